"""The kit's readers-writer lock: read(wait=False) shares with readers and never waits for a writer."""

from __future__ import annotations

import threading
import time

import pytest

from imgsearch.kit.locks import RWLock, WouldBlock


def test_read_without_waiting_shares_with_readers_and_refuses_while_a_writer_holds_the_lock() -> None:
    lock = RWLock()
    with lock.read(), lock.read(wait=False):
        pass
    with lock.write(), pytest.raises(WouldBlock), lock.read(wait=False):
        pass
    with lock.read(wait=False):  # released again
        pass


def test_read_without_waiting_refuses_while_a_writer_waits_so_writers_are_not_starved() -> None:
    lock = RWLock()
    entered = threading.Event()
    with lock.read():

        def write() -> None:
            with lock.write():
                entered.set()

        writer = threading.Thread(target=write)
        writer.start()
        while not lock._writers_waiting:  # the writer is queued behind our read
            time.sleep(0.001)
        with pytest.raises(WouldBlock), lock.read(wait=False):
            pass
    writer.join(5)
    assert entered.is_set()
