"""Running a schedule of point-to-point steps with several chunks in flight.

Every algorithm in this package is written as a *schedule*: a list of steps,
each sending one slice of the buffer to one peer and/or receiving one slice
from one peer. A received slice either lands directly in the buffer
(``DIRECT``) or lands in a scratch chunk and is combined into the buffer
(``REDUCE``); ``FINAL`` marks the last reduction of a slice (where ``mean``
divides). ``run`` executes the steps in order, and keeps up to ``depth`` of
them posted at once (``Isend``/``Irecv``): while step k is being reduced,
steps k+1.. are already on the wire. A later step is posted early only when
that cannot change what any earlier step reads or writes:

- it may not send a slice an unfinished earlier step will still write;
- a DIRECT receive may not land on a slice an unfinished earlier step still
  sends or writes.

REDUCE receives go to private scratch, so they are always safe to post early.

Ranks build their schedules from the same integers, so the k-th message from
rank a to rank b in a's schedule is the k-th receive from a in b's schedule;
MPI's non-overtaking rule then matches them with a single tag. Empty slices
are skipped on both sides, which keeps that pairing intact.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
from mpi4py import MPI

from .. import traffic
from ._buffers import Reduction
from ._chunks import num_pieces, pieces

__all__ = ["Step", "Schedule", "DIRECT", "REDUCE", "FINAL", "run", "send", "recv", "exchange", "DEFAULT_DEPTH",
           "polling", "wait", "poll_interval", "Guard", "guard", "Mismatch"]

DIRECT, REDUCE, FINAL = 1, 2, 4
DEFAULT_DEPTH = 2
_TAG = 7


class Step(NamedTuple):
    """One schedule step; a peer of -1 means no send (or no receive)."""

    send_to: int
    send_lo: int
    send_hi: int
    recv_from: int
    recv_lo: int
    recv_hi: int
    mode: int = DIRECT


def send(to: int, lo: int, hi: int) -> Step:
    return Step(to, lo, hi, -1, 0, 0, 0)


def recv(frm: int, lo: int, hi: int, mode: int = DIRECT) -> Step:
    return Step(-1, 0, 0, frm, lo, hi, mode)


def exchange(to: int, send_lo: int, send_hi: int, frm: int, recv_lo: int, recv_hi: int,
             mode: int, piece: int) -> list[Step]:
    """Send ``[send_lo, send_hi)`` to ``to`` while receiving ``[recv_lo, recv_hi)`` from ``frm``, in pieces.

    Both slices are cut into the same number of pieces of at most ``piece``
    elements; the partner, whose send is our receive, computes the same count.
    A peer of -1 leaves that direction out.
    """
    send_len = send_hi - send_lo if to >= 0 else 0
    recv_len = recv_hi - recv_lo if frm >= 0 else 0
    count = num_pieces(max(send_len, recv_len), piece)
    sends = pieces(send_lo, send_hi, count)
    recvs = pieces(recv_lo, recv_hi, count)
    return [Step(to, s_lo, s_hi, frm, r_lo, r_hi, mode) for (s_lo, s_hi), (r_lo, r_hi) in zip(sends, recvs)]


def _overlap(a_lo: int, a_hi: int, b_lo: int, b_hi: int) -> bool:
    return a_lo < b_hi and b_lo < a_hi and a_lo < a_hi and b_lo < b_hi


def _conflicts(later: Step, earlier: Step) -> bool:
    """Whether posting ``later`` before ``earlier`` completes could change either's data."""
    if earlier.recv_from >= 0 or earlier.mode & FINAL:  # earlier still writes its recv slice
        if later.send_to >= 0 and _overlap(later.send_lo, later.send_hi, earlier.recv_lo, earlier.recv_hi):
            return True
        if later.recv_from >= 0 and later.mode & DIRECT and _overlap(
                later.recv_lo, later.recv_hi, earlier.recv_lo, earlier.recv_hi):
            return True
    if earlier.send_to >= 0 and later.recv_from >= 0 and later.mode & DIRECT:
        return _overlap(later.recv_lo, later.recv_hi, earlier.send_lo, earlier.send_hi)
    return False


