"""Tagger core on the real exported models: ConSE ranking, live vocabulary, durability, heads."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from imgsearch.encoder.core import Encoder, ImageEncoding, ImageItem
from imgsearch.encoder.settings import EncoderSettings
from imgsearch.heads import ConSEHead, l2_normalise, save_head
from imgsearch.kit.convert import Matrix
from imgsearch.kit.errors import FailedPrecondition, ImgsearchError, InvalidArgument, NotFound, ResourceExhausted
from imgsearch.models.manifest import ModelInfo
from imgsearch.tagger.core import Tagger, starter_vocabulary
from imgsearch.tagger.settings import TaggerSettings


class InProcessEncoder:
    """The real encoder core as the tagger's text source, without the gRPC hop."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.text_calls = 0

    async def model_info(self, timeout: float) -> ModelInfo:
        return self.encoder.info()

    async def encode_texts(self, texts: Sequence[str], timeout: float) -> list[Matrix | ImgsearchError]:
        self.text_calls += 1
        return list(await self.encoder.encode_texts(texts))

    async def image(self, data: bytes) -> tuple[Matrix, Matrix]:
        (enc,) = await self.encoder.encode_images([ImageItem(data, "test")])
        assert isinstance(enc, ImageEncoding)
        return enc.features, enc.logits


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def source(model_dir: Path) -> AsyncIterator[InProcessEncoder]:
    encoder = await asyncio.to_thread(Encoder, EncoderSettings(model_dir=model_dir))
    yield InProcessEncoder(encoder)
    await encoder.close()


def settings(tmp: Path, **kw: object) -> TaggerSettings:
    return TaggerSettings(encoder_address="in-process", data_dir=tmp / "tagger", heads_dir=tmp / "heads", **kw)  # type: ignore[arg-type]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def seeded(tmp_path_factory: pytest.TempPathFactory, source: InProcessEncoder) -> Path:
    """A vocabulary database seeded once; embedding ~1200 starter tags per test would dominate the run."""
    root = tmp_path_factory.mktemp("seeded")
    t = Tagger(settings(root), source)
    await t.start()
    t.close()
    return root / "tagger"


@pytest_asyncio.fixture(loop_scope="session")
async def tagger(tmp_path: Path, source: InProcessEncoder, seeded: Path) -> AsyncIterator[Tagger]:
    shutil.copytree(seeded, tmp_path / "tagger")
    t = Tagger(settings(tmp_path), source)
    await t.start()
    yield t
    t.close()


def names(ranked: Sequence[object]) -> list[str]:
    return [r.tag for r in ranked]  # type: ignore[attr-defined]


async def test_conse_ranks_cat_and_an_unseen_tag_without_restart(
    tagger: Tagger, source: InProcessEncoder, sample_photos: dict[str, bytes]
) -> None:
    features, logits = await source.image(sample_photos["cat"])
    ranked, head, size = tagger.rank(features, logits, 10, "all")
    assert head == "conse@1"
    assert "cat" in names(ranked[:3]), names(ranked)
    assert "feline" not in names(ranked)
    [change] = await tagger.add_tags(["feline"])
    assert change.changed and change.error is None
    ranked, _, size_after = tagger.rank(features, logits, 5, "all")
    assert size_after == size + 1
    assert "feline" in names(ranked), names(ranked)
    feline = next(r for r in ranked if r.tag == "feline")
    assert feline.seen is False
    unseen, _, _ = tagger.rank(features, logits, 3, "unseen")
    assert names(unseen) == ["feline"]


async def test_ranking_matches_a_per_tag_loop(
    tagger: Tagger, source: InProcessEncoder, sample_photos: dict[str, bytes]
) -> None:
    features, logits = await source.image(sample_photos["coffee"])
    ranked, _, _ = tagger.rank(features, logits, 20, "all")
    state = tagger.state
    direction = state.head.tag_direction(features[None, :], logits[None, :])[0]
    # Ground truth computed tag by tag, independently of the vectorised ranking.
    scores = [float(np.dot(state.projected[i], direction) + state.bias[i]) for i in range(state.size)]
    expected = [state.names[i] for i in np.argsort(scores)[::-1][:20]]
    assert names(ranked) == expected
    assert [r.score for r in ranked] == pytest.approx(sorted(scores, reverse=True)[:20], abs=1e-5)
    assert "espresso" in names(ranked[:3])


