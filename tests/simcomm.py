"""An in-process stand-in for an MPI communicator, for testing schedules at any rank count.

``simulate(p, fn)`` runs ``fn(comm)`` for p simulated ranks, one thread each.
Point-to-point messages use *rendezvous* semantics, stricter than real MPI:
a send completes only once a matching receive is posted, and the bytes are
copied from the sender's live buffer at that moment. So a schedule that
would deadlock without eager buffering deadlocks here (reported, not hung),
and one that touches a buffer while a message on it is in flight gets wrong
numbers. Sizes must match exactly (MPI would silently accept a shorter
message). Bytes and messages sent are counted per rank.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

import numpy as np

TIMEOUT = 20.0


class SimDeadlock(RuntimeError):
    pass


def _array(spec: Any) -> np.ndarray:
    buf = spec[0] if isinstance(spec, (list, tuple)) else spec
    return np.asarray(buf).reshape(-1).view(np.uint8)


class _Request:
    def __init__(self, world: SimWorld, what: str) -> None:
        self.world, self.what, self.done, self.error = world, what, False, None

    def Wait(self) -> None:
        with self.world.cond:
            if not self.world.cond.wait_for(lambda: self.done or self.world.failed, TIMEOUT):
                self.world.failed = True
                self.world.cond.notify_all()
                raise SimDeadlock(f"no progress after {TIMEOUT}s waiting for {self.what}")
            if self.error:
                raise RuntimeError(self.error)
            if not self.done:
                raise SimDeadlock(f"another rank failed while waiting for {self.what}")


class SimWorld:
    def __init__(self, p: int) -> None:
        self.p = p
        self.cond = threading.Condition()
        self.sends: dict[tuple[int, int, int], deque] = defaultdict(deque)
        self.recvs: dict[tuple[int, int, int], deque] = defaultdict(deque)
        self.bytes_sent = [0] * p
        self.messages_sent = [0] * p
        self.largest_message = [0] * p
        self.failed = False

    def _match(self, src: np.ndarray, sreq: _Request, dst: np.ndarray, rreq: _Request) -> None:
        if src.size != dst.size:
            sreq.error = rreq.error = f"size mismatch: sent {src.size} bytes into a receive of {dst.size}"
        else:
            dst[...] = src
        sreq.done = rreq.done = True
        self.cond.notify_all()

    def isend(self, rank: int, spec: Any, dest: int, tag: int) -> _Request:
        src = _array(spec)
        req = _Request(self, f"send {rank}->{dest} ({src.size} bytes)")
        with self.cond:
            self.bytes_sent[rank] += src.size
            self.messages_sent[rank] += 1
            self.largest_message[rank] = max(self.largest_message[rank], src.size)
            key = (rank, dest, tag)
            if self.recvs[key]:
                dst, rreq = self.recvs[key].popleft()
                self._match(src, req, dst, rreq)
            else:
                self.sends[key].append((src, req))
        return req

    def irecv(self, rank: int, spec: Any, source: int, tag: int) -> _Request:
        dst = _array(spec)
        req = _Request(self, f"recv {source}->{rank} ({dst.size} bytes)")
        with self.cond:
            key = (source, rank, tag)
            if self.sends[key]:
                src, sreq = self.sends[key].popleft()
                self._match(src, sreq, dst, req)
            else:
                self.recvs[key].append((dst, req))
        return req

    def unmatched(self) -> list[str]:
        left = [f"send {k}" for k, q in self.sends.items() for _ in q]
        return left + [f"recv {k}" for k, q in self.recvs.items() for _ in q]


class SimComm:
    """The subset of mpi4py's Comm the schedules use."""

    def __init__(self, world: SimWorld, rank: int) -> None:
        self.world, self.rank, self.size = world, rank, world.p

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return self.size

    def Isend(self, spec: Any, dest: int, tag: int = 0) -> _Request:
        return self.world.isend(self.rank, spec, dest, tag)

    def Irecv(self, spec: Any, source: int, tag: int = 0) -> _Request:
        return self.world.irecv(self.rank, spec, source, tag)

    def Sendrecv(self, sendspec: Any, dest: int, sendtag: int, recvspec: Any, source: int, recvtag: int) -> None:
        r = self.Irecv(recvspec, source, recvtag)
        s = self.Isend(sendspec, dest, sendtag)
        s.Wait()
        r.Wait()


def simulate(p: int, fn: Callable[[SimComm], Any]) -> tuple[list[Any], SimWorld]:
    """Run ``fn`` on p simulated ranks; returns (per-rank results, the world with its counters)."""
    world = SimWorld(p)
    results: list[Any] = [None] * p
    errors: list[BaseException | None] = [None] * p

    def body(r: int) -> None:
        try:
            results[r] = fn(SimComm(world, r))
        except BaseException as e:  # reported below, with the rank
            errors[r] = e
            with world.cond:
                world.failed = True
                world.cond.notify_all()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(p)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = next((r for r in range(p) if errors[r] is not None and not isinstance(errors[r], SimDeadlock)), None)
    if first is None:
        first = next((r for r in range(p) if errors[r] is not None), None)
    if first is not None:
        raise RuntimeError(f"simulated rank {first} of {p} failed: {errors[first]!r}") from errors[first]
    if world.unmatched():
        raise RuntimeError(f"unmatched messages left over: {world.unmatched()[:5]}")
    return results, world
