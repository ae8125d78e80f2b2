"""Encoder-specific Prometheus metrics: batching, inference time, items and decode failures."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from imgsearch.encoder.imaging import REASONS
from imgsearch.kit.metrics import LATENCY_BUCKETS

KINDS = ("image", "text")

BATCH_SIZE = Histogram(
    "imgsearch_encoder_batch_size",
    "Items per model call, after micro-batching across requests.",
    ("kind",),
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
QUEUE_SECONDS = Histogram(
    "imgsearch_encoder_queue_seconds",
    "Time an item waited in the batching queue before its batch ran.",
    ("kind",),
    buckets=LATENCY_BUCKETS,
)
INFERENCE_SECONDS = Histogram(
    "imgsearch_encoder_inference_seconds",
    "Time of one model call (one batch), including tokenisation for texts.",
    ("kind",),
    buckets=LATENCY_BUCKETS,
)
ITEMS = Counter("imgsearch_encoder_items_total", "Images or texts encoded successfully.", ("kind",))
DECODE_FAILURES = Counter(
    "imgsearch_encoder_decode_failures_total", "Images rejected before inference, by reason.", ("reason",)
)
PROVIDER_INFO = Gauge(
    "imgsearch_encoder_provider_info", "Always 1 for each ONNX Runtime execution provider in use.", ("provider",)
)


def prime() -> None:
    """Create every label combination at zero so dashboards and rate() see them before traffic."""
    for kind in KINDS:
        BATCH_SIZE.labels(kind)
        QUEUE_SECONDS.labels(kind)
        INFERENCE_SECONDS.labels(kind)
        ITEMS.labels(kind)
    for reason in REASONS:
        DECODE_FAILURES.labels(reason)
