"""Image decoding: accepted formats, EXIF orientation, colour modes, and every way bytes can be bad."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from imgsearch.encoder.imaging import (
    DecodedImage,
    ImageDecodeError,
    ImageLimits,
    decode_image,
    header_size,
    sniff_unsupported,
    webp_size,
)
from imgsearch.gateway.thumbnails import make_thumbnail
from imgsearch.models import imaging
from tests.conftest import encode, sample_path

SIZE = 224
LIMITS = ImageLimits()
RED, GREEN, BLUE, YELLOW = (220, 20, 20), (20, 200, 20), (20, 20, 220), (230, 220, 20)


def quadrants(width: int = 300, height: int = 200) -> Image.Image:
    """Red, green / blue, yellow quadrants: any flip, rotation or wrong crop moves a colour."""
    img = Image.new("RGB", (width, height))
    w2, h2 = width // 2, height // 2
    img.paste(RED, (0, 0, w2, h2))
    img.paste(GREEN, (w2, 0, width, h2))
    img.paste(BLUE, (0, h2, w2, height))
    img.paste(YELLOW, (w2, h2, width, height))
    return img


def colour_at(decoded: DecodedImage, x: int, y: int) -> np.ndarray:
    return decoded.pixels[y, x].astype(int)


def assert_quadrants(decoded: DecodedImage, tolerance: int) -> None:
    for (x, y), expected in {(40, 40): RED, (184, 40): GREEN, (40, 184): BLUE, (184, 184): YELLOW}.items():
        got = colour_at(decoded, x, y)
        assert np.abs(got - np.array(expected)).max() <= tolerance, f"pixel ({x},{y}) is {got}, expected {expected}"


def animated_gif() -> bytes:
    first, second = quadrants(), Image.new("RGB", (300, 200), (0, 0, 0))
    return encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


ENCODERS: dict[str, Callable[[], bytes]] = {
    "jpeg": lambda: encode(quadrants(), "JPEG", quality=95),
    "png": lambda: encode(quadrants(), "PNG"),
    "webp": lambda: encode(quadrants(), "WEBP", quality=95),
    "webp-lossless": lambda: encode(quadrants(), "WEBP", lossless=True),
    "gif-animated": animated_gif,
    "bmp": lambda: encode(quadrants(), "BMP"),
}


@pytest.mark.parametrize("fmt", sorted(ENCODERS))
def test_accepted_formats_round_trip(fmt: str) -> None:
    decoded = decode_image(ENCODERS[fmt](), SIZE, LIMITS)
    assert decoded.pixels.shape == (SIZE, SIZE, 3)
    assert decoded.pixels.dtype == np.uint8
    assert (decoded.width, decoded.height) == (300, 200)
    # The GIF's second frame is black: seeing the quadrants proves the first frame was used.
    assert_quadrants(decoded, tolerance=30)


def test_centre_crop_keeps_the_middle_of_a_wide_image() -> None:
    # 600x200: left third red, middle third green, right third blue; the centred square is all green.
    img = Image.new("RGB", (600, 200), RED)
    img.paste(GREEN, (200, 0, 400, 200))
    img.paste(BLUE, (400, 0, 600, 200))
    decoded = decode_image(encode(img, "PNG"), SIZE, LIMITS)
    assert np.abs(decoded.pixels[:, 5:-5].astype(int) - np.array(GREEN)).max() <= 2


def test_small_image_is_upscaled() -> None:
    decoded = decode_image(encode(quadrants(30, 20), "PNG"), SIZE, LIMITS)
    assert decoded.pixels.shape == (SIZE, SIZE, 3)
    assert (decoded.width, decoded.height) == (30, 20)
    assert_quadrants(decoded, tolerance=10)


def test_large_jpeg_is_decoded_correctly() -> None:
    # Large enough for the reduced-size JPEG decode to kick in; the result must still be right.
    decoded = decode_image(encode(quadrants(3000, 2000), "JPEG", quality=90), SIZE, LIMITS)
    assert (decoded.width, decoded.height) == (3000, 2000)
    assert_quadrants(decoded, tolerance=20)


def halves_with_orientation(orientation: int) -> bytes:
    """A landscape JPEG, left half red and right half blue, tagged with an EXIF orientation."""
    img = Image.new("RGB", (300, 200), RED)
    img.paste(BLUE, (150, 0, 300, 200))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


@pytest.mark.parametrize(
    ("orientation", "top", "bottom"),
    [(6, RED, BLUE), (8, BLUE, RED)],
    ids=["rotate-90-cw", "rotate-90-ccw"],
)
def test_exif_orientation_rotates(orientation: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> None:
    decoded = decode_image(halves_with_orientation(orientation), SIZE, LIMITS)
    # Stored landscape 300x200, shown portrait 200x300: the reported size is after orientation.
    assert (decoded.width, decoded.height) == (200, 300)
    assert np.abs(colour_at(decoded, 112, 30) - np.array(top)).max() <= 30
    assert np.abs(colour_at(decoded, 112, 190) - np.array(bottom)).max() <= 30


def test_without_orientation_the_image_stays_landscape() -> None:
    decoded = decode_image(halves_with_orientation(1), SIZE, LIMITS)
    assert (decoded.width, decoded.height) == (300, 200)
    assert np.abs(colour_at(decoded, 30, 112) - np.array(RED)).max() <= 30
    assert np.abs(colour_at(decoded, 190, 112) - np.array(BLUE)).max() <= 30


# Real-world EXIF is often broken: an out-of-range orientation, a wrongly typed one, a truncated block.
BROKEN_EXIF = {
    "orientation-9": b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x09\x00\x00\x00",
    "orientation-as-bytes": b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x02\x00\x00\x00\x04" + bytes(12),
    "truncated-ifd": b"Exif\x00\x00MM\x00*\x00\x00\xff\xff\xff\xff",
}


@pytest.mark.parametrize("blob", sorted(BROKEN_EXIF))
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_broken_exif_neither_fails_nor_rotates_the_image(blob: str) -> None:
    decoded = decode_image(encode(quadrants(), "JPEG", quality=95, exif=BROKEN_EXIF[blob]), SIZE, LIMITS)
    assert (decoded.width, decoded.height) == (300, 200)
    assert_quadrants(decoded, tolerance=30)


def _p_with_transparency() -> Image.Image:
    img = Image.new("P", (100, 100), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    img.paste(1, (0, 0, 50, 100))
    img.info["transparency"] = 0
    return img


def _i16() -> Image.Image:
    arr = np.full((100, 100), 32768, dtype=np.uint16)
    arr[:, 50:] = 65535
    return Image.fromarray(arr)


def _la() -> Image.Image:
    grey = Image.new("L", (100, 100), 0)
    alpha = Image.new("L", (100, 100), 255)
    alpha.paste(0, (50, 0, 100, 100))
    return Image.merge("LA", [grey, alpha])


def _rgba() -> Image.Image:
    img = Image.new("RGBA", (100, 100), (20, 200, 20, 255))
    img.paste((0, 0, 0, 0), (50, 0, 100, 100))
    return img


def _one_bit() -> Image.Image:
    img = Image.new("1", (100, 100), 0)
    img.paste(1, (50, 0, 100, 100))
    return img


# For each mode: an image, the format to store it in, and the RGB expected left and right.
MODES: dict[str, tuple[Callable[[], Image.Image], str, tuple[int, ...], tuple[int, ...]]] = {
    "L": (lambda: Image.new("L", (100, 100), 90), "PNG", (90, 90, 90), (90, 90, 90)),
    # Left half opaque black, right half fully transparent: transparency composites onto white.
    # Left half opaque black, right half fully transparent: transparency composites onto white.
    "LA": (_la, "PNG", (0, 0, 0), (255, 255, 255)),
    "P-transparency": (_p_with_transparency, "PNG", (255, 0, 0), (255, 255, 255)),
    "RGBA": (_rgba, "PNG", (20, 200, 20), (255, 255, 255)),
    "CMYK": (lambda: Image.new("CMYK", (100, 100), (0, 255, 255, 0)), "JPEG", (255, 0, 0), (255, 0, 0)),
    # 16-bit grey is scaled to 8 bits, not clipped: half-scale stays mid-grey.
    "I;16": (_i16, "PNG", (128, 128, 128), (255, 255, 255)),
    "1": (_one_bit, "PNG", (0, 0, 0), (255, 255, 255)),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_modes_become_rgb(mode: str) -> None:
    make, fmt, left, right = MODES[mode]
    src = make()
    data = encode(src, fmt)
    stored_mode = Image.open(io.BytesIO(data)).mode
    # Guard against the test silently testing RGB: the stored file must really be in the odd mode.
    assert stored_mode == src.mode or (mode == "P-transparency" and stored_mode == "P")
    decoded = decode_image(data, SIZE, LIMITS)
    assert decoded.pixels.shape == (SIZE, SIZE, 3)
    tolerance = 12 if fmt == "JPEG" else 2
    assert np.abs(colour_at(decoded, 40, 112) - np.array(left)).max() <= tolerance
    assert np.abs(colour_at(decoded, 184, 112) - np.array(right)).max() <= tolerance


def _exif_bytes() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 1
    return exif.tobytes()


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height zero pixels, a few KB long, built without allocating it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    packer = zlib.compressobj(9)
    compressed = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", compressed) + chunk(b"IEND", b"")


@pytest.fixture()
def loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Records the size of every image whose pixel data gets decoded (the real load still runs)."""
    seen: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def recording_load(self: ImageFile.ImageFile) -> Any:
        seen.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    return seen


