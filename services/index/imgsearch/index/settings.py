"""Index service settings, read from IMGSEARCH_INDEX_* environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

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
    index_type: str = Field("Flat", description="kind of FAISS index: " + ", ".join(INDEX_KINDS))
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

    snapshot_every: int = Field(1000, ge=1, description="write a FAISS snapshot after this many changes")
    snapshot_interval_seconds: float = Field(
        300.0, gt=0, description="write a snapshot at least this often while there are unsnapshotted changes"
    )

    @field_validator("index_type")
    @classmethod
    def _known_index_type(cls, value: str) -> str:
        if value not in INDEX_KINDS:
            raise ValueError(f"unknown index type {value!r}; known: {', '.join(INDEX_KINDS)}")
        return value

    @property
    def shard_dir(self) -> Path:
        """The directory holding this shard's database and snapshots."""
        return self.data_dir if self.data_dir is not None else Path("var") / "index" / self.shard
