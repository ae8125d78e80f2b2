"""Durable tag vocabulary and embedding cache in SQLite (committed before any add is acknowledged)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgsearch.kit.convert import Matrix

SCHEMA = """
CREATE TABLE IF NOT EXISTS tags (
    key TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    seen INTEGER NOT NULL,
    added_ms INTEGER NOT NULL,
    text_model TEXT NOT NULL,
    embedding BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS text_cache (
    text_model TEXT NOT NULL,
    text TEXT NOT NULL,
    embedding BLOB NOT NULL,
    PRIMARY KEY (text_model, text)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class StoredTag:
    """A vocabulary entry as stored."""

    key: str
    name: str
    seen: bool
    added_ms: int
    text_model: str
    embedding: Matrix


def tag_key(name: str) -> str:
    """Tags are unique regardless of case: 'Cat' and 'cat' are one tag."""
    return name.casefold()


class VocabularyStore:
    """SQLite in WAL mode with synchronous=FULL: an acknowledged change survives SIGKILL and power loss."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def load(self) -> list[StoredTag]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key, name, seen, added_ms, text_model, embedding FROM tags ORDER BY key"
            ).fetchall()
        return [
            StoredTag(k, n, bool(s), int(a), m, np.frombuffer(e, dtype=np.float32).copy()) for k, n, s, a, m, e in rows
        ]

    def version(self) -> int:
        """The vocabulary's version: bumped in the same transaction as every change, so it survives crashes."""
        value = self.get_meta("version")
        return 0 if value is None else int(value)

    def _set_version(self, version: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('version', ?)", (str(version),))

    def put(self, tags: Sequence[StoredTag], version: int) -> None:
        """Insert or replace tags and record the new version, in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._set_version(version)
                self._db.executemany(
                    "INSERT OR REPLACE INTO tags (key, name, seen, added_ms, text_model, embedding) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (t.key, t.name, int(t.seen), t.added_ms, t.text_model, t.embedding.astype(np.float32).tobytes())
                        for t in tags
                    ],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def delete(self, keys: Iterable[str], version: int) -> None:
        """Delete tags and record the new version, in one transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._set_version(version)
                self._db.executemany("DELETE FROM tags WHERE key = ?", [(k,) for k in keys])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def cached_embeddings(self, text_model: str, texts: Sequence[str]) -> dict[str, Matrix]:
        """Embeddings of texts computed earlier by this exact text model."""
        out: dict[str, Matrix] = {}
        with self._lock:
            for start in range(0, len(texts), 500):
                chunk = list(texts[start : start + 500])
                marks = ",".join("?" * len(chunk))
                for text, blob in self._db.execute(
                    f"SELECT text, embedding FROM text_cache WHERE text_model = ? AND text IN ({marks})",
                    [text_model, *chunk],
                ):
                    out[text] = np.frombuffer(blob, dtype=np.float32).copy()
        return out

    def cache_embeddings(self, text_model: str, items: dict[str, Matrix]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO text_cache (text_model, text, embedding) VALUES (?, ?, ?)",
                [(text_model, t, e.astype(np.float32).tobytes()) for t, e in items.items()],
            )

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def now_ms() -> int:
    return int(time.time() * 1000)
