"""Tagger core on the real exported models: ranking under a requested head, live vocabulary, durability."""

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
from imgsearch.kit.errors import ImgsearchError, InvalidArgument, NotFound, ResourceExhausted
from imgsearch.models.manifest import ModelInfo
from imgsearch.tagger.core import VocabularyWriter, starter_vocabulary
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
    t = VocabularyWriter(settings(root), source)
    await t.start()
    await t.close()
    return root / "tagger"


@pytest_asyncio.fixture(loop_scope="session")
async def tagger(tmp_path: Path, source: InProcessEncoder, seeded: Path) -> AsyncIterator[VocabularyWriter]:
    shutil.copytree(seeded, tmp_path / "tagger")
    t = VocabularyWriter(settings(tmp_path), source)
    await t.start()
    yield t
    await t.close()


def names(ranked: Sequence[object]) -> list[str]:
    return [r.tag for r in ranked]  # type: ignore[attr-defined]


async def test_conse_ranks_cat_and_an_unseen_tag_without_restart(
    tagger: VocabularyWriter, source: InProcessEncoder, sample_photos: dict[str, bytes]
) -> None:
    features, logits = await source.image(sample_photos["cat"])
    r = tagger.rank(features, logits, 10, "all")
    assert r.head == "conse@1"
    assert "cat" in names(r.tags[:3]), names(r.tags)
    assert "feline" not in names(r.tags)
    changes = await tagger.add_tags(["feline"])
    [change] = changes.results
    assert change.changed and change.error is None
    assert changes.version == r.vocabulary_version + 1
    after = tagger.rank(features, logits, 5, "all")
    assert after.vocabulary_size == r.vocabulary_size + 1 and after.vocabulary_version == changes.version
    assert "feline" in names(after.tags), names(after.tags)
    feline = next(t for t in after.tags if t.tag == "feline")
    assert feline.seen is False
    unseen = tagger.rank(features, logits, 3, "unseen")
    assert names(unseen.tags) == ["feline"]


async def test_ranking_matches_a_per_tag_loop(
    tagger: VocabularyWriter, source: InProcessEncoder, sample_photos: dict[str, bytes]
) -> None:
    features, logits = await source.image(sample_photos["coffee"])
    ranked = tagger.rank(features, logits, 20, "all").tags
    vocab = tagger.vocabulary
    head = tagger.default_head
    direction = head.tag_direction(features[None, :], logits[None, :])[0]
    # Ground truth computed tag by tag from the raw embeddings, independently of the cached projection.
    scores = []
    for i in range(vocab.size):
        projected = head.project_texts(vocab.raw[i : i + 1])
        scores.append(float(projected[0] @ direction + head.tag_bias(projected)[0]))
    expected = [vocab.names[i] for i in np.argsort(scores)[::-1][:20]]
    assert names(ranked) == expected
    assert [r.score for r in ranked] == pytest.approx(sorted(scores, reverse=True)[:20], abs=1e-5)
    assert "espresso" in names(ranked[:3])


async def test_vocabulary_and_its_version_are_durable_and_seeded_once(tmp_path: Path, source: InProcessEncoder) -> None:
    t = VocabularyWriter(settings(tmp_path), source)
    await t.start()
    starter = t.vocabulary.size
    info = await source.model_info(1)
    assert starter == len(starter_vocabulary(info.class_labels))
    assert t.vocabulary.version == 1, "seeding is the first version"
    added = await t.add_tags(["beach party", "Crowd of fans"])
    removed = await t.remove_tags(["tabby cat"])
    assert (added.version, removed.version) == (2, 3)
    unchanged = await t.add_tags(["beach party"])
    assert unchanged.version == 3, "a call that changes nothing does not bump the version"
    await t.close()

    calls = source.text_calls
    again = VocabularyWriter(settings(tmp_path), source)
    await again.start()
    try:
        assert source.text_calls == calls, "a restart must reuse stored embeddings, not re-embed"
        assert again.vocabulary.version == 3, "the version survives a restart"
        keys = set(again.vocabulary.keys)
        assert {"beach party", "crowd of fans"} <= keys
        assert "tabby cat" not in keys, "a removed starter tag must stay removed after a restart"
        assert again.vocabulary.size == starter + 2 - 1
        listed = again.list_tags("unseen", 100, "")
        assert sorted(t.name for t in listed.tags) == ["Crowd of fans", "beach party"]
        assert listed.vocabulary_version == 3
        assert (await again.add_tags(["kite surfing lessons"])).version == 4
    finally:
        await again.close()


