"""Stall detection: say which collective is stuck and who has not arrived, then end the job instead of hanging.

Every mpiml collective (and anything wrapped in ``watch``, such as the
parameter server's waits) is numbered in call order: collective #s is the
same operation on every rank. On entering #s a rank sends (s, step, name)
to rank 0 on a communicator of its own (one small non-blocking message);
every ``heartbeat`` seconds (at most 1 s) a thread on each rank sends a
heartbeat as well. A monitor thread on every rank wakes up every ``poll``
seconds and

- on rank 0, compares the ranks' latest collective numbers: if some rank
  entered #s more than ``stall_warning`` seconds ago and others have not,
  it prints which collective, which training step, and which ranks are
  missing (and where they were last seen); a rank rank 0 has not heard
  from (no report, no heartbeat) for ``quiet`` seconds is named as stopped
  or frozen (SIGSTOP, a debugger, a host cut off); if everyone has entered
  and everyone is alive but #s has not completed, it says so (the network,
  not a rank, is the suspect);
- on every rank, if its own oldest unfinished collective is older than
  ``timeout``, prints that and aborts the whole job (``MPI_Abort``, and
  ``os._exit`` if the launcher cannot be reached: MPI_Abort from a
  reachable rank does not reach a host cut off the network, so every rank
  needs its own deadline).

``close`` (collective) is watched too: a rank that never gets there is named
like a missing rank; ``close(grace=...)`` gives up after ``grace`` seconds
instead, for a caller that then aborts the job (an error raised on one rank
alone, see ``mpiml.runtime``).

The monitor sleeps between checks; it costs nothing measurable while all is well.
"""

from __future__ import annotations

import math
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
ENTER, BEAT, ENDING, BYE = 0, 1, 2, 3  # the kinds of message a rank sends rank 0: [seq, step, name code, kind]
_SHUTDOWN = 0  # the key of close()'s own entry among a rank's open collectives (collectives count from 1)
_active: Watchdog | None = None


