"""Encoder core with the real ONNX models: per-item failures, micro-batching, deadlines, providers."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import pytest_asyncio
from PIL import Image
from prometheus_client import REGISTRY

from imgsearch.encoder.batching import DeadlineExceeded, MicroBatcher
from imgsearch.encoder.core import MAX_THUMBNAIL_PX, Encoder, ImageEncoding, ImageItem
from imgsearch.encoder.settings import EncoderSettings
from imgsearch.kit.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from imgsearch.models.imaging import decode_image
from imgsearch.models.manifest import MANIFEST_NAME, ModelManifest
from imgsearch.models.runtime import RuntimeOptions, select_providers

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian Mau


def make_settings(model_dir: Path, **overrides: object) -> EncoderSettings:
    values: dict[str, object] = {
        "model_dir": model_dir,
        "max_batch": 8,
        "max_wait_ms": 5,
        "max_items_per_request": 16,
        "max_queue_items": 64,
        "max_text_chars": 200,
        **overrides,
    }
    return EncoderSettings(**values)  # type: ignore[arg-type]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def encoder(model_dir: Path) -> AsyncIterator[Encoder]:
    enc = await asyncio.to_thread(Encoder, make_settings(model_dir))
    await asyncio.to_thread(enc.warm_up)
    yield enc
    await enc.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def patient_encoder(model_dir: Path) -> AsyncIterator[Encoder]:
    """Batches of 4 that wait up to 10 s to fill: a batch runs early only when it is full."""
    enc = await asyncio.to_thread(Encoder, make_settings(model_dir, max_batch=4, max_wait_ms=10_000))
    yield enc
    await enc.close()


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_bad_items_fail_alone_and_good_ones_match_single_encoding(
    encoder: Encoder, sample_photos: dict[str, bytes]
) -> None:
    items = [
        ImageItem(sample_photos["cat"], "cat.png"),
        ImageItem(b"", "empty.jpg"),
        ImageItem(sample_photos["coffee"], "coffee.png"),
        ImageItem(b"definitely not an image", "notes.txt"),
        ImageItem(sample_photos["rocket"], "rocket.jpg"),
    ]
    corrupt_before = metric("imgsearch_encoder_decode_failures_total", reason="corrupt")
    results = await encoder.encode_images(items)
    assert len(results) == 5
    for i in (1, 3):
        err = results[i]
        assert isinstance(err, InvalidArgument) and err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"item {i} ({items[i].name!r})" in err.message
    assert metric("imgsearch_encoder_decode_failures_total", reason="corrupt") == corrupt_before + 1

    for i in (0, 2, 4):
        batched = results[i]
        assert isinstance(batched, ImageEncoding)
        assert batched.features.shape == (1280,) and batched.logits.shape == (1000,)
        (alone,) = await encoder.encode_images([items[i]])
        assert isinstance(alone, ImageEncoding)
        np.testing.assert_allclose(batched.features, alone.features, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(batched.logits, alone.logits, atol=1e-3, rtol=1e-4)
    # Different photos must give clearly different features (a constant output would pass the above).
    cat, coffee = results[0], results[2]
    assert isinstance(cat, ImageEncoding) and isinstance(coffee, ImageEncoding)
    cos = float(cat.features @ coffee.features / np.linalg.norm(cat.features) / np.linalg.norm(coffee.features))
    assert cos < 0.9


async def test_cat_photo_is_classified_as_a_cat(encoder: Encoder, sample_photos: dict[str, bytes]) -> None:
    (result,) = await encoder.encode_images([ImageItem(sample_photos["cat"])])
    assert isinstance(result, ImageEncoding)
    assert int(np.argmax(result.logits)) in CAT_CLASSES
    assert (result.width, result.height) == (451, 300)


async def test_thumbnails_come_with_the_encodings_and_a_bad_image_still_fails_alone(
    encoder: Encoder, sample_photos: dict[str, bytes]
) -> None:
    items = [
        ImageItem(sample_photos["cat"], "cat.png"),
        ImageItem(b"definitely not an image", "notes.txt"),
        ImageItem(sample_photos["rocket"], "rocket.jpg"),
    ]
    results = await encoder.encode_images(items, thumbnail_px=160)
    plain = await encoder.encode_images(items)
    assert isinstance(results[1], InvalidArgument) and "item 1 ('notes.txt')" in results[1].message
    for i in (0, 2):
        with_thumbnail, without = results[i], plain[i]
        assert isinstance(with_thumbnail, ImageEncoding) and isinstance(without, ImageEncoding)
        assert without.thumbnail == b""
        # Exactly the decoder's thumbnail, and a thumbnail no larger than the model input changes no feature.
        expected = decode_image(items[i].data, 224, encoder.limits, thumbnail_px=160).thumbnail
        assert with_thumbnail.thumbnail == expected
        np.testing.assert_allclose(with_thumbnail.features, without.features, atol=1e-4, rtol=1e-4)
        with Image.open(io.BytesIO(with_thumbnail.thumbnail)) as im:
            assert im.format == "JPEG" and max(im.size) == 160
            assert im.size[0] / im.size[1] == pytest.approx(with_thumbnail.width / with_thumbnail.height, rel=0.02)


@pytest.mark.parametrize("px", [-1, MAX_THUMBNAIL_PX + 1, 1 << 20])
async def test_a_thumbnail_size_out_of_range_is_invalid(
    encoder: Encoder, sample_photos: dict[str, bytes], px: int
) -> None:
    before = encoder.image_batcher.stats.batches
    with pytest.raises(InvalidArgument, match=f"thumbnail_px is {px}; it must be 0 .* to 1024 px"):
        await encoder.encode_images([ImageItem(sample_photos["cat"])], thumbnail_px=px)
    assert encoder.image_batcher.stats.batches == before


async def test_concurrent_requests_are_merged_into_one_batch(
    patient_encoder: Encoder, sample_photos: dict[str, bytes]
) -> None:
    stats = patient_encoder.image_batcher.stats
    batches_before = stats.batches
    count_before = metric("imgsearch_encoder_batch_size_count", kind="image")
    sum_before = metric("imgsearch_encoder_batch_size_sum", kind="image")
    names = ["cat", "coffee", "rocket", "horse"]
    results = await asyncio.gather(*(patient_encoder.encode_images([ImageItem(sample_photos[n], n)]) for n in names))
    assert all(isinstance(r[0], ImageEncoding) for r in results)
    # Four one-image requests, one model call of four: they were batched together, not run one by one.
    assert stats.batches - batches_before == 1
    assert stats.largest == 4
    assert metric("imgsearch_encoder_batch_size_count", kind="image") == count_before + 1
    assert metric("imgsearch_encoder_batch_size_sum", kind="image") == sum_before + 4


async def test_concurrent_text_requests_are_merged(patient_encoder: Encoder) -> None:
    stats = patient_encoder.text_batcher.stats
    before = stats.batches
    texts = ["a cat", "a dog", "a red truck", "coffee in a cup"]
    results = await asyncio.gather(*(patient_encoder.encode_texts([t]) for t in texts))
    assert all(isinstance(r[0], np.ndarray) for r in results)
    assert stats.batches - before == 1


async def test_large_request_is_split_into_max_batch_sized_calls(encoder: Encoder) -> None:
    stats = encoder.text_batcher.stats
    before_batches, before_items = stats.batches, stats.items
    results = await encoder.encode_texts([f"photo number {i}" for i in range(12)])
    assert len(results) == 12
    assert stats.batches - before_batches == 2  # 8 + 4 with max_batch 8
    assert stats.items - before_items == 12
    assert stats.largest <= 8


async def test_texts_normalised_and_bad_ones_fail_alone(encoder: Encoder) -> None:
    texts = ["a photo of a cat", "", "a cat", "   \n\t", "x" * 201, "a red truck on the road"]
    results = await encoder.encode_texts(texts)
    assert len(results) == len(texts)
    for i, why in ((1, "empty"), (3, "empty"), (4, "201 characters")):
        err = results[i]
        assert isinstance(err, InvalidArgument), i
        assert f"text {i}" in err.message and why in err.message
    good = {i: r for i, r in enumerate(results) if isinstance(r, np.ndarray)}
    assert sorted(good) == [0, 2, 5]
    for vec in good.values():
        assert vec.shape == (384,)
        assert abs(float(np.linalg.norm(vec)) - 1.0) < 1e-5
    # Meaning, not just shape: the cat sentence is nearer "a cat" than "a red truck".
    assert float(good[0] @ good[2]) > float(good[0] @ good[5]) + 0.2
    # Padding in a mixed-length batch must not change an embedding.
    (alone,) = await encoder.encode_texts([texts[5]])
    assert isinstance(alone, np.ndarray)
    np.testing.assert_allclose(good[5], alone, atol=1e-5)


def test_tokenizer_truncates_at_manifest_length_and_pads_per_batch(encoder: Encoder) -> None:
    # tokenizer.json ships with truncation at 128 and fixed padding to 128; the manifest says 256 tokens.
    (long,) = encoder.tokenizer.encode_batch(["word " * 1000])
    assert len(long.ids) == encoder.manifest.text_max_tokens == 256
    short = encoder.tokenizer.encode_batch(["a cat", "a cat on a mat"])
    assert [len(e.ids) for e in short] == [7, 7]  # [CLS] a cat on a mat [SEP], padded to the longest
    assert short[0].attention_mask == [1, 1, 1, 1, 0, 0, 0]


async def test_too_many_items_is_resource_exhausted(encoder: Encoder) -> None:
    with pytest.raises(ResourceExhausted, match="17 images in one request; the limit is 16"):
        await encoder.encode_images([ImageItem(b"x")] * 17)
    with pytest.raises(ResourceExhausted, match="17 texts"):
        await encoder.encode_texts(["hello"] * 17)


async def test_expired_deadline_never_reaches_the_model(encoder: Encoder, sample_photos: dict[str, bytes]) -> None:
    before = encoder.image_batcher.stats.batches
    past = asyncio.get_running_loop().time() - 1.0
    with pytest.raises(DeadlineExceeded) as info:
        await encoder.encode_images([ImageItem(sample_photos["cat"])], deadline=past)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert encoder.image_batcher.stats.batches == before


async def test_empty_requests_return_empty_results(encoder: Encoder) -> None:
    assert await encoder.encode_images([]) == []
    assert await encoder.encode_texts([]) == []


def test_info_describes_the_served_models(encoder: Encoder, model_dir: Path) -> None:
    info = encoder.info()
    manifest = ModelManifest.load(model_dir)
    # The served variant's version: int8 (auto on CPU once its gate passed) names itself after the fp32 one.
    assert info.image_model_version == manifest.serving(encoder.image_model.variant).image_version
    assert info.image_model_version.startswith(manifest.image_version)
    assert info.text_model_version == manifest.serving_text(encoder.text_model.variant).text_version
    assert info.text_model_version.startswith(manifest.text_version)
    assert (info.image_size, info.feature_dim, info.text_dim) == (224, 1280, 384)
    assert len(info.class_labels) == 1000
    assert info.class_labels[281] == json.loads((model_dir / manifest.labels_file).read_text())[281]
    assert info.providers and info.providers[-1] == "CPUExecutionProvider"


# Micro-batcher behaviour with a plain function as the "model", where timing can be controlled.


async def test_item_whose_deadline_passes_in_the_queue_is_not_run() -> None:
    started, release = threading.Event(), threading.Event()
    ran: list[list[int]] = []

    def model(batch: list[int]) -> list[int]:
        ran.append(batch)
        started.set()
        release.wait(5)
        return [x * 10 for x in batch]

    batcher: MicroBatcher[int, int] = MicroBatcher("text", model, max_batch=4, max_wait_s=0.0, max_queue=16)
    loop = asyncio.get_running_loop()
    first = asyncio.create_task(batcher.submit([1]))
    assert await asyncio.to_thread(started.wait, 5)  # the model is now busy with [1]
    late = asyncio.create_task(batcher.submit([2], deadline=loop.time() + 0.05))
    await asyncio.sleep(0.1)
    release.set()
    assert await first == [10]
    with pytest.raises(DeadlineExceeded):
        await late
    assert ran == [[1]]
    assert batcher.stats.expired == 1
    await batcher.close()


async def test_full_queue_is_resource_exhausted_and_cancelled_items_are_skipped() -> None:
    started, release = threading.Event(), threading.Event()
    ran: list[list[int]] = []

    def model(batch: list[int]) -> list[int]:
        ran.append(batch)
        started.set()
        release.wait(5)
        return batch

    batcher: MicroBatcher[int, int] = MicroBatcher("image", model, max_batch=8, max_wait_s=0.0, max_queue=3)
    busy = asyncio.create_task(batcher.submit([0]))
    assert await asyncio.to_thread(started.wait, 5)
    queued = asyncio.create_task(batcher.submit([1, 2]))
    await asyncio.sleep(0.01)
    with pytest.raises(ResourceExhausted, match="queue is full"):
        await batcher.submit([3, 4])
    queued.cancel()  # the caller went away: its items must not be run
    await asyncio.sleep(0.01)
    release.set()
    assert await busy == [0]
    assert await batcher.submit([5]) == [5]
    assert ran == [[0], [5]]
    await batcher.close()


async def test_a_failing_batch_fails_its_items_and_the_next_batch_still_runs() -> None:
    def model(batch: list[int]) -> list[int]:
        if 13 in batch:
            raise RuntimeError("unlucky batch")
        return [x + 1 for x in batch]

    batcher: MicroBatcher[int, int] = MicroBatcher("text", model, max_batch=4, max_wait_s=0.0, max_queue=16)
    with pytest.raises(RuntimeError, match="unlucky"):
        await batcher.submit([12, 13])
    assert await batcher.submit([1, 2]) == [2, 3]
    await batcher.close()
    with pytest.raises(Unavailable):
        await batcher.submit([1])


# Provider selection.

KNOWN = ort.get_all_providers()
DEFAULT = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("preferred", "available", "expected"),
    [
        (DEFAULT, ["CPUExecutionProvider"], ["CPUExecutionProvider"]),
        (DEFAULT, ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]),
        (DEFAULT, ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"], DEFAULT),
        # Preference order wins over the order onnxruntime lists them in.
        (
            ["CPUExecutionProvider", "CUDAExecutionProvider"],
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
            ["CPUExecutionProvider", "CUDAExecutionProvider"],
        ),
        (["CPUExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"], ["CPUExecutionProvider"]),
    ],
)
def test_providers_are_the_ordered_intersection(
    preferred: list[str], available: list[str], expected: list[str]
) -> None:
    assert select_providers(preferred, available, KNOWN) == expected


def test_unknown_provider_names_are_ignored_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="imgsearch.models.runtime"):
        chosen = select_providers(["CudaProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"], KNOWN)
    assert chosen == ["CPUExecutionProvider"]
    assert any("CudaProvider" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_no_usable_provider_is_a_clear_startup_error(model_dir: Path) -> None:
    with pytest.raises(FailedPrecondition, match="none of the configured execution providers"):
        Encoder(make_settings(model_dir, providers="MIGraphXExecutionProvider"))


def test_model_files_that_do_not_match_the_manifest_are_refused(model_dir: Path, tmp_path: Path) -> None:
    manifest = json.loads((model_dir / MANIFEST_NAME).read_text())
    for name in (manifest["image_file"], manifest["text_file"], manifest["tokenizer_file"], manifest["labels_file"]):
        (tmp_path / name).symlink_to(model_dir / name)
    manifest["image_sha256"] = "0" * 64
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(FailedPrecondition, match=r"do not match manifest\.json"):
        Encoder(make_settings(tmp_path))


def test_settings_parse_a_comma_separated_provider_list(model_dir: Path) -> None:
    settings = make_settings(model_dir, providers=" CUDAExecutionProvider , CPUExecutionProvider ,")
    assert settings.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")


def test_settings_become_runtime_options(model_dir: Path, tmp_path: Path) -> None:
    settings = make_settings(
        model_dir,
        providers="CUDAExecutionProvider,CPUExecutionProvider",
        intra_op_threads=3,
        inter_op_threads=2,
        graph_optimization="extended",
        device_id=1,
        trt_cache_dir=tmp_path,
        cudnn_conv_algo_search="HEURISTIC",
    )
    assert settings.runtime_options() == RuntimeOptions(
        providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
        intra_op_threads=3,
        inter_op_threads=2,
        graph_optimization="extended",
        device_id=1,
        trt_cache_dir=tmp_path,
        cudnn_conv_algo_search="HEURISTIC",
    )
    assert make_settings(model_dir).runtime_options() == RuntimeOptions()


def test_serving_path_does_not_import_torch() -> None:
    code = (
        "import sys, imgsearch.encoder.core, imgsearch.encoder.servicer, imgsearch.encoder.app; "
        "print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_no_batching_window_on_cpu_unless_set() -> None:
    from imgsearch.encoder.core import GPU_MAX_WAIT_MS, batch_wait_ms

    # On CPU a batch costs the sum of its items: a window would only delay a lone query.
    assert batch_wait_ms(None, on_gpu=False) == 0.0
    assert batch_wait_ms(None, on_gpu=True) == GPU_MAX_WAIT_MS > 0
    assert batch_wait_ms(7.5, on_gpu=False) == 7.5
    assert batch_wait_ms(0.0, on_gpu=True) == 0.0


def test_image_batches_have_one_shape_on_gpu_unless_set() -> None:
    from imgsearch.encoder.core import fixed_batch_size

    # On a GPU every new batch size rebuilds the convolution plans; on CPU padding rows are pure cost.
    assert fixed_batch_size("auto", 32, on_gpu=True) == 32
    assert fixed_batch_size("auto", 32, on_gpu=False) == 0
    assert fixed_batch_size("on", 16, on_gpu=False) == 16
    assert fixed_batch_size("off", 32, on_gpu=True) == 0


@pytest.mark.asyncio(loop_scope="session")
async def test_a_fixed_batch_runs_one_shape_and_returns_each_images_own_result(
    encoder: Encoder, model_dir: Path, sample_photos: dict[str, bytes]
) -> None:
    fixed = await asyncio.to_thread(Encoder, make_settings(model_dir, fixed_batch="on", max_batch=8))
    try:
        assert fixed.fixed_batch == 8 and encoder.fixed_batch == 0
        shapes: list[tuple[int, ...]] = []
        for model in fixed.image_models:
            run = model.run

            def spy(pixels: np.ndarray, run: object = run) -> object:
                shapes.append(pixels.shape)
                return run(pixels)  # type: ignore[operator]

            model.run = spy  # type: ignore[method-assign,assignment]
        items = [ImageItem(data, name) for name, data in sample_photos.items()][:3]
        for n in (1, 3):
            padded = await fixed.encode_images(items[:n])
            plain = await encoder.encode_images(items[:n])
            assert len(padded) == n
            for a, b in zip(padded, plain, strict=True):
                assert isinstance(a, ImageEncoding) and isinstance(b, ImageEncoding)
                np.testing.assert_allclose(a.features, b.features, atol=1e-4)
                np.testing.assert_allclose(a.logits, b.logits, atol=1e-3)
        assert shapes and {s[0] for s in shapes} == {8}
    finally:
        await fixed.close()
