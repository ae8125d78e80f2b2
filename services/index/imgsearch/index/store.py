"""The shard's source of truth: records, vectors and a change log in SQLite (WAL journal, synchronous=FULL).

Every Upsert, Delete or SetSemantic request is one transaction, committed (and fsynced) before the response is
sent, so an acknowledged write survives a SIGKILL or a power cut. FAISS holds only derived state, rebuilt from here.

Tables:
- records: label (int64 FAISS id, never reused: AUTOINCREMENT) <-> string id, plus metadata and source.
  A replaced id keeps its label, so label -> id never changes while the id exists.
- vectors: the normalised visual vector per label, plus what re-projecting into a new semantic head needs
  without the image: the raw features' L2 norm and the top ImageNet logits (a BLOB of n little-endian int16
  class indices followed by n float32 logits; NULL for none). Apart from records so that loading the id map at
  start does not read these pages.
- semantics: one normalised semantic vector per (label, head), so that a record holds the vectors of several
  heads at once while a new head is built. Its primary key index covers (label, head), so loading which heads
  each label has at start reads that index, not the vectors.
- meta_terms: one row per metadata entry of a record (key, value, label), so that a search filter reads only the
  labels it matches.
- changes: one row per applied upsert, delete or semantic write (seq AUTOINCREMENT, monotonic). A FAISS
  snapshot records the last seq it contains; on start only rows after it are replayed. Rows up to a durable
  snapshot are pruned.
- meta: the schema version, the shard's uuid (snapshots must belong to this database), the dimensions it was
  created with, the seq the change log is pruned up to (an older snapshot could not be brought up to date), the
  head configuration (head_epoch, head_active, head_building) and when SetSemantic last wrote.

Schema versions: 1 had no feature_norm / top_logits columns; 2 added them (0 and NULL for the rows already stored,
i.e. "unknown"); 2 held one semantic vector per record (vectors.semantic, with its head in records.semantic_head),
3 moves each into the semantics table and drops those two columns; 4 stores every vector as little-endian float16
instead of float32 (half the bytes; converted in place) and adds meta_terms (key, value, label: the metadata
filter of searches) and an index on records.created_ms (its time range). Opening an older database upgrades it in
the transaction that records the new version: all or nothing.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from imgsearch.index.types import HeadConfig
from imgsearch.kit.errors import FailedPrecondition, ImgsearchError, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

DB_NAME = "index.sqlite3"
SCHEMA_VERSION = "4"
# Versions this code opens, upgrading them to SCHEMA_VERSION.
_KNOWN_VERSIONS = ("1", "2", "3", SCHEMA_VERSION)
# Columns added by version 2, with the values rows stored before it get (ALTER TABLE ADD COLUMN needs a constant).
_V2_COLUMNS = {"feature_norm": "REAL NOT NULL DEFAULT 0", "top_logits": "BLOB"}
# SQLite's default limit on host parameters is 32766 since 3.32; stay far below it.
_IN_CHUNK = 500
_HEAD_KEYS = ("head_epoch", "head_active", "head_building")
# The WAL is checkpointed this long after a commit, and restarted (see _Checkpointer) once it holds this many
# pages (4 KiB each: 64 MiB).
_CHECKPOINT_DELAY_S = 0.5
_WAL_RESTART_FRAMES = 16384
_LAST_SEMANTIC_KEY = "last_semantic_write_ms"
# json.dumps with options builds a new encoder per call; one shared encoder gives the same text.
_metadata_json = json.JSONEncoder(ensure_ascii=False, sort_keys=True).encode

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    label INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    has_visual INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    source_name TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS vectors (
    label INTEGER PRIMARY KEY,
    visual BLOB,
    feature_norm REAL NOT NULL DEFAULT 0,
    top_logits BLOB
);
CREATE TABLE IF NOT EXISTS semantics (
    label INTEGER NOT NULL,
    head TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (label, head)
);
CREATE TABLE IF NOT EXISTS meta_terms (
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    label INTEGER NOT NULL,
    PRIMARY KEY (key, value, label)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS meta_terms_label ON meta_terms(label);
CREATE TABLE IF NOT EXISTS thumbnails (
    label INTEGER PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_created ON records(created_ms);
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
Vec = npt.NDArray[np.float32]


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class UpsertOp:
    """A validated record to insert or replace (vectors already normalised); it replaces every head's vector."""

    id: str
    visual: Vec | None
    semantics: Mapping[str, Vec]
    metadata: dict[str, str]
    source_name: str
    # 0: keep the stored creation time on replace, now on insert.
    created_ms: int = 0
    feature_norm: float = 0.0
    top_logits: TopLogits = ()
    # A small JPEG kept with the record for result pages; empty: none.
    thumbnail: bytes = b""


