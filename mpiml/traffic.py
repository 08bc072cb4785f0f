"""Bytes this process has sent for mpiml's communication, for the studies' "accuracy against bytes" plots.

Point-to-point schedules (ring, tree, butterfly, hier across hosts, butterfly mixing) count what they
really send; the ``mpi`` algorithm (whose messages are the library's business) and the parameter server
add their cost-model figure (allreduce 2n(p-1)/p, parameter-server step 2n(K-1)/K).
"""

from __future__ import annotations

import threading

__all__ = ["add", "sent"]

_lock = threading.Lock()
_sent = 0


def add(nbytes: int | float) -> None:
    global _sent
    with _lock:
        _sent += int(nbytes)


def sent() -> int:
    return _sent
