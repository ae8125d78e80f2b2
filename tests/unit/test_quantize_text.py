"""Dynamic int8 text model: quantisation quality and determinism, the manifest record, which model is served."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from imgsearch.encoder.core import TEXT_THREADS_DEFAULT, Encoder, text_threads
from imgsearch.encoder.settings import EncoderSettings
from imgsearch.kit.errors import FailedPrecondition
from imgsearch.models.manifest import MANIFEST_NAME, Int8Model, ModelManifest, QualityGate, file_sha256
from imgsearch.models.quantize import TEXT_RECIPE, int8_file_name, quantize_text_model
from imgsearch.models.runtime import (
    CPU,
    GraphOptimization,
    RuntimeOptions,
    TextModel,
    TextPrecision,
    choose_text_variant,
)

SENTENCES = (
    "a cat sleeping on a sofa",
    "two dogs playing fetch on the beach at sunset",
    "red car",
    "a man in a blue jacket riding a bicycle down a muddy forest trail",
    "espresso",
    "children splash in a fountain while their parents watch from a bench in the shade",
)


def _int8(sha: str, fp32_sha: str, gate: QualityGate | None = None) -> Int8Model:
    return Int8Model(
        file="t.int8.onnx",
        sha256=sha,
        fp32_sha256=fp32_sha,
        calibration="none",
        method={"recipe": TEXT_RECIPE},
        sources={"onnxruntime": "1"},
        gate=gate,
    )


def _manifest(gate: QualityGate | None = None, text_int8: bool = True) -> ModelManifest:
    return ModelManifest(
        image_model="efficientnet-lite0",
        image_file="m.onnx",
        image_sha256="a" * 64,
        image_size=224,
        feature_dim=1280,
        num_classes=1000,
        text_model="all-MiniLM-L6-v2",
        text_file="t.onnx",
        text_sha256="c" * 64,
        text_dim=384,
        text_max_tokens=256,
        tokenizer_file="tokenizer.json",
        labels_file="labels.json",
        opset=17,
        sources={"torch": "2"},
        image_int8=Int8Model("m.int8.onnx", "b" * 64, "a" * 64, "photos", {"recipe": "x"}),
        text_int8=_int8("d" * 64, "c" * 64, gate) if text_int8 else None,
    )


def _gate(passed: bool, sha: str = "d" * 64) -> QualityGate:
    return QualityGate(passed=passed, int8_sha256=sha, metrics={"flickr8k_t2i_r10_int8": 67.0}, command="gate")


# The manifest record.


def test_manifest_round_trip_with_text_int8_and_gate(tmp_path: Path) -> None:
    m = _manifest(_gate(True))
    m.save(tmp_path)
    assert ModelManifest.load(tmp_path) == m
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert "text_variant" not in raw and raw["text_int8"]["gate"]["passed"] is True
    assert raw["text_int8"]["fp32_sha256"] == "c" * 64


def test_manifest_from_before_the_text_int8_model_loads(tmp_path: Path) -> None:
    raw = _manifest(text_int8=False).to_dict()
    assert "text_int8" not in raw
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(raw))
    loaded = ModelManifest.load(tmp_path)
    assert loaded.text_int8 is None and loaded.text_variant == "fp32"
    assert loaded.text_version == "all-MiniLM-L6-v2@cccccccccccc"
    assert not loaded.text_int8_intact(tmp_path)
    with pytest.raises(FileNotFoundError):
        loaded.serving_text("int8")


def test_int8_text_view_has_its_own_version_and_file() -> None:
    m = _manifest(_gate(True))
    view = m.serving_text("int8")
    assert view.text_file == "t.int8.onnx" and view.text_sha256 == "d" * 64 and view.text_variant == "int8"
    # Differs from fp32, so the tagger re-embeds its vocabulary on a switch; same model name before '@'.
    assert view.text_version == "all-MiniLM-L6-v2@cccccccccccc+int8.dddddddd"
    assert view.text_version != m.text_version and view.text_version.split("@")[0] == m.text_model
    assert m.serving_text("fp32") is m
    # The image and text views compose: each replaces only its own fields.
    both = m.serving("int8").serving_text("int8")
    assert both.image_version.endswith("+int8.bbbbbbbb") and both.text_version == view.text_version
    with pytest.raises(ValueError):
        view.save(Path("/nonexistent"))


def test_text_gate_counts_only_for_the_file_it_measured() -> None:
    def passed(m: ModelManifest) -> bool:
        assert m.text_int8 is not None
        return m.text_int8.gate_passed

    assert passed(_manifest(_gate(True)))
    assert not passed(_manifest(_gate(False)))
    assert not passed(_manifest(_gate(True, sha="e" * 64)))
    assert not passed(_manifest(None))


# Which variant is served (pure).


@pytest.mark.parametrize(
    ("precision", "gate", "on_gpu", "want"),
    [
        ("auto", _gate(True), False, "int8"),
        ("auto", _gate(False), False, "fp32"),
        ("auto", None, False, "fp32"),
        ("auto", _gate(True, sha="e" * 64), False, "fp32"),  # the gate measured another file
        ("auto", _gate(True), True, "fp32"),
        ("fp32", _gate(True), False, "fp32"),
        ("int8", _gate(False), False, "int8"),
        ("int8", None, False, "int8"),
        ("int8", _gate(True), True, "int8"),
    ],
)
def test_text_precision_setting_picks_the_variant(
    precision: TextPrecision, gate: QualityGate | None, on_gpu: bool, want: str
) -> None:
    choice = choose_text_variant(precision, _manifest(gate), on_gpu=on_gpu, int8_intact=True)
    assert choice.variant == want and choice.reason


def test_auto_without_an_intact_text_int8_serves_fp32_and_forced_int8_refuses() -> None:
    assert choose_text_variant("auto", _manifest(_gate(True)), False, int8_intact=False).variant == "fp32"
    assert choose_text_variant("auto", _manifest(text_int8=False), False, int8_intact=False).variant == "fp32"
    with pytest.raises(FailedPrecondition, match="int8 text model"):
        choose_text_variant("int8", _manifest(text_int8=False), False, int8_intact=False)
    with pytest.raises(FailedPrecondition, match="int8 text model"):
        choose_text_variant("int8", _manifest(_gate(True)), False, int8_intact=False)


def test_text_session_threads(model_dir: Path) -> None:
    def settings(**kw: int) -> EncoderSettings:
        return EncoderSettings(model_dir=model_dir, providers=(CPU,), **kw)  # type: ignore[arg-type]

    assert text_threads(settings(), on_gpu=False) == TEXT_THREADS_DEFAULT
    assert text_threads(settings(intra_op_threads=3), on_gpu=False) == 3
    assert text_threads(settings(intra_op_threads=3, text_threads=2), on_gpu=False) == 2
    assert text_threads(settings(), on_gpu=True) == 0


# Real quantisation of the exported text model (no ../shared).


@pytest.fixture(scope="module")
def quantised(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The exported models linked in, plus a freshly quantised int8 text model (no text gate yet)."""
    out = tmp_path_factory.mktemp("text-int8-models")
    m = ModelManifest.load(model_dir)
    for p in model_dir.iterdir():
        if p.name != MANIFEST_NAME and not p.name.startswith(m.text_file.removesuffix(".onnx") + ".int8"):
            (out / p.name).symlink_to(p.resolve())
    name = int8_file_name(m.text_file)
    method = quantize_text_model(model_dir / m.text_file, out / name)
    calibration = str(method.pop("calibration"))
    q = Int8Model(name, file_sha256(out / name), m.text_sha256, calibration, method)
    replace(m, text_int8=q).save(out)
    return out


