"""Decode untrusted image bytes into the models' square RGB uint8 input, safely and deterministically."""

from __future__ import annotations

import io
import logging
import re
import struct
import warnings
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from imgsearch.kit.errors import InvalidArgument

log = logging.getLogger(__name__)

ACCEPTED_FORMATS: Final = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
ACCEPTED_TEXT: Final = "JPEG, PNG, WebP, GIF or BMP"
# Reason label values of imgsearch_encoder_decode_failures_total.
REASONS: Final = ("empty", "corrupt", "truncated", "unsupported_format", "too_large", "too_many_pixels")
# Thumbnails (decode_image's thumbnail_px) are JPEGs of this quality, resized with this filter. Images of more
# pixels than the cap get none, whatever the decode limits allow: the gateway's own thumbnails.make_thumbnail uses
# the same constants, so a record's thumbnail is the same whichever service made it.
THUMBNAIL_QUALITY: Final = 80
THUMBNAIL_RESAMPLE: Final = Image.Resampling.BILINEAR
THUMBNAIL_MAX_PIXELS: Final = 50_000_000

# Our own pixel limit (checked from the header) is the real guard; Pillow's warning at 89 MP would only
# add noise, while its hard error at 179 MP stays in force as a second line of defence.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Magic numbers of formats people commonly send but we do not accept, so the error can name them.
# Sniffing these bytes ourselves means Pillow never runs its parsers for formats we refuse.
_MAGIC: Final = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "BigTIFF"),
    (b"MM\x00+", "BigTIFF"),
    (b"8BPS", "PSD"),
    (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"icns", "ICNS"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"#?RADIANCE", "HDR"),
    (b"\x76\x2f\x31\x01", "OpenEXR"),
    (b"P1", "PBM"),
    (b"P4", "PBM"),
    (b"P2", "PGM"),
    (b"P5", "PGM"),
    (b"P3", "PPM"),
    (b"P6", "PPM"),
)
_FTYP_BRANDS: Final = {
    b"heic": "HEIC",
    b"heix": "HEIC",
    b"hevc": "HEIC",
    b"mif1": "HEIF",
    b"msf1": "HEIF",
    b"avif": "AVIF",
    b"avis": "AVIF",
}


class ImageDecodeError(InvalidArgument):
    """An image that cannot be used; `reason` is a fixed label for metrics, `message` is for people."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on what one encoded image may cost to decode."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000


@dataclass(frozen=True)
class DecodedImage:
    """Model input (size x size x 3, uint8 RGB), the image's size after EXIF orientation, and its thumbnail."""

    pixels: npt.NDArray[np.uint8]
    width: int
    height: int
    # A JPEG whose longer side is at most the thumbnail_px asked for; empty when none was asked for or made.
    thumbnail: bytes = b""


def describe(index: int, name: str = "") -> str:
    """How an item is named in error messages: its position and the caller's name for it, if any."""
    if not name:
        return f"item {index}"
    shown = name if len(name) <= 120 else name[:117] + "..."
    return f"item {index} ({shown!r})"


def sniff_unsupported(data: bytes) -> str | None:
    """The name of a known but unaccepted format these bytes start with, if any."""
    head = data[:32]
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            # Netpbm magic is two ASCII bytes; require the whitespace that follows to avoid false hits.
            if fmt in ("PBM", "PGM", "PPM") and (len(head) < 3 or head[2:3] not in b" \t\r\n"):
                continue
            return fmt
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _FTYP_BRANDS:
            return _FTYP_BRANDS[brand]
    stripped = head.lstrip()
    if stripped.startswith((b"<svg", b"<?xml")):
        return "SVG"
    return None


def webp_size(data: bytes) -> tuple[int, int] | None:
    """Canvas size from a WebP header, or None if the header does not say.

    libwebp allocates the whole canvas when Pillow merely opens the file, so WebP is the one format
    whose size we must read ourselves before handing it to Pillow.
    """
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack_from("<HH", data, 26)
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8X":
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _check_pixels(width: int, height: int, limits: ImageLimits, what: str) -> None:
    if width < 1 or height < 1:
        raise ImageDecodeError(f"{what} has no pixels ({width}x{height})", "corrupt")
    if width * height > limits.max_pixels:
        raise ImageDecodeError(
            f"{what} has too many pixels: {width}x{height} = {width * height:,} > limit {limits.max_pixels:,}",
            "too_many_pixels",
        )


