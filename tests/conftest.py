"""Shared fixtures: exported models and small real test images (no ../shared needed)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.harness import MODEL_DIR


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The exported ONNX models (make models); exported on demand if missing."""
    from imgsearch.models.manifest import MANIFEST_NAME

    if not (MODEL_DIR / MANIFEST_NAME).exists():
        from imgsearch.models.export import export_all

        export_all(MODEL_DIR, "efficientnet-lite0")
    return MODEL_DIR


def sample_path(name: str) -> Path:
    """A photo bundled with scikit-image (chelsea.png = cat, coffee.png = coffee cup, ...)."""
    import skimage

    return Path(skimage.__file__).parent / "data" / name


@pytest.fixture(scope="session")
def sample_photos() -> dict[str, bytes]:
    """Real photos from scikit-image, as encoded bytes, keyed by a short name."""
    names = {
        "cat": "chelsea.png",
        "coffee": "coffee.png",
        "astronaut": "astronaut.png",
        "rocket": "rocket.jpg",
        "motorcycle": "motorcycle_left.png",
        "horse": "horse.png",
        "hubble": "hubble_deep_field.jpg",
        "camera": "camera.png",
    }
    return {k: sample_path(v).read_bytes() for k, v in names.items()}


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="session")
def cat_image(sample_photos: dict[str, bytes]) -> Image.Image:
    return Image.open(io.BytesIO(sample_photos["cat"])).convert("RGB")


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
