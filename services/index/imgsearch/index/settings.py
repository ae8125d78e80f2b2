"""Index service settings, read from IMGSEARCH_INDEX_* environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from imgsearch.index.ann import SPACE_KINDS, AnnParams
from imgsearch.index.indexes import INDEX_KINDS
from imgsearch.kit.settings import ServerSettings


class IndexSettings(ServerSettings):
    """One index shard: where its data lives, vector dimensions, request limits and snapshot policy."""

    model_config = SettingsConfigDict(env_prefix="IMGSEARCH_INDEX_", extra="ignore", frozen=True)

    port: int = Field(50061, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    metrics_port: int = Field(9111, ge=0, le=65535, description="Prometheus port (0 picks a free one)")

    # The name goes into file paths and metric labels, hence the conservative alphabet.
    shard: str = Field("shard-0", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="shard name")
    data_dir: Path | None = Field(None, description="directory of the shard's files (default var/index/<shard>)")
    visual_dim: int = Field(1280, ge=1, le=65536, description="dimension of the visual (CNN feature) space")
    semantic_dim: int = Field(384, ge=1, le=65536, description="dimension of the semantic space")
    index_type: str = Field(
        "SQfp16", description="exact kind of FAISS index (small spaces, tails): " + ", ".join(INDEX_KINDS)
    )
    # Approximate kinds per space (see ann.py and docs/benchmarks.md for why these): a space stays exact until it
    # holds ann_min_vectors vectors, then an approximate base is built in the background and swapped in.
    # IVFPQFS (4-bit fast-scan codes) rather than IVFPQ: at 500k per shard, recall@10 0.989 for 2.9 ms of CPU a
    # query, where IVF-PQ (nprobe 96) gave 0.973 for 8.8 ms (docs/benchmarks.md, "Fast-scan visual base").
    # A base of the other kind read from a snapshot keeps serving until the builder has replaced it.
    visual_index: str = Field("IVFPQFS", description="kind of the visual space: " + ", ".join(SPACE_KINDS))
    semantic_index: str = Field("HNSW", description="kind of each semantic space: " + ", ".join(SPACE_KINDS))
    ann_min_vectors: int = Field(50_000, ge=1, description="vectors in a space before its approximate index is built")
    ann_merge_min: int = Field(10_000, ge=1, description="exact tail size that triggers merging it into the base")
    ann_idle_merge_seconds: float = Field(
        30.0, ge=0, description="after this long without writes, merge smaller tails too (0: never)"
    )
    ann_idle_merge_min: int = Field(1_000, ge=1, description="... tails of at least this many vectors")
    ann_bulk_write_rate: float = Field(
        2_000.0,
        ge=0,
        description="records/s written over the last 10 s from which the shard is taking a bulk load: background"
        " builds then wait until it pauses or a tail holds ann_bulk_tail_max vectors (0: never wait)",
    )
    ann_bulk_tail_max: int = Field(500_000, ge=1, description="... vectors in a tail at which builds go ahead anyway")
    ann_merge_ratio: float = Field(0.05, ge=0, description="... or this fraction of the base, whichever is larger")
    ann_rebuild_dead_fraction: float = Field(
        0.25, gt=0, le=1, description="rebuild the base from scratch once this fraction of it is deleted/replaced"
    )
    hnsw_m: int = Field(32, ge=4, le=256, description="HNSW neighbours per node")
    hnsw_ef_construction: int = Field(128, ge=8, description="HNSW build-time beam width")
    # 320 and 192: the cheapest settings with recall@10 >= 0.95 on the hard synthetic queries at 500k vectors per
    # shard, with margin (efSearch 256 gave 0.946-0.959; the fast-scan visual base 0.973 at nprobe 96 and 0.989 at
    # 192 for 0.3 ms more, margin against the training point's +-0.05; docs/benchmarks.md).
    hnsw_ef_search: int = Field(320, ge=1, description="HNSW search beam width (raised to k when k is larger)")
    ivf_nprobe: int = Field(192, ge=1, description="IVF lists probed per visual search")
    pq_dims_per_code: int = Field(
        8, ge=1, description="dimensions per PQ byte of the visual space (IVFPQFS: two 4-bit codes per byte)"
    )
    # 300, although the fast-scan base at nprobe 192 reached the same recall@10 (0.989) re-ranking 150 (100: 0.980)
    # on the 1280-d sweep: at 150 the 64-d unit test's coarser codes fell to 0.92, so the margin stays.
    rerank: int = Field(300, ge=0, description="visual (PQ) candidates re-ranked exactly from stored float16 vectors")
    filter_brute_limit: int = Field(
        20_000, ge=0, description="filters allowing at most this many base rows are scored exactly, not by ANN"
    )
    background_build: bool = Field(True, description="build approximate indexes on a background thread when due")
    build_threads: int = Field(1, ge=0, description="OpenMP threads of the background index builder (0: all)")
    build_nice: int = Field(
        10, ge=0, le=19, description="how much nicer the builder thread runs than the shard (0: same priority)"
    )
    use_gpu: bool = Field(True, description="search on GPU when faiss was built with GPU support and sees one")
    # Concurrent RPCs already run searches in parallel (FAISS releases the GIL); OpenMP teams inside each of
    # them oversubscribe the cores, which measured ~10x slower on a busy 2-core host (see benchmarks).
    search_threads: int = Field(1, ge=0, description="OpenMP threads per CPU search; 0: FAISS's default (all cores)")

    max_k: int = Field(1000, ge=1, le=100_000, description="largest k a search may ask for")
    max_batch: int = Field(
        1000, ge=1, description="most records, ids or updates per Upsert, Delete, Get or SetSemantic request"
    )
    max_exclude_ids: int = Field(1000, ge=0, description="most exclude_ids per Search request")
    max_id_length: int = Field(256, ge=1, description="longest id (and semantic_head), in characters")
    max_metadata_entries: int = Field(64, ge=0, description="most metadata entries per record")
    max_metadata_bytes: int = Field(16 * 1024, ge=0, description="most UTF-8 bytes of metadata keys plus values")
    max_source_name_length: int = Field(4096, ge=0, description="longest source_name, in characters")
    max_thumbnail_bytes: int = Field(64 * 1024, ge=0, description="largest thumbnail kept with a record")

    snapshot_every: int = Field(1000, ge=1, description="write a FAISS snapshot after at least this many changes")
    snapshot_growth: float = Field(
        0.25, ge=0, description="... and at least this fraction of the shard's records (snapshot cost stays O(N))"
    )
    snapshot_interval_seconds: float = Field(
        300.0, gt=0, description="write a snapshot at least this often while there are unsnapshotted changes"
    )

    @field_validator("index_type")
    @classmethod
    def _known_index_type(cls, value: str) -> str:
        if value not in INDEX_KINDS:
            raise ValueError(f"unknown index type {value!r}; known: {', '.join(INDEX_KINDS)}")
        return value

    @field_validator("visual_index", "semantic_index")
    @classmethod
    def _known_space_kind(cls, value: str) -> str:
        if value not in SPACE_KINDS:
            raise ValueError(f"unknown index kind {value!r}; known: {', '.join(SPACE_KINDS)}")
        return value

    def ann_params(self) -> AnnParams:
        return AnnParams(
            min_vectors=self.ann_min_vectors,
            merge_min=self.ann_merge_min,
            idle_merge_min=self.ann_idle_merge_min,
            bulk_tail_max=self.ann_bulk_tail_max,
            merge_ratio=self.ann_merge_ratio,
            rebuild_dead_fraction=self.ann_rebuild_dead_fraction,
            hnsw_m=self.hnsw_m,
            hnsw_ef_construction=self.hnsw_ef_construction,
            hnsw_ef_search=self.hnsw_ef_search,
            ivf_nprobe=self.ivf_nprobe,
            pq_dims_per_code=self.pq_dims_per_code,
            brute_limit=self.filter_brute_limit,
            build_threads=self.build_threads,
        )

    @property
    def shard_dir(self) -> Path:
        """The directory holding this shard's database and snapshots."""
        return self.data_dir if self.data_dir is not None else Path("var") / "index" / self.shard
