"""The one model runtime: ONNX Runtime sessions and providers, preprocessing, and the image and text models."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np
import numpy.typing as npt

from imgsearch.kit.errors import FailedPrecondition
from imgsearch.models.imaging import DecodedImage, ImageLimits, decode_image
from imgsearch.models.manifest import ImageVariant, Int8Model, ModelManifest, TextVariant, Variant

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

Matrix = npt.NDArray[np.float32]
Pixels = npt.NDArray[np.uint8]
TokenIds = npt.NDArray[np.int64]

TENSORRT: Final = "TensorrtExecutionProvider"
CUDA: Final = "CUDAExecutionProvider"
CPU: Final = "CPUExecutionProvider"
DEFAULT_PROVIDERS: Final = (TENSORRT, CUDA, CPU)

GraphOptimization = Literal["disabled", "basic", "extended", "all"]
Precision = Literal["auto", "fp32", "int8"]
ImagePrecision = Precision
TextPrecision = Precision
GPU_PROVIDERS: Final = frozenset({"TensorrtExecutionProvider", "CUDAExecutionProvider"})
ExecutionMode = Literal["sequential", "parallel"]
ConvAlgoSearch = Literal["HEURISTIC", "EXHAUSTIVE", "DEFAULT"]
_GRAPH_LEVELS: Final = {
    "disabled": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}

# The image graph takes uint8 NHWC pixels and does the rest itself: x / 255, (x - mean) / std, NCHW
# float32 (see export.image_wrapper). Keeping it in the graph means no caller can get it wrong;
# `normalise` below is the same step in numpy, for tests and for anyone feeding the bare network.
IMAGE_MEAN: Final = 0.5
IMAGE_STD: Final = 0.5

IMAGE_INPUTS: Final = frozenset({"pixels"})
IMAGE_OUTPUTS: Final = ("features", "logits")
TEXT_INPUTS: Final = frozenset({"input_ids", "attention_mask"})
TEXT_OUTPUTS: Final = ("embedding",)


@dataclass(frozen=True)
class RuntimeOptions:
    """What to ask ONNX Runtime for; the encoder builds this from its settings, training from its defaults."""

    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization: GraphOptimization = "all"
    device_id: int = 0
    trt_cache_dir: Path | None = None
    cudnn_conv_algo_search: ConvAlgoSearch = "EXHAUSTIVE"


@dataclass(frozen=True)
class ProviderPlan:
    """The execution providers a session gets, best first, each with its provider options."""

    providers: tuple[str, ...]
    options: tuple[Mapping[str, str], ...]
    skipped: tuple[str, ...] = ()

    def options_for(self, provider: str) -> Mapping[str, str]:
        return self.options[self.providers.index(provider)]


@dataclass(frozen=True)
class SessionPlan:
    """Everything a session is created with: providers with their options, and the session options."""

    providers: ProviderPlan
    graph_optimization: GraphOptimization = "all"
    execution_mode: ExecutionMode = "sequential"
    intra_op_threads: int = 0
    inter_op_threads: int = 0


def select_providers(
    preferred: Sequence[str], available: Sequence[str], known: Sequence[str] | None = None
) -> list[str]:
    """The preferred providers this ONNX Runtime build offers, in preference order.

    Names ONNX Runtime has never heard of (when `known` is given) are most likely typos: they are
    skipped with a warning.
    """
    chosen: list[str] = []
    for name in preferred:
        if name in chosen:
            continue
        if known is not None and name not in known:
            log.warning("unknown execution provider %r ignored (known: %s)", name, ", ".join(known))
        elif name not in available:
            log.info("execution provider %s is not available in this onnxruntime build", name)
        else:
            chosen.append(name)
    if not chosen:
        raise FailedPrecondition(
            f"none of the configured execution providers ({', '.join(preferred)}) is available; "
            f"this onnxruntime offers {', '.join(available)}"
        )
    return chosen


def provider_options(provider: str, options: RuntimeOptions) -> dict[str, str]:
    """ONNX Runtime's options for one provider (values are strings, which every provider parses)."""
    if provider == TENSORRT:
        opts = {"device_id": str(options.device_id)}
        if options.trt_cache_dir is not None:
            # Building TensorRT engines takes minutes; cached, a restart on the same GPU takes seconds.
            cache = str(options.trt_cache_dir)
            opts |= {
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": "True",
                "trt_timing_cache_path": cache,
            }
        return opts
    if provider == CUDA:
        # EXHAUSTIVE (ONNX Runtime's default) benchmarks cuDNN's convolution algorithms again whenever the input
        # shape changes, as dynamic batching makes it do unless the encoder pads batches to one size (its
        # FIXED_BATCH). On an H200 fed fast enough for batches to vary, ingest ran at 36 images/s with it and 64
        # with HEURISTIC (docs/benchmarks.md); which serves a steady shape faster was not measured.
        return {"device_id": str(options.device_id), "cudnn_conv_algo_search": options.cudnn_conv_algo_search}
    return {}