async def test_bad_tags_fail_alone(tagger: VocabularyWriter) -> None:
    results = (
        await tagger.add_tags(["  ", "x" * 101, "cat", "new\x00tag", "  sailing   boat ", "Sailing Boat"])
    ).results
    assert isinstance(results[0].error, InvalidArgument)
    assert isinstance(results[1].error, InvalidArgument) and "limit is 100" in results[1].error.message
    assert results[2].error is None and not results[2].changed  # already a starter tag
    assert isinstance(results[3].error, InvalidArgument)
    assert results[4].tag == "sailing boat" and results[4].changed
    assert results[5].error is None and not results[5].changed  # same tag, other case
    removed = (await tagger.remove_tags(["sailing boat", "no such tag"])).results
    assert removed[0].changed
    assert isinstance(removed[1].error, NotFound)
    with pytest.raises(InvalidArgument):
        await tagger.add_tags([])
    with pytest.raises(ResourceExhausted):
        await tagger.add_tags(["t"] * 1001)


async def test_top_k_may_cover_the_whole_vocabulary(
    tagger: VocabularyWriter, source: InProcessEncoder, sample_photos: dict[str, bytes]
) -> None:
    features, logits = await source.image(sample_photos["rocket"])
    with pytest.raises(InvalidArgument, match="top_k must be at least 1"):
        tagger.rank(features, logits, 0, "all")
    size = tagger.vocabulary.size
    assert size > 1000
    everything = tagger.rank(features, logits, size, "all")
    assert len(everything.tags) == size
    assert len({t.tag for t in everything.tags}) == size
    assert len(tagger.rank(features, logits, 10 * size, "all").tags) == size
    with pytest.raises(InvalidArgument, match="features"):
        tagger.rank(features[:10], logits, 5, "all")


async def test_list_tags_pages_cover_everything_once(tagger: VocabularyWriter) -> None:
    seen: list[str] = []
    token = ""
    while True:
        page = tagger.list_tags("all", 97, token)
        seen.extend(t.name.casefold() for t in page.tags)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == page.total == tagger.vocabulary.size
    assert len(set(seen)) == len(seen)
    with pytest.raises(InvalidArgument):
        tagger.list_tags("all", 10, "%%%not-a-token")


def _write_linear_head(
    path: Path, image_model: str, rng: np.random.Generator, conse_weight: float = 0.0, name: str = "testlinear"
) -> Matrix:
    w = rng.standard_normal((1280, 384)).astype(np.float32) * 0.05
    save_head(
        path,
        {
            "name": name,
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


async def test_ranks_under_the_requested_head(
    tmp_path: Path, seeded: Path, source: InProcessEncoder, sample_photos: dict[str, bytes]
) -> None:
    info = await source.model_info(1)
    w = _write_linear_head(tmp_path / "heads" / "mine.npz", info.image_model_version, np.random.default_rng(3))
    # Trained on another image model: skipped at load, so it cannot be requested.
    _write_linear_head(
        tmp_path / "heads" / "other.npz", "efficientnet-lite2@0123456789ab", np.random.default_rng(0), name="other"
    )
    shutil.copytree(seeded, tmp_path / "tagger")
    t = VocabularyWriter(settings(tmp_path), source)
    await t.start()
    try:
        features, logits = await source.image(sample_photos["astronaut"])
        default = t.rank(features, logits, 10, "all")
        assert default.head == "conse@1", "no heads/default.npz: the default falls back to ConSE"
        for spec in ("testlinear@7", "testlinear", "mine"):
            r = t.rank(features, logits, 10, "all", head=spec)
            assert r.head == "testlinear@7"
        # By hand: a linear head without text layers scores l2(tag) . l2(l2(features) @ w).
        direction = l2_normalise((l2_normalise(features[None, :]) @ w).astype(np.float32))[0]
        vocab = t.vocabulary
        scores = l2_normalise(vocab.raw) @ direction
        expected = [vocab.names[i] for i in np.argsort(-scores)[:10]]
        assert names(r.tags) == expected
        assert set(vocab.views) == {"conse@1", "testlinear@7"}, "one cached projection per head used"
        # Both cached projections follow an add without being rebuilt from scratch.
        version = (await t.add_tags(["moon walk"])).version
        assert set(t.vocabulary.views) == {"conse@1", "testlinear@7"}
        r = t.rank(features, logits, t.vocabulary.size, "unseen", head="testlinear")
        assert names(r.tags) == ["moon walk"] and r.vocabulary_version == version
        fresh = l2_normalise(t.vocabulary.raw[-1:]) @ direction
        assert r.tags[0].score == pytest.approx(float(fresh[0]), abs=1e-5)
        with pytest.raises(NotFound, match="available: conse@1, testlinear@7"):
            t.rank(features, logits, 5, "all", head="other")
        with pytest.raises(InvalidArgument, match="file path"):
            t.rank(features, logits, 5, "all", head=str(tmp_path / "heads" / "mine.npz"))
        heads, default_id = t.list_heads()
        assert default_id == "conse@1" and [f"{h.name}@{h.version}" for h in heads] == ["conse@1", "testlinear@7"]
    finally:
        await t.close()


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
