"""FAISS snapshots of a shard: one directory per snapshot, written aside, fsynced and renamed into place.

Layout under <data_dir>/snapshots/:
  snap-<seq>/manifest.json   shard uuid, last change seq contained, index type, dims, and per index file its
                             space, head, vector count, size and CRC-32
  snap-<seq>/visual.faiss    the visual index (IndexIDMap2: the int64 labels travel inside the file)
  snap-<seq>/semantic-<n>.faiss  one index per semantic head (head names are free text, so files are numbered)
  snap-<seq>/<name>.base.faiss, <name>.rows.npy  (format 2) a space's approximate base (ann.py) and its row
                             labels plus liveness at the snapshot's seq; a base is immutable, so a later
                             snapshot hard-links the files of the previous one instead of writing them again:
                             writing snapshots costs the exact tails plus each base once
A snapshot is written into .tmp-*, each file fsynced, the directory fsynced, then renamed to snap-<seq> (the
commit point) and the parent fsynced; a crash at any point leaves either the old or the new snapshot, plus
debris that the next start removes. Only the newest snapshot is kept, because the change rows it covers are
pruned from SQLite; if it is unusable the shard rebuilds from SQLite, which holds everything.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import faiss
import numpy as np

from imgsearch.index.ann import APPROXIMATE_KINDS, Base
from imgsearch.index.indexes import INDEX_KINDS
from imgsearch.index.store import now_ms

log = logging.getLogger(__name__)

SNAPSHOT_DIR = "snapshots"
FORMAT = 2
# Format 1 snapshots (exact indexes only) are still read.
_READABLE = (1, 2)
_PREFIX = "snap-"
_MANIFEST = "manifest.json"


class SnapshotError(Exception):
    """A snapshot exists but cannot be used (corrupt, truncated, or from another database or configuration)."""


@dataclass(frozen=True)
class Expected:
    """What a usable snapshot must match."""

    shard_uuid: str
    visual_dim: int
    semantic_dim: int
    # Newest change seq in SQLite: a snapshot claiming more is from a different history.
    max_seq: int
    # The change log is pruned up to here: an older snapshot cannot be replayed to the current state.
    min_seq: int = 0
    # Kinds per space: a base of another kind (the settings changed) makes the snapshot unusable.
    visual_kind: str = "Flat"
    semantic_kind: str = "Flat"


@dataclass
class Snapshot:
    seq: int
    created_ms: int
    path: Path
    visual: Any
    semantic: dict[str, Any]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seq_of(path: Path) -> int | None:
    if not path.name.startswith(_PREFIX):
        return None
    try:
        return int(path.name[len(_PREFIX) :])
    except ValueError:
        return None


def _write_index(index: Any, path: Path) -> dict[str, int]:
    """Write one index, computing its CRC on the way, and fsync it."""
    crc = 0
    size = 0
    with open(path, "wb") as f:

        def sink(chunk: bytes) -> int:
            nonlocal crc, size
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
            f.write(chunk)
            return len(chunk)

        writer = faiss.PyCallbackIOWriter(sink)  # type: ignore[attr-defined]
        faiss.write_index(index, writer)
        del writer
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": size, "crc32": crc}


def _read_index(path: Path, size: int, crc32: int) -> Any:
    """Read one index in a single pass, checking size and CRC against the manifest."""
    where = f"{path.parent.name}/{path.name}"
    crc = 0
    read = 0
    with open(path, "rb") as f:
        source: BinaryIO = f

        def pull(n: int) -> bytes:
            nonlocal crc, read
            chunk = source.read(n)
            crc = zlib.crc32(chunk, crc)
            read += len(chunk)
            return chunk

        reader = faiss.PyCallbackIOReader(pull)  # type: ignore[attr-defined]
        try:
            index = faiss.read_index(reader)
        except RuntimeError as exc:
            raise SnapshotError(f"{where}: faiss cannot read it: {str(exc).splitlines()[0]}") from exc
        finally:
            del reader
        tail = f.read()
        crc = zlib.crc32(tail, crc)
        read += len(tail)
    if read != size or crc != crc32:
        raise SnapshotError(f"{where}: {read} bytes with CRC {crc}, manifest says {size} bytes with CRC {crc32}")
    return index


def _write_rows(base: Base, alive: Any, path: Path) -> dict[str, int]:
    buf = io.BytesIO()
    np.save(buf, np.stack([base.row_labels, np.asarray(alive, dtype=np.int64)]))
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "crc32": zlib.crc32(data)}


def _write_base(base: Base, alive: Any, directory: Path, stem: str) -> dict[str, Any]:
    """Write (or hard-link, when an earlier snapshot wrote it) a base's index, and its rows and liveness."""
    index_name = f"{stem}.base.faiss"
    old = base.files.get("path")
    entry: dict[str, Any] = {"kind": base.kind, "file": index_name, "rows": base.rows, "trained": base.trained_rows}
    linked = False
    if isinstance(old, Path) and old.exists():
        try:
            os.link(old, directory / index_name)
            entry.update(base.files["meta"])
            linked = True
        except OSError:
            linked = False
    if not linked:
        meta = _write_index(base.index, directory / index_name)
        entry.update(meta)
        base.files["meta"] = meta
    rows_name = f"{stem}.rows.npy"
    rows = _write_rows(base, alive, directory / rows_name)
    entry.update({"rows_file": rows_name, "rows_bytes": rows["bytes"], "rows_crc32": rows["crc32"]})
    return entry


