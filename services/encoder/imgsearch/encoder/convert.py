"""Conversions between EncoderService messages and the core's domain values, in one place."""

from __future__ import annotations

from collections.abc import Sequence

from imgsearch.api.encoder.v1 import encoder_pb2
from imgsearch.encoder.core import ImageEncoding, ImageItem, ImageResult, TextResult
from imgsearch.kit.convert import item_error, packed
from imgsearch.models.manifest import ModelInfo


def image_items(request: encoder_pb2.EncodeImagesRequest) -> list[ImageItem]:
    return [ImageItem(data=img.data, name=img.name) for img in request.images]


def image_result(result: ImageResult, include_logits: bool) -> encoder_pb2.EncodedImage:
    if not isinstance(result, ImageEncoding):
        return encoder_pb2.EncodedImage(error=item_error(result))
    encoding = encoder_pb2.ImageEncoding(
        features=packed(result.features), width=result.width, height=result.height, thumbnail=result.thumbnail
    )
    if include_logits:
        encoding.logits.CopyFrom(packed(result.logits))
    return encoder_pb2.EncodedImage(encoding=encoding)


def images_response(
    results: Sequence[ImageResult], include_logits: bool, model_version: str
) -> encoder_pb2.EncodeImagesResponse:
    return encoder_pb2.EncodeImagesResponse(
        results=[image_result(r, include_logits) for r in results], model_version=model_version
    )


def text_result(result: TextResult) -> encoder_pb2.EncodedText:
    if isinstance(result, Exception):
        return encoder_pb2.EncodedText(error=item_error(result))
    return encoder_pb2.EncodedText(embedding=packed(result))


def texts_response(results: Sequence[TextResult], model_version: str) -> encoder_pb2.EncodeTextsResponse:
    return encoder_pb2.EncodeTextsResponse(results=[text_result(r) for r in results], model_version=model_version)


def model_info_response(info: ModelInfo) -> encoder_pb2.GetModelInfoResponse:
    return encoder_pb2.GetModelInfoResponse(
        image_model=info.image_model,
        image_model_version=info.image_model_version,
        image_size=info.image_size,
        feature_dim=info.feature_dim,
        class_labels=list(info.class_labels),
        text_model=info.text_model,
        text_model_version=info.text_model_version,
        text_dim=info.text_dim,
        providers=list(info.providers),
    )