@dataclass(frozen=True)
class DeleteOp:
    id: str


@dataclass(frozen=True)
class SemanticOp:
    """A validated write of one head's semantic vector of a record; its other heads and fields stay."""

    id: str
    semantic: Vec
    semantic_head: str


Op = UpsertOp | DeleteOp | SemanticOp


@dataclass(frozen=True)
class Slot:
    """What the in-memory id map keeps per label: enough to know which FAISS indexes hold it."""

    id: str
    has_visual: bool
    heads: frozenset[str] = frozenset()


@dataclass(frozen=True)
class StoredRecord:
    label: int
    id: str
    metadata: dict[str, str]
    source_name: str
    # Legacy single-head view: the preferred head the record has (see Store.fetch), and its vector when read.
    semantic_head: str | None
    created_ms: int
    visual: Vec | None = None
    semantic: Vec | None = None
    # Read with the vectors only (0 and empty otherwise, as for records stored before schema version 2).
    feature_norm: float = 0.0
    top_logits: TopLogits = ()
    # Every head the record has a vector of, sorted; their vectors when read with the vectors.
    heads: tuple[str, ...] = ()
    semantics: dict[str, Vec] = field(default_factory=dict)


class HitRecord(NamedTuple):
    """The stored fields a search hit carries, and the creation time its filter checks."""

    id: str
    metadata: dict[str, str]
    source_name: str
    created_ms: int


@dataclass
class VectorChunk:
    """Vectors of some labels, grouped by FAISS index: visual, and semantic per head."""

    visual_labels: list[int] = field(default_factory=list)
    visual: list[bytes] = field(default_factory=list)
    semantic: dict[str, tuple[list[int], list[bytes]]] = field(default_factory=dict)

    def merge(self, other: VectorChunk) -> None:
        self.visual_labels += other.visual_labels
        self.visual += other.visual
        for head, (labels, blobs) in other.semantic.items():
            group = self.semantic.setdefault(head, ([], []))
            group[0].extend(labels)
            group[1].extend(blobs)


@dataclass(frozen=True)
class WriteOutcome:
    """Per op: the label written, deleted or updated (None: the id did not exist); and the last change seq."""

    labels: list[int | None]
    last_seq: int
    # When a semantic write of this transaction was stored (0: it had none).
    semantic_ms: int = 0


def _storage_error(exc: sqlite3.OperationalError) -> ImgsearchError:
    """A failed write transaction as a status the caller can act on; nothing of the request was stored."""
    if "full" in str(exc):
        return ResourceExhausted(f"the shard's storage is full ({exc}); nothing from this request was stored")
    return Unavailable(f"the shard's storage failed ({exc}); nothing from this request was stored, retry later")


# Every float16 bit pattern's float32 value: a table lookup converts twice as fast as numpy's float16 cast, to
# the same values (the table is that cast).
_F16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def f16_matrix(buf: bytes, rows: int) -> Vec:
    """Little-endian float16 values (rows of equal length) as a float32 matrix."""
    out: Vec = np.take(_F16_TO_F32, np.frombuffer(buf, dtype="<u2")).reshape(rows, -1)
    return out


def _blob(vec: Vec | None) -> bytes | None:
    return None if vec is None else np.ascontiguousarray(vec, dtype="<f2").tobytes()


def _vec(blob: bytes | None) -> Vec | None:
    return None if blob is None else np.frombuffer(blob, dtype="<f2").astype(np.float32)


