"""A readers-writer lock that makes degree switches atomic with respect to forwards.

Forwards are readers: any number run at once. A switch (``model.r = ...``, folding a plugin's
delta) is a writer: it waits for running forwards to finish, and forwards that start meanwhile
wait for it. Writers are preferred so a busy server still gets its switch in; a thread that already
reads (a forward calling another forward) or writes may enter again without deadlock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)


class StateLock:
    """Shared (forward) / exclusive (state change) lock; re-entrant per thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None  # thread id
        self._writer_depth = 0
        self._writers_waiting = 0
        self._local = threading.local()

    def __reduce__(self):
        # Copies and pickles of a model get a fresh, unlocked lock.
        return (StateLock, ())

    def _read_depth(self) -> int:
        return getattr(self._local, "depth", 0)

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold while reading the model's degree and weights (a forward)."""
        me = threading.get_ident()
        depth = self._read_depth()
        if depth == 0 and self._writer != me:
            with self._cond:
                while self._writer is not None or self._writers_waiting:
                    self._cond.wait()
                self._readers += 1
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0 and self._writer != me:
                with self._cond:
                    self._readers -= 1
                    if self._readers == 0:
                        self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold while changing the degree or the weights it implies."""
        me = threading.get_ident()
        with self._cond:
            if self._writer != me:
                if self._read_depth():
                    raise RuntimeError("cannot switch the degree from inside a forward of the same model")
                self._writers_waiting += 1
                busy, start = self._readers, time.perf_counter()
                try:
                    while self._writer is not None or self._readers:
                        self._cond.wait()
                finally:
                    self._writers_waiting -= 1
                if busy:  # only the contended path pays for the clock and the record
                    logger.debug("a switch waited %.1f ms for %d running forwards",
                                 (time.perf_counter() - start) * 1000, busy)
                self._writer = me
            self._writer_depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._writer_depth -= 1
                if self._writer_depth == 0:
                    self._writer = None
                    self._cond.notify_all()
