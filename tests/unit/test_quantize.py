"""Static int8 image model: quantisation quality, the manifest record, and which file the encoder serves."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from imgsearch.encoder.core import Encoder
from imgsearch.encoder.settings import EncoderSettings
from imgsearch.heads import ConSEHead, load_head
from imgsearch.kit.errors import FailedPrecondition
from imgsearch.models.imaging import ImageLimits, decode_image
from imgsearch.models.manifest import MANIFEST_NAME, Int8Model, ModelManifest, QualityGate, file_sha256
from imgsearch.models.quantize import calibration_pixels, int8_file_name, quantize_image_model
from imgsearch.models.runtime import CPU, ImageModel, ImagePrecision, RuntimeOptions, choose_image_variant
from tests.conftest import sample_path

PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png", "horse.png", "motorcycle_left.png")
HEAD = Path(__file__).resolve().parents[2] / "heads" / "default.npz"


def _manifest(gate: QualityGate | None = None, int8: bool = True) -> ModelManifest:
    q = Int8Model(
        file="m.int8.onnx",
        sha256="b" * 64,
        fp32_sha256="a" * 64,
        calibration="test photos",
        method={"format": "QDQ", "recipe": "x"},
        sources={"onnxruntime": "1"},
        gate=gate,
    )
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
        image_int8=q if int8 else None,
    )


def _gate(passed: bool, sha: str = "b" * 64) -> QualityGate:
    return QualityGate(passed=passed, int8_sha256=sha, metrics={"flickr8k_t2i_r10_int8": 67.0}, command="gate")


# The manifest record.


def test_manifest_round_trip_with_int8_and_gate(tmp_path: Path) -> None:
    m = _manifest(_gate(True))
    m.save(tmp_path)
    assert ModelManifest.load(tmp_path) == m
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert "image_variant" not in raw and raw["image_int8"]["gate"]["passed"] is True


def test_manifest_without_int8_still_loads_and_saves_as_before(tmp_path: Path) -> None:
    m = _manifest(int8=False)
    m.save(tmp_path)
    assert "image_int8" not in json.loads((tmp_path / MANIFEST_NAME).read_text())
    loaded = ModelManifest.load(tmp_path)
    assert loaded == m and loaded.image_int8 is None and loaded.image_version == "efficientnet-lite0@aaaaaaaaaaaa"


def test_int8_view_names_the_variant_and_keeps_the_model_name() -> None:
    m = _manifest(_gate(True))
    view = m.serving("int8")
    assert view.image_file == "m.int8.onnx" and view.image_sha256 == "b" * 64 and view.image_variant == "int8"
    assert view.image_version == "efficientnet-lite0@aaaaaaaaaaaa+int8.bbbbbbbb"
    assert view.image_version.split("@")[0] == m.image_version.split("@")[0]
    assert m.serving("fp32") is m
    with pytest.raises(ValueError):
        view.save(Path("/nonexistent"))


def test_gate_counts_only_for_the_file_it_measured() -> None:
    assert _manifest(_gate(True)).image_int8 is not None
    assert _manifest(_gate(True)).image_int8.gate_passed  # type: ignore[union-attr]
    assert not _manifest(_gate(False)).image_int8.gate_passed  # type: ignore[union-attr]
    assert not _manifest(_gate(True, sha="d" * 64)).image_int8.gate_passed  # type: ignore[union-attr]
    assert not _manifest(None).image_int8.gate_passed  # type: ignore[union-attr]


# Which variant is served (pure).


@pytest.mark.parametrize(
    ("precision", "gate", "on_gpu", "want"),
    [
        ("auto", True, False, "int8"),
        ("auto", False, False, "fp32"),
        ("auto", None, False, "fp32"),
        ("auto", True, True, "fp32"),
        ("fp32", True, False, "fp32"),
        ("int8", False, False, "int8"),
        ("int8", True, True, "int8"),
    ],
)
def test_precision_setting_picks_the_variant(
    precision: ImagePrecision, gate: bool | None, on_gpu: bool, want: str
) -> None:
    m = _manifest(None if gate is None else _gate(gate))
    assert choose_image_variant(precision, m, on_gpu=on_gpu, int8_intact=True).variant == want


def test_auto_without_an_intact_int8_model_serves_fp32_and_forced_int8_refuses() -> None:
    assert choose_image_variant("auto", _manifest(_gate(True)), False, int8_intact=False).variant == "fp32"
    assert choose_image_variant("auto", _manifest(int8=False), False, int8_intact=False).variant == "fp32"
    with pytest.raises(FailedPrecondition, match="int8"):
        choose_image_variant("int8", _manifest(int8=False), False, int8_intact=False)


# Real quantisation of the exported model (no ../shared: calibration and checks use bundled photos).


@pytest.fixture(scope="module")
def quantised(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory: the exported fp32 files linked in, a freshly quantised int8 model, no gate yet."""
    out = tmp_path_factory.mktemp("int8-models")
    fp32 = ModelManifest.load(model_dir)
    for name in (fp32.image_file, fp32.text_file, fp32.tokenizer_file, fp32.labels_file):
        (out / name).symlink_to(model_dir / name)
    int8_name = int8_file_name(fp32.image_file)
    method = quantize_image_model(model_dir / fp32.image_file, out / int8_name, fp32.image_size, count=96)
    calibration = str(method.pop("calibration"))
    q = Int8Model(int8_name, file_sha256(out / int8_name), fp32.image_sha256, calibration, method)
    replace(fp32, image_int8=q).save(out)
    return out


