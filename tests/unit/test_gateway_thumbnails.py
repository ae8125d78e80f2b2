"""Thumbnails made by the gateway: small JPEGs of the right size and orientation, or none for bad bytes."""

from __future__ import annotations

import io

from PIL import Image

from imgsearch.gateway.thumbnails import make_thumbnail
from tests.conftest import sample_path


def jpeg(width: int, height: int, orientation: int = 1) -> bytes:
    base = Image.open(sample_path("chelsea.png")).convert("RGB").resize((width, height))
    out = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = orientation
    base.save(out, format="JPEG", quality=90, exif=exif)
    return out.getvalue()


def test_a_camera_photo_becomes_a_small_jpeg() -> None:
    thumb = make_thumbnail(jpeg(4000, 3000), 160)
    with Image.open(io.BytesIO(thumb)) as im:
        assert im.format == "JPEG" and max(im.size) == 160 and im.size == (160, 120)
    assert len(thumb) < 16_000


def test_exif_orientation_is_applied() -> None:
    # Orientation 6: the camera was turned; the stored pixels are landscape, the photo is portrait.
    with Image.open(io.BytesIO(make_thumbnail(jpeg(400, 300, orientation=6), 160))) as im:
        assert im.size == (120, 160)


def test_unreadable_bytes_give_no_thumbnail() -> None:
    assert make_thumbnail(b"not an image", 160) == b""
    assert make_thumbnail(b"", 160) == b""