class Schedule:
    """Steps plus, for each step, the last earlier step it must wait for (see ``compile``)."""

    __slots__ = ("steps", "blocker", "depth", "temp_size", "send_elements")

    def __init__(self, steps: Sequence[Step], depth: int | None = None) -> None:
        depth = DEFAULT_DEPTH if depth is None else depth
        self.steps = tuple(steps)
        self.depth = max(1, depth)
        # blocker[j]: the latest of the depth-1 steps before j that j conflicts with (-1: none),
        # so step j may be posted once every step up to blocker[j] has completed.
        blocker = []
        for j, later in enumerate(self.steps):
            b = -1
            for i in range(j - 1, max(-1, j - self.depth), -1):
                if _conflicts(later, self.steps[i]):
                    b = i
                    break
            blocker.append(b)
        self.blocker = tuple(blocker)
        self.send_elements = sum(s.send_hi - s.send_lo for s in self.steps if s.send_to >= 0)
        self.temp_size = max((s.recv_hi - s.recv_lo for s in self.steps if s.mode & REDUCE and s.recv_from >= 0),
                             default=0)

    def __len__(self) -> int:
        return len(self.steps)


def _env_interval() -> float | None:
    text = os.environ.get("MPIML_POLL_US", "").strip()
    if not text:
        return None
    try:
        us = float(text)
    except ValueError:
        raise ValueError(f"MPIML_POLL_US must be a number of microseconds, got {text!r}") from None
    if not 0 <= us <= 1e6:
        raise ValueError(f"MPIML_POLL_US must be in [0, 1e6], got {text!r}")
    return us * 1e-6


class _WaitMode(threading.local):
    """How this thread waits for a message: spin in MPI_Wait (interval 0), or test and sleep ``interval``."""

    def __init__(self) -> None:
        self.interval = 0.0


_ENV_INTERVAL = _env_interval()
_mode = _WaitMode()


def poll_interval() -> float:
    """The current thread's interval between tests while waiting (0: MPI_Wait, which busy-polls)."""
    return _ENV_INTERVAL if _ENV_INTERVAL is not None else _mode.interval


@contextmanager
def polling(interval: float) -> Iterator[None]:
    """Inside, this thread waits for messages by testing and sleeping ``interval`` seconds in between.

    MPI_Wait busy-polls a core until the message is complete. Where messages
    cross a network that is much slower than the CPU, that core is better
    spent on computation (backward, other ranks sharing the core) and on the
    kernel's TCP work; a message of one chunk takes milliseconds on the wire,
    so waking every few tens of microseconds loses nothing measurable.
    ``MPIML_POLL_US`` (microseconds, 0 = spin) overrides this everywhere."""
    previous = _mode.interval
    _mode.interval = interval
    try:
        yield
    finally:
        _mode.interval = previous


class Mismatch(Exception):
    """The agreement check running beside a call found that the ranks called different collectives."""


class Guard(threading.local):
    """The agreement check of the call this thread is running, while it runs beside the data (speculation).

    ``request`` is a non-blocking allreduce (MAX) of ``[code, -code]``; once it completes, the ranks agreed iff
    ``word[0] == -word[1]``. Until then every wait also watches it, so a rank whose peers called something
    else never waits for a message that will not come: it raises ``Mismatch`` instead.
    """

    def __init__(self) -> None:
        self.request: Any = None
        self.word: Any = None

    def settle(self) -> None:
        """Wait for the check (if still running); raise Mismatch if the ranks disagreed."""
        if self.request is not None:
            self.request.Wait()
            self._verdict()

    def _verdict(self) -> None:
        self.request = None
        if self.word[0] != -self.word[1]:
            raise Mismatch()

    def wait(self, req: Any, interval: float) -> None:
        """Complete ``req``, or raise Mismatch as soon as the check says the ranks disagree."""
        if interval > 0:
            while not req.Test():
                if self.request is not None and self.request.Test():
                    self._verdict()
                time.sleep(interval)
            return
        if MPI.Request.Waitany([req, self.request]) == 1:
            self._verdict()
            req.Wait()


guard = Guard()


def wait(req: Any) -> None:
    """Complete one request, spinning or politely (see ``polling``), watching a running agreement check."""
    interval = poll_interval()
    if guard.request is not None:
        guard.wait(req, interval)
        return
    if interval <= 0:
        req.Wait()
        return
    while not req.Test():
        time.sleep(interval)


class _Scratch(threading.local):
    """Per-thread scratch chunks, reused across calls (allocating them each time costs more than small messages)."""

    def __init__(self) -> None:
        self.sets: dict[tuple[str, int], list[np.ndarray]] = {}

    def get(self, dtype: np.dtype, count: int, size: int) -> list[np.ndarray]:
        """``count`` arrays of at least ``size`` elements of ``dtype``."""
        key = (dtype.char, count)  # (hashing the dtype itself costs more than this whole lookup)
        bufs = self.sets.get(key)
        if bufs is None or bufs[0].size < size:
            bufs = self.sets[key] = [np.empty(size, dtype=dtype) for _ in range(count)]
        return bufs


