"""int8 quantisation of the exported models: static QDQ for the image model, dynamic for the text model.

Image calibration uses only what a fresh clone has: scikit-image's bundled sample photos and deterministic
crops, flips and colour changes of them (fixed seed), decoded exactly as the encoder decodes. The text model
needs no calibration (dynamic quantisation takes activation ranges per call). Nothing is downloaded and
../shared is never read, so `make models` gives every checkout the same int8 models for the same
onnxruntime. Needs `onnx` (an export dependency); serving the results needs only onnxruntime.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image

from imgsearch.models.imaging import ImageLimits, decode_image

log = logging.getLogger(__name__)

# Photos bundled with scikit-image (colour and grey; names it can only download are skipped).
CALIBRATION_PHOTOS: Final = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
    "color.png",
    "logo.png",
    "immunohistochemistry.png",
    "skin.jpg",
    "lily.png",
    "horse.png",
    "camera.png",
    "coins.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "page.png",
    "moon.png",
    "text.png",
    "clock_motion.png",
)
CALIBRATION_COUNT: Final = 320
CALIBRATION_SEED: Final = 0
CALIBRATION_BATCH: Final = 16
# Bump when the recipe changes: `make models` then re-quantises (and the quality gate must run again).
RECIPE: Final = "qdq-per-channel-minmax-uint8-input-v2"
TEXT_RECIPE: Final = "dynamic-per-channel-qint8-per-token-v1"
TEXT_CALIBRATION: Final = "none: dynamic quantisation computes each token's activation range per call"
INT8_SUFFIX: Final = ".int8.onnx"

Pixels = npt.NDArray[np.uint8]


def int8_file_name(fp32_file: str) -> str:
    """efficientnet-lite0.onnx -> efficientnet-lite0.int8.onnx (all-minilm-l6-v2.onnx likewise)."""
    stem = fp32_file[: -len(".onnx")] if fp32_file.endswith(".onnx") else fp32_file
    return stem + INT8_SUFFIX


def sample_photo_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def available_photos() -> list[Path]:
    """The calibration photos this scikit-image actually ships (it bundles fewer than it can fetch)."""
    root = sample_photo_dir()
    return [root / name for name in CALIBRATION_PHOTOS if (root / name).is_file()]


def _augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One deterministic variation: a random crop (15-100 % of the area), maybe a flip, colour and tone changes."""
    w, h = img.size
    area = rng.uniform(0.15, 1.0)
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw = max(16, min(w, round((area * w * h * aspect) ** 0.5)))
    ch = max(16, min(h, round((area * w * h / aspect) ** 0.5)))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    out = img.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(out, dtype=np.float32)
    gain = rng.uniform(0.6, 1.4)  # brightness
    contrast = rng.uniform(0.7, 1.3)
    tint = rng.uniform(0.85, 1.15, size=3)  # white balance
    mean = arr.mean()
    arr = ((arr - mean) * contrast + mean) * gain * tint
    if rng.random() < 0.2:
        grey = arr.mean(axis=2, keepdims=True)
        arr = np.repeat(grey, 3, axis=2)
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), mode="RGB")