def reason_of(data: bytes, limits: ImageLimits = LIMITS, name: str = "upload.bin") -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, SIZE, limits, index=3, name=name)
    # Every message names the item, so a caller can find it in its batch.
    assert "item 3" in info.value.message and name in info.value.message
    return info.value


def test_bomb_png_is_refused_without_decoding(loads: list[tuple[int, int]]) -> None:
    data = png_bomb(20_000, 20_000)
    assert len(data) < 100_000
    err = reason_of(data)
    assert err.reason == "too_many_pixels"
    assert "too many pixels: 20000x20000 = 400,000,000 > limit 40,000,000" in err.message
    assert loads == []


def test_jpeg_claiming_a_huge_frame_is_refused_without_decoding(loads: list[tuple[int, int]]) -> None:
    data = bytearray(encode(quadrants(64, 48), "JPEG", exif=_exif_bytes()))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 50000)  # height, width
    err = reason_of(bytes(data))
    assert err.reason == "too_many_pixels" and "50000x60000" in err.message
    assert loads == []


def test_pixel_limit_below_pillows_own_is_ours(loads: list[tuple[int, int]]) -> None:
    # 8000x6000 = 48 MP: over our 40 MP default but under Pillow's warning threshold of 89 MP.
    err = reason_of(png_bomb(8000, 6000))
    assert err.reason == "too_many_pixels"
    assert "8000x6000" in err.message and "40,000,000" in err.message
    assert loads == []


