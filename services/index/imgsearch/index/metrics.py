"""Prometheus metrics of the index service (the RPC metrics come from the kit)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from imgsearch.kit.metrics import LATENCY_BUCKETS

VECTORS = Gauge("imgsearch_index_vectors", "Vectors held by the shard, per space.", ("shard", "space"))
SEARCH_SECONDS = Histogram(
    "imgsearch_index_search_seconds",
    "Time of one FAISS search, including id and metadata lookup.",
    ("shard", "space", "index_type"),
    buckets=LATENCY_BUCKETS,
)
SNAPSHOT_AGE = Gauge(
    "imgsearch_index_snapshot_age_seconds",
    "Seconds since the newest FAISS snapshot (since the shard opened when it has none).",
    ("shard",),
)
UNINDEXED = Gauge(
    "imgsearch_index_unindexed_vectors",
    "Vectors of an approximate space still in its exact tail, waiting for the background builder (searched exactly"
    " meanwhile: each one costs every search of that space); 0 for exact spaces.",
    ("shard", "space"),
)
BUILD_SECONDS = Histogram(
    "imgsearch_index_build_seconds",
    "Background builds of an approximate base: full (from scratch) or merge (the exact tail into the base).",
    ("shard", "space", "mode"),
    buckets=(0.5, 2, 5, 15, 30, 60, 120, 300, 600, 1200, 3600),
)
WAL_ENTRIES = Gauge(
    "imgsearch_index_wal_entries", "Changes stored in SQLite but not yet in a FAISS snapshot.", ("shard",)
)
WRITES = Counter(
    "imgsearch_index_writes_total",
    "Records written: upserts stored, deletes of existing ids, semantic vectors added or replaced (op=set_semantic).",
    ("shard", "op"),
)
