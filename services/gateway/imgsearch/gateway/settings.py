"""Gateway settings from IMGSEARCH_GATEWAY_* environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from imgsearch.kit.settings import ServerSettings


def parse_shards(spec: str) -> list[tuple[str, str]]:
    """'index-0=host:50061,index-1=host:50062' (or bare addresses, named shard-0, shard-1, ...)."""
    shards: list[tuple[str, str]] = []
    for i, part in enumerate(p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, sep, address = part.partition("=")
        if not sep:
            name, address = f"shard-{i}", part
        name, address = name.strip(), address.strip()
        if not name or ":" not in address:
            raise ValueError(f"shard entry {part!r} must look like name=host:port")
        shards.append((name, address))
    if not shards:
        raise ValueError("at least one index shard is required")
    names = [n for n, _ in shards]
    if len(set(names)) != len(names):
        raise ValueError(f"shard names must be unique, got {names}")
    return shards


class GatewaySettings(ServerSettings):
    """Everything the gateway reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="IMGSEARCH_GATEWAY_", extra="ignore", frozen=True)

    port: int = Field(50050, ge=0, le=65535)
    metrics_port: int = Field(9100, ge=0, le=65535)
    encoder_address: str = Field(..., min_length=1, description="host:port of the encoder")
    tagger_address: str = Field(
        ..., min_length=1, description="host:port of the tagger read replicas (tag ranking and listing)"
    )
    tagger_writer_address: str | None = Field(
        None, description="host:port of the tagger that owns the vocabulary (tag edits); default TAGGER_ADDRESS"
    )
    index_shards: str = Field(..., min_length=1, description="name=host:port of every index shard, comma-separated")
    max_k: int = Field(1000, ge=1, le=100_000)
    thumbnails: bool = Field(True, description="keep a small JPEG of each added image with its record")
    thumbnail_px: int = Field(160, ge=16, le=512, description="longer side of the kept thumbnails, in pixels")
    max_queries_per_request: int = Field(64, ge=1, description="most queries in one SearchByTexts call")
    shard_deadline_fraction: float = Field(
        0.8, gt=0, le=1, description="share of the caller's remaining deadline each shard's search may take"
    )
    shard_search_timeout_seconds: float = Field(
        2.0, gt=0, description="longest a shard's search may take; past it the answer is partial without it"
    )
    # Concurrent calls of one kind to one peer (shard searches, single-id Gets, query-text embeddings) go out as
    # one batched call while the peer is busy (kit.coalesce; docs/benchmarks.md): one call's overhead per batch
    # instead of per query, and no waiting window, so a lone caller waits for nothing.
    coalesce_max_batch: int = Field(
        64, ge=1, le=256, description="most calls coalesced into one call to a shard or the encoder (1: off)"
    )
    # One: each peer (a shard's event loop, the encoder's text session) runs one call at a time anyway, so a
    # second call in flight only splits the batch. At 10k images, alternating runs, 1 against 2 gave SearchByText
    # 198-226 against 149-182 q/s at 8 callers and 356-388 against 286 at 32 (docs/benchmarks.md).
    coalesce_inflight: int = Field(1, ge=1, le=64, description="calls in flight to one peer before calls queue")
    max_tag_k: int = Field(200_000, ge=1, description="most tags one TagImage may return (up to the vocabulary)")
    max_metadata_entries: int = Field(64, ge=0, description="most metadata entries per image (as the shards)")
    max_metadata_bytes: int = Field(16 * 1024, ge=0, description="most UTF-8 bytes of metadata keys plus values")
    heads_dir: Path = Field(Path("heads"), description="installed head files (*.npz): the only heads that can be used")
    default_head: str = Field("default", description="head a fresh cluster starts with; falls back to conse")
    conse_top_t: int = Field(10, ge=1, le=1000, description="ImageNet classes combined by ConSE")
    anchor_penalty: float = Field(0.5, ge=0.0, le=1.0, description="ConSE tag-score correction")
    head_refresh_seconds: float = Field(1.0, gt=0, description="how often the head configuration is re-read")
    backfill_page_size: int = Field(256, ge=1, le=1000, description="images re-projected per shard call")
    startup_timeout_seconds: float = Field(600.0, gt=0, description="how long to wait for the encoder at start")
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_query_chars: int = Field(1000, ge=1)
    max_ids_per_request: int = Field(1000, ge=1)
    max_id_chars: int = Field(256, ge=1)
    # Every batch costs the stack one encoder call and one durable Upsert per shard: at 64 the gateway and the
    # shards spent 0.8-1.1 ms of CPU per 224-px photo against 1.4-1.9 at 16 (bench_ingest.py --configs).
    add_batch_size: int = Field(64, ge=1, le=256, description="streamed images encoded per encoder call")
    auth_tokens_file: Path | None = Field(None, description="bearer tokens (one per line) required on writes")
    auth_reads: bool = Field(False, description="also require a token on searches and reads")
    http_host: str = Field("127.0.0.1", description="address the HTTP/JSON API and web page bind")
    http_port: int = Field(
        0, ge=0, le=65535, description="port of the HTTP/JSON API and web page, served beside gRPC; 0 turns it off"
    )
    http_max_body_mb: int = Field(
        256, ge=1, le=16 * 1024, description="largest HTTP request body (all uploaded files together)"
    )

    @field_validator("index_shards")
    @classmethod
    def _valid_shards(cls, value: str) -> str:
        parse_shards(value)
        return value

    @property
    def shards(self) -> list[tuple[str, str]]:
        return parse_shards(self.index_shards)