def test_webp_canvas_is_checked_before_pillow_allocates_it(loads: list[tuple[int, int]]) -> None:
    # An extended (VP8X) WebP header claiming a 16000x16000 canvas; libwebp would allocate ~1 GB on open.
    data = bytearray(encode(quadrants(64, 48), "WEBP", exif=_exif_bytes()))
    assert data[12:16] == b"VP8X"
    data[24:27] = (16000 - 1).to_bytes(3, "little")
    data[27:30] = (16000 - 1).to_bytes(3, "little")
    assert webp_size(bytes(data)) == (16000, 16000)
    err = reason_of(bytes(data))
    assert err.reason == "too_many_pixels" and "16000x16000" in err.message
    assert loads == []


WEBP_KINDS: dict[str, dict[str, Any]] = {
    "lossy": {},
    "lossless": {"lossless": True},
    # Metadata forces the extended (VP8X) container.
    "extended": {"exif": _exif_bytes()},
}


@pytest.mark.parametrize("kind", sorted(WEBP_KINDS))
def test_webp_size_reads_every_header_kind(kind: str) -> None:
    data = encode(quadrants(123, 45), "WEBP", **WEBP_KINDS[kind])
    assert data[12:16] == {"lossy": b"VP8 ", "lossless": b"VP8L", "extended": b"VP8X"}[kind]
    assert webp_size(data) == (123, 45)