_scratch = _Scratch()


def _finish(s: Step, a: np.ndarray, temp: np.ndarray | None, red: Reduction | None, p: int) -> None:
    """Reduce (and finalize) step ``s``'s received slice once its messages are complete."""
    seg = a[s.recv_lo:s.recv_hi]
    if s.mode & REDUCE and s.recv_from >= 0:
        red.combine(seg, temp[: s.recv_hi - s.recv_lo])
    if s.mode & FINAL:
        red.finalize(seg, p)


def run(comm: Any, a: np.ndarray, schedule: Schedule, red: Reduction | None) -> None:
    """Execute ``schedule`` on the 1-D array ``a``; returns when every step has completed."""
    steps, blocker, depth = schedule.steps, schedule.blocker, schedule.depth
    m = len(steps)
    if m == 0:
        return
    traffic.add(schedule.send_elements * a.itemsize)
    temps = _scratch.get(a.dtype, depth, schedule.temp_size) if schedule.temp_size else None
    byte = MPI.BYTE
    interval = poll_interval()
    checking = guard.request is not None
    if m == 1 and interval <= 0:  # one exchange (small butterfly messages at p = 2): skip the request bookkeeping
        s = steps[0]
        if s.send_to >= 0 and s.recv_from >= 0 and s.send_hi > s.send_lo and s.recv_hi > s.recv_lo:
            target = temps[0][: s.recv_hi - s.recv_lo] if s.mode & REDUCE else a[s.recv_lo:s.recv_hi]
            if checking:  # the agreement check runs beside: wait for the message or a failed check
                received = comm.Irecv([target, byte], s.recv_from, _TAG)
                sent = comm.Isend([a[s.send_lo:s.send_hi], byte], s.send_to, _TAG)
                try:
                    guard.wait(received, 0.0)
                except BaseException:
                    _cancel([received])
                    raise
                sent.Wait()
            else:
                comm.Sendrecv([a[s.send_lo:s.send_hi], byte], s.send_to, _TAG, [target, byte], s.recv_from, _TAG)
            if s.mode & (REDUCE | FINAL):
                _finish(s, a, target, red, comm.Get_size())
            return
    polite = interval > 0 or checking
    reqs: list[Any] = [None] * m
    recvs: list[Any] = [None] * m
    try:
        _post_and_wait(steps, blocker, depth, a, temps, red, comm, reqs, recvs, polite)
    except BaseException:
        _cancel(recvs)  # nothing may land in the caller's buffer after this call has raised
        raise


def _cancel(recvs: list[Any]) -> None:
    """Cancel receives still posted (sends are left alone: cancelling a send may never complete)."""
    for req in recvs:
        if req is not None:
            try:
                req.Cancel()
                req.Wait()
            except MPI.Exception:
                pass


def _post_and_wait(steps: Sequence[Step], blocker: Sequence[int], depth: int, a: np.ndarray, temps: Any,
                   red: Reduction | None, comm: Any, reqs: list[Any], recvs: list[Any], polite: bool) -> None:
    m = len(steps)
    byte = MPI.BYTE
    isend, irecv = comm.Isend, comm.Irecv
    posted = 0
    for k in range(m):
        while posted < m and (posted == k or (posted - k < depth and blocker[posted] < k)):
            s = steps[posted]
            r = []
            if s.recv_from >= 0 and s.recv_hi > s.recv_lo:
                if s.mode & REDUCE:
                    target = temps[posted % depth][: s.recv_hi - s.recv_lo]
                else:
                    target = a[s.recv_lo:s.recv_hi]
                recvs[posted] = irecv([target, byte], s.recv_from, _TAG)
                r.append(recvs[posted])
            if s.send_to >= 0 and s.send_hi > s.send_lo:
                r.append(isend([a[s.send_lo:s.send_hi], byte], s.send_to, _TAG))
            reqs[posted] = r
            posted += 1
        for req in reqs[k]:  # (Wait on each: as fast as Waitall for two, and works with any request-like object)
            if polite:
                wait(req)
            else:
                req.Wait()
        reqs[k] = recvs[k] = None
        s = steps[k]
        if s.mode & (REDUCE | FINAL) and s.recv_hi > s.recv_lo:
            _finish(s, a, temps[k % depth] if temps else None, red, comm.Get_size())