_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the first JPEG start-of-frame segment."""
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in _JPEG_SOF:
            height, width = struct.unpack_from(">HH", data, i + 5)
            return width, height
        (length,) = struct.unpack_from(">H", data, i + 2)
        i += 2 + length
    return None


def header_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the header of an accepted format, without Pillow; None if unreadable."""
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
            w, h = struct.unpack_from(">II", data, 16)
            return int(w), int(h)
        if data[:6] in (b"GIF87a", b"GIF89a"):
            w, h = struct.unpack_from("<HH", data, 6)
            return int(w), int(h)
        if data.startswith(b"BM"):
            w, h = struct.unpack_from("<ii", data, 18)
            return abs(int(w)), abs(int(h))
        if data.startswith(b"\xff\xd8"):
            return _jpeg_size(data)
        return webp_size(data)
    except struct.error:
        return None


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _bomb(
    size: tuple[int, int] | None, exc: Image.DecompressionBombError, limits: ImageLimits, what: str
) -> ImageDecodeError:
    """Pillow's own hard limit fired (far above ours) before we saw the size: same reason, our wording."""
    if size is not None:
        count = f"{size[0]}x{size[1]} = {size[0] * size[1]:,}"
    else:
        found = _BOMB_PIXELS.search(str(exc))
        count = f"{int(found.group(1)):,}" if found else "more than 178,956,970"
    return ImageDecodeError(f"{what} has too many pixels: {count} > limit {limits.max_pixels:,}", "too_many_pixels")


