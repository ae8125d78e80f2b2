"""Image decoding for the encoder: re-exports the shared decoder in imgsearch.models.imaging."""

from __future__ import annotations

# The decoder lives with the model runtime so that training decodes with the same code without
# importing this service package; existing imports of imgsearch.encoder.imaging keep working.
from imgsearch.models.imaging import (
    ACCEPTED_FORMATS,
    ACCEPTED_TEXT,
    REASONS,
    DecodedImage,
    ImageDecodeError,
    ImageLimits,
    decode_image,
    describe,
    header_size,
    sniff_unsupported,
    to_rgb,
    webp_size,
)

__all__ = [
    "ACCEPTED_FORMATS",
    "ACCEPTED_TEXT",
    "REASONS",
    "DecodedImage",
    "ImageDecodeError",
    "ImageLimits",
    "decode_image",
    "describe",
    "header_size",
    "sniff_unsupported",
    "to_rgb",
    "webp_size",
]