def plan_providers(
    requested: Sequence[str], available: Sequence[str], options: RuntimeOptions, known: Sequence[str] | None = None
) -> ProviderPlan:
    """Pure: the requested providers that are available, in requested order, with their options."""
    chosen = tuple(select_providers(requested, available, known))
    skipped = tuple(p for p in dict.fromkeys(requested) if p not in chosen)
    return ProviderPlan(chosen, tuple(provider_options(p, options) for p in chosen), skipped)


def plan_session(options: RuntimeOptions, available: Sequence[str], known: Sequence[str] | None = None) -> SessionPlan:
    """Pure: the providers and session options a session is created with, from what was asked for."""
    # Inter-op threads only run independent graph branches side by side, which needs parallel mode;
    # with one thread or none parallel mode is only overhead.
    parallel = options.inter_op_threads > 1
    return SessionPlan(
        providers=plan_providers(options.providers, available, options, known),
        graph_optimization=options.graph_optimization,
        execution_mode="parallel" if parallel else "sequential",
        intra_op_threads=options.intra_op_threads,
        inter_op_threads=options.inter_op_threads if parallel else 0,
    )


def available_providers() -> list[str]:
    """What this onnxruntime build can run on (a GPU build lists CUDA even without a GPU present)."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def known_providers() -> list[str]:
    """Every provider name onnxruntime knows of, available here or not."""
    import onnxruntime as ort

    return list(ort.get_all_providers())


def default_plan(options: RuntimeOptions) -> SessionPlan:
    """The session plan for `options` on this machine's onnxruntime."""
    return plan_session(options, available_providers(), known_providers())


def session_options(plan: SessionPlan) -> Any:
    """An ort.SessionOptions carrying the plan's graph optimisation, execution mode and threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _GRAPH_LEVELS[plan.graph_optimization])
    if plan.execution_mode == "parallel":
        opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        opts.inter_op_num_threads = plan.inter_op_threads
    else:
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if plan.intra_op_threads > 0:
        opts.intra_op_num_threads = plan.intra_op_threads
    return opts


def open_session(path: Path, plan: SessionPlan, inputs: frozenset[str], outputs: Sequence[str]) -> Any:
    """An ort.InferenceSession for one model file; refuses graphs whose inputs and outputs are not these."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(path),
        sess_options=session_options(plan),
        providers=list(plan.providers.providers),
        provider_options=[dict(o) for o in plan.providers.options],
    )
    have_in = {i.name for i in session.get_inputs()}
    have_out = {o.name for o in session.get_outputs()}
    if have_in != inputs or not set(outputs) <= have_out:
        raise FailedPrecondition(
            f"{path.name} has inputs {sorted(have_in)} and outputs {sorted(have_out)}; "
            f"expected inputs {sorted(inputs)} and outputs {sorted(outputs)}"
        )
    return session


