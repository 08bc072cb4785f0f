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
_sent = 0
_paused = threading.local()


def add(nbytes: int | float) -> None:
    global _sent
    if getattr(_paused, "on", False):
        return
    with _lock:
        _sent += int(nbytes)


@contextmanager
def uncounted() -> Iterator[None]:
    """Inside, this thread's communication is not training traffic (metrics: evaluation, replica drift)."""
    before = getattr(_paused, "on", False)
    _paused.on = True
    try:
        yield
    finally:
        _paused.on = before


def sent() -> int:
    return _sent
