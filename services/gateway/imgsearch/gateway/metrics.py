"""Gateway-specific Prometheus metrics."""

from prometheus_client import Counter, Histogram

from imgsearch.kit.metrics import LATENCY_BUCKETS

FANOUT_SECONDS = Histogram(
    "imgsearch_gateway_fanout_seconds", "Latency of one shard's part of a fan-out.", ("shard",), buckets=LATENCY_BUCKETS
)
PARTIAL_RESULTS = Counter(
    "imgsearch_gateway_partial_results_total", "Responses answered without every shard.", ("method",)
)
SHARD_ERRORS = Counter("imgsearch_gateway_shard_errors_total", "Failed calls to index shards.", ("shard", "code"))
IMAGES_ADDED = Counter("imgsearch_gateway_images_added_total", "Streamed images by outcome.", ("result",))

PARTIAL_METHODS = ("SearchByImage", "SearchByText", "SearchById", "DeleteImages", "GetImages")


def prime(shards: list[str]) -> None:
    """Create every labelled series at zero: rate() cannot see the increase that creates a series."""
    for shard in shards:
        FANOUT_SECONDS.labels(shard)
        SHARD_ERRORS.labels(shard, "UNAVAILABLE")
    for method in PARTIAL_METHODS:
        PARTIAL_RESULTS.labels(method)
    for result in ("ok", "error"):
        IMAGES_ADDED.labels(result)
