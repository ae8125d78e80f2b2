"""Tagger-specific Prometheus metrics."""

from prometheus_client import Gauge, Histogram

from imgsearch.kit.metrics import LATENCY_BUCKETS

VOCABULARY_SIZE = Gauge("imgsearch_tagger_vocabulary_size", "Tags in the live vocabulary.", ("kind",))
HEAD_INFO = Gauge(
    "imgsearch_tagger_head_info", "1 for the active projection head, 0 for other loaded ones.", ("head", "kind")
)
TAG_ADD_SECONDS = Histogram(
    "imgsearch_tagger_tag_add_seconds", "Time to embed, store and publish added tags.", buckets=LATENCY_BUCKETS
)
RANK_SECONDS = Histogram(
    "imgsearch_tagger_rank_seconds", "Time to rank the vocabulary against one image.", buckets=LATENCY_BUCKETS
)