def normalise(pixels: Pixels) -> Matrix:
    """[N, H, W, 3] uint8 RGB as the network's [N, 3, H, W] float32 input: what the image graph does first."""
    x = pixels.astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(IMAGE_MEAN)) / np.float32(IMAGE_STD)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


@dataclass(frozen=True)
class VariantChoice:
    """Which variant of a model to serve, and why (logged at start)."""

    variant: Variant
    reason: str


def _choose_variant(
    kind: str, precision: Precision, q: Int8Model | None, on_gpu: bool, int8_intact: bool
) -> VariantChoice:
    """Pure: the variant of the `kind` model a server runs (see choose_image_variant)."""
    if precision == "fp32":
        return VariantChoice("fp32", "fp32 set by configuration")
    if precision == "int8":
        if q is None or not int8_intact:
            raise FailedPrecondition(
                f"{kind} precision int8 is configured but the int8 {kind} model is missing or does not match "
                "manifest.json; run `make models` (or set the precision to auto or fp32)"
            )
        return VariantChoice(
            "int8", "int8 set by configuration" + ("" if q.gate_passed else "; its gate has not passed")
        )
    if on_gpu:
        return VariantChoice("fp32", "auto: fp32 on GPU")
    if q is None:
        return VariantChoice("fp32", f"auto: no int8 {kind} model exported")
    if not int8_intact:
        return VariantChoice("fp32", f"auto: int8 {kind} model missing or not from this export")
    if not q.gate_passed:
        why = "not run on this file" if q.gate is None or q.gate.int8_sha256 != q.sha256 else "failed"
        return VariantChoice("fp32", f"auto: int8 quality gate {why}")
    return VariantChoice("int8", "auto: int8 on CPU, quality gate passed")


def choose_image_variant(
    precision: ImagePrecision, manifest: ModelManifest, on_gpu: bool, int8_intact: bool
) -> VariantChoice:
    """Pure: the image model variant a server runs.

    fp32: always fp32. int8: the int8 model even if its gate failed or the session is on a GPU (refused
    only if it is missing). auto: int8 on CPU when the int8 model is intact and its quality gate passed on
    exactly that file; fp32 on GPU (int8 QDQ gains nothing there) and whenever the gate has not passed.
    """
    return _choose_variant("image", precision, manifest.image_int8, on_gpu, int8_intact)


def choose_text_variant(
    precision: TextPrecision, manifest: ModelManifest, on_gpu: bool, int8_intact: bool
) -> VariantChoice:
    """Pure: the text model variant a server runs, by the same rules as choose_image_variant.

    The int8 text model is dynamically quantised (int8 weights, activation ranges per call), which pays on
    CPU only; auto serves it there once its own gate passed on exactly that file.
    """
    return _choose_variant("text", precision, manifest.text_int8, on_gpu, int8_intact)


def plan_on_gpu(plan: SessionPlan) -> bool:
    """Whether a session of this plan would run on a GPU provider (if the GPU is really there)."""
    return any(p in GPU_PROVIDERS for p in plan.providers.providers)


