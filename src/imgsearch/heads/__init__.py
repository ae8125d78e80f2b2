"""Projection heads as a library: loaded and run in process by the gateway (projection) and the tagger (ranking)."""

from imgsearch.heads.catalog import HeadCatalog, TextSource, embed_texts, head_id, wait_for_model_info
from imgsearch.heads.model import (
    HEAD_FORMAT,
    ConSEHead,
    Head,
    Layer,
    LearnedHead,
    Matrix,
    TagGate,
    l2_normalise,
    load_head,
    read_head_manifest,
    save_head,
    softmax,
)

__all__ = [
    "HEAD_FORMAT",
    "ConSEHead",
    "Head",
    "HeadCatalog",
    "Layer",
    "LearnedHead",
    "Matrix",
    "TagGate",
    "TextSource",
    "embed_texts",
    "head_id",
    "l2_normalise",
    "load_head",
    "read_head_manifest",
    "save_head",
    "softmax",
    "wait_for_model_info",
]