class Watchdog:
    """Watches one job (``comm``, normally COMM_WORLD); collective over ``comm`` to create."""

    def __init__(self, comm: MPI.Intracomm | None = None, stall_warning: float = 60.0, timeout: float = 600.0,
                 poll: float = 0.25, out: TextIO | None = None, exit_code: int = 3,
                 heartbeat: float | None = None) -> None:
        self.world = MPI.COMM_WORLD if comm is None else comm
        self.comm = self.world.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.stall_warning, self.timeout, self.poll = stall_warning, timeout, poll
        self.heartbeat = heartbeat if heartbeat is not None else min(1.0, max(poll, stall_warning / 4 or 1.0))
        self.quiet = max(5 * self.heartbeat, 2.0)  # silent this long: named as stopped or frozen
        self.out, self.exit_code = out or sys.stderr, exit_code
        self.step: int | None = None
        self.seq = 0
        self._names: dict[int, str] = {}
        self._open: dict[int, tuple[str, int | None, float]] = {}
        self._lock = threading.Lock()  # never held across an MPI call: the deadline thread must always get it
        self._send_lock = threading.Lock()  # the reports and heartbeats in flight (never taken by the deadline thread)
        self._sends: list[MPI.Request] = []
        # rank 0's view: latest collective entered by each rank, with step, name code and arrival time,
        # when each rank was last heard from at all, and which ranks have said goodbye (close)
        self._seen = np.full((self.size, 3), -1, dtype=np.int64)
        self._arrived = np.zeros(self.size)
        self._heard = np.full(self.size, time.monotonic())
        self._gone = [r == 0 for r in range(self.size)]
        self._ending = [False] * self.size  # in close(): at the end of its run
        self._all_gone = threading.Event()
        self._warned: set[tuple[int, tuple[int, ...]]] = set()
        self._stop, self._stop_beats, self._wake = threading.Event(), threading.Event(), threading.Event()
        self._closing = False
        # The deadline thread makes no MPI call at all (a network fault can stall MPI calls anywhere in the
        # process); on rank 0 a second thread receives the other ranks' reports, on the others one sends
        # heartbeats.
        self._thread = threading.Thread(target=self._monitor, name="mpiml-watchdog", daemon=True)
        self._thread.start()
        self._reporter = self._beater = None
        if self.rank == 0 and self.size > 1:
            self._reporter = threading.Thread(target=self._receive, name="mpiml-watchdog-reports", daemon=True)
            self._reporter.start()
        elif self.rank != 0:
            self._beater = threading.Thread(target=self._beat, name="mpiml-watchdog-heartbeat", daemon=True)
            self._beater.start()

    # ------------------------------------------------------------ called around every collective

    def enter(self, name: str) -> int:
        with self._lock:  # never held across an MPI call: the deadline thread must always get it
            self.seq += 1
            seq = self.seq
            self._open[seq] = (name, self.step, time.monotonic())
            code = zlib.crc32(name.encode())
            self._names[code] = name
            report = np.array([seq, -1 if self.step is None else self.step, code, ENTER], dtype=np.int64)
            if self.rank == 0:
                self._record(0, report)
        if self.rank != 0:
            self._send(report)
        return seq

    def leave(self, seq: int) -> None:
        with self._lock:
            self._open.pop(seq, None)

    def _send(self, message: np.ndarray) -> None:
        with self._send_lock:
            self._sends = [r for r in self._sends if not r.Test()]
            self._sends.append(self.comm.Isend(message, 0, _TAG))

    # ------------------------------------------------------------ the other threads

    def _beat(self) -> None:
        """Ranks other than 0: tell rank 0 every ``heartbeat`` seconds that this process still runs."""
        while not self._stop_beats.wait(self.heartbeat):
            with self._lock:
                beat = np.array([self.seq, -1, 0, BEAT], dtype=np.int64)
            try:
                self._send(beat)
            except MPI.Exception:
                return  # MPI is going away under us (finalize or abort)

    def _record(self, rank: int, report: np.ndarray) -> None:
        self._seen[rank] = report[:3]
        self._arrived[rank] = time.monotonic()

    def _drain(self) -> None:
        # One source at a time: with MPICH 5.0.2 over UCX's TCP transport (several hosts), receives from
        # MPI_ANY_SOURCE can miss messages that a receive naming the sender gets (see README, Failures).
        buf = np.empty(4, dtype=np.int64)
        for source in range(1, self.size):
            while not self._gone[source] and self.comm.Iprobe(source, _TAG):
                self.comm.Recv(buf, source, _TAG)
                with self._lock:
                    self._heard[source] = time.monotonic()
                    if buf[3] == ENTER:
                        self._record(source, buf.copy())
                    elif buf[3] == ENDING:
                        self._ending[source] = True
                    elif buf[3] == BYE:
                        self._gone[source] = True  # its last message: nothing more will come from it
        if all(self._gone):
            self._all_gone.set()

    def _describe(self, seq: int, name: str, step: int | None) -> str:
        if seq == _SHUTDOWN:
            return "the end of the run (closing the watchdog, collective)"
        return f"collective #{seq} ({name}{'' if step is None or step < 0 else f', step {step}'})"

    def suspects(self) -> list[int]:
        """Rank 0: the ranks not heard from (no report, no heartbeat) for ``quiet`` seconds."""
        with self._lock:
            heard, gone = self._heard.copy(), list(self._gone)
        now = time.monotonic()
        return [r for r in range(1, self.size) if not gone[r] and now - heard[r] > self.quiet]

    def _global_view(self) -> tuple[str, tuple[int, ...]] | None:
        """Rank 0: which ranks have not reached the newest collective anyone has entered, and which are silent."""
        with self._lock:
            seen, arrived, heard = self._seen.copy(), self._arrived.copy(), self._heard.copy()
            ending = list(self._ending)
        newest = int(seen[:, 0].max())
        if newest < 1:
            return None
        first = seen[:, 0] == newest
        missing = [r for r in range(self.size) if seen[r, 0] < newest]
        silent = self.suspects()
        now = time.monotonic()
        waited = now - arrived[first].min()
        name = self._names.get(int(seen[first][0, 2]), "a collective rank 0 has not reached yet")
        what = self._describe(newest, name, int(seen[first][0, 1]))
        frozen = "; ".join(f"rank {r} has not been heard from for {now - heard[r]:.0f} s (stopped or frozen?)"
                           for r in silent[:8])
        if missing:
            where = "; ".join((f"rank {r} entered #{seen[r, 0]} {now - arrived[r]:.0f} s ago" if seen[r, 0] > 0
                               else f"rank {r} none yet") + (", then ended its run" if ending[r] else "")
                              for r in missing[:8])
            text = (f"{what} has waited {waited:.0f} s for rank{'s' if len(missing) > 1 else ''} "
                    f"{','.join(map(str, missing))} ({where})" + (f"; {frozen}" if frozen else ""))
        elif frozen:
            text = f"every rank has entered {what}, but it has not completed after {waited:.0f} s; {frozen}"
        else:
            text = f"every rank has entered {what}, but it has not completed after {waited:.0f} s (network?)"
        return text, tuple(silent)

    def _monitor(self) -> None:
        while not self._stop.wait(self.poll):
            self._check()

    def _receive(self) -> None:
        while not self._stop.is_set():
            if self._wake.wait(0.005 if self._closing else self.poll):
                self._wake.clear()
            try:
                self._drain()
            except MPI.Exception:
                return  # MPI is going away under us (finalize or abort)

    def _check(self) -> None:
        with self._lock:
            oldest = min(self._open.items(), key=lambda kv: kv[1][2], default=None)
        age = time.monotonic() - oldest[1][2] if oldest else 0.0
        seen = self._global_view() if self.rank == 0 else None
        view = seen[0] if seen else None
        stalled = self.rank == 0 and seen is not None and oldest is not None and age > self.stall_warning > 0
        if stalled and (oldest[0], seen[1]) not in self._warned:  # once, and again if a rank falls silent
            self._warned.add((oldest[0], seen[1]))
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
        from .runtime import abort
        abort(self.exit_code, comm=self.world)

    def close(self, grace: float | None = None) -> bool:
        """Stop watching; collective. Returns True once every rank has called it.

        Watched like any collective (a rank that never comes is named, and
        ``timeout`` ends the job); with ``grace``, returns False after that
        many seconds instead, leaving the watchdog running. Rank 0 receives
        every report still in flight (no message is left unmatched at
        MPI_Finalize): each rank's last message says goodbye, and messages
        between two ranks arrive in order.
        """
        with self._lock:  # watched, but not numbered: a rank that ends early must not look like one that arrived
            self._open[_SHUTDOWN] = ("shutdown", self.step, time.monotonic())
            ending = np.array([self.seq, -1, 0, ENDING], dtype=np.int64)
            self._ending[self.rank] = True
        if self.rank != 0:
            self._send(ending)
        barrier, deadline = self.comm.Ibarrier(), time.monotonic() + (math.inf if grace is None else grace)
        pause = 1e-4
        while not barrier.Test():
            if time.monotonic() > deadline:
                self.leave(_SHUTDOWN)
                return False
            time.sleep(pause)
            pause = min(2 * pause, 0.01)
        self._stop_beats.set()
        if self._beater is not None:
            self._beater.join()
        if self.rank != 0:
            self._send(np.array([self.seq, -1, 0, BYE], dtype=np.int64))
            with self._send_lock:
                MPI.Request.Waitall(self._sends)
        elif self._reporter is not None:
            self._closing = True
            self._wake.set()
            self._all_gone.wait()  # every rank is here (the barrier): their last messages are on their way
        self.leave(_SHUTDOWN)
        self._stop.set()
        self._wake.set()
        self._thread.join()
        if self._reporter is not None:
            self._reporter.join()
        self._sends = []
        self.comm.Free()
        return True


def install(watchdog: Watchdog) -> Watchdog:
    """Make ``watchdog`` the one mpiml's collectives report to."""
    global _active
    _active = watchdog
    return watchdog


def uninstall(grace: float | None = None) -> bool:
    """Close the active watchdog (collective; see ``Watchdog.close``). False if ``grace`` ran out first,
    and then the watchdog stays active (the caller is expected to abort the job)."""
    global _active
    if _active is not None:
        if not _active.close(grace):
            return False
    _active = None
    return True


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