def _encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def calibration_pixels(size: int, count: int = CALIBRATION_COUNT, seed: int = CALIBRATION_SEED) -> Pixels:
    """[count, size, size, 3] uint8: every sample photo as served, then seeded augmentations of them.

    Every image goes through decode_image, the encoder's own decoder, so calibration sees the same
    pixel statistics as serving.
    """
    photos = available_photos()
    if not photos:
        raise FileNotFoundError(f"no scikit-image sample photos in {sample_photo_dir()}")
    limits = ImageLimits()
    originals = [Image.open(p).convert("RGB") for p in photos]
    rng = np.random.default_rng(seed)
    out = np.zeros((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        if i < len(originals):
            data = photos[i].read_bytes()
        else:
            data = _encode_png(_augment(originals[int(rng.integers(len(originals)))], rng))
        out[i] = decode_image(data, size, limits, i).pixels
    return out


def calibration_description(count: int = CALIBRATION_COUNT, seed: int = CALIBRATION_SEED) -> str:
    names = ", ".join(p.name for p in available_photos())
    return (
        f"{count} images: the {len(available_photos())} scikit-image sample photos ({names}) plus seeded "
        f"(seed {seed}) random crops of 15-100 % area, flips, brightness/contrast/white-balance changes and 20 % "
        "grey; decoded with the encoder's decoder; MinMax calibration"
    )


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader protocol over a pixel array, batch by batch."""

    def __init__(self, pixels: Pixels, batch: int) -> None:
        self._pixels = pixels
        self._batch = batch
        self._it: Iterator[dict[str, Pixels]] = self._batches()

    def _batches(self) -> Iterator[dict[str, Pixels]]:
        for start in range(0, len(self._pixels), self._batch):
            yield {"pixels": self._pixels[start : start + self._batch]}

    def get_next(self) -> dict[str, Pixels] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._batches()


def quantize_image_model(
    fp32: Path,
    out: Path,
    size: int,
    count: int = CALIBRATION_COUNT,
    seed: int = CALIBRATION_SEED,
) -> dict[str, Any]:
    """Write the static int8 (QDQ, per-channel weights, uint8 activations) model; returns how it was made."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    t0 = time.perf_counter()
    pixels = calibration_pixels(size, count, seed)
    with tempfile.TemporaryDirectory(prefix="imgsearch-quant-") as tmp:
        # Constant-folds the dynamic "same" padding and infers shapes, so every Conv is seen as one.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        tmp_out = out.with_name(out.name + ".tmp")
        quantize_static(
            str(prepared),
            str(tmp_out),
            _Reader(pixels, CALIBRATION_BATCH),
            quant_format=QuantFormat.QDQ,
            # All operators onnxruntime can quantise (Conv, Clip, Add, ReduceMean, Gemm, ...): quantising only
            # the convolutions leaves float islands between them, which measured 1.1x faster with feature
            # cosine 0.86; the whole chain measured 2.0x with cosine 0.993 (mean) on Flickr8k photos.
            op_types_to_quantize=None,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        import onnx

        model = onnx.load(str(tmp_out))
        if not feed_pixels_directly(model):
            raise RuntimeError(f"{fp32.name}: the int8 graph does not start as the exported models do")
        onnx.save(model, str(tmp_out))
        tmp_out.replace(out)
    log.info("quantised %s -> %s in %.1fs", fp32.name, out.name, time.perf_counter() - t0)
    return {
        "format": "QDQ",
        "per_channel": True,
        "activations": "uint8 (asymmetric)",
        "weights": "int8 (symmetric)",
        "input": "the uint8 pixels are the first convolution's quantised input (scale 2/255, zero point 128)",
        "ops": "onnxruntime defaults (all quantisable)",
        "recipe": RECIPE,
        "calibration": calibration_description(count, seed),
    }


def _consumers(graph: Any) -> dict[str, list[Any]]:
    """The nodes that read each tensor of an ONNX graph, by tensor name."""
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def feed_pixels_directly(model: Any) -> bool:
    """Make the uint8 pixels the first convolution's quantised input, without the float round trip.

    The exported graph normalises in float, x = (p / 255 - 0.5) / 0.5, and quantize_static then quantises x
    for the first convolution with scale s = 2/255 and zero point 128: Cast, Div, Sub, Div and QuantizeLinear
    (6.5 % of the int8 model's time on one thread) only to get back p or p + 1, so that the 256 grey levels
    became 215 codes. Read with the same scale and zero point, p itself stands for x - s/2, and the
    convolution's bias absorbs that shift (+ s/2 times the sum of each filter's weights, which in the int32
    bias's units is half the sum of its int8 weights); only the outputs that read the image's zero padding
    (its last row and column) keep a shift of at most s/2 times a weight. Returns False, leaving the graph
    alone, when it does not start with exactly that chain.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers = _consumers(graph)

    def only(name: str, op: str) -> Any:
        found = consumers.get(name, [])
        return found[0] if len(found) == 1 and found[0].op_type == op else None

    def const(name: str) -> Any:
        return numpy_helper.to_array(inits[name]) if name in inits else None

    chain, name = [], graph.input[0].name
    for op in ("Transpose", "Cast", "Div", "Sub", "Div", "QuantizeLinear", "DequantizeLinear", "Conv"):
        node = only(name, op)
        if node is None:
            return False
        chain.append(node)
        name = node.output[0]
    transpose, cast, div, sub, div2, quant, dequant, conv = chain
    scale, zero = const(quant.input[1]), const(quant.input[2])
    weight_dq, bias_dq = producer.get(conv.input[1]), producer.get(conv.input[2]) if len(conv.input) > 2 else None
    if (
        [float(v) if v is not None else None for v in map(const, (div.input[1], sub.input[1], div2.input[1]))]
        != [255.0, 0.5, 0.5]
        or scale is None
        or zero is None
        or zero.dtype != np.uint8
        or int(zero) != 128
        or abs(float(scale) * 127.5 - 1.0) > 1e-6
        or list(dequant.input[1:]) != list(quant.input[1:])
        or weight_dq is None
        or bias_dq is None
        or weight_dq.op_type != "DequantizeLinear"
        or bias_dq.op_type != "DequantizeLinear"
    ):
        return False
    weights, bias = const(weight_dq.input[0]), const(bias_dq.input[0])
    if weights is None or bias is None or bias.dtype != np.int32 or bias.shape != (weights.shape[0],):
        return False
    shift = np.rint(0.5 * weights.reshape(weights.shape[0], -1).astype(np.int64).sum(axis=1))
    inits[bias_dq.input[0]].CopyFrom(numpy_helper.from_array((bias + shift).astype(np.int32), bias_dq.input[0]))
    dequant.input[0] = transpose.output[0]
    for node in (cast, div, sub, div2, quant):
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)
    return True


def per_token_activations(model: Any) -> int:
    """Rewrite quantize_dynamic's activation quantisation from one range per tensor to one per token.

    quantize_dynamic quantises each MatMul input with DynamicQuantizeLinear: one uint8 range for the whole
    [batch, tokens, 384] tensor, padding included. A text's embedding then depends on the other texts of its
    micro-batch (measured: cosine 0.985 min / 0.992 mean between a caption alone and in a random batch of 8,
    as far apart as int8 is from fp32), so one query would get different vectors under different traffic.
    Here each token row gets its own symmetric range (scale = max|x| / 127, stored as uint8 around 128 so
    MatMulInteger keeps its fast uint8 x int8 path with a scalar zero point), and the row's scale is applied
    after the per-column weight scale. Tokens no longer see each other's ranges: batched and single calls
    agree (cosine 1.0000), and int8 sits closer to fp32 (0.997 mean against 0.994).

    The scale is multiplied in as its own Mul because onnxruntime's MatMulIntegerToFloat fusion reads the
    activation scale as a scalar: left as Mul(cast, Mul(token scale, weight scale)) it is fused into a wrong
    result (cosine 0.5) at the "all" optimisation level. Returns how many activations were rewritten.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    consumers = _consumers(graph)
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(1e-8, np.float32), "per_token_eps"),
            numpy_helper.from_array(np.array(127.0, np.float32), "per_token_127"),
            numpy_helper.from_array(np.array(128.0, np.float32), "per_token_128"),
            numpy_helper.from_array(np.array(128, np.uint8), "per_token_zero_point"),
        ]
    )
    dropped: set[str] = set()
    after: dict[str, Any] = {}  # output node name -> the per-token Mul that follows it
    rewritten: dict[str, list[Any]] = {}  # DynamicQuantizeLinear name -> its replacement
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            continue
        x = node.input[0]
        quantised, scale, zero_point = node.output
        for user in consumers.get(zero_point, []):
            if user.op_type != "MatMulInteger":
                raise ValueError(f"unexpected {user.op_type} using {zero_point}: onnxruntime's quantizer changed")
            user.input[:] = ["per_token_zero_point" if i == zero_point else i for i in user.input]
        for scale_mul in consumers.get(scale, []):
            # quantize_dynamic writes Mul(token scale, weight scale) -> Mul(Cast(MatMulInteger), that).
            (out_mul,) = consumers[scale_mul.output[0]]
            if scale_mul.op_type != "Mul" or out_mul.op_type != "Mul":
                raise ValueError(f"unexpected scale use after {node.name}: onnxruntime's quantizer changed")
            weight_scale = next(i for i in scale_mul.input if i != scale)
            cast_out = next(i for i in out_mul.input if i != scale_mul.output[0])
            y = out_mul.output[0]
            out_mul.input[:] = [cast_out, weight_scale]
            out_mul.output[0] = y + "_per_column"
            after[out_mul.name] = helper.make_node("Mul", [y + "_per_column", scale], [y], name=out_mul.name + "_tok")
            dropped.add(scale_mul.name)
        n = node.name
        rewritten[n] = [
            helper.make_node("Abs", [x], [n + "_abs"], name=n + "_abs"),
            helper.make_node("ReduceMax", [n + "_abs"], [n + "_max"], name=n + "_max", axes=[-1], keepdims=1),
            helper.make_node("Max", [n + "_max", "per_token_eps"], [n + "_range"], name=n + "_range"),
            helper.make_node("Div", [n + "_range", "per_token_127"], [scale], name=n + "_scale"),
            helper.make_node("Div", [x, scale], [n + "_scaled"], name=n + "_scaled"),
            helper.make_node("Round", [n + "_scaled"], [n + "_rounded"], name=n + "_rounded"),
            helper.make_node("Add", [n + "_rounded", "per_token_128"], [n + "_shifted"], name=n + "_shifted"),
            helper.make_node("Cast", [n + "_shifted"], [quantised], name=n + "_cast", to=TensorProto.UINT8),
        ]
    nodes: list[Any] = []
    for node in graph.node:
        if node.name in dropped:
            continue
        nodes += rewritten.get(node.name, [node])
        if node.name in after:
            nodes.append(after[node.name])
    del graph.node[:]
    graph.node.extend(nodes)
    return len(rewritten)