def test_text_quantisation_is_deterministic(quantised: Path, model_dir: Path, tmp_path: Path) -> None:
    m = ModelManifest.load(quantised)
    assert m.text_int8 is not None
    again = quantize_text_model(model_dir / m.text_file, tmp_path / "again.onnx")
    assert again["recipe"] == TEXT_RECIPE
    assert file_sha256(tmp_path / "again.onnx") == m.text_int8.sha256


# "all" fuses MatMulInteger + Cast + Mul into MatMulIntegerToFloat, which once read the per-token scale wrongly.
@pytest.mark.parametrize("level", ["basic", "all"])
def test_int8_text_embeddings_stay_close_to_fp32(quantised: Path, level: GraphOptimization) -> None:
    m = ModelManifest.load(quantised)
    options = RuntimeOptions(providers=(CPU,), graph_optimization=level)
    fp32 = TextModel(quantised, options, manifest=m)
    int8 = TextModel(quantised, options, manifest=m.serving_text("int8"))
    assert int8.variant == "int8" and int8.version != fp32.version
    a, b = fp32.run(SENTENCES), int8.run(SENTENCES)
    assert b.shape == (len(SENTENCES), 384) and np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-4)
    cos = (a * b).sum(1)
    assert cos.min() >= 0.97, cos
    # Retrieval order survives: each sentence is still nearest to its own fp32 embedding.
    assert ((b @ a.T).argmax(1) == np.arange(len(SENTENCES))).all()


