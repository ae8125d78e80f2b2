"""Static int8 image model: quantisation quality, the manifest record, and which file the encoder serves."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imgsearch.encoder.core import Encoder
from imgsearch.encoder.settings import EncoderSettings
from imgsearch.heads import ConSEHead, load_head
from imgsearch.kit.errors import FailedPrecondition
from imgsearch.models.imaging import ImageLimits, decode_image
from imgsearch.models.manifest import MANIFEST_NAME, Int8Model, ModelManifest, QualityGate, file_sha256
from imgsearch.models.quantize import calibration_pixels, feed_pixels_directly, int8_file_name, quantize_image_model
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


def _normalising_stem(weights: np.ndarray, bias_q: np.ndarray, w_scale: np.ndarray) -> Any:
    """The exported model's start as quantize_static leaves it: uint8 NHWC pixels, float normalisation
    (p / 255 - 0.5) / 0.5, QuantizeLinear / DequantizeLinear (scale 2/255, zero point 128), and a 3x3 stride-2
    convolution with int8 weights and an int32 bias, padded at the bottom and right like the real stem."""
    from onnx import TensorProto, helper, numpy_helper

    s = np.float32(2 / 255)
    inits = [
        numpy_helper.from_array(np.array(255, np.float32), "c255"),
        numpy_helper.from_array(np.array(0.5, np.float32), "c05"),
        numpy_helper.from_array(np.array(s, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zero"),
        numpy_helper.from_array(weights, "w_q"),
        numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(len(w_scale), np.int8), "w_zero"),
        numpy_helper.from_array(bias_q, "b_q"),
        numpy_helper.from_array((s * w_scale).astype(np.float32), "b_scale"),
        numpy_helper.from_array(np.zeros(len(w_scale), np.int32), "b_zero"),
    ]
    nodes = [
        helper.make_node("Transpose", ["pixels"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Cast", ["t"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["f", "c255"], ["d"]),
        helper.make_node("Sub", ["d", "c05"], ["u"]),
        helper.make_node("Div", ["u", "c05"], ["x"]),
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=0),
        helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zero"], ["b"], axis=0),
        helper.make_node("Conv", ["xd", "w", "b"], ["out"], strides=[2, 2], pads=[0, 0, 1, 1], kernel_shape=[3, 3]),
    ]
    graph = helper.make_graph(
        nodes,
        "stem",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, [None, 16, 16, 3])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_pixels_feed_the_first_convolution_directly_with_its_bias_absorbing_the_shift() -> None:
    import onnx
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    weights = rng.integers(-127, 128, (4, 3, 3, 3), dtype=np.int8)
    w_scale = np.array([0.01, 0.02, 0.005, 0.03], np.float32)
    bias_q = rng.integers(-5000, 5000, 4).astype(np.int32)
    model = _normalising_stem(weights, bias_q, w_scale)
    folded = onnx.load_from_string(model.SerializeToString())
    assert feed_pixels_directly(folded)
    assert [n.op_type for n in folded.graph.node if n.op_type in ("Cast", "Div", "Sub", "QuantizeLinear")] == []
    assert not feed_pixels_directly(folded)  # nothing left to fold: the graph is left alone
    # The bias grows by half the sum of each filter's int8 weights (s/2 per input, in the bias's units).
    shifted = {t.name: t for t in folded.graph.initializer}["b_q"]
    expected = bias_q + np.rint(weights.reshape(4, -1).astype(np.int64).sum(1) / 2).astype(np.int32)
    assert np.array_equal(onnx.numpy_helper.to_array(shifted), expected)

    pixels = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    x = (pixels.astype(np.float64) / 255 - 0.5) / 0.5  # the exact normalisation, no quantisation
    w = weights.astype(np.float64) * w_scale[:, None, None, None]
    b = bias_q * (2 / 255) * w_scale.astype(np.float64)
    padded = np.pad(x.transpose(0, 3, 1, 2), ((0, 0), (0, 0), (0, 1), (0, 1)))
    exact = np.stack(
        [
            np.einsum("ncij,kcij->nk", padded[:, :, 2 * r : 2 * r + 3, 2 * c : 2 * c + 3], w) + b
            for r in range(8)
            for c in range(8)
        ],
        axis=-1,
    ).reshape(2, 4, 8, 8)

    def run(m: Any) -> np.ndarray:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"pixels": pixels}
        )[0]

    inner = (slice(None), slice(None), slice(0, 7), slice(0, 7))  # outputs that read no padding
    # Exact but for the bias's rounding to whole int32 units: half a unit, (s/2) * the weight scale.
    assert np.abs(run(folded) - exact)[inner].max() <= 0.5 * (2 / 255) * float(w_scale.max()) + 1e-5
    # The float round trip it replaces was off by up to half a step on every pixel.
    assert np.abs(run(model) - exact)[inner].max() > 10 * np.abs(run(folded) - exact)[inner].max()


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
