"""The encoder core: loads the ONNX models and turns image bytes and texts into vectors (no gRPC)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

from imgsearch.encoder import metrics
from imgsearch.encoder.batching import MicroBatcher
from imgsearch.encoder.imaging import DecodedImage, ImageDecodeError, ImageLimits, decode_image
from imgsearch.encoder.settings import EncoderSettings
from imgsearch.kit.errors import FailedPrecondition, ImgsearchError, InvalidArgument, ResourceExhausted
from imgsearch.models.manifest import ModelInfo, ModelManifest

log = logging.getLogger(__name__)

Vector = npt.NDArray[np.float32]
Pixels = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class ImageItem:
    """One encoded image from a caller, with the caller's name for it (used in error messages)."""

    data: bytes
    name: str = ""


@dataclass(frozen=True)
class ImageEncoding:
    """The image model's output for one image, plus its size after EXIF orientation."""

    features: Vector
    logits: Vector
    width: int
    height: int


ImageResult = ImageEncoding | ImgsearchError
TextResult = Vector | ImgsearchError


def select_providers(preferred: Sequence[str], available: Sequence[str], known: Sequence[str]) -> list[str]:
    """The preferred providers this ONNX Runtime build offers, in preference order.

    Names ONNX Runtime has never heard of are most likely typos: they are skipped with a warning.
    """
    chosen: list[str] = []
    for name in preferred:
        if name in chosen:
            continue
        if name not in known:
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


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if intra_op_threads > 0:
        opts.intra_op_num_threads = intra_op_threads
    return opts


def _io_names(session: ort.InferenceSession) -> tuple[set[str], set[str]]:
    return {i.name for i in session.get_inputs()}, {o.name for o in session.get_outputs()}


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
        providers = select_providers(settings.providers, ort.get_available_providers(), ort.get_all_providers())
        opts = session_options(settings.intra_op_threads)
        self.image_session = ort.InferenceSession(str(model_dir / m.image_file), opts, providers=providers)
        self.text_session = ort.InferenceSession(str(model_dir / m.text_file), opts, providers=providers)
        self._check_graphs()
        self.providers: tuple[str, ...] = tuple(self.image_session.get_providers())
        log.info(
            "execution providers in use",
            extra={"providers": list(self.providers), "text_providers": self.text_session.get_providers()},
        )
        for name in self.providers:
            metrics.PROVIDER_INFO.labels(name).set(1)

        self.tokenizer = Tokenizer.from_file(str(model_dir / m.tokenizer_file))
        self.tokenizer.enable_truncation(max_length=m.text_max_tokens)
        pad_id = self.tokenizer.token_to_id("[PAD]")
        # Pad to the longest text of each batch, not the tokenizer file's fixed 128: less work, and no
        # silent cut below text_max_tokens.
        self.tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")

        labels = json.loads((model_dir / m.labels_file).read_text())
        if not isinstance(labels, list) or len(labels) != m.num_classes:
            raise FailedPrecondition(f"{m.labels_file} must list {m.num_classes} class names")
        self.class_labels: tuple[str, ...] = tuple(str(x) for x in labels)

        self.limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
        threads = settings.decode_threads or min(4, os.cpu_count() or 1)
        self._decode_pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="encoder-decode")
        wait_s = settings.max_wait_ms / 1000.0
        self.image_batcher: MicroBatcher[Pixels, tuple[Vector, Vector]] = MicroBatcher(
            "image", self.infer_images, settings.max_batch, wait_s, settings.max_queue_items
        )
        self.text_batcher: MicroBatcher[str, Vector] = MicroBatcher(
            "text", self.infer_texts, settings.max_batch, wait_s, settings.max_queue_items
        )

    def _check_graphs(self) -> None:
        """Refuse model files whose inputs and outputs are not the ones this code feeds and reads."""
        expected = {
            self.manifest.image_file: (self.image_session, {"pixels"}, {"features", "logits"}),
            self.manifest.text_file: (self.text_session, {"input_ids", "attention_mask"}, {"embedding"}),
        }
        for file, (session, inputs, outputs) in expected.items():
            have_in, have_out = _io_names(session)
            if have_in != inputs or not outputs <= have_out:
                raise FailedPrecondition(
                    f"{file} has inputs {sorted(have_in)} and outputs {sorted(have_out)}; "
                    f"expected inputs {sorted(inputs)} and outputs {sorted(outputs)}"
                )

    # Model calls block for the length of an inference: the batchers run them in their worker threads.

    def infer_images(self, batch: list[Pixels]) -> list[tuple[Vector, Vector]]:
        """(features, logits) per decoded image, in one model call."""
        pixels = np.stack(batch)
        features, logits = self.image_session.run(["features", "logits"], {"pixels": pixels})
        return [(features[i].copy(), logits[i].copy()) for i in range(len(batch))]

    def infer_texts(self, batch: list[str]) -> list[Vector]:
        """An L2-normalised embedding per text, in one model call (texts must already be validated)."""
        encoded = self.tokenizer.encode_batch(batch)
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
        (embedding,) = self.text_session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})
        return [embedding[i].copy() for i in range(len(batch))]

    def warm_up(self) -> None:
        """One inference per model, so the first real request does not pay for allocation and tuning."""
        size = self.manifest.image_size
        features, logits = self.infer_images([np.full((size, size, 3), 128, dtype=np.uint8)])[0]
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

    def _decode(self, index: int, item: ImageItem) -> DecodedImage | ImageDecodeError:
        try:
            return decode_image(item.data, self.manifest.image_size, self.limits, index, item.name)
        except ImageDecodeError as exc:
            metrics.DECODE_FAILURES.labels(exc.reason).inc()
            log.debug("image rejected", extra={"reason": exc.reason, "detail": exc.message})
            return exc

    def _check_count(self, n: int, what: str) -> None:
        limit = self.settings.max_items_per_request
        if n > limit:
            raise ResourceExhausted(f"{n} {what} in one request; the limit is {limit}, so split the request")

    async def encode_images(self, items: Sequence[ImageItem], deadline: float | None = None) -> list[ImageResult]:
        """Per image, in order: its encoding, or the error that affects that image alone.

        deadline is in asyncio loop time; images still queued when it passes are not run.
        """
        self._check_count(len(items), "images")
        # Refuse early under overload rather than decode images the queue cannot take.
        self.image_batcher.check_capacity(len(items))
        loop = asyncio.get_running_loop()
        decoded = await asyncio.gather(
            *(loop.run_in_executor(self._decode_pool, self._decode, i, item) for i, item in enumerate(items))
        )
        good = [(i, d) for i, d in enumerate(decoded) if isinstance(d, DecodedImage)]
        outputs = await self.image_batcher.submit([d.pixels for _, d in good], deadline)
        encoded = {
            i: ImageEncoding(features=features, logits=logits, width=d.width, height=d.height)
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
