"""The encoder core: loads the ONNX models and turns image bytes and texts into vectors (no gRPC)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import queue
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from imgsearch.encoder import metrics
from imgsearch.encoder.batching import MicroBatcher
from imgsearch.encoder.settings import EncoderSettings, FixedBatch
from imgsearch.kit.errors import FailedPrecondition, ImgsearchError, InvalidArgument, ResourceExhausted
from imgsearch.models.imaging import DecodedImage, ImageDecodeError, ImageLimits
from imgsearch.models.manifest import ModelInfo, ModelManifest
from imgsearch.models.runtime import (
    ImageModel,
    SessionPlan,
    TextModel,
    VariantChoice,
    choose_image_variant,
    choose_text_variant,
    default_plan,
    plan_on_gpu,
)

log = logging.getLogger(__name__)

Vector = npt.NDArray[np.float32]
Pixels = npt.NDArray[np.uint8]
# More image sessions than this buys nothing but memory: batches are already split across them.
MAX_AUTO_IMAGE_WORKERS = 8
# Intra-op threads of the text session on CPU unless configured (see text_threads).
TEXT_THREADS_DEFAULT = 1
# Largest thumbnail a caller may ask for (EncodeImagesRequest.thumbnail_px): thumbnails are for result pages,
# and a larger one would need a larger JPEG draft, slowing the decode the model input needs.
MAX_THUMBNAIL_PX = 1024


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, which containers narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def image_workers(settings: EncoderSettings, on_gpu: bool, cpus: int) -> tuple[int, int]:
    """(sessions, intra-op threads each): on CPU one single-threaded session per core by default.

    Measured on 2 vCPUs (int8 EfficientNet-Lite0, batches of 16): two sessions of one thread each ran
    1.3x the images/s of one session with two threads, which loses time at every operator boundary.
    """
    if on_gpu:
        return max(1, settings.image_workers or 1), settings.intra_op_threads
    workers = settings.image_workers or min(cpus, MAX_AUTO_IMAGE_WORKERS)
    intra = settings.intra_op_threads or max(1, cpus // workers)
    return workers, intra


def text_threads(settings: EncoderSettings, on_gpu: bool) -> int:
    """Intra-op threads of the one text session: TEXT_THREADS, else INTRA_OP_THREADS, else the default.

    On CPU the default is TEXT_THREADS_DEFAULT (1), measured through real encoder servers on 2 shared vCPUs
    (benchmarks/bench_encoder.py --text-service, 8 concurrent one-query callers): in two runs one thread served
    1.9-2.5x (int8) and 1.5-1.9x (fp32) the queries/s of two, and at least as many with one caller.
    A second intra-op thread mostly waits at each of MiniLM's hundreds of small operators, on cores the gRPC
    threads need too. On GPU the threads only feed the device: ONNX Runtime's default (0).
    """
    if settings.text_threads:
        return settings.text_threads
    if settings.intra_op_threads or on_gpu:
        return settings.intra_op_threads
    return TEXT_THREADS_DEFAULT


@dataclass(frozen=True)
class ImageItem:
    """One encoded image from a caller, with the caller's name for it (used in error messages)."""

    data: bytes
    name: str = ""


@dataclass(frozen=True)
class ImageEncoding:
    """The image model's output for one image, plus its size after EXIF orientation and its thumbnail."""

    features: Vector
    logits: Vector
    width: int
    height: int
    # JPEG, when the request asked for thumbnails and one could be made.
    thumbnail: bytes = b""


ImageResult = ImageEncoding | ImgsearchError
TextResult = Vector | ImgsearchError


# A GPU runs a batch of 32 in about the time of one item, so waiting a little for company pays there.
GPU_MAX_WAIT_MS = 5.0


def fixed_batch_size(setting: FixedBatch, max_batch: int, on_gpu: bool) -> int:
    """The one batch size every image model call is padded to, or 0 to run batches as they come.

    ONNX Runtime's CUDA convolutions keep the plan of the last input shape only, and rebuild it when the batch
    size changes, which dynamic batching does from call to call. On an H200, ingest fell from about 700 to
    36-64 images/s when photos reached the model faster, which points there (docs/benchmarks.md); a fixed shape
    never rebuilds. On CPU a padded row costs as much as a real one, so auto pads only on a GPU.
    """
    if setting == "on" or (setting == "auto" and on_gpu):
        return max_batch
    return 0


