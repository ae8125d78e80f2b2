"""The shard's source of truth: records, vectors and a change log in SQLite (WAL journal, synchronous=FULL).

Every Upsert or Delete request is one transaction, committed (and fsynced) before the response is sent, so an
acknowledged write survives a SIGKILL or a power cut. FAISS holds only derived state, rebuilt from here.

Tables:
- records: label (int64 FAISS id, never reused: AUTOINCREMENT) <-> string id, plus head, metadata, source.
  A replaced id keeps its label, so label -> id never changes while the id exists.
- vectors: the normalised float32 vectors per label, apart from records so that loading the id map at start
  does not read the vector pages.
- changes: one row per applied upsert or delete (seq AUTOINCREMENT, monotonic). A FAISS snapshot records the
  last seq it contains; on start only rows after it are replayed. Rows up to a durable snapshot are pruned.
- meta: the shard's uuid (snapshots must belong to this database), the dimensions it was created with, and
  the seq the change log is pruned up to (an older snapshot could not be brought up to date).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from imgsearch.kit.errors import FailedPrecondition, ImgsearchError, ResourceExhausted, Unavailable

DB_NAME = "index.sqlite3"
SCHEMA_VERSION = "1"
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
CREATE TABLE IF NOT EXISTS vectors (label INTEGER PRIMARY KEY, visual BLOB, semantic BLOB);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    op TEXT NOT NULL,
    label INTEGER NOT NULL,
    id TEXT NOT NULL,
    unix_ms INTEGER NOT NULL
);
"""


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


@dataclass(frozen=True)
class DeleteOp:
    id: str


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


@dataclass
class VectorChunk:
    """Vectors of some labels, grouped by FAISS index: visual, and semantic per head."""

    visual_labels: list[int] = field(default_factory=list)
    visual: list[bytes] = field(default_factory=list)
    semantic: dict[str, tuple[list[int], list[bytes]]] = field(default_factory=dict)


@dataclass(frozen=True)
class WriteOutcome:
    """Per op: the label written or deleted (None: deleted id did not exist); and the last change seq."""

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
        wanted = {"visual_dim": str(visual_dim), "semantic_dim": str(semantic_dim)}
        self._db.execute("BEGIN IMMEDIATE")
        try:
            stored = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
            if not stored:
                stored = {"schema_version": SCHEMA_VERSION, "shard_uuid": uuid.uuid4().hex, **wanted}
                self._db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", stored.items())
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        for key, value in wanted.items():
            if stored.get(key) != value:
                # Refusing to start is the only safe answer: mixing dimensions would corrupt the shard.
                raise FailedPrecondition(
                    f"{self.path} was created with {key}={stored.get(key)}, but the settings say {value}; "
                    "use the original dimensions or a new data_dir"
                )
        if stored.get("schema_version") != SCHEMA_VERSION:
            raise FailedPrecondition(f"{self.path} has schema version {stored.get('schema_version')}, expected 1")
        return stored["shard_uuid"]

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

    def write(self, ops: Sequence[UpsertOp | DeleteOp]) -> WriteOutcome:
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
                        "INSERT OR REPLACE INTO vectors(label, visual, semantic) VALUES (?, ?, ?)",
                        (label, _blob(op.visual), _blob(op.semantic)),
                    )
                    db.execute(
                        "INSERT INTO changes(op, label, id, unix_ms) VALUES ('upsert', ?, ?, ?)", (label, op.id, ts)
                    )
                    labels.append(label)
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
        cols = "r.label, r.id, r.metadata, r.source_name, r.semantic_head, r.created_ms"
        join = ""
        if include_vectors:
            cols += ", v.visual, v.semantic"
            join = "LEFT JOIN vectors v ON v.label = r.label "
        out: list[StoredRecord] = []
        # One read transaction, so that a request split into chunks still sees one state of the shard.
        conn.execute("BEGIN")
        try:
            for start in range(0, len(values), _IN_CHUNK):
                part = tuple(values[start : start + _IN_CHUNK])
                rows = conn.execute(
                    f"SELECT {cols} FROM records r {join}WHERE r.{key} IN ({','.join('?' * len(part))})", part
                ).fetchall()
                out.extend(
                    StoredRecord(
                        label=int(row[0]),
                        id=row[1],
                        metadata=json.loads(row[2]),
                        source_name=row[3],
                        semantic_head=row[4],
                        created_ms=int(row[5]),
                        visual=_vec(row[6]) if include_vectors else None,
                        semantic=_vec(row[7]) if include_vectors else None,
                    )
                    for row in rows
                )
        finally:
            conn.execute("COMMIT")
        return out
