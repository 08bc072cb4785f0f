"""Bytes this process has sent for mpiml's communication, for the studies' "accuracy against bytes" plots.

Point-to-point schedules (ring, tree, butterfly, hier across hosts, butterfly mixing) count what they
really send; the ``mpi`` algorithm (whose messages are the library's business) and the parameter server
add their cost-model figure (allreduce 2n(p-1)/p, parameter-server step 2n(K-1)/K).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["add", "sent", "uncounted"]

_lock = threading.Lock()


class _Thread:
    """One thread's count (no lock on the hot path: each thread adds to its own)."""

    __slots__ = ("sent", "paused")

    def __init__(self) -> None:
        self.sent = 0
        self.paused = False


_local = threading.local()
_threads: list[_Thread] = []  # every thread's count, kept after the thread ends (its bytes were sent)


def _this() -> _Thread:
    mine = getattr(_local, "count", None)
    if mine is None:
        mine = _local.count = _Thread()
        with _lock:
            _threads.append(mine)
    return mine


def add(nbytes: int | float) -> None:
    mine = _this()
    if not mine.paused:
        mine.sent += int(nbytes)


@contextmanager
def uncounted() -> Iterator[None]:
    """Inside, this thread's communication is not training traffic (metrics: evaluation, replica drift)."""
    mine = _this()
    before = mine.paused
    mine.paused = True
    try:
        yield
    finally:
        mine.paused = before


def sent() -> int:
    with _lock:
        return sum(t.sent for t in _threads)