def _read_base(path: Path, entry: dict[str, Any], kind: str, dim: int) -> tuple[Base, Any]:
    saved = entry.get("kind")
    # A base of another approximate kind (the settings changed, or the default did on an upgrade) still serves:
    # the builder replaces it in the background (SegmentedSpace.build_due). Only a space now configured exact
    # cannot use one: its records would have to come back into the exact tail, which a rebuild does.
    if saved != kind and (kind not in APPROXIMATE_KINDS or saved not in APPROXIMATE_KINDS):
        raise SnapshotError(f"{path.name}: a {saved} base, but the space is configured {kind}")
    kind = str(saved)
    index = _read_index(path / entry["file"], int(entry["bytes"]), int(entry["crc32"]))
    data = (path / entry["rows_file"]).read_bytes()
    if len(data) != int(entry["rows_bytes"]) or zlib.crc32(data) != int(entry["rows_crc32"]):
        raise SnapshotError(f"{path.name}: {entry['rows_file']} does not match the manifest")
    rows = np.load(io.BytesIO(data))
    n = int(entry["rows"])
    if rows.shape != (2, n) or int(index.ntotal) != n or int(index.d) != dim:
        raise SnapshotError(f"{path.name}: {entry['file']} does not hold what the manifest says")
    base = Base(kind=kind, index=index, row_labels=rows[0].astype(np.int64), trained_rows=int(entry["trained"]))
    base.files["path"] = path / entry["file"]
    base.files["meta"] = {"bytes": int(entry["bytes"]), "crc32": int(entry["crc32"])}
    return base, rows[1].astype(bool)


def write(
    root: Path,
    *,
    seq: int,
    shard_uuid: str,
    index_type: str,
    visual_dim: int,
    semantic_dim: int,
    visual: Any,
    semantic: dict[str, Any],
    visual_kind: str = "Flat",
    semantic_kind: str = "Flat",
) -> Snapshot:
    """Write a complete snapshot of these (private, unshared) CPU indexes; returns it once durable."""
    base = root / SNAPSHOT_DIR
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".tmp-{seq}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    entries: list[dict[str, Any]] = []
    files: list[tuple[str, str | None, Any]] = [("visual", None, visual)]
    files += [("semantic", head, index) for head, index in sorted(semantic.items())]
    for n, (space, head, saved) in enumerate(files):
        name = "visual.faiss" if space == "visual" else f"semantic-{n - 1}.faiss"
        index, ann_base, alive = saved if isinstance(saved, tuple) else (saved, None, None)
        entries.append({"space": space, "head": head, "file": name, "count": int(index.ntotal)})
        entries[-1].update(_write_index(index, tmp / name))
        if ann_base is not None:
            entries[-1]["base"] = _write_base(ann_base, alive, tmp, name.removesuffix(".faiss"))
    created = now_ms()
    manifest = {
        "format": FORMAT,
        "shard_uuid": shard_uuid,
        "seq": seq,
        "created_unix_ms": created,
        "index_type": index_type,
        "visual_dim": visual_dim,
        "semantic_dim": semantic_dim,
        "visual_kind": visual_kind,
        "semantic_kind": semantic_kind,
        "indexes": entries,
    }
    with open(tmp / _MANIFEST, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    final = base / f"{_PREFIX}{seq:020d}"
    stale = None
    if final.exists():
        # Same seq as before: the previous one was found unusable, or a forced rewrite. Move it aside first
        # because rename cannot replace a non-empty directory.
        stale = base / f".old-{seq}-{os.getpid()}"
        final.rename(stale)
    tmp.rename(final)
    _fsync_dir(base)
    # Bases written or linked here: the next snapshot links these files (the old directory goes below).
    for _, _, saved in files:
        if isinstance(saved, tuple) and saved[1] is not None:
            saved[1].files["path"] = final / f"{_stem_of(files, saved)}.base.faiss"
    for other in base.iterdir():
        if other != final and (other.name.startswith(".") or _seq_of(other) is not None):
            shutil.rmtree(other, ignore_errors=True)
    return Snapshot(seq=seq, created_ms=created, path=final, visual=visual, semantic=semantic)


def _stem_of(files: list[tuple[str, str | None, Any]], saved: Any) -> str:
    for n, (space, _, other) in enumerate(files):
        if other is saved:
            return "visual" if space == "visual" else f"semantic-{n - 1}"
    raise ValueError("not in files")


def newest(root: Path) -> Path | None:
    """The directory of the newest committed snapshot, if any."""
    base = root / SNAPSHOT_DIR
    if not base.is_dir():
        return None
    found = [(seq, p) for p in base.iterdir() if p.is_dir() and (seq := _seq_of(p)) is not None]
    return max(found)[1] if found else None


def remove_debris(root: Path) -> None:
    """Delete half-written snapshots left by a crash."""
    base = root / SNAPSHOT_DIR
    if base.is_dir():
        for p in base.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)


