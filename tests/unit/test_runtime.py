"""The shared model runtime: provider planning, session options, and identical features on every path."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from imgsearch.encoder.core import Encoder, ImageEncoding, ImageItem
from imgsearch.encoder.settings import EncoderSettings
from imgsearch.kit.errors import FailedPrecondition
from imgsearch.models.imaging import ImageLimits, decode_image
from imgsearch.models.manifest import ModelManifest
from imgsearch.models.runtime import (
    CPU,
    CUDA,
    DEFAULT_PROVIDERS,
    IMAGE_INPUTS,
    IMAGE_OUTPUTS,
    TENSORRT,
    ImageModel,
    RuntimeOptions,
    SessionPlan,
    TextModel,
    default_plan,
    open_session,
    plan_providers,
    plan_session,
    session_options,
)
from imgsearch.training.features import OnnxImageModel, OnnxTextModel
from tests.conftest import sample_path

PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png", "horse.png")
TEXTS = ["a cat", "a red truck on the road", "coffee in a cup", "A red double-decker bus drives through London."]


# Provider planning is a pure function of what is asked for and what onnxruntime offers: testable on CPU.


def test_cuda_requested_on_a_cpu_build_gives_cpu_only() -> None:
    plan = plan_providers(DEFAULT_PROVIDERS, [CPU], RuntimeOptions(device_id=1))
    assert plan.providers == (CPU,)
    assert plan.options == ({},)
    assert plan.skipped == (TENSORRT, CUDA)


def test_cuda_available_comes_first_with_its_device() -> None:
    plan = plan_providers(DEFAULT_PROVIDERS, [CPU, CUDA], RuntimeOptions(device_id=1))
    assert plan.providers == (CUDA, CPU)
    assert plan.options_for(CUDA) == {"device_id": "1", "cudnn_conv_algo_search": "EXHAUSTIVE"}
    assert plan.options_for(CPU) == {}
    assert plan.skipped == (TENSORRT,)


def test_cuda_convolution_algorithm_search_is_configurable() -> None:
    # EXHAUSTIVE (ONNX Runtime's default) benchmarks again at every new batch size, which dynamic batching makes.
    chosen = plan_providers([CUDA], [CUDA], RuntimeOptions(cudnn_conv_algo_search="HEURISTIC"))
    assert chosen.options_for(CUDA)["cudnn_conv_algo_search"] == "HEURISTIC"
    assert plan_providers([CUDA], [CUDA], RuntimeOptions()).options_for(CUDA)["cudnn_conv_algo_search"] == "EXHAUSTIVE"


def test_tensorrt_gets_its_engine_cache_and_falls_back_to_cuda_then_cpu(tmp_path: Path) -> None:
    options = RuntimeOptions(trt_cache_dir=tmp_path / "trt")
    plan = plan_providers(DEFAULT_PROVIDERS, [TENSORRT, CUDA, CPU], options)
    assert plan.providers == (TENSORRT, CUDA, CPU)
    assert plan.options_for(TENSORRT) == {
        "device_id": "0",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(tmp_path / "trt"),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(tmp_path / "trt"),
    }
    assert plan.options_for(CUDA) == {"device_id": "0", "cudnn_conv_algo_search": "EXHAUSTIVE"}
    # Without a cache directory TensorRT gets no cache options (engines are rebuilt at each start).
    assert plan_providers([TENSORRT], [TENSORRT], RuntimeOptions()).options == ({"device_id": "0"},)


def test_requested_order_wins_and_duplicates_collapse() -> None:
    plan = plan_providers([CPU, CUDA, CPU], [CUDA, CPU], RuntimeOptions())
    assert plan.providers == (CPU, CUDA)
    assert plan.skipped == ()


def test_unknown_and_unavailable_providers_only_is_a_clear_error() -> None:
    with pytest.raises(FailedPrecondition, match="none of the configured execution providers"):
        plan_providers(["CudaProvider", CUDA], [CPU], RuntimeOptions(), known=ort.get_all_providers())


@pytest.mark.parametrize(
    ("inter", "mode", "planned_inter"),
    [(0, "sequential", 0), (1, "sequential", 0), (4, "parallel", 4)],
)
def test_session_plan_and_its_ort_options(inter: int, mode: str, planned_inter: int) -> None:
    options = RuntimeOptions(providers=(CPU,), intra_op_threads=3, inter_op_threads=inter, graph_optimization="basic")
    plan = plan_session(options, [CPU])
    assert (plan.execution_mode, plan.inter_op_threads, plan.intra_op_threads) == (mode, planned_inter, 3)
    opts = session_options(plan)
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert opts.intra_op_num_threads == 3
    expected_mode = ort.ExecutionMode.ORT_PARALLEL if mode == "parallel" else ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.execution_mode == expected_mode
    if mode == "parallel":
        assert opts.inter_op_num_threads == 4


def test_default_session_options_are_what_the_encoder_always_used() -> None:
    opts = session_options(plan_session(RuntimeOptions(), [CPU]))
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.intra_op_num_threads == 0  # onnxruntime's own default


def test_a_graph_with_other_inputs_is_refused(model_dir: Path) -> None:
    manifest = ModelManifest.load(model_dir)
    plan = default_plan(RuntimeOptions(providers=(CPU,)))
    with pytest.raises(FailedPrecondition, match=r"has inputs \['attention_mask', 'input_ids'\]"):
        open_session(model_dir / manifest.text_file, plan, IMAGE_INPUTS, IMAGE_OUTPUTS)


# The runtime computes exactly what a bare onnxruntime session computes, and so does every caller.


@pytest.fixture(scope="module")
def image_model(model_dir: Path) -> ImageModel:
    return ImageModel(model_dir, RuntimeOptions(providers=(CPU,)))


@pytest.fixture(scope="module")
def text_model(model_dir: Path) -> TextModel:
    return TextModel(model_dir, RuntimeOptions(providers=(CPU,)))


def test_image_model_is_bit_identical_to_a_direct_onnxruntime_call(image_model: ImageModel, model_dir: Path) -> None:
    manifest = ModelManifest.load(model_dir)
    pixels = np.stack([decode_image(sample_path(n).read_bytes(), 224, ImageLimits()).pixels for n in PHOTOS])
    direct = ort.InferenceSession(str(model_dir / manifest.image_file), providers=[CPU])
    want_features, want_logits = direct.run(["features", "logits"], {"pixels": pixels})
    runtime_pixels = np.stack([image_model.preprocess_file(sample_path(n)) for n in PHOTOS])
    features, logits = image_model.run(runtime_pixels)
    assert np.array_equal(runtime_pixels, pixels)
    assert features.dtype == np.float32 and features.shape == (len(PHOTOS), 1280)
    assert np.array_equal(features, want_features)
    assert np.array_equal(logits, want_logits)


def test_text_model_is_bit_identical_to_a_direct_onnxruntime_call(text_model: TextModel, model_dir: Path) -> None:
    manifest = ModelManifest.load(model_dir)
    # The tokenizer set up the way training used to: truncation at the manifest length, default padding.
    tokenizer = Tokenizer.from_file(str(model_dir / manifest.tokenizer_file))
    tokenizer.enable_truncation(manifest.text_max_tokens)
    tokenizer.enable_padding()
    encoded = tokenizer.encode_batch(TEXTS)
    ids = np.array([e.ids for e in encoded], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
    direct = ort.InferenceSession(str(model_dir / manifest.text_file), providers=[CPU])
    (want,) = direct.run(["embedding"], {"input_ids": ids, "attention_mask": mask})
    got = text_model.run(TEXTS)
    assert np.array_equal(got, want)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_empty_batches_give_empty_outputs(image_model: ImageModel, text_model: TextModel) -> None:
    features, logits = image_model.run(np.zeros((0, 224, 224, 3), np.uint8))
    assert features.shape == (0, 1280) and logits.shape == (0, 1000)
    assert text_model.run([]).shape == (0, 384)
    assert text_model.encode([]).shape == (0, 384)


def test_length_sorted_encode_matches_one_call_per_text(text_model: TextModel) -> None:
    batched = text_model.encode(TEXTS, batch=2)
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(batched[i], text_model.run([text])[0], atol=1e-5)


async def test_encoder_and_training_give_identical_features_for_the_same_photos(model_dir: Path) -> None:
    training_image, training_text = OnnxImageModel(model_dir), OnnxTextModel(model_dir)
    # Pinned to CPU like training, so the comparison can be bit for bit on any machine; fp32 because training
    # (and the heads trained on its features) always uses the fp32 model, while auto may serve int8 on CPU.
    settings = EncoderSettings(model_dir=model_dir, providers=(CPU,), image_precision="fp32", text_precision="fp32")
    encoder = await asyncio.to_thread(Encoder, settings)
    try:
        # Identical session options on both paths; only the providers may differ (training pins CPU).
        for plan in (training_image.plan, training_text.plan):
            assert _session_settings(plan) == _session_settings(encoder.plan)
        results = await encoder.encode_images([ImageItem(sample_path(n).read_bytes(), n) for n in PHOTOS])
        texts = await encoder.encode_texts(TEXTS)
    finally:
        await encoder.close()
    assert all(isinstance(r, ImageEncoding) for r in results)
    served_features = np.stack([r.features for r in results if isinstance(r, ImageEncoding)])
    served_logits = np.stack([r.logits for r in results if isinstance(r, ImageEncoding)])
    features, logits = training_image.run(np.stack([training_image.decode(sample_path(n)) for n in PHOTOS]))
    assert np.array_equal(served_features, features)
    assert np.array_equal(served_logits, logits)
    served_texts = np.stack([t for t in texts if isinstance(t, np.ndarray)])
    assert np.array_equal(served_texts, training_text.run(TEXTS))


def _session_settings(plan: SessionPlan) -> tuple[object, ...]:
    return plan.graph_optimization, plan.execution_mode, plan.intra_op_threads, plan.inter_op_threads


def test_encoder_imaging_is_the_shared_decoder() -> None:
    import imgsearch.encoder.imaging as encoder_imaging
    import imgsearch.models.imaging as shared

    assert encoder_imaging.decode_image is shared.decode_image
    assert encoder_imaging.ImageDecodeError is shared.ImageDecodeError


def test_runtime_imports_neither_torch_nor_the_encoder_service() -> None:
    code = (
        "import sys, imgsearch.models.runtime; "
        "print(','.join(m for m in ('torch', 'transformers', 'imgsearch.encoder') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