def batch_wait_ms(configured: float | None, on_gpu: bool) -> float:
    """How long a micro-batch waits after its first item: the setting if given, else 0 on CPU, 5 ms on GPU.

    On CPU a batch costs the sum of its items (the issue's measurement: batch 1, 8 and 32 give the same
    images/s), so waiting only adds latency: a lone text query paid the whole 5 ms window. Batches still form
    without a window, from the items that queue while the model is busy.
    """
    if configured is not None:
        return configured
    return GPU_MAX_WAIT_MS if on_gpu else 0.0


class Encoder:
    """Both models behind micro-batchers; construct in a worker thread (loading takes seconds)."""

    def __init__(self, settings: EncoderSettings) -> None:
        self.settings = settings
        model_dir: Path = settings.model_dir
        self.manifest = ModelManifest.load(model_dir)
        m = self.manifest
        if not m.files_intact(model_dir):
            raise FailedPrecondition(
                f"model files in {model_dir} are missing or do not match manifest.json; "
                f"re-export with `python -m imgsearch.models.export --model-dir {model_dir} --force`"
            )
        # One plan for both models: the same providers and session options, logged once.
        self.plan = default_plan(settings.runtime_options())
        self.limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        self.image_model, self.variant_choice = self._open_image_model(model_dir, m, self.plan)
        # More sessions of the chosen variant, one per worker, each with its share of the cores.
        workers, intra = image_workers(settings, self.image_model.on_gpu, cpu_count())
        self.image_plan = self.plan
        if workers > 1 or intra != self.plan.intra_op_threads:
            self.image_plan = dataclasses.replace(self.plan, intra_op_threads=intra)
            self.image_model = ImageModel(
                model_dir, manifest=self.image_model.manifest, plan=self.image_plan, limits=self.limits
            )
        self.image_models = [self.image_model] + [
            ImageModel(model_dir, manifest=self.image_model.manifest, plan=self.image_plan, limits=self.limits)
            for _ in range(workers - 1)
        ]
        self.fixed_batch = fixed_batch_size(settings.fixed_batch, settings.max_batch, self.image_model.on_gpu)
        self._free_models: queue.SimpleQueue[ImageModel] = queue.SimpleQueue()
        for model in self.image_models:
            self._free_models.put(model)
        self.text_model, self.text_choice = self._open_text_model(model_dir, m)
        self.tokenizer = self.text_model.tokenizer
        # The served view: the image_* and text_* files, checksums and versions are those of the variants in use.
        self.manifest = self.image_model.manifest.serving_text(self.text_model.variant)
        self.providers: tuple[str, ...] = self.image_model.providers
        log.info(
            "execution providers in use",
            extra={
                "image_variant": self.image_model.variant,
                "image_variant_reason": self.variant_choice.reason,
                "image_model": self.image_model.version,
                "providers": list(self.providers),
                "image_workers": workers,
                "image_intra_op_threads": intra,
                "image_fixed_batch": self.fixed_batch,
                "text_variant": self.text_model.variant,
                "text_variant_reason": self.text_choice.reason,
                "text_model": self.text_model.version,
                "text_intra_op_threads": self.text_model.plan.intra_op_threads,
                "text_providers": list(self.text_model.providers),
                "skipped_providers": list(self.plan.providers.skipped),
            },
        )
        for name in self.providers:
            metrics.PROVIDER_INFO.labels(name).set(1)

        labels = json.loads((model_dir / m.labels_file).read_text())
        if not isinstance(labels, list) or len(labels) != m.num_classes:
            raise FailedPrecondition(f"{m.labels_file} must list {m.num_classes} class names")
        self.class_labels: tuple[str, ...] = tuple(str(x) for x in labels)

        threads = settings.decode_threads or min(4, os.cpu_count() or 1)
        self._decode_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="encoder-decode")
        self.image_wait_ms = batch_wait_ms(settings.max_wait_ms, self.image_model.on_gpu)
        self.text_wait_ms = batch_wait_ms(settings.max_wait_ms, self.text_model.on_gpu)
        self.image_batcher: MicroBatcher[Pixels, tuple[Vector, Vector]] = MicroBatcher(
            "image",
            self.infer_images,
            settings.max_batch,
            self.image_wait_ms / 1000.0,
            settings.max_queue_items,
            workers=workers,
        )
        self.text_batcher: MicroBatcher[str, Vector] = MicroBatcher(
            "text", self.infer_texts, settings.max_batch, self.text_wait_ms / 1000.0, settings.max_queue_items
        )

    def _open_image_model(
        self, model_dir: Path, m: ModelManifest, plan: SessionPlan
    ) -> tuple[ImageModel, VariantChoice]:
        """The image model of the configured precision (see runtime.choose_image_variant)."""
        precision = self.settings.image_precision
        intact = m.int8_intact(model_dir)
        choice = choose_image_variant(precision, m, plan_on_gpu(plan), intact)
        model = ImageModel(model_dir, manifest=m.serving(choice.variant), plan=plan, limits=self.limits)
        if precision == "auto" and choice.variant == "fp32" and plan_on_gpu(plan) and not model.on_gpu:
            # A GPU build of onnxruntime on a machine without a usable GPU falls back to CPU: decide again.
            choice = choose_image_variant(precision, m, False, intact)
            if choice.variant == "int8":
                model = ImageModel(model_dir, manifest=m.serving("int8"), plan=plan, limits=self.limits)
        if choice.variant == "int8" and precision == "int8" and not (m.image_int8 and m.image_int8.gate_passed):
            log.warning("serving the int8 image model although its quality gate has not passed")
        return model, choice

    def _open_text_model(self, model_dir: Path, m: ModelManifest) -> tuple[TextModel, VariantChoice]:
        """The text model of the configured precision (see runtime.choose_text_variant) and its threads."""
        precision = self.settings.text_precision
        intact = m.text_int8_intact(model_dir)

        def open_on(on_gpu: bool) -> tuple[TextModel, VariantChoice]:
            choice = choose_text_variant(precision, m, on_gpu, intact)
            plan = dataclasses.replace(self.plan, intra_op_threads=text_threads(self.settings, on_gpu))
            return TextModel(model_dir, manifest=m.serving_text(choice.variant), plan=plan), choice

        model, choice = open_on(plan_on_gpu(self.plan))
        if plan_on_gpu(self.plan) and not model.on_gpu:
            # A GPU build of onnxruntime on a machine without a usable GPU falls back to CPU: decide again.
            model, choice = open_on(False)
        if choice.variant == "int8" and precision == "int8" and not (m.text_int8 and m.text_int8.gate_passed):
            log.warning("serving the int8 text model although its quality gate has not passed")
        return model, choice

    # Model calls block for the length of an inference: the batchers run them in their worker threads.

    def infer_images(self, batch: list[Pixels]) -> list[tuple[Vector, Vector]]:
        """(features, logits) per decoded image, in one model call."""
        # The batcher runs at most one batch per session at a time, so a free session is always waiting.
        n = len(batch)
        # One copy into the model's input, filled with zero images up to the fixed batch (their outputs are
        # dropped below).
        pixels = np.empty((max(n, self.fixed_batch), *batch[0].shape), batch[0].dtype)
        np.stack(batch, out=pixels[:n])
        pixels[n:] = 0
        model = self._free_models.get()
        try:
            features, logits = model.run(pixels)
        finally:
            self._free_models.put(model)
        return [(features[i].copy(), logits[i].copy()) for i in range(n)]

    def infer_texts(self, batch: list[str]) -> list[Vector]:
        """An L2-normalised embedding per text, in one model call (texts must already be validated)."""
        embedding = self.text_model.run(batch)
        return [embedding[i].copy() for i in range(len(batch))]

    def warm_up(self) -> None:
        """One inference per model, so the first real request does not pay for allocation and tuning."""
        size = self.manifest.image_size
        # With a fixed batch size, that one shape is the one to warm up.
        grey = np.full((max(1, self.fixed_batch), size, size, 3), 128, dtype=np.uint8)
        for model in self.image_models[1:]:
            model.run(grey)
        features, logits = self.infer_images([grey[0]])[0]
        if features.shape != (self.manifest.feature_dim,) or logits.shape != (self.manifest.num_classes,):
            raise FailedPrecondition(
                f"image model returned features {features.shape} and logits {logits.shape}; manifest says "
                f"({self.manifest.feature_dim},) and ({self.manifest.num_classes},)"
            )
        embedding = self.infer_texts(["a photo of a cat"])[0]
        if embedding.shape != (self.manifest.text_dim,):
            raise FailedPrecondition(
                f"text model returned {embedding.shape}; manifest says ({self.manifest.text_dim},)"
            )

    def _decode(self, index: int, item: ImageItem, thumbnail_px: int = 0) -> DecodedImage | ImageDecodeError:
        try:
            return self.image_model.preprocess(item.data, index, item.name, thumbnail_px=thumbnail_px)
        except ImageDecodeError as exc:
            metrics.DECODE_FAILURES.labels(exc.reason).inc()
            log.debug("image rejected", extra={"reason": exc.reason, "detail": exc.message})
            return exc

    def _check_count(self, n: int, what: str) -> None:
        limit = self.settings.max_items_per_request
        if n > limit:
            raise ResourceExhausted(f"{n} {what} in one request; the limit is {limit}, so split the request")

    async def encode_images(
        self, items: Sequence[ImageItem], deadline: float | None = None, thumbnail_px: int = 0
    ) -> list[ImageResult]:
        """Per image, in order: its encoding, or the error that affects that image alone.

        deadline is in asyncio loop time; images still queued when it passes are not run. thumbnail_px > 0
        also makes each image's JPEG thumbnail (longer side at most that) from the decode done anyway.
        """
        if not 0 <= thumbnail_px <= MAX_THUMBNAIL_PX:
            raise InvalidArgument(
                f"thumbnail_px is {thumbnail_px}; it must be 0 (no thumbnails) to {MAX_THUMBNAIL_PX} px"
            )
        self._check_count(len(items), "images")
        # Refuse early under overload rather than decode images the queue cannot take.
        self.image_batcher.check_capacity(len(items))
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(
            *(
                loop.run_in_executor(self._decode_pool, self._decode, i, item, thumbnail_px)
                for i, item in enumerate(items)
            )
        )
        good = [(i, d) for i, d in enumerate(decoded) if isinstance(d, DecodedImage)]
        outputs = await self.image_batcher.submit([d.pixels for _, d in good], deadline)
        encoded = {
            i: ImageEncoding(features=features, logits=logits, width=d.width, height=d.height, thumbnail=d.thumbnail)
            for (i, d), (features, logits) in zip(good, outputs, strict=True)
        }
        return [encoded[i] if isinstance(d, DecodedImage) else d for i, d in enumerate(decoded)]

    def check_text(self, index: int, text: str) -> None:
        """Raise InvalidArgument if one text cannot be encoded."""
        if not text.strip():
            raise InvalidArgument(f"text {index} is empty or only whitespace")
        if len(text) > self.settings.max_text_chars:
            raise InvalidArgument(
                f"text {index} has {len(text)} characters; the limit is {self.settings.max_text_chars}"
            )

    async def encode_texts(self, texts: Sequence[str], deadline: float | None = None) -> list[TextResult]:
        """Per text, in order: its L2-normalised embedding, or the error that affects that text alone."""
        self._check_count(len(texts), "texts")
        errors: dict[int, InvalidArgument] = {}
        for i, text in enumerate(texts):
            try:
                self.check_text(i, text)
            except InvalidArgument as exc:
                errors[i] = exc
        good = [i for i in range(len(texts)) if i not in errors]
        embeddings = await self.text_batcher.submit([texts[i] for i in good], deadline)
        encoded = dict(zip(good, embeddings, strict=True))
        return [errors[i] if i in errors else encoded[i] for i in range(len(texts))]

    def info(self) -> ModelInfo:
        m = self.manifest
        return ModelInfo(
            image_model=m.image_model,
            image_model_version=m.image_version,
            image_size=m.image_size,
            feature_dim=m.feature_dim,
            class_labels=self.class_labels,
            text_model=m.text_model,
            text_model_version=m.text_version,
            text_dim=m.text_dim,
            providers=self.providers,
        )

    async def close(self) -> None:
        await self.image_batcher.close()
        await self.text_batcher.close()
        self._decode_pool.shutdown(wait=True)
