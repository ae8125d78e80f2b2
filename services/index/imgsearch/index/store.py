"""The shard's source of truth: records, vectors and a change log in SQLite (WAL journal, synchronous=FULL).

Every Upsert, Delete or SetSemantic request is one transaction, committed (and fsynced) before the response is
sent, so an acknowledged write survives a SIGKILL or a power cut. FAISS holds only derived state, rebuilt from here.

Tables:
- records: label (int64 FAISS id, never reused: AUTOINCREMENT) <-> string id, plus head, metadata, source.
  A replaced id keeps its label, so label -> id never changes while the id exists.
- vectors: the normalised float32 vectors per label, plus what re-projecting into a new semantic head needs
  without the image: the raw features' L2 norm and the top ImageNet logits (a BLOB of n little-endian int16
  class indices followed by n float32 logits; NULL for none). Apart from records so that loading the id map at
  start does not read these pages.
- changes: one row per applied upsert, delete or semantic replacement (seq AUTOINCREMENT, monotonic). A FAISS
  snapshot records the last seq it contains; on start only rows after it are replayed. Rows up to a durable
  snapshot are pruned.
- meta: the schema version, the shard's uuid (snapshots must belong to this database), the dimensions it was
  created with, and the seq the change log is pruned up to (an older snapshot could not be brought up to date).

Schema versions: 1 had no feature_norm / top_logits columns; opening it adds them (0 and NULL for the rows
already stored, i.e. "unknown") in the same transaction that records version 2, so nothing stored is rewritten.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from imgsearch.kit.errors import FailedPrecondition, ImgsearchError, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

DB_NAME = "index.sqlite3"
SCHEMA_VERSION = "2"
# Versions this code opens, upgrading them to SCHEMA_VERSION.
_KNOWN_VERSIONS = ("1", SCHEMA_VERSION)
# Columns added by version 2, with the values rows stored before it get (ALTER TABLE ADD COLUMN needs a constant).
_V2_COLUMNS = {"feature_norm": "REAL NOT NULL DEFAULT 0", "top_logits": "BLOB"}
# SQLite's default limit on host parameters is 32766 since 3.32; stay far below it.
_IN_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    label INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    has_visual INTEGER NOT NULL,
    semantic_head TEXT,
    metadata TEXT NOT NULL,
    source_name TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS vectors (
    label INTEGER PRIMARY KEY,
    visual BLOB,
    semantic BLOB,
    feature_norm REAL NOT NULL DEFAULT 0,
    top_logits BLOB
);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL,
    label INTEGER NOT NULL,
    id TEXT NOT NULL,
    unix_ms INTEGER NOT NULL
);
"""


# (class_index, logit) pairs, highest logit first as the caller gave them.
TopLogits = tuple[tuple[int, float], ...]


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class UpsertOp:
    """A validated record to insert or replace (vectors already normalised)."""

    id: str
    visual: npt.NDArray[np.float32] | None
    semantic: npt.NDArray[np.float32] | None
    semantic_head: str | None
    metadata: dict[str, str]
    source_name: str
    # 0: keep the stored creation time on replace, now on insert.
    created_ms: int = 0
    feature_norm: float = 0.0
    top_logits: TopLogits = ()


@dataclass(frozen=True)
class DeleteOp:
    id: str


@dataclass(frozen=True)
class SemanticOp:
    """A validated replacement of one record's semantic vector and head; the rest of the record stays."""

    id: str
    semantic: npt.NDArray[np.float32]
    semantic_head: str


Op = UpsertOp | DeleteOp | SemanticOp


@dataclass(frozen=True)
class Slot:
    """What the in-memory id map keeps per label: enough to know which FAISS indexes hold it."""

    id: str
    has_visual: bool
    semantic_head: str | None


@dataclass(frozen=True)
class StoredRecord:
    label: int
    id: str
    metadata: dict[str, str]
    source_name: str
    semantic_head: str | None
    created_ms: int
    visual: npt.NDArray[np.float32] | None = None
    semantic: npt.NDArray[np.float32] | None = None
    # Read with the vectors only (0 and empty otherwise, as for records stored before schema version 2).
    feature_norm: float = 0.0
    top_logits: TopLogits = ()


@dataclass
class VectorChunk:
    """Vectors of some labels, grouped by FAISS index: visual, and semantic per head."""

    visual_labels: list[int] = field(default_factory=list)
    visual: list[bytes] = field(default_factory=list)
    semantic: dict[str, tuple[list[int], list[bytes]]] = field(default_factory=dict)