def test_int8_text_embedding_does_not_depend_on_its_batch(quantised: Path) -> None:
    """Per-token ranges: a query gets the same vector alone, padded in a batch, or beside other texts."""
    m = ModelManifest.load(quantised)
    int8 = TextModel(quantised, RuntimeOptions(providers=(CPU,)), manifest=m.serving_text("int8"))
    batched = int8.run(SENTENCES)
    alone = np.stack([int8.run([t])[0] for t in SENTENCES])
    reversed_ = int8.run(SENTENCES[::-1])[::-1]
    assert (alone * batched).sum(1).min() >= 0.9999
    assert (reversed_ * batched).sum(1).min() >= 0.9999


def _with_text_gate(model_dir: Path, passed: bool | None, dest: Path) -> Path:
    dest.mkdir()
    for p in model_dir.iterdir():
        if p.name != MANIFEST_NAME:
            (dest / p.name).symlink_to(p.resolve())
    m = ModelManifest.load(model_dir)
    assert m.text_int8 is not None
    gate = None if passed is None else _gate(passed, m.text_int8.sha256)
    replace(m, text_int8=replace(m.text_int8, gate=gate)).save(dest)
    return dest


@pytest.mark.parametrize(
    ("precision", "passed", "want"),
    [("auto", True, "int8"), ("auto", None, "fp32"), ("fp32", True, "fp32"), ("int8", False, "int8")],
)
async def test_encoder_serves_the_chosen_text_model_and_says_so(
    quantised: Path, tmp_path: Path, precision: TextPrecision, passed: bool | None, want: str
) -> None:
    model_dir = _with_text_gate(quantised, passed, tmp_path / "models")
    settings = EncoderSettings(model_dir=model_dir, providers=(CPU,), text_precision=precision, image_workers=1)
    encoder = await asyncio.to_thread(Encoder, settings)
    try:
        m = ModelManifest.load(model_dir)
        info = encoder.info()
        assert encoder.text_model.variant == want
        assert encoder.manifest.text_file == (m.text_file if want == "fp32" else int8_file_name(m.text_file))
        assert info.text_model == "all-MiniLM-L6-v2"
        assert ("+int8." in info.text_model_version) == (want == "int8")
        assert info.text_model_version == encoder.manifest.text_version
        assert encoder.text_model.plan.intra_op_threads == TEXT_THREADS_DEFAULT
        # The image side is chosen on its own: the text choice leaves its version alone.
        assert info.image_model_version == encoder.image_model.version
        await asyncio.to_thread(encoder.warm_up)
        (emb,) = await encoder.encode_texts(["a photo of a cat"])
        assert isinstance(emb, np.ndarray) and emb.shape == (384,)
    finally:
        await encoder.close()


def test_exported_models_record_the_text_int8_model(model_dir: Path) -> None:
    m = ModelManifest.load(model_dir)
    if m.text_int8 is None:
        pytest.skip("models exported without int8 (--no-int8)")
    assert m.text_int8_intact(model_dir)
    assert m.text_int8.method["recipe"] == TEXT_RECIPE and m.text_int8.method["per_channel"] is True
    assert (model_dir / m.text_int8.file).stat().st_size < (model_dir / m.text_file).stat().st_size / 3