def load_tokenizer(path: Path, max_tokens: int) -> Tokenizer:
    """The MiniLM tokenizer, truncating at `max_tokens` and padding each batch to its longest text."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length=max_tokens)
    pad_id = tokenizer.token_to_id("[PAD]")
    # Pad to the longest text of each batch, not the tokenizer file's fixed 128: less work, and no
    # silent cut below max_tokens.
    tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    return tokenizer


class ImageModel:
    """The image model: encoded bytes to square RGB pixels, then pooled features and ImageNet logits."""

    def __init__(
        self,
        model_dir: Path,
        options: RuntimeOptions | None = None,
        *,
        manifest: ModelManifest | None = None,
        plan: SessionPlan | None = None,
        limits: ImageLimits | None = None,
    ) -> None:
        self.manifest = manifest if manifest is not None else ModelManifest.load(model_dir)
        self.plan = plan if plan is not None else default_plan(options or RuntimeOptions())
        self.limits = limits if limits is not None else ImageLimits()
        self.session = open_session(model_dir / self.manifest.image_file, self.plan, IMAGE_INPUTS, IMAGE_OUTPUTS)

    @property
    def version(self) -> str:
        return self.manifest.image_version

    @property
    def variant(self) -> ImageVariant:
        return self.manifest.image_variant

    @property
    def on_gpu(self) -> bool:
        return any(p in GPU_PROVIDERS for p in self.providers)

    @property
    def providers(self) -> tuple[str, ...]:
        """The providers the session really runs on, best first."""
        return tuple(self.session.get_providers())

    def preprocess(self, data: bytes, index: int = 0, name: str = "", *, thumbnail_px: int = 0) -> DecodedImage:
        """Decode (EXIF, limits, bomb checks), RGB, shorter side to the model size and centre crop.

        thumbnail_px > 0 also makes a JPEG thumbnail of at most that many px from the same decode.
        Raises ImageDecodeError naming item `index` (and `name`) and the reason.
        """
        return decode_image(data, self.manifest.image_size, self.limits, index, name, thumbnail_px=thumbnail_px)

    def preprocess_file(self, path: Path) -> Pixels:
        return self.preprocess(path.read_bytes(), name=path.name).pixels

    def run(self, pixels: Pixels) -> tuple[Matrix, Matrix]:
        """Features [N, feature_dim] and logits [N, num_classes] for [N, size, size, 3] uint8 pixels, in one call."""
        if len(pixels) == 0:
            m = self.manifest
            return np.zeros((0, m.feature_dim), np.float32), np.zeros((0, m.num_classes), np.float32)
        features, logits = self.session.run(list(IMAGE_OUTPUTS), {"pixels": pixels})
        return np.asarray(features, dtype=np.float32), np.asarray(logits, dtype=np.float32)


class TextModel:
    """The text model (all-MiniLM-L6-v2; mean pooling and L2 normalisation are in the graph) and its tokenizer."""

    def __init__(
        self,
        model_dir: Path,
        options: RuntimeOptions | None = None,
        *,
        manifest: ModelManifest | None = None,
        plan: SessionPlan | None = None,
    ) -> None:
        self.manifest = manifest if manifest is not None else ModelManifest.load(model_dir)
        self.plan = plan if plan is not None else default_plan(options or RuntimeOptions())
        self.session = open_session(model_dir / self.manifest.text_file, self.plan, TEXT_INPUTS, TEXT_OUTPUTS)
        self.tokenizer = load_tokenizer(model_dir / self.manifest.tokenizer_file, self.manifest.text_max_tokens)

    @property
    def version(self) -> str:
        return self.manifest.text_version

    @property
    def variant(self) -> TextVariant:
        return self.manifest.text_variant

    @property
    def on_gpu(self) -> bool:
        return any(p in GPU_PROVIDERS for p in self.providers)

    @property
    def providers(self) -> tuple[str, ...]:
        return tuple(self.session.get_providers())

    def tokenize(self, texts: Sequence[str]) -> tuple[TokenIds, TokenIds]:
        """Token ids and attention mask, [N, longest text] each."""
        encoded = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
        return ids, mask

    def run(self, texts: Sequence[str]) -> Matrix:
        """L2-normalised embeddings [N, text_dim], in one model call."""
        if not texts:
            return np.zeros((0, self.manifest.text_dim), np.float32)
        ids, mask = self.tokenize(texts)
        (embedding,) = self.session.run(list(TEXT_OUTPUTS), {"input_ids": ids, "attention_mask": mask})
        return np.asarray(embedding, dtype=np.float32)

    def encode(self, texts: Sequence[str], batch: int = 128, progress: bool = False) -> Matrix:
        """Embeddings [N, text_dim] of any number of texts, batched by length so padding stays short."""
        from tqdm import tqdm

        out = np.zeros((len(texts), self.manifest.text_dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in tqdm(range(0, len(order), batch), desc="text embeddings", unit="batch", disable=not progress):
            idx = order[start : start + batch]
            out[idx] = self.run([texts[i] for i in idx])
        return out
