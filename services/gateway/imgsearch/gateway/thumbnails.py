"""Small JPEG thumbnails kept with each record, for result pages, made here when an encoder did not make them."""

from __future__ import annotations

import io
import logging
import warnings

from PIL import Image, ImageOps

from imgsearch.models.imaging import THUMBNAIL_MAX_PIXELS, thumbnail_jpeg

log = logging.getLogger(__name__)


def make_thumbnail(data: bytes, size: int) -> bytes:
    """A JPEG whose longer side is at most `size` px, EXIF-rotated; b"" if the image cannot be read.

    The encoder normally makes these from its own decode (EncodeImagesRequest.thumbnail_px); the gateway
    calls this only for an encoder that returned none (one older than that field). JPEGs are decoded through
    Pillow's draft mode (a DCT-domain downscale), which still costs a full entropy decode: about 6.7 ms of CPU
    for a 12 MP photo.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                # Small by design: anything bigger is not worth the gateway's CPU (the encoder already refused
                # real decompression bombs), and the encoder's own thumbnails skip the same images.
                if im.width * im.height > THUMBNAIL_MAX_PIXELS:
                    return b""
                im.draft("RGB", (size, size))
                rgb = ImageOps.exif_transpose(im).convert("RGB")
                return thumbnail_jpeg(rgb, size)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        # The image was already encoded by the encoder, so this is rare; the record is stored without one.
        log.info("no thumbnail", extra={"reason": str(exc)})
        return b""