async def test_vocabulary_is_durable_and_seeded_once(tmp_path: Path, source: InProcessEncoder) -> None:
    t = Tagger(settings(tmp_path), source)
    await t.start()
    starter = t.state.size
    info = await source.model_info(1)
    assert starter == len(starter_vocabulary(info.class_labels))
    await t.add_tags(["beach party", "Crowd of fans"])
    await t.remove_tags(["tabby cat"])
    t.close()

    calls = source.text_calls
    again = Tagger(settings(tmp_path), source)
    await again.start()
    try:
        assert source.text_calls == calls, "a restart must reuse stored embeddings, not re-embed"
        keys = set(again.state.keys)
        assert {"beach party", "crowd of fans"} <= keys
        assert "tabby cat" not in keys, "a removed starter tag must stay removed after a restart"
        assert again.state.size == starter + 2 - 1
        listed, _, _ = again.list_tags("unseen", 100, "")
        assert sorted(t.name for t in listed) == ["Crowd of fans", "beach party"]
    finally:
        again.close()


async def test_bad_tags_fail_alone(tagger: Tagger) -> None:
    results = await tagger.add_tags(["  ", "x" * 101, "cat", "new\x00tag", "  sailing   boat ", "Sailing Boat"])
    assert isinstance(results[0].error, InvalidArgument)
    assert isinstance(results[1].error, InvalidArgument) and "limit is 100" in results[1].error.message
    assert results[2].error is None and not results[2].changed  # already a starter tag
    assert isinstance(results[3].error, InvalidArgument)
    assert results[4].tag == "sailing boat" and results[4].changed
    assert results[5].error is None and not results[5].changed  # same tag, other case
    removed = await tagger.remove_tags(["sailing boat", "no such tag"])
    assert removed[0].changed
    assert isinstance(removed[1].error, NotFound)
    with pytest.raises(InvalidArgument):
        await tagger.add_tags([])
    with pytest.raises(ResourceExhausted):
        await tagger.add_tags(["t"] * 1001)


async def test_top_k_limits(tagger: Tagger, source: InProcessEncoder, sample_photos: dict[str, bytes]) -> None:
    features, logits = await source.image(sample_photos["rocket"])
    for k in (0, 1001):
        with pytest.raises(InvalidArgument, match="top_k must be between 1 and 1000"):
            tagger.rank(features, logits, k, "all")
    with pytest.raises(InvalidArgument, match="features"):
        tagger.rank(features[:10], logits, 5, "all")


async def test_list_tags_pages_cover_everything_once(tagger: Tagger) -> None:
    seen: list[str] = []
    token = ""
    while True:
        page, token, total = tagger.list_tags("all", 97, token)
        seen.extend(t.name.casefold() for t in page)
        if not token:
            break
    assert len(seen) == total == tagger.state.size
    assert len(set(seen)) == len(seen)
    with pytest.raises(InvalidArgument):
        tagger.list_tags("all", 10, "%%%not-a-token")


def _write_linear_head(path: Path, image_model: str, rng: np.random.Generator, conse_weight: float = 0.0) -> Matrix:
    w = rng.standard_normal((1280, 384)).astype(np.float32) * 0.05
    save_head(
        path,
        {
            "name": "testlinear",
            "version": "7",
            "kind": "linear",
            "image_model": image_model,
            "text_model": "all-MiniLM-L6-v2",
            "feature_dim": 1280,
            "text_dim": 384,
            "feature_norm": "l2",
            "image_layers": [{"weight": "w0", "bias": "b0", "activation": "none"}],
            "conse_weight": conse_weight,
            "metrics": {"t2i_r10": 0.5},
        },
        {"w0": w, "b0": np.zeros(384, dtype=np.float32)},
    )
    return w


