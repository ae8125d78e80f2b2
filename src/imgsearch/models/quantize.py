"""Static int8 quantisation of the exported image model (QDQ, per-channel), calibrated offline.

Calibration uses only what a fresh clone has: scikit-image's bundled sample photos and deterministic
crops, flips and colour changes of them (fixed seed), decoded exactly as the encoder decodes. Nothing is
downloaded and ../shared is never read, so `make models` gives every checkout the same int8 model for
the same onnxruntime. Needs `onnx` (an export dependency); serving the result needs only onnxruntime.
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
RECIPE: Final = "qdq-per-channel-minmax-v1"
INT8_SUFFIX: Final = ".int8.onnx"

Pixels = npt.NDArray[np.uint8]


def int8_file_name(image_file: str) -> str:
    """efficientnet-lite0.onnx -> efficientnet-lite0.int8.onnx."""
    stem = image_file[: -len(".onnx")] if image_file.endswith(".onnx") else image_file
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
        tmp_out.replace(out)
    log.info("quantised %s -> %s in %.1fs", fp32.name, out.name, time.perf_counter() - t0)
    return {
        "format": "QDQ",
        "per_channel": True,
        "activations": "uint8 (asymmetric)",
        "weights": "int8 (symmetric)",
        "ops": "onnxruntime defaults (all quantisable)",
        "recipe": RECIPE,
        "calibration": calibration_description(count, seed),
    }
