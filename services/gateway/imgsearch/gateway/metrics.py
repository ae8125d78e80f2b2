"""Gateway-specific Prometheus metrics."""

from prometheus_client import Counter, Gauge, Histogram

from imgsearch.kit.metrics import LATENCY_BUCKETS

FANOUT_SECONDS = Histogram(
    "imgsearch_gateway_fanout_seconds", "Latency of one shard's part of a fan-out.", ("shard",), buckets=LATENCY_BUCKETS
)
PARTIAL_RESULTS = Counter(
    "imgsearch_gateway_partial_results_total", "Responses answered without every shard.", ("method",)
)
SHARD_ERRORS = Counter("imgsearch_gateway_shard_errors_total", "Failed calls to index shards.", ("shard", "code"))
SHARD_BATCH_SIZE = Histogram(
    "imgsearch_gateway_shard_batch_size",
    "Calls coalesced into one call to a shard (1: the shard was idle, sent at once).",
    ("shard", "method"),
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
ENCODER_BATCH_SIZE = Histogram(
    "imgsearch_gateway_encoder_batch_size",
    "Calls coalesced into one call to the encoder (1: it was idle, sent at once).",
    ("method",),
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
IMAGES_ADDED = Counter("imgsearch_gateway_images_added_total", "Streamed images by outcome.", ("result",))

HEAD_EPOCH = Gauge("imgsearch_gateway_head_epoch", "Epoch of the head configuration this gateway follows.")
HEAD_BUILDING = Gauge("imgsearch_gateway_head_building", "1 while a head switch is being built, else 0.")
BACKFILLED = Counter(
    "imgsearch_gateway_backfilled_total", "Stored images given a vector of the head being built.", ("shard",)
)

PARTIAL_METHODS = ("SearchByImage", "SearchByText", "SearchById", "DeleteImages", "GetImages")


def prime(shards: list[str]) -> None:
    """Create every labelled series at zero: rate() cannot see the increase that creates a series."""
    for shard in shards:
        FANOUT_SECONDS.labels(shard)
        SHARD_ERRORS.labels(shard, "UNAVAILABLE")
        BACKFILLED.labels(shard)
    for method in PARTIAL_METHODS:
        PARTIAL_RESULTS.labels(method)
    for result in ("ok", "error"):
        IMAGES_ADDED.labels(result)
