"""Stall detection: say which collective is stuck and who has not arrived, then end the job instead of hanging.

Every mpiml collective (and anything wrapped in ``watch``) is numbered in
call order: collective #s is the same operation on every rank. On entering
#s a rank sends (s, step, name) to rank 0 on a communicator of its own
(one small non-blocking message). A monitor thread on every rank wakes up
every ``poll`` seconds and

- on rank 0, compares the ranks' latest collective numbers: if some rank
  entered #s more than ``stall_warning`` seconds ago and others have not,
  it prints which collective, which training step, and which ranks are
  missing (and where they were last seen); if everyone has entered but #s
  has not completed, it says so (the network, not a rank, is the suspect);
- on every rank, if its own oldest unfinished collective is older than
  ``timeout``, prints that and aborts the whole job (``MPI_Abort``, and
  ``os._exit`` if the launcher cannot be reached: MPI_Abort from a
  reachable rank does not reach a host cut off the network, so every rank
  needs its own deadline).

The monitor sleeps between checks; it costs nothing measurable while all is well.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

import numpy as np
from mpi4py import MPI

__all__ = ["Watchdog", "install", "uninstall", "active", "watch", "enter", "leave"]

_TAG = 77
_active: Watchdog | None = None


class Watchdog:
    """Watches one job (``comm``, normally COMM_WORLD); collective over ``comm`` to create."""

    def __init__(self, comm: MPI.Intracomm | None = None, stall_warning: float = 60.0, timeout: float = 600.0,
                 poll: float = 0.25, out: TextIO | None = None, exit_code: int = 3) -> None:
        self.world = MPI.COMM_WORLD if comm is None else comm
        self.comm = self.world.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.stall_warning, self.timeout, self.poll = stall_warning, timeout, poll
        self.out, self.exit_code = out or sys.stderr, exit_code
        self.step: int | None = None
        self.seq = 0
        self._names: dict[int, str] = {}
        self._open: dict[int, tuple[str, int | None, float]] = {}
        self._lock = threading.Lock()
        self._sends: list[MPI.Request] = []
        # rank 0's view: latest collective entered by each rank, with step, name code and arrival time
        self._seen = np.full((self.size, 3), -1, dtype=np.int64)
        self._arrived = np.zeros(self.size)
        self._warned: set[int] = set()
        self._stop = threading.Event()
        # Two threads: the deadline thread makes no MPI call at all (a network fault can stall MPI calls
        # anywhere in the process); on rank 0 a second one receives the other ranks' reports.
        self._thread = threading.Thread(target=self._monitor, name="mpiml-watchdog", daemon=True)
        self._thread.start()
        self._reporter = None
        if self.rank == 0 and self.size > 1:
            self._reporter = threading.Thread(target=self._receive, name="mpiml-watchdog-reports", daemon=True)
            self._reporter.start()

    # ------------------------------------------------------------ called around every collective

    def enter(self, name: str) -> int:
        with self._lock:  # never held across an MPI call: the deadline thread must always get it
            self.seq += 1
            seq = self.seq
            self._open[seq] = (name, self.step, time.monotonic())
            code = zlib.crc32(name.encode())
            self._names[code] = name
            report = np.array([seq, -1 if self.step is None else self.step, code], dtype=np.int64)
            if self.rank == 0:
                self._record(0, report)
        if self.rank != 0:
            self._sends = [r for r in self._sends if not r.Test()]
            self._sends.append(self.comm.Isend(report, 0, _TAG))
        return seq

    def leave(self, seq: int) -> None:
        with self._lock:
            self._open.pop(seq, None)

    # ------------------------------------------------------------ the monitor thread

    def _record(self, rank: int, report: np.ndarray) -> None:
        self._seen[rank] = report
        self._arrived[rank] = time.monotonic()

    def _drain(self) -> None:
        # One source at a time: with MPICH 5.0.2 over UCX's TCP transport (several hosts), receives from
        # MPI_ANY_SOURCE can miss messages that a receive naming the sender gets (see README, Failures).
        buf = np.empty(3, dtype=np.int64)
        for source in range(1, self.size):
            while self.comm.Iprobe(source, _TAG):
                self.comm.Recv(buf, source, _TAG)
                with self._lock:
                    self._record(source, buf.copy())

    def _describe(self, seq: int, name: str, step: int | None) -> str:
        return f"collective #{seq} ({name}{'' if step is None or step < 0 else f', step {step}'})"

    def _global_view(self) -> str | None:
        """Rank 0: which ranks have not reached the newest collective anyone has entered."""
        with self._lock:
            seen, arrived = self._seen.copy(), self._arrived.copy()
        newest = int(seen[:, 0].max())
        if newest < 1:
            return None
        first = seen[:, 0] == newest
        missing = [r for r in range(self.size) if seen[r, 0] < newest]
        now = time.monotonic()
        waited = now - arrived[first].min()
        name = self._names.get(int(seen[first][0, 2]), "a collective rank 0 has not reached yet")
        what = self._describe(newest, name, int(seen[first][0, 1]))
        if missing:
            where = "; ".join(f"rank {r} entered #{seen[r, 0]} {now - arrived[r]:.0f} s ago" if seen[r, 0] > 0
                              else f"rank {r} none yet" for r in missing[:8])
            return (f"{what} has waited {waited:.0f} s for rank{'s' if len(missing) > 1 else ''} "
                    f"{','.join(map(str, missing))} ({where})")
        return f"every rank has entered {what}, but it has not completed after {waited:.0f} s (network?)"

    def _monitor(self) -> None:
        while not self._stop.wait(self.poll):
            self._check()

    def _receive(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                self._drain()
            except MPI.Exception:
                return  # MPI is going away under us (finalize or abort)

    def _check(self) -> None:
        with self._lock:
            oldest = min(self._open.items(), key=lambda kv: kv[1][2], default=None)
        age = time.monotonic() - oldest[1][2] if oldest else 0.0
        view = self._global_view() if self.rank == 0 else None
        stalled = self.rank == 0 and view is not None and oldest is not None and age > self.stall_warning > 0
        if stalled and oldest[0] not in self._warned:
            self._warned.add(oldest[0])
            self._say(f"mpiml watchdog: stall: {view}")
        if oldest is not None and self.timeout > 0 and age > self.timeout:
            # Leave for sure, a few seconds from now, even if printing or MPI_Abort blocks (a full pipe,
            # a launcher out of reach): MPI_Abort does not reach a host cut off the network.
            threading.Timer(5.0, os._exit, args=(self.exit_code,)).start()
            mine = self._describe(oldest[0], oldest[1][0], oldest[1][1])
            detail = f" Rank 0's view: {view}." if view else ""
            self._say(f"mpiml watchdog: rank {self.rank}: {mine} has not completed after {age:.0f} s "
                      f"(--timeout {self.timeout:g}); aborting the job.{detail}")
            self._abort()

    def _say(self, message: str) -> None:
        self.out.write(message + "\n")
        self.out.flush()

    def _abort(self) -> None:
        self.world.Abort(self.exit_code)

    def close(self) -> None:
        """Stop the monitor; collective. Rank 0 receives every report still in flight (no message is left
        unmatched at MPI_Finalize): each rank ends with a (-1) report, and messages between two ranks
        arrive in order."""
        self._stop.set()
        self._thread.join()
        if self._reporter is not None:
            self._reporter.join()
        if self.rank != 0:
            self._sends.append(self.comm.Isend(np.array([-1, -1, 0], dtype=np.int64), 0, _TAG))
            MPI.Request.Waitall(self._sends)
        else:
            buf = np.empty(3, dtype=np.int64)
            for source in range(1, self.size):
                buf[0] = 0
                while buf[0] != -1:
                    self.comm.Recv(buf, source, _TAG)
        self._sends = []
        self.comm.Free()


def install(watchdog: Watchdog) -> Watchdog:
    """Make ``watchdog`` the one mpiml's collectives report to."""
    global _active
    _active = watchdog
    return watchdog


def uninstall() -> None:
    global _active
    if _active is not None:
        _active.close()
    _active = None


def active() -> Watchdog | None:
    return _active


def enter(name: str) -> int:
    return _active.enter(name) if _active is not None else 0


def leave(seq: int) -> None:
    if _active is not None and seq:
        _active.leave(seq)


@contextmanager
def watch(name: str) -> Iterator[None]:
    """Count a block (e.g. a raw MPI call) as one collective for stall detection."""
    seq = enter(name)
    try:
        yield
    finally:
        leave(seq)
