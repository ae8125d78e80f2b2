"""Gateway search options over in-memory shards: filters, min score, paging, batched queries, shard budgets."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from imgsearch.gateway.core import Gateway, NewImage, SearchResult
from imgsearch.gateway.search import Rocchio, SearchOptions, filter_terms, rocchio
from imgsearch.kit.errors import ImgsearchError, InvalidArgument, NotFound
from tests.fakes import (
    FakeEncoder,
    FakeRecord,
    FakeShard,
    FakeTagger,
    close_gateway,
    make_catalog,
    make_settings,
    stream,
    text_embedding,
)

TIMEOUT = 2.0
N = 30


@dataclass
class Cluster:
    gw: Gateway
    shards: list[FakeShard]

    def records(self) -> list[FakeRecord]:
        return [r for s in self.shards for r in s.records.values()]

    def expected(self, text: str, keep: object = None) -> list[tuple[str, float]]:
        """Every stored image in (score desc, id asc) order for a text query, by numpy over the shards."""
        head = self.gw.heads.active()
        query = head.project_texts(text_embedding(text)[None, :])[0].astype(np.float64)
        scored = [
            (r.id, float(r.semantics[self.gw.heads.current().active].astype(np.float64) @ query))
            for r in self.records()
            if keep is None or keep(r)  # type: ignore[operator]
        ]
        return sorted(scored, key=lambda t: (-t[1], t[0]))


@pytest.fixture()
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    catalog = make_catalog(tmp_path)
    shards = [FakeShard(f"index-{i}") for i in range(3)]
    gw = Gateway(make_settings(tmp_path, shards), FakeEncoder(catalog.info), FakeTagger(), shards)
    await gw.start(catalog=catalog)
    images = [
        NewImage(f"img-{i:02d}", f"pixels {i}".encode(), {"album": "a" if i % 3 == 0 else "b"}, "") for i in range(N)
    ]
    results = await gw.add_images(stream(images), lambda: TIMEOUT)
    assert all(r.error is None for r in results)
    try:
        yield Cluster(gw, shards)
    finally:
        assert await close_gateway(gw)


def ids(result: SearchResult) -> list[str]:
    return [h.id for h in result.hits]


async def test_a_filter_returns_only_matching_images_and_still_k_of_them(cluster: Cluster) -> None:
    options = SearchOptions(filter=filter_terms([("album", ["a"])]))
    result = await cluster.gw.search_by_text("a red boat", 5, TIMEOUT, options)
    want = cluster.expected("a red boat", lambda r: r.metadata["album"] == "a")
    assert ids(result) == [i for i, _ in want[:5]]
    assert all(h.metadata["album"] == "a" for h in result.hits)


async def test_a_filter_matching_nothing_is_an_empty_answer(cluster: Cluster) -> None:
    options = SearchOptions(filter=filter_terms([("album", ["no-such-album"])]))
    result = await cluster.gw.search_by_text("a red boat", 5, TIMEOUT, options)
    assert result.hits == [] and not result.partial and result.next_page_token == ""


async def test_in_terms_and_min_score(cluster: Cluster) -> None:
    everything = cluster.expected("two dogs")
    threshold = everything[len(everything) // 2][1]
    options = SearchOptions(filter=filter_terms([("album", ["a", "b"])]), min_score=threshold)
    result = await cluster.gw.search_by_text("two dogs", 100, TIMEOUT, options)
    assert ids(result) == [i for i, s in everything if s >= threshold]


async def test_pages_have_no_duplicates_and_no_gaps(cluster: Cluster) -> None:
    seen: list[str] = []
    token = ""
    for _ in range(20):
        page = await cluster.gw.search_by_text("a quiet lake", 4, TIMEOUT, SearchOptions(page_token=token))
        seen.extend(ids(page))
        token = page.next_page_token
        if not token:
            break
    assert seen == [i for i, _ in cluster.expected("a quiet lake")]


async def test_a_page_token_only_works_for_its_own_query(cluster: Cluster) -> None:
    first = await cluster.gw.search_by_text("a quiet lake", 4, TIMEOUT)
    with pytest.raises(InvalidArgument, match="another query"):
        await cluster.gw.search_by_text("a busy street", 4, TIMEOUT, SearchOptions(page_token=first.next_page_token))
    with pytest.raises(InvalidArgument, match="not one this service issued"):
        await cluster.gw.search_by_text("a quiet lake", 4, TIMEOUT, SearchOptions(page_token="garbage!"))


async def test_unset_k_means_ten(cluster: Cluster) -> None:
    assert len((await cluster.gw.search_by_text("a quiet lake", 0, TIMEOUT)).hits) == 10


async def test_several_queries_in_one_call_each_succeed_or_fail_alone(cluster: Cluster) -> None:
    results = await cluster.gw.search_by_texts(["a red boat", "   ", "two dogs"], 3, TIMEOUT)
    assert isinstance(results[1], InvalidArgument) and "query 1 is empty" in results[1].message
    for query, result in zip(["a red boat", "two dogs"], [results[0], results[2]], strict=True):
        assert not isinstance(result, ImgsearchError)
        assert ids(result) == [i for i, _ in cluster.expected(query)[:3]]
    with pytest.raises(InvalidArgument, match="page_token"):
        await cluster.gw.search_by_texts(["x"], 3, TIMEOUT, SearchOptions(page_token="abc"))


async def test_a_hung_shard_is_cut_off_within_its_share_of_the_deadline(cluster: Cluster) -> None:
    cluster.shards[1].search_delay = 30.0
    start = time.monotonic()
    # A 2 s deadline: the shard's share is 1.6 s, which leaves a loaded test machine 0.4 s for the rest.
    result = await cluster.gw.search_by_text("a quiet lake", 5, 2.0)
    elapsed = time.monotonic() - start
    assert result.partial and result.failed_shards == ["index-1"]
    assert elapsed < 2.0, f"the answer came after {elapsed:.2f}s, past the caller's deadline"
    others = {r.id for s in cluster.shards if s.name != "index-1" for r in s.records.values()}
    assert ids(result) == [i for i, _ in cluster.expected("a quiet lake", lambda r: r.id in others)[:5]]


async def test_bad_options_are_refused_before_any_work(cluster: Cluster) -> None:
    for options, words in [
        (SearchOptions(filter=(("", ("x",)),)), "empty metadata key"),
        (SearchOptions(created_after_ms=10, created_before_ms=5), "must be before"),
        (SearchOptions(min_score=float("nan")), "finite"),
    ]:
        with pytest.raises(InvalidArgument, match=words):
            await cluster.gw.search_by_text("a quiet lake", 5, TIMEOUT, options)


def test_rocchio_against_hand_computed_values() -> None:
    text = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    pos = [np.array([0.0, 1.0, 0.0], dtype=np.float32), np.array([0.0, 0.0, 1.0], dtype=np.float32)]
    neg = [np.array([1.0, 0.0, 0.0], dtype=np.float32)]
    # 1.0*[1,0,0] + 0.75*[0,.5,.5] - 0.15*[1,0,0] = [0.85, 0.375, 0.375]; norm = sqrt(0.7225 + 2*0.140625)
    q = rocchio(text, pos, neg, Rocchio())
    norm = (0.85**2 + 2 * 0.375**2) ** 0.5
    np.testing.assert_allclose(q, [0.85 / norm, 0.375 / norm, 0.375 / norm], rtol=1e-6)
    # Without text, positives only: the normalised mean.
    np.testing.assert_allclose(rocchio(None, pos, [], Rocchio()), [0.0, 2**-0.5, 2**-0.5], rtol=1e-6)
    with pytest.raises(InvalidArgument, match="cancel out"):
        rocchio(None, pos[:1], pos[:1], Rocchio(positive=1.0, negative=1.0))
    with pytest.raises(InvalidArgument, match="negative_weight"):
        Rocchio(negative=-1.0).check()


async def test_search_by_examples_moves_towards_positives_and_away_from_negatives(cluster: Cluster) -> None:
    records = {r.id: r for r in cluster.records()}
    pos, neg = ["img-01", "img-02"], ["img-03"]
    result = await cluster.gw.search_by_examples(pos, neg, "", 5, 0, TIMEOUT)
    q = rocchio(None, [records[i].visual for i in pos], [records[i].visual for i in neg], Rocchio())
    want = sorted(
        (
            (r.id, float(r.visual.astype(np.float64) @ q.astype(np.float64)))
            for r in records.values()
            if r.id not in pos + neg
        ),
        key=lambda t: (-t[1], t[0]),
    )[:5]
    assert ids(result) == [i for i, _ in want]
    np.testing.assert_allclose([h.score for h in result.hits], [s for _, s in want], atol=1e-5)
    # With text: the semantic space of the active head, the text's projection weighted in.
    head = cluster.gw.heads.current().active
    with_text = await cluster.gw.search_by_examples(pos, [], "a red boat", 3, 0, TIMEOUT)
    t = cluster.gw.heads.active().project_texts(text_embedding("a red boat")[None, :])[0]
    q2 = rocchio(t, [records[i].semantics[head] for i in pos], [], Rocchio())
    want2 = sorted(
        ((r.id, float(r.semantics[head] @ q2)) for r in records.values() if r.id not in pos),
        key=lambda x: (-x[1], x[0]),
    )[:3]
    assert with_text.head == head and ids(with_text) == [i for i, _ in want2]
    with pytest.raises(NotFound, match="ghost"):
        await cluster.gw.search_by_examples(["ghost"], [], "", 5, 0, TIMEOUT)
    with pytest.raises(InvalidArgument, match="at least one positive"):
        await cluster.gw.search_by_examples([], ["img-01"], "", 5, 0, TIMEOUT)


async def test_count_images_sums_the_shards_and_names_a_missing_one(cluster: Cluster) -> None:
    counts, failed = await cluster.gw.count_images(TIMEOUT)
    assert counts == {s.name: len(s.records) for s in cluster.shards} and sum(counts.values()) == N and failed == []
    cluster.shards[2].down = True
    counts, failed = await cluster.gw.count_images(TIMEOUT)
    assert failed == ["index-2"] and set(counts) == {"index-0", "index-1"}
