"""Tagger settings from IMGSEARCH_TAGGER_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from imgsearch.kit.settings import ServerSettings


class TaggerSettings(ServerSettings):
    """Everything the tagger reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="IMGSEARCH_TAGGER_", extra="ignore", frozen=True)

    port: int = Field(50052, ge=0, le=65535)
    metrics_port: int = Field(9102, ge=0, le=65535)
    encoder_address: str = Field(..., min_length=1, description="host:port of the encoder service")
    role: Literal["writer", "reader"] = Field(
        "writer",
        description="writer: owns the durable vocabulary (one per deployment); reader: a replica that follows it",
    )
    # Declared after role: its validator reads the role.
    writer_address: str | None = Field(
        None, validate_default=True, description="host:port of the vocabulary writer (required for a reader)"
    )
    data_dir: Path = Field(Path("var/tagger"), description="durable vocabulary (SQLite; writer only)")
    heads_dir: Path = Field(Path("heads"), description="trained head files (*.npz) loaded at start")
    default_head: str = Field(
        "default", description="head RankTags uses when a request names none; falls back to conse"
    )
    conse_top_t: int = Field(10, ge=1, le=1000, description="ImageNet classes combined by ConSE")
    anchor_penalty: float = Field(0.5, ge=0.0, le=1.0, description="ConSE tag-score correction")
    max_tags_per_request: int = Field(1000, ge=1)
    max_tag_chars: int = Field(100, ge=1)
    max_vocabulary: int = Field(200_000, ge=1, description="adds beyond this get RESOURCE_EXHAUSTED")
    encode_batch_size: int = Field(
        256, ge=1, description="texts per EncodeTexts call when embedding new tags (the encoder's per-call limit)"
    )
    max_cached_heads: int = Field(
        4, ge=1, description="heads whose projected vocabulary is kept in memory at once (least recent dropped)"
    )
    version_wait_seconds: float = Field(
        1.0, ge=0, le=30, description="how long a replica behind min_vocabulary_version waits before answering"
    )
    startup_timeout_seconds: float = Field(
        600.0, gt=0, description="how long to wait for the encoder (and a reader for its first snapshot)"
    )

    @field_validator("writer_address")
    @classmethod
    def _reader_needs_writer(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("role") == "reader" and not (value and value.strip()):
            raise ValueError("a reader (IMGSEARCH_TAGGER_ROLE=reader) needs the writer's host:port here")
        return value