HEADER_FORMATS: dict[str, dict[str, Any]] = {
    "PNG": {},
    "GIF": {},
    "BMP": {},
    "JPEG": {"exif": b"Exif\x00\x00" + bytes(300)},  # an APP1 segment to skip before the frame header
    "WEBP": {},
}


@pytest.mark.parametrize("fmt", sorted(HEADER_FORMATS))
def test_header_size_matches_pillow(fmt: str) -> None:
    data = encode(quadrants(321, 123), fmt, **HEADER_FORMATS[fmt])
    assert header_size(data) == Image.open(io.BytesIO(data)).size == (321, 123)


def test_empty_bytes() -> None:
    err = reason_of(b"")
    assert err.reason == "empty" and "empty" in err.message


def test_corrupt_bytes(rng: np.random.Generator) -> None:
    err = reason_of(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert err.reason == "corrupt"
    assert "not a recognisable image" in err.message


def test_corrupt_body_with_valid_signature() -> None:
    data = encode(quadrants(), "PNG")
    broken = data[:40] + bytes(len(data) - 40)
    assert reason_of(broken).reason in ("corrupt", "truncated")


def test_truncated_jpeg() -> None:
    data = encode(quadrants(600, 400), "JPEG", quality=95)
    err = reason_of(data[: len(data) // 2])
    assert err.reason == "truncated"
    assert "truncated" in err.message


def test_too_many_bytes() -> None:
    data = encode(quadrants(), "PNG")
    err = reason_of(data, ImageLimits(max_bytes=len(data) - 1))
    assert err.reason == "too_large"


@pytest.mark.parametrize(("fmt", "named"), [("TIFF", "TIFF"), ("ICO", "ICO"), ("PPM", "PPM")])
def test_unsupported_formats_are_named(fmt: str, named: str, loads: list[tuple[int, int]]) -> None:
    err = reason_of(encode(quadrants(64, 48), fmt))
    assert err.reason == "unsupported_format"
    assert f"'{named}'" in err.message
    assert loads == []


def test_heic_is_named_from_its_brand() -> None:
    header = struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00mif1heic"
    assert sniff_unsupported(header + bytes(100)) == "HEIC"
    assert reason_of(header + bytes(100)).reason == "unsupported_format"


def test_text_is_not_mistaken_for_netpbm() -> None:
    assert sniff_unsupported(b"P1anet is not an image") is None


def test_real_photos_decode(sample_photos: dict[str, bytes]) -> None:
    for name, data in sample_photos.items():
        decoded = decode_image(data, SIZE, LIMITS, name=name)
        original = Image.open(io.BytesIO(data))
        assert (decoded.width, decoded.height) == original.size, name
        assert decoded.pixels.shape == (SIZE, SIZE, 3), name
        # Not a blank image: real photos have texture.
        assert decoded.pixels.std() > 10, name


@pytest.mark.parametrize("fmt", sorted(ENCODERS))
def test_damaged_files_fail_alone_with_image_decode_error(fmt: str) -> None:
    """Random byte damage anywhere in a file: the result is an image or an ImageDecodeError, nothing else."""
    rng = np.random.default_rng(sum(fmt.encode()))
    original = np.frombuffer(ENCODERS[fmt](), dtype=np.uint8)
    outcomes: set[str] = set()
    for _ in range(60):
        damaged = original.copy()
        spots = rng.integers(0, len(damaged), size=int(rng.integers(1, 8)))
        damaged[spots] = rng.integers(0, 256, size=len(spots), dtype=np.uint8)
        cut = int(rng.integers(len(damaged) // 2, len(damaged) + 1))
        try:
            decoded = decode_image(damaged[:cut].tobytes(), SIZE, LIMITS)
        except ImageDecodeError as err:
            assert err.reason in ("corrupt", "truncated", "unsupported_format", "too_many_pixels"), err.reason
            outcomes.add(err.reason)
        else:
            assert decoded.pixels.shape == (SIZE, SIZE, 3)
            outcomes.add("decoded")
    # Damage of this kind must actually be caught sometimes, or the loop tested nothing.
    assert outcomes - {"decoded"}, outcomes


def test_big_jpegs_decode_through_a_draft_at_the_target_size(cat_image: Image.Image) -> None:
    """A 12 MP JPEG is DCT-scaled to the smallest size whose shorter side is >= 224 (here 1/8: 500x375),
    and the result stays within a grey level (mean) of a full-resolution decode."""
    big = encode(cat_image.resize((4000, 3000), Image.Resampling.BICUBIC), "JPEG", quality=90)
    img = Image.open(io.BytesIO(big))
    img.draft("RGB", (SIZE, SIZE))
    assert min(img.size) >= SIZE and img.size == (500, 375)
    decoded = decode_image(big, SIZE, LIMITS)
    assert (decoded.width, decoded.height) == (4000, 3000)
    full = Image.open(io.BytesIO(big)).convert("RGB")
    reference = np.asarray(
        full.resize((SIZE, SIZE), Image.Resampling.BICUBIC, box=(500.0, 0.0, 3500.0, 3000.0)), dtype=np.float32
    )
    assert np.abs(decoded.pixels.astype(np.float32) - reference).mean() <= 1.0


# ---- thumbnails ----------------------------------------------------------------------------------------


def thumbnail_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG" and im.mode == "RGB"
        return np.asarray(im, dtype=np.float32)


def full_decode_thumbnail(data: bytes, px: int) -> np.ndarray:
    """A thumbnail from the full-resolution decode, through the same JPEG quality: the best one can make."""
    with Image.open(io.BytesIO(data)) as im:
        rgb = ImageOps.exif_transpose(im).convert("RGB")
    rgb.thumbnail((px, px), imaging.THUMBNAIL_RESAMPLE)  # Image.thumbnail with the served filter
    return thumbnail_pixels(encode(rgb, "JPEG", quality=80))


def with_orientation(img: Image.Image, orientation: int, **kw: Any) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", exif=exif, **kw)


@pytest.fixture(scope="module")
def camera_jpeg() -> bytes:
    """A 12 MP camera-like JPEG (benchmarks/bench_ingest.py's camera_photos): a sample photo upscaled."""
    img = Image.open(sample_path("chelsea.png")).convert("RGB").resize((4000, 3000), Image.Resampling.BILINEAR)
    return encode(img, "JPEG", quality=92)


@pytest.mark.parametrize(
    ("kind", "orientation", "px"),
    [("camera", 1, 160), ("camera", 6, 160), ("camera", 3, 512), ("small", 8, 160), ("png", 1, 160), ("tiny", 1, 160)],
)
def test_thumbnail_equals_the_gateways_own(
    camera_jpeg: bytes, cat_image: Image.Image, kind: str, orientation: int, px: int
) -> None:
    """The encoder's thumbnail has make_thumbnail's size and orientation, and pixels as close to a full decode's.

    Both decode JPEGs through a draft, the encoder's to at least the model size: where that is the larger one
    (the 641x401 photo: full size, against make_thumbnail's half) the two differ by ~2.7 grey levels, and the
    encoder's is the one equal to the full decode's. Elsewhere the two are the same to the grey level.
    """
    if kind == "camera":
        data = camera_jpeg if orientation == 1 else with_orientation(Image.open(io.BytesIO(camera_jpeg)), orientation)
    elif kind == "small":
        data = with_orientation(cat_image.resize((641, 401)), orientation, quality=92)
    elif kind == "png":
        data = encode(cat_image, "PNG")
    else:  # smaller than the thumbnail: kept at its own size
        data = encode(cat_image.resize((120, 90)), "JPEG", quality=92)
    decoded = decode_image(data, SIZE, LIMITS, thumbnail_px=px)
    ours, gateways = thumbnail_pixels(decoded.thumbnail), thumbnail_pixels(make_thumbnail(data, px))
    assert ours.shape == gateways.shape
    assert max(ours.shape[:2]) == min(px, max(decoded.width, decoded.height))
    if orientation in (6, 8):
        assert ours.shape[0] > ours.shape[1]  # the landscape pixels were turned upright
    reference = full_decode_thumbnail(data, px)
    assert np.abs(ours - gateways).mean() <= 3.0
    assert np.abs(ours - reference).mean() <= np.abs(gateways - reference).mean() + 0.05


def test_thumbnail_of_a_camera_photo_is_small_and_does_not_change_the_model_input(camera_jpeg: bytes) -> None:
    plain = decode_image(camera_jpeg, SIZE, LIMITS)
    with_thumbnail = decode_image(camera_jpeg, SIZE, LIMITS, thumbnail_px=160)
    assert plain.thumbnail == b""
    assert np.array_equal(plain.pixels, with_thumbnail.pixels)
    assert (with_thumbnail.width, with_thumbnail.height) == (4000, 3000)
    assert thumbnail_pixels(with_thumbnail.thumbnail).shape == (120, 160, 3)
    assert len(with_thumbnail.thumbnail) < 16_000


def test_a_thumbnail_larger_than_the_model_input_comes_from_a_large_enough_draft(camera_jpeg: bytes) -> None:
    """At 512 px the 1/8 draft (500x375) would be too small: the decode must draft to at least 512."""
    thumb = thumbnail_pixels(decode_image(camera_jpeg, SIZE, LIMITS, thumbnail_px=512).thumbnail)
    assert thumb.shape == (384, 512, 3)
    assert np.abs(thumb - full_decode_thumbnail(camera_jpeg, 512)).mean() <= 1.0


def test_no_thumbnail_without_thumbnail_px(sample_photos: dict[str, bytes]) -> None:
    assert decode_image(sample_photos["cat"], SIZE, LIMITS).thumbnail == b""
    assert decode_image(sample_photos["cat"], SIZE, LIMITS, thumbnail_px=0).thumbnail == b""


def test_transparent_areas_of_a_thumbnail_are_white() -> None:
    decoded = decode_image(encode(_rgba(), "PNG"), SIZE, LIMITS, thumbnail_px=64)
    pixels = thumbnail_pixels(decoded.thumbnail)
    assert pixels[0, -1].min() >= 245  # the transparent right half


def test_an_image_over_the_thumbnail_pixel_cap_is_encoded_without_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imaging, "THUMBNAIL_MAX_PIXELS", 300 * 200 - 1)
    decoded = decode_image(encode(quadrants(), "JPEG", quality=95), SIZE, LIMITS, thumbnail_px=160)
    assert decoded.thumbnail == b"" and decoded.pixels.shape == (SIZE, SIZE, 3)


def test_a_thumbnail_that_fails_leaves_the_image_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kw: object) -> None:
        raise OSError("encoder error -2 when writing image file")

    data = encode(quadrants(), "PNG")
    monkeypatch.setattr(Image.Image, "save", broken)
    decoded = decode_image(data, SIZE, LIMITS, thumbnail_px=160)
    assert decoded.thumbnail == b""
    assert_quadrants(decoded, tolerance=2)


def test_a_bad_image_with_thumbnails_fails_as_without() -> None:
    for data in (b"", b"definitely not an image", encode(quadrants(), "JPEG")[:200]):
        with pytest.raises(ImageDecodeError) as plain:
            decode_image(data, SIZE, LIMITS, 3, "x.jpg")
        with pytest.raises(ImageDecodeError) as thumbs:
            decode_image(data, SIZE, LIMITS, 3, "x.jpg", thumbnail_px=160)
        assert (thumbs.value.reason, thumbs.value.message) == (plain.value.reason, plain.value.message)
