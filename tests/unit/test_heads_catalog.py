"""Head catalog: several versions of one head installed side by side, as an upgrade ships them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgsearch.heads.catalog import HeadCatalog, head_id
from tests.fakes import CLASSES, TEXT_DIM, make_info, write_linear_head


def _catalog(heads_dir: Path) -> HeadCatalog:
    classes = np.random.default_rng(3).standard_normal((CLASSES, TEXT_DIM)).astype(np.float32)
    return HeadCatalog.load(make_info(), classes / np.linalg.norm(classes, axis=1, keepdims=True), heads_dir)


def test_a_kept_previous_version_still_serves_and_the_name_means_the_shipped_file(tmp_path: Path) -> None:
    # The upgrade layout: the new version under the head's own file name, the previous one kept beside it.
    write_linear_head(tmp_path, "default", seed=1, version="5")
    write_linear_head(tmp_path, "default", seed=2, version="4", stem="default-v4")
    catalog = _catalog(tmp_path)
    assert {"default@4", "default@5"} <= set(catalog.heads)
    # A cluster whose shards say default@4 is active keeps finding it; a new one starts on default@5.
    assert head_id(catalog.get("default@4")) == "default@4"
    assert head_id(catalog.default("default")) == "default@5"
    assert head_id(catalog.resolve("default-v4")) == "default@4"


def test_a_bare_name_picks_the_numerically_newest_version(tmp_path: Path) -> None:
    write_linear_head(tmp_path, "lin", seed=1, version="9", stem="lin-old")
    write_linear_head(tmp_path, "lin", seed=2, version="10", stem="lin-new")
    assert head_id(_catalog(tmp_path).resolve("lin")) == "lin@10"
