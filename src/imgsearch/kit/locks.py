"""A readers-writer lock for threads: many readers or one writer, writers not starved."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class WouldBlock(Exception):
    """A call asked not to wait (read(wait=False), or a caller's own cheap path) would have had to."""


class RWLock:
    """Many readers or one writer; a waiting writer holds off new readers so writes are not starved."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self, wait: bool = True) -> Iterator[None]:
        """A read lock; with wait=False it never waits: WouldBlock when a writer holds the lock or waits for it.

        wait=False is for callers on an event loop: they run cheap reads inline and hand the rest to a thread.
        """
        with self._cond:
            while self._writer or self._writers_waiting:
                if not wait:
                    raise WouldBlock
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