@dataclass(frozen=True)
class WriteOutcome:
    """Per op: the label written, deleted or updated (None: the id did not exist); and the last change seq."""

    labels: list[int | None]
    last_seq: int


def _storage_error(exc: sqlite3.OperationalError) -> ImgsearchError:
    """A failed write transaction as a status the caller can act on; nothing of the request was stored."""
    if "full" in str(exc):
        return ResourceExhausted(f"the shard's storage is full ({exc}); nothing from this request was stored")
    return Unavailable(f"the shard's storage failed ({exc}); nothing from this request was stored, retry later")


def _blob(vec: npt.NDArray[np.float32] | None) -> bytes | None:
    return None if vec is None else np.ascontiguousarray(vec, dtype="<f4").tobytes()


def _vec(blob: bytes | None) -> npt.NDArray[np.float32] | None:
    return None if blob is None else np.frombuffer(blob, dtype="<f4").astype(np.float32)


def _logits_blob(pairs: TopLogits) -> bytes | None:
    if not pairs:
        return None
    classes = np.array([c for c, _ in pairs], dtype="<i2")
    logits = np.array([v for _, v in pairs], dtype="<f4")
    return classes.tobytes() + logits.tobytes()


def _top_logits(blob: bytes | None) -> TopLogits:
    if not blob:
        return ()
    if len(blob) % 6:
        raise FailedPrecondition(f"a stored top_logits value has {len(blob)} bytes, not a multiple of 6")
    n = len(blob) // 6
    classes = np.frombuffer(blob, dtype="<i2", count=n).tolist()
    logits = np.frombuffer(blob, dtype="<f4", count=n, offset=2 * n).tolist()
    return tuple(zip(classes, logits, strict=True))