async def test_heads_switch_at_run_time(
    tagger: Tagger, source: InProcessEncoder, sample_photos: dict[str, bytes], tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    info = await source.model_info(1)
    path = tmp_path / "testlinear.npz"
    w = _write_linear_head(path, info.image_model_version, rng)
    features, _logits = await source.image(sample_photos["astronaut"])
    before = tagger.state
    head, previous = await tagger.activate_head(str(path))
    assert previous == "conse@1" and f"{head.name}@{head.version}" == "testlinear@7"
    vec, hid = tagger.project_images(features[None, :], None)
    assert hid == "testlinear@7"
    expected = l2_normalise((l2_normalise(features[None, :]) @ w).astype(np.float32))
    np.testing.assert_allclose(vec, expected, atol=1e-5)
    # A request that took its snapshot before the switch still ranks on the old head.
    assert before.head_id == "conse@1"
    heads, active = tagger.list_heads()
    assert active == "testlinear@7" and {"conse@1", "testlinear@7"} <= {f"{h.name}@{h.version}" for h in heads}
    await tagger.activate_head("conse")
    assert tagger.state.head_id == "conse@1"


async def test_head_of_another_encoder_is_refused(tagger: Tagger, tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    _write_linear_head(path, "efficientnet-lite2@0123456789ab", np.random.default_rng(0))
    with pytest.raises(FailedPrecondition, match="trained on"):
        await tagger.activate_head(str(path))
    with pytest.raises(NotFound):
        await tagger.activate_head("no-such-head")
    assert tagger.state.head_id == "conse@1"


def test_conse_is_a_convex_combination() -> None:
    rng = np.random.default_rng(1)
    classes = l2_normalise(rng.standard_normal((6, 4)).astype(np.float32))
    head = ConSEHead(classes, top_t=2, anchor_penalty=0.0)
    logits = np.log(np.array([[0.5, 0.3, 0.1, 0.05, 0.03, 0.02]], dtype=np.float32))
    out = head.project_images(np.zeros((1, 3), dtype=np.float32), logits)
    # By hand: weights 0.5/0.8 and 0.3/0.8 on the two most probable classes.
    expected = (0.5 / 0.8) * classes[0] + (0.3 / 0.8) * classes[1]
    np.testing.assert_allclose(out[0], expected / np.linalg.norm(expected), atol=1e-6)
    with pytest.raises(InvalidArgument):
        head.project_images(np.zeros((1, 3), dtype=np.float32), None)


def test_tag_gate_blends_per_image_by_in_domain_score(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    classes = l2_normalise(rng.standard_normal((20, 384)).astype(np.float32))
    conse = ConSEHead(classes, top_t=3, anchor_penalty=0.0, image_model="efficientnet-lite0@abc")
    w = (rng.standard_normal((1280, 384)) * 0.05).astype(np.float32)
    features = rng.standard_normal((2, 1280)).astype(np.float32)
    learned = l2_normalise(l2_normalise(features) @ w)
    # Bank: the first image's own direction (score 1.0, in domain) and a vector orthogonal-ish to both.
    bank = np.stack([learned[0], l2_normalise(rng.standard_normal(384).astype(np.float32))])
    path = tmp_path / "gated.npz"
    save_head(
        path,
        {
            "name": "gated",
            "version": "1",
            "image_model": "efficientnet-lite0@abc",
            "feature_dim": 1280,
            "text_dim": 384,
            "feature_norm": "l2",
            "image_layers": [{"weight": "w", "bias": "b", "activation": "none"}],
            "conse_weight": 0.0,
            "tag_gate": {"bank": "bank", "k": 1, "low": 0.2, "high": 0.9, "weight_out": 0.6, "weight_in": 0.1},
        },
        {"w": w, "b": np.zeros(384, dtype=np.float32), "bank": bank},
    )
    from imgsearch.heads import load_head

    head = load_head(path, image_model="efficientnet-lite0@abc", feature_dim=1280, text_dim=384, conse=conse)
    assert head.needs_logits and head.tag_gate is not None
    logits = rng.standard_normal((2, 20)).astype(np.float32)
    scores = head.tag_gate.scores(learned)
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    # By hand: the ramp maps score s to 0.6 + clip((s - 0.2) / 0.7, 0, 1) * (0.1 - 0.6).
    expected_w = [0.6 + min(max((s - 0.2) / 0.7, 0.0), 1.0) * (0.1 - 0.6) for s in scores]
    assert expected_w[0] == pytest.approx(0.1)
    cdir = conse.project_images(features, logits)
    direction = head.tag_direction(features, logits)
    for i in range(2):
        manual = expected_w[i] * cdir[i] + (1 - expected_w[i]) * learned[i]
        np.testing.assert_allclose(direction[i], manual / np.linalg.norm(manual), atol=1e-5)
    # The search space is untouched by the gate.
    np.testing.assert_allclose(head.project_images(features, logits), learned, atol=1e-6)
