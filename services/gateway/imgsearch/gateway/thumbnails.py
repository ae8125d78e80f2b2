"""Small JPEG thumbnails made at add time and kept with each record, for result pages."""

from __future__ import annotations

import io
import logging
import warnings

from PIL import Image, ImageOps

log = logging.getLogger(__name__)

# Thumbnails are small by design: anything that would decode to more than this is not worth the gateway's CPU
# (the encoder already refused real decompression bombs before a thumbnail is made).
_MAX_PIXELS = 50_000_000


def make_thumbnail(data: bytes, size: int, quality: int = 80) -> bytes:
    """A JPEG whose longer side is at most `size` px, EXIF-rotated; b"" if the image cannot be read.

    JPEGs are decoded through Pillow's draft mode (a DCT-domain downscale), so a 12 MP photo costs a few
    milliseconds rather than a full decode.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > _MAX_PIXELS:
                    return b""
                im.draft("RGB", (size, size))
                rgb = ImageOps.exif_transpose(im).convert("RGB")
                rgb.thumbnail((size, size), Image.Resampling.LANCZOS)
                out = io.BytesIO()
                rgb.save(out, format="JPEG", quality=quality, optimize=True)
                return out.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        # The image was already encoded by the encoder, so this is rare; the record is stored without one.
        log.info("no thumbnail", extra={"reason": str(exc)})
        return b""