def test_calibration_images_are_deterministic_and_varied() -> None:
    a, b = calibration_pixels(224, count=40, seed=3), calibration_pixels(224, count=40, seed=3)
    assert a.shape == (40, 224, 224, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert len({x.tobytes() for x in a}) == 40


def test_int8_features_stay_close_to_fp32_on_sample_photos(quantised: Path) -> None:
    m = ModelManifest.load(quantised)
    options = RuntimeOptions(providers=(CPU,))
    fp32 = ImageModel(quantised, options, manifest=m)
    int8 = ImageModel(quantised, options, manifest=m.serving("int8"))
    # The sample photos as served, plus crops the calibration never saw (another seed).
    pixels = np.concatenate(
        [
            np.stack([decode_image(sample_path(n).read_bytes(), 224, ImageLimits()).pixels for n in PHOTOS]),
            calibration_pixels(224, count=40, seed=12345)[30:],
        ]
    )
    f32, l32 = fp32.run(pixels)
    f8, l8 = int8.run(pixels)
    cos = (f32 * f8).sum(1) / (np.linalg.norm(f32, axis=1) * np.linalg.norm(f8, axis=1))
    assert cos.min() >= 0.9, cos
    assert cos.mean() >= 0.97, cos
    # The photos' ImageNet answers mostly survive: the cat stays a cat class, etc.
    assert (l32.argmax(1) == l8.argmax(1)).mean() >= 0.6


def _with_gate(model_dir: Path, passed: bool | None, dest: Path) -> Path:
    dest.mkdir()
    for p in model_dir.iterdir():
        if p.name != MANIFEST_NAME:
            (dest / p.name).symlink_to(p.resolve())
    m = ModelManifest.load(model_dir)
    assert m.image_int8 is not None
    gate = None if passed is None else _gate(passed, m.image_int8.sha256)
    replace(m, image_int8=replace(m.image_int8, gate=gate)).save(dest)
    return dest


@pytest.mark.parametrize(
    ("precision", "passed", "want"),
    [("auto", True, "int8"), ("auto", False, "fp32"), ("auto", None, "fp32"), ("fp32", True, "fp32")],
)
async def test_encoder_serves_the_chosen_file_and_says_so(
    quantised: Path, tmp_path: Path, precision: ImagePrecision, passed: bool | None, want: str
) -> None:
    model_dir = _with_gate(quantised, passed, tmp_path / "models")
    settings = EncoderSettings(model_dir=model_dir, providers=(CPU,), image_precision=precision)
    encoder = await asyncio.to_thread(Encoder, settings)
    try:
        m = ModelManifest.load(model_dir)
        info = encoder.info()
        assert encoder.image_model.variant == want
        assert encoder.manifest.image_file == (m.image_file if want == "fp32" else int8_file_name(m.image_file))
        assert info.image_model == "efficientnet-lite0"
        assert ("+int8." in info.image_model_version) == (want == "int8")
        assert info.image_model_version == encoder.manifest.image_version
        await asyncio.to_thread(encoder.warm_up)
    finally:
        await encoder.close()


def test_fp32_trained_head_accepts_the_int8_model_version(quantised: Path) -> None:
    """Heads are trained on fp32 features; the name before '@' is what load_head checks, and it is the same."""
    if not HEAD.exists():
        pytest.skip("no shipped heads/default.npz")
    view = ModelManifest.load(quantised).serving("int8")
    labels = json.loads((quantised / view.labels_file).read_text())
    conse = ConSEHead(class_embeddings=np.eye(len(labels), 384, dtype=np.float32), image_model=view.image_version)
    head = load_head(HEAD, image_model=view.image_version, feature_dim=1280, text_dim=384, conse=conse)
    assert head.image_model.split("@")[0] == view.image_model


def test_exported_models_record_the_int8_model(model_dir: Path) -> None:
    m = ModelManifest.load(model_dir)
    if m.image_int8 is None:
        pytest.skip("models exported without int8 (--no-int8)")
    assert m.int8_intact(model_dir)
    assert m.image_int8.method["format"] == "QDQ" and m.image_int8.method["per_channel"] is True
    assert "scikit-image" in m.image_int8.calibration
    assert (model_dir / m.image_int8.file).stat().st_size > 1_000_000