def _open(data: bytes, limits: ImageLimits, what: str) -> ImageFile.ImageFile:
    """Identify the format and read the header only (no pixel data yet)."""
    size = webp_size(data)
    if size is not None:
        _check_pixels(*size, limits, what)
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise _bomb(header_size(data), exc, limits, what) from None
    except UnidentifiedImageError:
        fmt = sniff_unsupported(data)
        if fmt is not None:
            raise ImageDecodeError(
                f"{what} is in unsupported format '{fmt}'; send {ACCEPTED_TEXT}", "unsupported_format"
            ) from None
        raise ImageDecodeError(
            f"{what} is not a recognisable image ({len(data)} bytes); expected {ACCEPTED_TEXT}", "corrupt"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise ImageDecodeError(f"{what} has a corrupt header: {exc}", "corrupt") from None


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1-8), or 1 when absent or unreadable."""
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    # Broken EXIF must not cost the user their image: the pixels are still good, only rotation is lost.
    except Exception:
        log.debug("unreadable EXIF ignored", exc_info=True)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _load(img: ImageFile.ImageFile, limits: ImageLimits, what: str) -> None:
    try:
        img.load()
    except Image.DecompressionBombError as exc:
        raise _bomb(img.size, exc, limits, what) from None
    except OSError as exc:
        if "truncated" in str(exc).lower():
            raise ImageDecodeError(
                f"{what} is truncated: the data ends before the image does ({exc})", "truncated"
            ) from None
        raise ImageDecodeError(f"{what} is corrupt: {exc}", "corrupt") from None
    except (ValueError, SyntaxError, EOFError, IndexError, TypeError, struct.error) as exc:
        raise ImageDecodeError(f"{what} is corrupt: {exc}", "corrupt") from None


# The mapping ImageOps.exif_transpose uses; done by hand so that unreadable EXIF cannot fail the image.
_TRANSPOSE: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES: Final = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit grey or float as 8-bit grey, scaled rather than clipped (Pillow's convert clips at 255)."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        scaled = arr.astype(np.float32) / 257.0
    elif img.mode == "F":
        # Float images carry no convention; treat [0, 1] as normalised and anything else as 0-255.
        peak = float(np.nanmax(arr)) if arr.size else 0.0
        scaled = arr.astype(np.float32) * (255.0 if peak <= 1.0 else 1.0)
    else:
        # Mode I: 16-bit PNG greys arrive here in older Pillow versions; values above 255 mean 16-bit data.
        peak = int(arr.max()) if arr.size else 0
        scaled = arr.astype(np.float32) / (257.0 if peak > 255 else 1.0)
    out = np.clip(np.nan_to_num(scaled), 0.0, 255.0).round().astype(np.uint8)
    return Image.fromarray(out, mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as RGB; transparent areas are composited onto white."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return _high_bit_depth_to_l(img).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def thumbnail_jpeg(rgb: Image.Image, px: int, what: str = "image") -> bytes:
    """A JPEG of the RGB image, longer side at most px (Image.thumbnail with bilinear); b"" if it cannot be made.

    The one recipe for a record's thumbnail, whether the encoder makes it (decode_image's thumbnail_px) or the
    gateway does for an older encoder (gateway.thumbnails.make_thumbnail).
    """
    try:
        # Image.thumbnail's recipe (reducing_gap 2) with its bilinear filter, into a new image: Image.thumbnail
        # works in place and would need a copy first, to leave the model input alone. Thumbnails are a large
        # share of ingest on CPU, so the cheapest recipe whose files stay as small won: per 224-px Flickr8k
        # photo (200 photos, one thread) bilinear and a plain JPEG cost 0.49 ms against 0.84 ms for bicubic with
        # Pillow's extra Huffman pass (`optimize`), the files 6.5 KB either way (the softer bilinear image
        # compresses better), the pixels 1.4 grey levels apart on average. Lanczos, older still, cost 0.9 ms.
        small = rgb
        if rgb.width > px or rgb.height > px:
            scale = min(px / rgb.width, px / rgb.height)
            size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
            small = rgb.resize(size, THUMBNAIL_RESAMPLE, reducing_gap=2.0)
        out = io.BytesIO()
        small.save(out, format="JPEG", quality=THUMBNAIL_QUALITY)
        return out.getvalue()
    # The image itself decoded, so it is still encoded: a missing thumbnail costs a result page an icon only.
    except Exception:
        log.warning("no thumbnail for %s", what, exc_info=True)
        return b""


def decode_image(
    data: bytes, size: int, limits: ImageLimits, index: int = 0, name: str = "", *, thumbnail_px: int = 0
) -> DecodedImage:
    """Decode one image to size x size RGB: EXIF orientation, shorter side to `size` (bicubic), centre crop.

    With thumbnail_px > 0 the result also holds a JPEG thumbnail (longer side at most thumbnail_px), made from
    the same decode. Raises ImageDecodeError (an InvalidArgument) naming the item and the reason.
    """
    what = describe(index, name)
    if not data:
        raise ImageDecodeError(f"{what} is empty (0 bytes)", "empty")
    if len(data) > limits.max_bytes:
        raise ImageDecodeError(
            f"{what} is {len(data) / 2**20:.1f} MiB; the limit is {limits.max_bytes / 2**20:.1f} MiB", "too_large"
        )
    try:
        img = _open(data, limits, what)
        try:
            return _decode_opened(img, size, limits, what, thumbnail_px)
        finally:
            img.close()
    except (ImageDecodeError, MemoryError):
        raise
    # Pillow's parsers raise many exception types on hostile input (KeyError, ZeroDivisionError, ...);
    # whatever it is, it concerns this one image and must not fail the rest of the batch.
    except Exception as exc:
        log.warning("unexpected error decoding %s", what, exc_info=True)
        raise ImageDecodeError(f"{what} could not be decoded: {type(exc).__name__}: {exc}", "corrupt") from None


def _decode_opened(
    img: ImageFile.ImageFile, size: int, limits: ImageLimits, what: str, thumbnail_px: int = 0
) -> DecodedImage:
    stored_w, stored_h = img.size
    # The header's size is known before any pixel is decoded: refuse bombs here, not after allocating them.
    _check_pixels(stored_w, stored_h, limits, what)
    if thumbnail_px > 0 and stored_w * stored_h > THUMBNAIL_MAX_PIXELS:
        thumbnail_px = 0
    if img.format == "JPEG":
        # Let libjpeg scale by 1/2..1/8 in the DCT to the smallest size whose shorter side is still at
        # least the target: big photos decode several times faster and the bicubic step below does the real
        # resize. Against a draft of twice the target, on 12 MP JPEGs (quality 90) this decoded 1.36x faster
        # (15.1 vs 20.4 ms) and moved the final 224-px pixels by 0.46 grey levels on average (0.30-0.67 per
        # photo, at most 10 on single pixels); see docs/evaluation.md.
        # A thumbnail larger than the model input needs a larger draft, never one smaller than its own.
        target = max(size, thumbnail_px)
        img.draft("RGB", (target, target))
    _load(img, limits, what)
    # Read EXIF only after load(): for PNG, getexif() would otherwise trigger the load itself and a
    # decoding error there would be swallowed together with the EXIF problem.
    orientation = _orientation(img)
    width, height = (stored_h, stored_w) if orientation in (5, 6, 7, 8) else (stored_w, stored_h)
    out: Image.Image = img
    if orientation in _TRANSPOSE:
        out = out.transpose(_TRANSPOSE[orientation])
    out = to_rgb(out)
    thumbnail = thumbnail_jpeg(out, thumbnail_px, what) if thumbnail_px > 0 else b""
    w, h = out.size
    side = min(w, h)
    # Cropping the centred square in source coordinates and resizing it in one call is the same as
    # "shorter side to size, then centre crop", without materialising the larger intermediate image.
    box = ((w - side) / 2.0, (h - side) / 2.0, (w + side) / 2.0, (h + side) / 2.0)
    out = out.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    pixels = np.asarray(out, dtype=np.uint8)
    if pixels.shape != (size, size, 3):
        raise ImageDecodeError(f"{what} decoded to an unexpected shape {pixels.shape}", "corrupt")
    return DecodedImage(pixels=np.ascontiguousarray(pixels), width=width, height=height, thumbnail=thumbnail)