def _check(manifest: dict[str, Any], expected: Expected, path: Path) -> None:
    checks: list[tuple[str, Any, Any]] = [
        ("shard_uuid", manifest.get("shard_uuid"), expected.shard_uuid),
        ("visual_dim", manifest.get("visual_dim"), expected.visual_dim),
        ("semantic_dim", manifest.get("semantic_dim"), expected.semantic_dim),
    ]
    if manifest.get("format") not in _READABLE:
        raise SnapshotError(f"{path.name}: format is {manifest.get('format')!r}, expected one of {_READABLE}")
    for key, got, want in checks:
        if got != want:
            raise SnapshotError(f"{path.name}: {key} is {got!r}, expected {want!r}")
    # Any exact kind: they hold the same vectors, and a tail of another kind is converted as it is loaded
    # (indexes.as_kind), so changing INDEX_TYPE keeps the snapshot and its approximate bases.
    if manifest.get("index_type") not in INDEX_KINDS:
        raise SnapshotError(
            f"{path.name}: index_type is {manifest.get('index_type')!r}, expected one of {', '.join(INDEX_KINDS)}"
        )
    seq = manifest.get("seq")
    if not isinstance(seq, int) or seq < expected.min_seq or seq > expected.max_seq:
        raise SnapshotError(
            f"{path.name}: seq {seq!r} is not in {expected.min_seq}..{expected.max_seq} "
            "(the oldest change still logged .. the database's last change)"
        )


def load(path: Path, expected: Expected) -> Snapshot:
    """Load and verify one snapshot directory; raises SnapshotError if any part is unusable."""
    try:
        manifest = json.loads((path / _MANIFEST).read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise SnapshotError(f"{path.name}: manifest is not a JSON object")
        _check(manifest, expected, path)
        visual: Any = None
        semantic: dict[str, Any] = {}
        for entry in manifest["indexes"]:
            index = _read_index(path / entry["file"], int(entry["bytes"]), int(entry["crc32"]))
            want_dim = expected.visual_dim if entry["space"] == "visual" else expected.semantic_dim
            if not isinstance(index, faiss.IndexIDMap2) or index.d != want_dim or index.ntotal != entry["count"]:
                raise SnapshotError(f"{path.name}: {entry['file']} does not hold what the manifest says")
            saved: Any = index
            if "base" in entry:
                kind = expected.visual_kind if entry["space"] == "visual" else expected.semantic_kind
                base, alive = _read_base(path, entry["base"], kind, want_dim)
                saved = (index, base, alive)
            if entry["space"] == "visual":
                visual = saved
            else:
                semantic[str(entry["head"])] = saved
        if visual is None:
            raise SnapshotError(f"{path.name}: no visual index")
        return Snapshot(
            seq=int(manifest["seq"]),
            created_ms=int(manifest["created_unix_ms"]),
            path=path,
            visual=visual,
            semantic=semantic,
        )
    except SnapshotError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SnapshotError(f"{path.name}: {type(exc).__name__}: {exc}") from exc