def _chunks(items: Sequence[int], size: int = _IN_CHUNK) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Store:
    """SQLite access for one shard. Writes must be serialised by the caller; reads may run on any thread."""

    def __init__(self, directory: Path, visual_dim: int, semantic_dim: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / DB_NAME
        # Autocommit mode: transactions are explicit BEGIN IMMEDIATE ... COMMIT below.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self.shard_uuid = self._init_meta(visual_dim, semantic_dim)
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

    def _init_meta(self, visual_dim: int, semantic_dim: int) -> str:
        """Create the meta rows of a new database, or check an existing one and upgrade its schema."""
        wanted = {"visual_dim": str(visual_dim), "semantic_dim": str(semantic_dim)}
        self._db.execute("BEGIN IMMEDIATE")
        try:
            stored = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
            if not stored:
                stored = {"schema_version": SCHEMA_VERSION, "shard_uuid": uuid.uuid4().hex, **wanted}
                self._db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", stored.items())
            # Checked before upgrading, so that a refused start leaves the database exactly as it was.
            version = stored.get("schema_version")
            if version not in _KNOWN_VERSIONS:
                raise FailedPrecondition(
                    f"{self.path} has schema version {version}, this server reads {', '.join(_KNOWN_VERSIONS)}"
                )
            for key, value in wanted.items():
                if stored.get(key) != value:
                    # Refusing to start is the only safe answer: mixing dimensions would corrupt the shard.
                    raise FailedPrecondition(
                        f"{self.path} was created with {key}={stored.get(key)}, but the settings say {value}; "
                        "use the original dimensions or a new data_dir"
                    )
            self._upgrade(version)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return stored["shard_uuid"]

    def _upgrade(self, version: str | None) -> None:
        """Bring an older schema to SCHEMA_VERSION (inside the caller's transaction: all or nothing)."""
        # By the columns present rather than the version alone: a version-1 database whose tables were created
        # but whose meta rows were not (a crash in between) is indistinguishable from a new one by its meta.
        have = {str(row[1]) for row in self._db.execute("PRAGMA table_info(vectors)")}
        added = [name for name in _V2_COLUMNS if name not in have]
        for name in added:
            self._db.execute(f"ALTER TABLE vectors ADD COLUMN {name} {_V2_COLUMNS[name]}")
        if version != SCHEMA_VERSION:
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,))
        if added or version != SCHEMA_VERSION:
            log.info(
                "database schema upgraded",
                extra={"path": str(self.path), "from": version, "to": SCHEMA_VERSION, "added_columns": added},
            )

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection (WAL readers never block the writer)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA query_only=1")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def close(self) -> None:
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        self._db.close()

    # --- writes (one transaction per call) ---

    def write(self, ops: Sequence[Op]) -> WriteOutcome:
        """Apply the ops in order in one committed transaction."""
        db = self._db
        ts = now_ms()
        labels: list[int | None] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                if isinstance(op, UpsertOp):
                    label = self._upsert(op, ts)
                    db.execute(
                        "INSERT OR REPLACE INTO vectors(label, visual, semantic, feature_norm, top_logits) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (label, _blob(op.visual), _blob(op.semantic), op.feature_norm, _logits_blob(op.top_logits)),
                    )
                    db.execute(
                        "INSERT INTO changes(op, label, id, unix_ms) VALUES ('upsert', ?, ?, ?)", (label, op.id, ts)
                    )
                    labels.append(label)
                elif isinstance(op, SemanticOp):
                    row = db.execute(
                        "UPDATE records SET semantic_head = ?, updated_ms = ? WHERE id = ? RETURNING label",
                        (op.semantic_head, ts, op.id),
                    ).fetchone()
                    if row is None:
                        labels.append(None)
                        continue
                    db.execute("UPDATE vectors SET semantic = ? WHERE label = ?", (_blob(op.semantic), row[0]))
                    # Replay re-reads every vector of a touched label, which moves it to the new head's index.
                    db.execute(
                        "INSERT INTO changes(op, label, id, unix_ms) VALUES ('set_semantic', ?, ?, ?)",
                        (row[0], op.id, ts),
                    )
                    labels.append(int(row[0]))
                else:
                    row = db.execute("DELETE FROM records WHERE id = ? RETURNING label", (op.id,)).fetchone()
                    if row is None:
                        labels.append(None)
                        continue
                    db.execute("DELETE FROM vectors WHERE label = ?", (row[0],))
                    db.execute(
                        "INSERT INTO changes(op, label, id, unix_ms) VALUES ('delete', ?, ?, ?)", (row[0], op.id, ts)
                    )
                    labels.append(int(row[0]))
            last_seq = self._last_seq(db)
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                raise _storage_error(exc) from exc
            raise
        return WriteOutcome(labels=labels, last_seq=last_seq)

    def _upsert(self, op: UpsertOp, ts: int) -> int:
        row = self._db.execute(
            """
            INSERT INTO records(id, has_visual, semantic_head, metadata, source_name, created_ms, updated_ms)
            VALUES (?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT(id) DO UPDATE SET
                has_visual = excluded.has_visual,
                semantic_head = excluded.semantic_head,
                metadata = excluded.metadata,
                source_name = excluded.source_name,
                created_ms = CASE WHEN ? > 0 THEN excluded.created_ms ELSE records.created_ms END,
                updated_ms = excluded.updated_ms
            RETURNING label
            """,
            (
                op.id,
                int(op.visual is not None),
                op.semantic_head,
                json.dumps(op.metadata, ensure_ascii=False, sort_keys=True),
                op.source_name,
                op.created_ms if op.created_ms > 0 else ts,
                ts,
                op.created_ms,
            ),
        ).fetchone()
        return int(row[0])

    def prune_changes(self, upto_seq: int) -> int:
        """Drop change rows already contained in a durable snapshot; returns how many remain after it."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("DELETE FROM changes WHERE seq <= ?", (upto_seq,))
            self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('pruned_seq', ?)", (str(upto_seq),))
            (remaining,) = self._db.execute("SELECT COUNT(*) FROM changes WHERE seq > ?", (upto_seq,)).fetchone()
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return int(remaining)

    # --- reads ---

    @staticmethod
    def _last_seq(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        return int(row[0]) if row else 0

    def last_seq(self) -> int:
        return self._last_seq(self._reader())

    def pruned_seq(self) -> int:
        """Changes up to this seq are gone from the log: a snapshot older than that cannot be replayed."""
        row = self._reader().execute("SELECT value FROM meta WHERE key = 'pruned_seq'").fetchone()
        return int(row[0]) if row else 0

    def changes_after(self, seq: int) -> tuple[list[int], int]:
        """Distinct labels touched by changes after seq, and how many changes that is."""
        rows = self._reader().execute("SELECT label FROM changes WHERE seq > ? ORDER BY seq", (seq,)).fetchall()
        return sorted({int(r[0]) for r in rows}), len(rows)

    def slots(self) -> Iterator[tuple[int, Slot]]:
        """Every stored label with its id and which spaces it has vectors in."""
        cur = self._reader().execute("SELECT label, id, has_visual, semantic_head FROM records")
        while rows := cur.fetchmany(8192):
            for label, id_, has_visual, head in rows:
                yield int(label), Slot(id=id_, has_visual=bool(has_visual), semantic_head=head)

    def vectors(self, labels: Sequence[int] | None = None, chunk_rows: int = 4096) -> Iterator[VectorChunk]:
        """Stored vectors, all of them (labels=None) or of these labels, in chunks grouped by index."""
        sql = "SELECT v.label, v.visual, v.semantic, r.semantic_head FROM vectors v JOIN records r USING (label)"
        conn = self._reader()
        if labels is None:
            batches: Iterable[sqlite3.Cursor] = [conn.execute(sql + " ORDER BY v.label")]
        else:
            batches = (
                conn.execute(sql + f" WHERE v.label IN ({','.join('?' * len(part))})", tuple(part))
                for part in _chunks(labels)
            )
        for cur in batches:
            while rows := cur.fetchmany(chunk_rows):
                out = VectorChunk()
                for label, visual, semantic, head in rows:
                    if visual is not None:
                        out.visual_labels.append(int(label))
                        out.visual.append(visual)
                    if semantic is not None:
                        group = out.semantic.setdefault(head, ([], []))
                        group[0].append(int(label))
                        group[1].append(semantic)
                yield out

    def fetch(self, labels: Sequence[int], include_vectors: bool = False) -> dict[int, StoredRecord]:
        """Records of these labels that still exist, read in one transaction."""
        return {rec.label: rec for rec in self._fetch("label", list(dict.fromkeys(labels)), include_vectors)}

    def fetch_ids(self, ids: Sequence[str], include_vectors: bool = False) -> dict[str, StoredRecord]:
        """Records of these string ids that exist, read in one transaction."""
        return {rec.id: rec for rec in self._fetch("id", list(dict.fromkeys(ids)), include_vectors)}

    def _fetch(self, key: str, values: Sequence[int | str], include_vectors: bool) -> list[StoredRecord]:
        if not values:
            return []
        conn = self._reader()
        out: list[StoredRecord] = []
        # One read transaction, so that a request split into chunks still sees one state of the shard.
        conn.execute("BEGIN")
        try:
            for start in range(0, len(values), _IN_CHUNK):
                part = tuple(values[start : start + _IN_CHUNK])
                rows = conn.execute(
                    f"{_select(include_vectors)} WHERE r.{key} IN ({','.join('?' * len(part))})", part
                ).fetchall()
                out.extend(_record(row) for row in rows)
        finally:
            conn.execute("COMMIT")
        return out

    def scan(self, after_label: int, limit: int, skip_head: str = "") -> list[StoredRecord]:
        """Up to `limit` records with labels above `after_label`, in label order, with their vectors.

        Records whose semantic vectors come from `skip_head` (when given) are left out. Labels only grow and a
        replaced id keeps its label, so paging by the last label returned visits every record once, and
        records added meanwhile come in later pages.
        """
        sql = f"{_select(True)} WHERE r.label > ?"
        params: tuple[int | str, ...] = (after_label,)
        if skip_head:
            # IS NOT: records without a semantic vector (NULL head) are not of the skipped head.
            sql += " AND r.semantic_head IS NOT ?"
            params += (skip_head,)
        rows = self._reader().execute(sql + " ORDER BY r.label LIMIT ?", (*params, limit)).fetchall()
        return [_record(row) for row in rows]


_RECORD_COLUMNS = "r.label, r.id, r.metadata, r.source_name, r.semantic_head, r.created_ms"
_VECTOR_COLUMNS = "v.visual, v.semantic, v.feature_norm, v.top_logits"


def _select(include_vectors: bool) -> str:
    if include_vectors:
        return f"SELECT {_RECORD_COLUMNS}, {_VECTOR_COLUMNS} FROM records r LEFT JOIN vectors v ON v.label = r.label"
    return f"SELECT {_RECORD_COLUMNS} FROM records r"


def _record(row: Sequence[Any]) -> StoredRecord:
    """A row of _select(): vectors and signals when it has their columns."""
    rec = StoredRecord(
        label=int(row[0]),
        id=row[1],
        metadata=json.loads(row[2]),
        source_name=row[3],
        semantic_head=row[4],
        created_ms=int(row[5]),
    )
    if len(row) == 6:
        return rec
    return replace(
        rec,
        visual=_vec(row[6]),
        semantic=_vec(row[7]),
        feature_norm=float(row[8] or 0.0),
        top_logits=_top_logits(row[9]),
    )
