"""The heads a process can project with: ConSE plus every head file under the heads directory."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from imgsearch.heads.model import ConSEHead, Head, Matrix, load_head
from imgsearch.kit.errors import FailedPrecondition, ImgsearchError, InvalidArgument, NotFound
from imgsearch.models.manifest import ModelInfo

log = logging.getLogger(__name__)

# Texts per EncodeTexts call while embedding class names: well under the encoder's per-call limit.
EMBED_CHUNK = 128


class TextSource(Protocol):
    """What building a catalog needs from the encoder."""

    async def model_info(self, timeout: float) -> ModelInfo: ...

    async def encode_texts(self, texts: Sequence[str], timeout: float) -> list[Matrix | ImgsearchError]: ...


def head_id(head: Head) -> str:
    """The versioned name a head is stored, searched and switched under: name@version."""
    return f"{head.name}@{head.version}"


async def wait_for_model_info(source: TextSource, timeout: float, give_up_after: float) -> ModelInfo:
    """The encoder's model info, retrying with backoff while it starts (a peer may start after us)."""
    deadline = time.monotonic() + give_up_after
    delay = 0.2
    while True:
        try:
            return await source.model_info(timeout=timeout)
        except ImgsearchError as exc:
            if time.monotonic() > deadline:
                raise
            log.info("waiting for the encoder", extra={"reason": exc.message})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def embed_texts(source: TextSource, texts: Sequence[str], timeout: float) -> Matrix:
    """Embeddings of texts that must all succeed (class names, starter tags), in encoder-sized chunks."""
    out: list[Matrix] = []
    for start in range(0, len(texts), EMBED_CHUNK):
        chunk = list(texts[start : start + EMBED_CHUNK])
        results = await source.encode_texts(chunk, timeout=timeout)
        for text, res in zip(chunk, results, strict=True):
            if isinstance(res, ImgsearchError):
                raise FailedPrecondition(f"cannot embed {text!r}: {res.message}")
            out.append(res)
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack(out).astype(np.float32)


@dataclass
class HeadCatalog:
    """Heads by id (name@version), with file-stem aliases; ConSE is always present.

    Only files under the heads directory are ever loaded: a head is chosen by name, never by path, so
    nobody who can reach a port can make a server read an arbitrary file.
    """

    info: ModelInfo
    conse: ConSEHead
    heads: dict[str, Head] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    heads_dir: Path | None = None

    @classmethod
    def load(
        cls,
        info: ModelInfo,
        class_embeddings: Matrix,
        heads_dir: Path | None,
        *,
        conse_top_t: int = 10,
        anchor_penalty: float = 0.5,
    ) -> HeadCatalog:
        conse = ConSEHead(
            class_embeddings=class_embeddings,
            top_t=conse_top_t,
            anchor_penalty=anchor_penalty,
            image_model=info.image_model_version,
        )
        catalog = cls(info=info, conse=conse, heads={head_id(conse): conse}, heads_dir=heads_dir)
        if heads_dir is None or not heads_dir.is_dir():
            log.info("no heads directory; ConSE only", extra={"heads_dir": str(heads_dir)})
            return catalog
        for path in sorted(heads_dir.glob("*.npz")):
            try:
                head = load_head(
                    path,
                    image_model=info.image_model_version,
                    feature_dim=info.feature_dim,
                    text_dim=info.text_dim,
                    conse=conse,
                )
            except ImgsearchError as exc:
                log.warning("skipping head file", extra={"path": str(path), "reason": exc.message})
                continue
            catalog.heads[head_id(head)] = head
            catalog.aliases[path.stem] = head_id(head)
        return catalog

    @classmethod
    async def from_encoder(
        cls,
        source: TextSource,
        heads_dir: Path | None,
        *,
        timeout: float,
        startup_timeout: float,
        conse_top_t: int = 10,
        anchor_penalty: float = 0.5,
    ) -> HeadCatalog:
        """Wait for the encoder, embed the ImageNet class names with its text model, load the heads."""
        info = await wait_for_model_info(source, timeout, startup_timeout)
        class_embeddings = await embed_texts(source, info.class_labels, timeout)
        return await asyncio.to_thread(
            cls.load, info, class_embeddings, heads_dir, conse_top_t=conse_top_t, anchor_penalty=anchor_penalty
        )

    def resolve(self, spec: str) -> Head:
        """A head by id (name@version), file stem, or name (its newest loaded version); never a path."""
        spec = spec.strip()
        if not spec:
            raise InvalidArgument("head is empty: give a head name or name@version (see `imgsearch heads list`)")
        if "/" in spec or "\\" in spec or spec.endswith(".npz"):
            raise InvalidArgument(
                f"head {spec!r} looks like a file path; only heads installed in the heads directory can be "
                "used: give its name or name@version (see `imgsearch heads list`)"
            )
        if spec in self.heads:
            return self.heads[spec]
        if spec in self.aliases:
            return self.heads[self.aliases[spec]]
        named = [h for h in self.heads.values() if h.name == spec]
        if named:
            # Versions are numbers as training writes them ("10" is newer than "9"); others sort after none.
            return max(named, key=lambda h: (int(h.version) if h.version.isdigit() else -1, h.version))
        raise NotFound(f"no head {spec!r}; available: {', '.join(sorted(self.heads))}")

    def get(self, hid: str) -> Head:
        """A head by exact id; NotFound names the ones available."""
        head = self.heads.get(hid)
        if head is None:
            raise NotFound(f"head {hid!r} is not installed here; available: {', '.join(sorted(self.heads))}")
        return head

    def default(self, spec: str) -> Head:
        """The configured default head, or ConSE (with a warning) when it cannot be used."""
        try:
            return self.resolve(spec)
        except ImgsearchError as exc:
            log.warning("default head unavailable, using ConSE", extra={"reason": exc.message})
            return self.conse

    def all(self) -> list[Head]:
        return sorted(self.heads.values(), key=head_id)

    def check_signals(self, head: Head, features: Matrix, logits: Matrix | None) -> None:
        """Features (n, feature_dim) and, when the head needs them, logits (n, classes) for every row."""
        if features.ndim != 2 or features.shape[1] != self.info.feature_dim:
            raise InvalidArgument(f"image features must have {self.info.feature_dim} values")
        if head.needs_logits:
            if logits is None or logits.shape[0] != features.shape[0]:
                raise InvalidArgument(f"head {head_id(head)} needs ImageNet logits for every image")
            if logits.shape[1] != len(self.info.class_labels):
                raise InvalidArgument(f"logits must have {len(self.info.class_labels)} values")
