"""Tagger-specific Prometheus metrics."""

from prometheus_client import Gauge, Histogram

from imgsearch.kit.metrics import LATENCY_BUCKETS

VOCABULARY_SIZE = Gauge("imgsearch_tagger_vocabulary_size", "Tags in the live vocabulary.", ("kind",))
VOCABULARY_VERSION = Gauge(
    "imgsearch_tagger_vocabulary_version", "Version of the vocabulary this tagger serves (replica lag = writer - it)."
)
HEAD_INFO = Gauge(
    "imgsearch_tagger_head_info",
    "1 for the default head (RankTags without a head), 0 for other loaded ones.",
    ("head", "kind"),
)
WATCHERS = Gauge("imgsearch_tagger_watchers", "Replicas following this writer's vocabulary (WatchVocabulary streams).")
REPLICA_CONNECTED = Gauge(
    "imgsearch_tagger_replica_connected", "A read replica: 1 while it follows the writer, 0 while reconnecting."
)
TAG_ADD_SECONDS = Histogram(
    "imgsearch_tagger_tag_add_seconds", "Time to embed, store and publish added tags.", buckets=LATENCY_BUCKETS
)
RANK_SECONDS = Histogram(
    "imgsearch_tagger_rank_seconds", "Time to rank the vocabulary against one image.", buckets=LATENCY_BUCKETS
)