def quantize_text_model(fp32: Path, out: Path) -> dict[str, Any]:
    """Write the dynamic int8 text model (per-channel int8 weights, per-token activations); returns how it was made.

    Dynamic, not static: MiniLM's activations vary with the sentence far more than a CNN's with the photo,
    and a per-call range costs little next to the MatMuls it makes int8. The result is a pure function of
    the fp32 file and the onnxruntime version (no calibration data), so two runs give the same bytes.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="imgsearch-quant-") as tmp:
        per_tensor = Path(tmp) / "per-tensor.onnx"
        # onnxruntime's default operator set: the 36 weight MatMuls (Q, K, V, output and both feed-forward
        # layers of 6 blocks) become MatMulInteger and the 3 embedding tables int8; attention's own
        # activation-by-activation MatMuls, LayerNorm, Softmax and the pooling stay float.
        quantize_dynamic(str(fp32), str(per_tensor), per_channel=True, weight_type=QuantType.QInt8)
        model = onnx.load(str(per_tensor))
    rewritten = per_token_activations(model)
    onnx.checker.check_model(model)
    tmp_out = out.with_name(out.name + ".tmp")
    onnx.save(model, str(tmp_out))
    tmp_out.replace(out)
    log.info("quantised %s -> %s in %.1fs", fp32.name, out.name, time.perf_counter() - t0)
    return {
        "format": "dynamic (MatMulInteger), activations quantised per token in the graph",
        "per_channel": True,
        "activations": f"uint8 around 128, symmetric range per token ({rewritten} activations)",
        "weights": "int8 (symmetric, per output channel)",
        "ops": "onnxruntime defaults for dynamic quantisation",
        "recipe": TEXT_RECIPE,
        "calibration": TEXT_CALIBRATION,
    }
