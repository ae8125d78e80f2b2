"""Tagger settings from IMGSEARCH_TAGGER_* environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from imgsearch.kit.settings import ServerSettings


class TaggerSettings(ServerSettings):
    """Everything the tagger reads from its environment."""

    model_config = SettingsConfigDict(env_prefix="IMGSEARCH_TAGGER_", extra="ignore", frozen=True)

    port: int = Field(50052, ge=0, le=65535)
    metrics_port: int = Field(9102, ge=0, le=65535)
    encoder_address: str = Field(..., min_length=1, description="host:port of the encoder service")
    data_dir: Path = Field(Path("var/tagger"), description="durable vocabulary (SQLite)")
    heads_dir: Path = Field(Path("heads"), description="trained head files (*.npz) loaded at start")
    default_head: str = Field("default", description="head to activate at start; falls back to conse")
    conse_top_t: int = Field(10, ge=1, le=1000, description="ImageNet classes combined by ConSE")
    anchor_penalty: float = Field(0.5, ge=0.0, le=1.0, description="ConSE tag-score correction")
    max_k: int = Field(1000, ge=1)
    max_tags_per_request: int = Field(1000, ge=1)
    max_tag_chars: int = Field(100, ge=1)
    max_vocabulary: int = Field(200_000, ge=1, description="adds beyond this get RESOURCE_EXHAUSTED")
    startup_timeout_seconds: float = Field(600.0, gt=0, description="how long to wait for the encoder")
