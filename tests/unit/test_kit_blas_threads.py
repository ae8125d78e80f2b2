"""kit.server.limit_blas_threads: every BLAS loaded in the process (numpy's, FAISS's) runs the threads asked for."""

from __future__ import annotations

import faiss  # noqa: F401 - loads FAISS's own BLAS next to numpy's
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits  # type: ignore[import-untyped]

from imgsearch.kit.server import limit_blas_threads
from imgsearch.kit.settings import ServerSettings


def blas_threads() -> list[int]:
    return [int(pool["num_threads"]) for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_servers_default_to_one_blas_thread_and_every_blas_follows() -> None:
    assert ServerSettings().blas_threads == 1
    with threadpool_limits(limits=None):  # restores the test process's own limits afterwards
        limit_blas_threads(1)
        assert blas_threads() and set(blas_threads()) == {1}
        a = np.random.default_rng(0).standard_normal((64, 64))
        assert np.allclose(a @ np.eye(64), a)


def test_zero_leaves_the_libraries_alone() -> None:
    before = blas_threads()
    limit_blas_threads(0)
    assert blas_threads() == before
