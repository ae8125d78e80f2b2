"""Tagger proto <-> domain conversions, in one place."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from imgsearch.api.common.v1 import common_pb2
from imgsearch.api.tagger.v1 import tagger_pb2
from imgsearch.heads import Head
from imgsearch.kit.convert import Matrix, from_vector, has_values, item_error, to_vector, vector_size
from imgsearch.kit.errors import FailedPrecondition, InvalidArgument
from imgsearch.tagger.core import RankedTag, TagChange, TagInfo, VocabUpdate
from imgsearch.tagger.store import StoredTag

# Embeddings travel as packed little-endian float32, whatever the byte order of either end.
_WIRE_FLOAT = np.dtype("<f4")


def signals(images: Sequence[tagger_pb2.ImageSignal]) -> tuple[Matrix, Matrix | None]:
    """Features (n, d) and logits (n, c), or None when no image carries logits."""
    if not images:
        raise InvalidArgument("no images given")
    dims = {vector_size(im.features) for im in images}
    if len(dims) > 1:
        raise InvalidArgument(f"images have features of different sizes: {sorted(dims)}")
    features = np.stack([from_vector(im.features, None, f"image {i} features") for i, im in enumerate(images)])
    has_logits = [has_values(im.logits) for im in images]
    if not any(has_logits):
        return features, None
    if not all(has_logits):
        raise InvalidArgument(f"image {has_logits.index(False)} has no logits while others do")
    if len({vector_size(im.logits) for im in images}) > 1:
        raise InvalidArgument("images have logits of different sizes")
    logits = np.stack([from_vector(im.logits, None, f"image {i} logits") for i, im in enumerate(images)])
    return features, logits


def vectors(matrix: Matrix) -> list[common_pb2.FloatVector]:
    return [to_vector(row) for row in matrix]


def tag_scores(ranked: Sequence[RankedTag]) -> list[common_pb2.TagScore]:
    return [common_pb2.TagScore(tag=r.tag, score=r.score, seen=r.seen) for r in ranked]


def tag_results(changes: Sequence[TagChange]) -> list[common_pb2.TagResult]:
    out = []
    for c in changes:
        res = common_pb2.TagResult(tag=c.tag, changed=c.changed)
        if c.error is not None:
            res.error.CopyFrom(item_error(c.error))
        out.append(res)
    return out


def tags(infos: Sequence[TagInfo]) -> list[common_pb2.Tag]:
    return [common_pb2.Tag(name=t.name, seen=t.seen, added_unix_ms=t.added_ms) for t in infos]


def head(h: Head, active: str) -> tagger_pb2.Head:
    hid = f"{h.name}@{h.version}"
    return tagger_pb2.Head(
        name=h.name,
        version=h.version,
        kind=h.kind,
        active=hid == active,
        metrics=h.metrics,
        image_model=h.image_model,
    )


def vocab_update_message(u: VocabUpdate) -> tagger_pb2.VocabularyUpdate:
    return tagger_pb2.VocabularyUpdate(
        version=u.version,
        reset=u.reset,
        complete=u.complete,
        added=[
            tagger_pb2.VocabularyTag(
                key=t.key,
                name=t.name,
                seen=t.seen,
                added_unix_ms=t.added_ms,
                embedding=np.asarray(t.embedding, dtype=_WIRE_FLOAT).tobytes(),
            )
            for t in u.added
        ],
        removed=list(u.removed),
        text_model=u.text_model,
        dim=u.dim,
    )


def vocab_update(m: tagger_pb2.VocabularyUpdate) -> VocabUpdate:
    """A stream message as a domain update; refuses embeddings that do not have `dim` values."""
    added = []
    for t in m.added:
        if len(t.embedding) != 4 * m.dim:
            raise FailedPrecondition(
                f"vocabulary update {m.version}: tag {t.name!r} has {len(t.embedding)} embedding bytes, "
                f"expected {4 * m.dim}"
            )
        emb = np.frombuffer(t.embedding, dtype=_WIRE_FLOAT).astype(np.float32)
        added.append(StoredTag(t.key, t.name, t.seen, t.added_unix_ms, m.text_model, emb))
    return VocabUpdate(
        version=m.version,
        text_model=m.text_model,
        dim=m.dim,
        added=added,
        removed=list(m.removed),
        reset=m.reset,
        complete=m.complete,
    )