def _f32_to_f16(blob: bytes | None) -> bytes | None:
    return None if blob is None else np.frombuffer(blob, dtype="<f4").astype("<f2").tobytes()


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


def _chunks(items: Sequence[Any], size: int = _IN_CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def preferred_head(heads: Sequence[str], prefer: Sequence[str]) -> str | None:
    """The head a legacy single-head reader is shown: the first preferred one the record has, else the first."""
    for head in prefer:
        if head and head in heads:
            return head
    return min(heads) if heads else None


class _Checkpointer:
    """Checkpoints the WAL on a background thread, its own connection, a while after commits.

    PASSIVE checkpoints never block the writer. SQLite restarts the WAL from its start only when a checkpoint has
    copied every frame before the next write begins, which a steady stream of writes may keep from happening; once
    the WAL holds more than _WAL_RESTART_FRAMES, a RESTART checkpoint (which waits for the writer) bounds it.
    """

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"checkpoint-{path.parent.name}", daemon=True)
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            # Gather the commits of a burst into one checkpoint (a bulk load commits several times a second).
            self._stop.wait(_CHECKPOINT_DELAY_S)
            self._wake.clear()
            try:
                _, frames, _ = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if frames > _WAL_RESTART_FRAMES:
                    self._conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            except sqlite3.Error:
                log.warning("WAL checkpoint failed; will retry after the next write", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self._conn.close()


class Store:
    """SQLite access for one shard. Writes must be serialised by the caller; reads may run on any thread."""

    def __init__(self, directory: Path, visual_dim: int, semantic_dim: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / DB_NAME
        # Autocommit mode: transactions are explicit BEGIN IMMEDIATE ... COMMIT below.
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self.shard_uuid = self._init_meta(visual_dim, semantic_dim)
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        # Checkpoints (copying committed WAL pages into the database file, then fsyncing it) run on their own
        # thread rather than inside a commit: SQLite's automatic one ran in every other bulk Upsert (1000 pages)
        # and cost it more wall time than the commit's own fsync. Durability is the WAL's, unchanged.
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._checkpoints = _Checkpointer(self.path)

    def _init_meta(self, visual_dim: int, semantic_dim: int) -> str:
        """Create the tables and meta rows of a new database, or check an existing one and upgrade its schema."""
        wanted = {"visual_dim": str(visual_dim), "semantic_dim": str(semantic_dim)}
        self._db.execute("BEGIN IMMEDIATE")
        try:
            # In the transaction, so that a refused start (unknown version) creates nothing either.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
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
        return str(stored["shard_uuid"])

    def _columns(self, table: str) -> set[str]:
        return {str(row[1]) for row in self._db.execute(f"PRAGMA table_info({table})")}

    def _upgrade(self, version: str | None) -> None:
        """Bring an older schema to SCHEMA_VERSION (inside the caller's transaction: all or nothing)."""
        # By the columns present rather than the version alone: a database whose tables were created but whose
        # meta rows were not (a crash in between) is indistinguishable from a new one by its meta.
        added = [name for name in _V2_COLUMNS if name not in self._columns("vectors")]
        for name in added:
            self._db.execute(f"ALTER TABLE vectors ADD COLUMN {name} {_V2_COLUMNS[name]}")
        moved = 0
        legacy_vector = "semantic" in self._columns("vectors")
        legacy_head = "semantic_head" in self._columns("records")
        if legacy_vector and legacy_head:
            # Both must be set: version 1 and 2 refused a semantic vector without its head and vice versa.
            moved = self._db.execute(
                "INSERT INTO semantics(label, head, vector) SELECT v.label, r.semantic_head, v.semantic "
                "FROM vectors v JOIN records r ON r.label = v.label "
                "WHERE v.semantic IS NOT NULL AND r.semantic_head IS NOT NULL"
            ).rowcount
        if legacy_vector:
            self._db.execute("ALTER TABLE vectors DROP COLUMN semantic")
        if legacy_head:
            self._db.execute("ALTER TABLE records DROP COLUMN semantic_head")
        converted = 0
        if version in ("1", "2", "3"):
            converted = self._vectors_to_float16()
            self._db.execute(
                "INSERT OR IGNORE INTO meta_terms(key, value, label) "
                "SELECT j.key, CAST(j.value AS TEXT), r.label FROM records r, json_each(r.metadata) j"
            )
        if version != SCHEMA_VERSION:
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,))
        if added or legacy_vector or legacy_head or version != SCHEMA_VERSION:
            log.info(
                "database schema upgraded",
                extra={
                    "path": str(self.path),
                    "from": version,
                    "to": SCHEMA_VERSION,
                    "added_columns": added,
                    "semantic_vectors_moved": moved,
                    "vectors_to_float16": converted,
                },
            )

    def _vectors_to_float16(self) -> int:
        """Version 4 stores vectors as float16 (half the bytes; the visual space does not need float32)."""
        n = 0
        for table, column in (("vectors", "visual"), ("semantics", "vector")):
            key = "label" if table == "vectors" else "rowid"
            last = -1
            while True:
                rows = self._db.execute(
                    f"SELECT {key}, {column} FROM {table} WHERE {key} > ? AND {column} IS NOT NULL "
                    f"ORDER BY {key} LIMIT 4096",
                    (last,),
                ).fetchall()
                if not rows:
                    break
                self._db.executemany(
                    f"UPDATE {table} SET {column} = ? WHERE {key} = ?",
                    [(_f32_to_f16(blob), k) for k, blob in rows],
                )
                n += len(rows)
                last = int(rows[-1][0])
        return n

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
        self._checkpoints.stop()
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
        semantic_ms = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            # Upserts only (every Upsert request): table by table in bulk; anything else op by op, in order.
            upserts = [op for op in ops if isinstance(op, UpsertOp)]
            if len(upserts) == len(ops):
                labels += self._upserts(upserts, ts)
                ops = ()
            for op in ops:
                if isinstance(op, UpsertOp):
                    label = self._upsert(op, ts)
                    db.execute(
                        "INSERT OR REPLACE INTO vectors(label, visual, feature_norm, top_logits) VALUES (?, ?, ?, ?)",
                        (label, _blob(op.visual), op.feature_norm, _logits_blob(op.top_logits)),
                    )
                    db.execute("DELETE FROM meta_terms WHERE label = ?", (label,))
                    db.executemany(
                        "INSERT INTO meta_terms(key, value, label) VALUES (?, ?, ?)",
                        [(k, v, label) for k, v in op.metadata.items()],
                    )
                    db.execute("DELETE FROM thumbnails WHERE label = ?", (label,))
                    if op.thumbnail:
                        db.execute("INSERT INTO thumbnails(label, data) VALUES (?, ?)", (label, op.thumbnail))
                    # An upsert replaces the whole record, every head's vector included.
                    db.execute("DELETE FROM semantics WHERE label = ?", (label,))
                    db.executemany(
                        "INSERT INTO semantics(label, head, vector) VALUES (?, ?, ?)",
                        [(label, head, _blob(vec)) for head, vec in op.semantics.items()],
                    )
                    self._log_change(label, "upsert", op.id, ts)
                    labels.append(label)
                elif isinstance(op, SemanticOp):
                    row = db.execute(
                        "UPDATE records SET updated_ms = ? WHERE id = ? RETURNING label", (ts, op.id)
                    ).fetchone()
                    if row is None:
                        labels.append(None)
                        continue
                    db.execute(
                        "INSERT OR REPLACE INTO semantics(label, head, vector) VALUES (?, ?, ?)",
                        (row[0], op.semantic_head, _blob(op.semantic)),
                    )
                    # Replay re-reads every vector of a touched label, so the new head's vector is picked up.
                    self._log_change(int(row[0]), "set_semantic", op.id, ts)
                    labels.append(int(row[0]))
                    semantic_ms = ts
                else:
                    row = db.execute("DELETE FROM records WHERE id = ? RETURNING label", (op.id,)).fetchone()
                    if row is None:
                        labels.append(None)
                        continue
                    db.execute("DELETE FROM vectors WHERE label = ?", (row[0],))
                    db.execute("DELETE FROM semantics WHERE label = ?", (row[0],))
                    db.execute("DELETE FROM meta_terms WHERE label = ?", (row[0],))
                    db.execute("DELETE FROM thumbnails WHERE label = ?", (row[0],))
                    self._log_change(int(row[0]), "delete", op.id, ts)
                    labels.append(int(row[0]))
            if semantic_ms:
                db.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (_LAST_SEMANTIC_KEY, str(semantic_ms))
                )
            last_seq = self._last_seq(db)
            db.execute("COMMIT")
            self._checkpoints.poke()
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                raise _storage_error(exc) from exc
            raise
        return WriteOutcome(labels=labels, last_seq=last_seq, semantic_ms=semantic_ms)

    def _upserts(self, ops: Sequence[UpsertOp], ts: int) -> list[int]:
        """A batch of upserts, each table written with one executemany: what the per-op path does, in bulk.

        The records row is upserted op by op (its label, and the creation time a later op of the same id keeps).
        The rows hanging off a label are then written once per label, from the last op of it in the batch (an id
        twice in one request: the later record wins, as applying them in order gives); the old rows are deleted
        only for labels that existed before the batch (AUTOINCREMENT: new labels are above every earlier one).
        The change log keeps one row per op, in order.
        """
        db = self._db
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
        top = int(row[0]) if row else 0
        labels = [self._upsert(op, ts) for op in ops]
        last = dict(zip(labels, ops, strict=True))
        old = [label for label in last if label <= top]
        for part in _chunks(old):
            marks = _marks(len(part))
            for table in ("meta_terms", "thumbnails", "semantics"):
                db.execute(f"DELETE FROM {table} WHERE label IN ({marks})", tuple(part))
        db.executemany(
            "INSERT OR REPLACE INTO vectors(label, visual, feature_norm, top_logits) VALUES (?, ?, ?, ?)",
            [(label, _blob(op.visual), op.feature_norm, _logits_blob(op.top_logits)) for label, op in last.items()],
        )
        db.executemany(
            "INSERT INTO meta_terms(key, value, label) VALUES (?, ?, ?)",
            [(k, v, label) for label, op in last.items() for k, v in op.metadata.items()],
        )
        db.executemany(
            "INSERT INTO thumbnails(label, data) VALUES (?, ?)",
            [(label, op.thumbnail) for label, op in last.items() if op.thumbnail],
        )
        db.executemany(
            "INSERT INTO semantics(label, head, vector) VALUES (?, ?, ?)",
            [(label, head, _blob(vec)) for label, op in last.items() for head, vec in op.semantics.items()],
        )
        db.executemany(
            "INSERT INTO changes(op, label, id, unix_ms) VALUES ('upsert', ?, ?, ?)",
            [(label, op.id, ts) for label, op in zip(labels, ops, strict=True)],
        )
        return labels

    def _log_change(self, label: int, op: str, id_: str, ts: int) -> None:
        self._db.execute("INSERT INTO changes(op, label, id, unix_ms) VALUES (?, ?, ?, ?)", (op, label, id_, ts))

    def _upsert(self, op: UpsertOp, ts: int) -> int:
        row = self._db.execute(
            """
            INSERT INTO records(id, has_visual, metadata, source_name, created_ms, updated_ms)
            VALUES (?, ?, ?, ?, ?, ?)
            ON CONFLICT(id) DO UPDATE SET
                has_visual = excluded.has_visual,
                metadata = excluded.metadata,
                source_name = excluded.source_name,
                created_ms = CASE WHEN ? > 0 THEN excluded.created_ms ELSE records.created_ms END,
                updated_ms = excluded.updated_ms
            RETURNING label
            """,
            (
                op.id,
                int(op.visual is not None),
                _metadata_json(op.metadata),
                op.source_name,
                op.created_ms if op.created_ms > 0 else ts,
                ts,
                op.created_ms,
            ),
        ).fetchone()
        return int(row[0])

    def set_head_config(self, config: HeadConfig) -> HeadConfig:
        """Store the configuration if its epoch is newer than the stored one; returns the one in force after."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            stored = self._head_config(db)
            if config.epoch > stored.epoch:
                values = (str(config.epoch), config.active, config.building)
                db.executemany(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", zip(_HEAD_KEYS, values, strict=True)
                )
                stored = config
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                raise _storage_error(exc) from exc
            raise
        return stored

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

    @staticmethod
    def _meta(conn: sqlite3.Connection, keys: Sequence[str]) -> dict[str, str]:
        rows = conn.execute(f"SELECT key, value FROM meta WHERE key IN ({_marks(len(keys))})", tuple(keys))
        return {str(k): str(v) for k, v in rows.fetchall()}

    @classmethod
    def _head_config(cls, conn: sqlite3.Connection) -> HeadConfig:
        meta = cls._meta(conn, _HEAD_KEYS)
        return HeadConfig(
            epoch=int(meta.get("head_epoch", "0")),
            active=meta.get("head_active", ""),
            building=meta.get("head_building", ""),
        )

    def head_config(self) -> HeadConfig:
        return self._head_config(self._reader())

    def last_semantic_write_ms(self) -> int:
        return int(self._meta(self._reader(), (_LAST_SEMANTIC_KEY,)).get(_LAST_SEMANTIC_KEY, "0"))

    def last_seq(self) -> int:
        return self._last_seq(self._reader())

    def pruned_seq(self) -> int:
        """Changes up to this seq are gone from the log: a snapshot older than that cannot be replayed."""
        return int(self._meta(self._reader(), ("pruned_seq",)).get("pruned_seq", "0"))

    def changes_after(self, seq: int) -> tuple[list[int], int]:
        """Distinct labels touched by changes after seq, and how many changes that is."""
        rows = self._reader().execute("SELECT label FROM changes WHERE seq > ? ORDER BY seq", (seq,)).fetchall()
        return sorted({int(r[0]) for r in rows}), len(rows)

    def slots(self) -> dict[int, Slot]:
        """Every stored label with its id and which spaces it has vectors in (one read transaction)."""
        conn = self._reader()
        heads: dict[int, set[str]] = {}
        out: dict[int, Slot] = {}
        conn.execute("BEGIN")
        try:
            cur = conn.execute("SELECT label, head FROM semantics")
            while rows := cur.fetchmany(8192):
                for label, head in rows:
                    heads.setdefault(int(label), set()).add(str(head))
            cur = conn.execute("SELECT label, id, has_visual FROM records")
            while rows := cur.fetchmany(8192):
                for label, id_, has_visual in rows:
                    held = heads.get(int(label))
                    out[int(label)] = Slot(id_, bool(has_visual), frozenset(held) if held else frozenset())
        finally:
            conn.execute("COMMIT")
        return out

    def vectors(self, labels: Sequence[int] | None = None, chunk_rows: int = 4096) -> Iterator[VectorChunk]:
        """Stored vectors, all of them (labels=None) or of these labels, in chunks grouped by index."""
        conn = self._reader()
        visual_sql = "SELECT label, visual FROM vectors WHERE visual IS NOT NULL"
        semantic_sql = "SELECT label, head, vector FROM semantics"
        cursors: list[sqlite3.Cursor] = []
        if labels is None:
            cursors = [conn.execute(visual_sql + " ORDER BY label"), conn.execute(semantic_sql + " ORDER BY label")]
        else:
            for part in _chunks(labels):
                where = f"label IN ({_marks(len(part))})"
                cursors.append(conn.execute(f"{visual_sql} AND {where}", tuple(part)))
                cursors.append(conn.execute(f"{semantic_sql} WHERE {where}", tuple(part)))
        for cur in cursors:
            while rows := cur.fetchmany(chunk_rows):
                out = VectorChunk()
                for row in rows:
                    if len(row) == 2:
                        out.visual_labels.append(int(row[0]))
                        out.visual.append(row[1])
                    else:
                        group = out.semantic.setdefault(str(row[1]), ([], []))
                        group[0].append(int(row[0]))
                        group[1].append(row[2])
                yield out

    def fetch(
        self, labels: Sequence[int], include_vectors: bool = False, prefer: Sequence[str] = ()
    ) -> dict[int, StoredRecord]:
        """Records of these labels that still exist, read in one transaction.

        `prefer`: heads to show in the legacy semantic_head / semantic fields, first held wins (see
        preferred_head).
        """
        found = self._fetch("label", list(dict.fromkeys(labels)), include_vectors, prefer)
        return {rec.label: rec for rec in found}

    def hit_records(self, labels: Sequence[int]) -> dict[int, HitRecord]:
        """What a search hit shows of these labels that still exist: one statement per chunk, no vectors or heads.

        Search answers need only these columns; fetch() also reads every record's heads in a transaction, which
        cost more than the search itself on a small shard (docs/benchmarks.md).
        """
        out: dict[int, HitRecord] = {}
        conn = self._reader()
        for part in _chunks(list(dict.fromkeys(labels))):
            sql = f"{_select(False)} WHERE r.label IN ({_marks(len(part))})"
            for label, image_id, metadata, source_name, created_ms in conn.execute(sql, tuple(part)):
                out[label] = HitRecord(image_id, json.loads(metadata), source_name, created_ms)
        return out

    def fetch_ids(
        self, ids: Sequence[str], include_vectors: bool = False, prefer: Sequence[str] = ()
    ) -> dict[str, StoredRecord]:
        """Records of these string ids that exist, read in one transaction."""
        return {rec.id: rec for rec in self._fetch("id", list(dict.fromkeys(ids)), include_vectors, prefer)}

    def _fetch(
        self, key: str, values: Sequence[int | str], include_vectors: bool, prefer: Sequence[str]
    ) -> list[StoredRecord]:
        if not values:
            return []
        conn = self._reader()
        rows: list[Sequence[Any]] = []
        # One read transaction, so that a request split into chunks still sees one state of the shard.
        conn.execute("BEGIN")
        try:
            for part in _chunks(values):
                rows += conn.execute(f"{_select(include_vectors)} WHERE r.{key} IN ({_marks(len(part))})", tuple(part))
            semantics = _semantics_of(conn, [int(row[0]) for row in rows], include_vectors)
        finally:
            conn.execute("COMMIT")
        return [_record(row, semantics.get(int(row[0]), {}), prefer) for row in rows]

    def thumbnails(self, ids: Sequence[str]) -> dict[str, bytes]:
        """Stored thumbnails of these ids (those that have one)."""
        out: dict[str, bytes] = {}
        conn = self._reader()
        for part in _chunks(list(dict.fromkeys(ids))):
            rows = conn.execute(
                "SELECT r.id, t.data FROM records r JOIN thumbnails t USING (label) "
                f"WHERE r.id IN ({_marks(len(part))})",
                tuple(part),
            )
            out.update({str(i): bytes(d) for i, d in rows})
        return out

    def filter_labels(
        self, terms: Sequence[tuple[str, Sequence[str]]], created_after_ms: int = 0, created_before_ms: int = 0
    ) -> npt.NDArray[np.int64]:
        """Sorted labels of the records matching every term (key equal to one of the values) and the time range.

        created_after_ms: created at or after (0: unbounded); created_before_ms: created before (0: unbounded).
        """
        parts: list[str] = []
        params: list[Any] = []
        for key, values in terms:
            parts.append(f"SELECT label FROM meta_terms WHERE key = ? AND value IN ({_marks(len(values))})")
            params += [key, *values]
        if created_after_ms or created_before_ms:
            where = []
            if created_after_ms:
                where.append("created_ms >= ?")
                params.append(created_after_ms)
            if created_before_ms:
                where.append("created_ms < ?")
                params.append(created_before_ms)
            parts.append("SELECT label FROM records WHERE " + " AND ".join(where))
        if not parts:
            raise ValueError("an empty filter selects every record; pass none instead")
        rows = self._reader().execute(" INTERSECT ".join(parts), tuple(params)).fetchall()
        out = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        out.sort()
        return out

    def visual_matrix(self, labels: Sequence[int]) -> tuple[list[int], Vec]:
        """The labels (of these) with a stored visual vector, and those vectors as one float32 matrix, in one read.

        For re-ranking approximate candidates: one query and one buffer, not an array per row.
        """
        rows: list[tuple[int, bytes]] = []
        conn = self._reader()
        for part in _chunks(list(labels)):
            sql = f"SELECT label, visual FROM vectors WHERE visual IS NOT NULL AND label IN ({_marks(len(part))})"
            rows += conn.execute(sql, tuple(part)).fetchall()
        if not rows:
            return [], np.zeros((0, 0), np.float32)
        found, blobs = zip(*rows, strict=True)
        return list(found), f16_matrix(b"".join(blobs), len(found))

    def scan(self, after_label: int, limit: int, skip_head: str = "", prefer: Sequence[str] = ()) -> list[StoredRecord]:
        """Up to `limit` records with labels above `after_label`, in label order, with their vectors.

        Records that already have a vector of `skip_head` (when given) are left out. Labels only grow and a
        replaced id keeps its label, so paging by the last label returned visits every record once, and
        records added meanwhile come in later pages.
        """
        sql = f"{_select(True)} WHERE r.label > ?"
        params: tuple[int | str, ...] = (after_label,)
        if skip_head:
            sql += " AND NOT EXISTS (SELECT 1 FROM semantics s WHERE s.label = r.label AND s.head = ?)"
            params += (skip_head,)
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            rows = conn.execute(sql + " ORDER BY r.label LIMIT ?", (*params, limit)).fetchall()
            semantics = _semantics_of(conn, [int(row[0]) for row in rows], True)
        finally:
            conn.execute("COMMIT")
        return [_record(row, semantics.get(int(row[0]), {}), prefer) for row in rows]


_RECORD_COLUMNS = "r.label, r.id, r.metadata, r.source_name, r.created_ms"
_VECTOR_COLUMNS = "v.visual, v.feature_norm, v.top_logits"


def _select(include_vectors: bool) -> str:
    if include_vectors:
        return f"SELECT {_RECORD_COLUMNS}, {_VECTOR_COLUMNS} FROM records r LEFT JOIN vectors v ON v.label = r.label"
    return f"SELECT {_RECORD_COLUMNS} FROM records r"


def _semantics_of(
    conn: sqlite3.Connection, labels: Sequence[int], include_vectors: bool
) -> dict[int, dict[str, Vec | None]]:
    """Per label, its heads (with their vectors when asked), inside the caller's read transaction."""
    out: dict[int, dict[str, Vec | None]] = {}
    columns = "label, head, vector" if include_vectors else "label, head"
    for part in _chunks(labels):
        sql = f"SELECT {columns} FROM semantics WHERE label IN ({_marks(len(part))})"
        for row in conn.execute(sql, tuple(part)):
            out.setdefault(int(row[0]), {})[str(row[1])] = _vec(row[2]) if include_vectors else None
    return out


def _record(row: Sequence[Any], semantics: Mapping[str, Vec | None], prefer: Sequence[str]) -> StoredRecord:
    """A row of _select() plus the record's heads: vectors and signals when the row has their columns."""
    heads = tuple(sorted(semantics))
    head = preferred_head(heads, prefer)
    vectors = {h: v for h, v in semantics.items() if v is not None}
    rec = StoredRecord(
        label=int(row[0]),
        id=row[1],
        metadata=json.loads(row[2]),
        source_name=row[3],
        semantic_head=head,
        created_ms=int(row[4]),
        heads=heads,
    )
    if len(row) == 5:
        return rec
    return StoredRecord(
        label=rec.label,
        id=rec.id,
        metadata=rec.metadata,
        source_name=rec.source_name,
        semantic_head=head,
        created_ms=rec.created_ms,
        visual=_vec(row[5]),
        semantic=None if head is None else vectors.get(head),
        feature_norm=float(row[6] or 0.0),
        top_logits=_top_logits(row[7]),
        heads=heads,
        semantics={h: vectors[h] for h in heads if h in vectors},
    )
