"""A readers-writer lock: the concurrency contract of tlfast's indexes (docs/design/concurrency.md).

Searches are readers and run concurrently with each other; ``add`` / ``train`` (writers) wait
for running searches and run alone.  Writers are preferred: once a writer waits, new readers
queue behind it, so a steady stream of searches cannot starve an ``add``.  Not re-entrant: a
method holding the lock never calls another that takes it.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class RWLock:
    __slots__ = ("_cond", "_readers", "_writer", "_waiting_writers")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()

    # A lock belongs to one live object: copies and unpickled objects get a fresh, free one.
    def __reduce__(self):
        return (RWLock, ())

    def __deepcopy__(self, memo) -> "RWLock":
        return RWLock()

    def __copy__(self) -> "RWLock":
        return RWLock()


class Mutex:
    """``threading.Lock`` that copies and pickles as a fresh, free lock (for objects that pickle)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def __reduce__(self):
        return (Mutex, ())

    def __deepcopy__(self, memo) -> "Mutex":
        return Mutex()

    def __copy__(self) -> "Mutex":
        return Mutex()
