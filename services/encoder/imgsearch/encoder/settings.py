"""Encoder settings, read from IMGSEARCH_ENCODER_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from imgsearch.kit.settings import ServerSettings
from imgsearch.models.manifest import MANIFEST_NAME, default_model_dir
from imgsearch.models.runtime import (
    DEFAULT_PROVIDERS,
    ConvAlgoSearch,
    GraphOptimization,
    ImagePrecision,
    RuntimeOptions,
    TextPrecision,
)

# Pillow refuses to open anything above twice its MAX_IMAGE_PIXELS (89,478,485) before we can
# look at it, so a larger configured limit would be a promise the decoder cannot keep.
PILLOW_HARD_PIXEL_LIMIT = 2 * 89_478_485


# See EncoderSettings.fixed_batch.
FixedBatch = Literal["auto", "on", "off"]


class EncoderSettings(ServerSettings):
    """Everything the encoder server can be configured with."""

    model_config = SettingsConfigDict(env_prefix="IMGSEARCH_ENCODER_", extra="ignore", frozen=True)

    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    metrics_port: int = Field(9101, ge=0, le=65535, description="Prometheus port (0 picks a free one)")
    model_dir: Path = Field(
        default_factory=default_model_dir,
        validate_default=True,
        description="directory with manifest.json and the exported models (default $IMGSEARCH_MODEL_DIR or ./models)",
    )
    providers: Annotated[tuple[str, ...], NoDecode] = Field(
        DEFAULT_PROVIDERS,
        description="comma-separated ONNX Runtime execution providers, best first; unavailable ones are skipped",
    )
    intra_op_threads: int = Field(0, ge=0, le=1024, description="ONNX Runtime intra-op threads (0 = ORT default)")
    inter_op_threads: int = Field(
        0, ge=0, le=1024, description="ONNX Runtime inter-op threads; above 1 runs graph branches in parallel"
    )
    graph_optimization: GraphOptimization = Field(
        "all", description="ONNX Runtime graph optimisation level: disabled, basic, extended or all"
    )
    device_id: int = Field(0, ge=0, le=1023, description="GPU the CUDA and TensorRT providers run on")
    trt_cache_dir: Path | None = Field(
        None, description="TensorRT engine and timing cache directory (unset: engines are rebuilt at every start)"
    )
    cudnn_conv_algo_search: ConvAlgoSearch = Field(
        "EXHAUSTIVE",
        description="how the CUDA provider picks convolution algorithms: EXHAUSTIVE (ONNX Runtime's default: "
        "benchmarks them again at every new batch size), HEURISTIC (cuDNN's heuristics, no benchmarking) or DEFAULT",
    )
    image_precision: ImagePrecision = Field(
        "auto",
        description="image model: auto (int8 on CPU when its quality gate passed, else fp32), fp32 or int8",
    )
    text_precision: TextPrecision = Field(
        "auto",
        description="text model: auto (int8 on CPU when its quality gate passed, else fp32), fp32 or int8",
    )
    text_threads: int = Field(
        0,
        ge=0,
        le=1024,
        description="intra-op threads of the text model session (0 = INTRA_OP_THREADS if set, else "
        "TEXT_THREADS_DEFAULT on CPU and ONNX Runtime's default on GPU)",
    )
    max_batch: int = Field(32, ge=1, le=1024, description="most items one model call takes")
    fixed_batch: FixedBatch = Field(
        "auto",
        description="pad every image batch to MAX_BATCH, so the image model sees one input shape: auto (on when "
        "the image model runs on a GPU, where every new batch size rebuilds the convolution plans), on, or off",
    )
    max_wait_ms: float | None = Field(
        None,
        ge=0,
        le=10_000,
        description="how long a batch waits to fill up after its first item (unset: 0 on CPU, GPU_MAX_WAIT_MS on GPU)",
    )
    max_items_per_request: int = Field(256, ge=1, description="more images or texts in one call: RESOURCE_EXHAUSTED")
    max_queue_items: int = Field(
        1024, ge=1, description="items waiting for the model, per kind; beyond this calls get RESOURCE_EXHAUSTED"
    )
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, description="largest encoded image accepted")
    max_image_pixels: int = Field(
        40_000_000, ge=1, le=PILLOW_HARD_PIXEL_LIMIT, description="decompression-bomb limit (width x height)"
    )
    max_text_chars: int = Field(2000, ge=1, description="longest text accepted, in characters")
    decode_threads: int = Field(0, ge=0, le=256, description="image decoding threads (0 = min(4, CPU count))")
    image_workers: int = Field(
        0,
        ge=0,
        le=64,
        description="image model sessions running batches side by side (0 = one per CPU core, at most 8, "
        "on CPU; 1 on GPU); unless INTRA_OP_THREADS is set each gets CPU count / workers intra-op threads",
    )

    def runtime_options(self) -> RuntimeOptions:
        """The model runtime's options from these settings."""
        return RuntimeOptions(
            providers=self.providers,
            intra_op_threads=self.intra_op_threads,
            inter_op_threads=self.inter_op_threads,
            graph_optimization=self.graph_optimization,
            device_id=self.device_id,
            trt_cache_dir=self.trt_cache_dir,
            cudnn_conv_algo_search=self.cudnn_conv_algo_search,
        )

    @field_validator("providers", mode="before")
    @classmethod
    def _split_providers(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",")]
        if isinstance(value, list | tuple):
            names = tuple(str(p).strip() for p in value if str(p).strip())
            if not names:
                raise ValueError("name at least one execution provider, e.g. CPUExecutionProvider")
            return names
        return value

    @field_validator("model_dir")
    @classmethod
    def _has_manifest(cls, value: Path) -> Path:
        if not (value / MANIFEST_NAME).is_file():
            raise ValueError(
                f"{value} has no {MANIFEST_NAME}; export the models with "
                f"`python -m imgsearch.models.export --model-dir {value}` or point IMGSEARCH_MODEL_DIR at them"
            )
        return value

    @field_validator("max_queue_items")
    @classmethod
    def _queue_fits_a_request(cls, value: int, info: ValidationInfo) -> int:
        # max_items_per_request is declared first, so it is in info.data unless it failed itself.
        per_request = info.data.get("max_items_per_request")
        if isinstance(per_request, int) and value < per_request:
            raise ValueError(
                f"must be at least IMGSEARCH_ENCODER_MAX_ITEMS_PER_REQUEST ({per_request}), "
                "or a full request could never be queued"
            )
        return value
