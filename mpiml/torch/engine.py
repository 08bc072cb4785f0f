"""The background engine: one thread per process that negotiates named requests and executes them.

Life of an operation (``hvd.allreduce_async(t, name="w")``):

1. The caller's thread checks the arguments, allocates the output, puts a
   ``Request`` named ``allreduce.w`` on the engine's queue and returns a
   handle. A name still pending on this rank raises ``ValueError``.
2. The engine thread runs **negotiation cycles**. Each cycle every rank
   sends rank 0 (point to point, on the engine's own duplicate of the
   communicator) the requests queued since its last message, plus "I
   joined" / "shut down" flags. Rank 0's ``Coordinator`` records them,
   decides what is ready on every rank, checks and fuses it, and sends the
   same ordered response list back to every rank.
3. Every rank executes the responses in that order (``Executor``), so the
   collectives match even when ranks submitted in different orders.
4. Results (or ``HorovodInternalError``) are set on the handles;
   ``synchronize()`` waits on a threading event, never spinning.

Idle ranks do not burn a core: between cycles the thread sleeps on a
condition variable, for ``HOROVOD_CYCLE_TIME`` (1 ms) while anything is
pending and for up to 20 ms (growing) when nothing is; a new request wakes
it at once. MPI waits are non-blocking probes, yielding the core for up to
1 ms and then sleeping in between, because MPI's blocking calls busy-poll.

Shutdown is agreed like everything else: any rank asking (``shutdown()``
or interpreter exit), or a name stalled for longer than
``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS``, makes rank 0 answer "shutdown"
(with the stall as its reason) to all, every engine
fails its pending handles with ``HorovodInternalError`` and stops in the
same cycle, and the timeline (if any) is merged onto rank 0.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from mpi4py import MPI

from ..timeline import Timeline
from .execute import Executor
from .negotiation import Coordinator, Message, Response
from .requests import Handle, HorovodInternalError, Request

__all__ = ["Engine", "IDLE_MAX_SECONDS", "SHUTDOWN_BY_PEER"]

_REQUEST_TAG, _RESPONSE_TAG = 7301, 7302
IDLE_MAX_SECONDS = 0.02
_MAX_POLL_SLEEP = 0.001
_YIELD_SECONDS = 0.001
SHUTDOWN_BY_PEER = (
    "Horovod has been shut down. This was caused by an exception on one of the ranks or an attempt to allreduce, "
    "allgather or broadcast a tensor after one of the ranks finished execution. If the shutdown was caused by an "
    "exception, you should see the exception in the log before the first shutdown message.")


class Engine:
    """The negotiation-and-execution thread of one process (see the module docstring)."""

    def __init__(self, comm: MPI.Intracomm, *, algorithm: str, cycle_time: float, fusion_threshold: int,
                 stall_seconds: float, stall_shutdown_seconds: float = 0.0, timeline_path: str | None = None,
                 mark_cycles: bool = False) -> None:
        self.comm = comm.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.algorithm = algorithm
        self.cycle_time = max(cycle_time, 0.0)
        self.fusion_threshold = fusion_threshold
        self.mark_cycles = mark_cycles
        self.timeline = Timeline(timeline_path, rank=self.rank, size=self.size)
        self.executor = Executor(self.comm, algorithm, self.timeline)
        self.coordinator = (Coordinator(self.size, fusion_threshold, stall_seconds,
                                        shutdown_seconds=stall_shutdown_seconds) if self.rank == 0 else None)
        self._cond = threading.Condition()
        self._queue: list[Request] = []
        self._names: set[str] = set()  # every name pending on this rank (queued or negotiating)
        self._pending: dict[str, Request] = {}  # engine thread only: reported, waiting for a response
        self._join: Handle | None = None
        self._join_sent = False
        self._shutdown_requested = False
        self._sends: list[MPI.Request] = []
        self._idle_cycles = 0
        self.cycles = 0
        self.stopped = False
        self.stop_reason = ""
        self._thread = threading.Thread(target=self._run, name="mpiml.torch engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ called from user threads
    def submit(self, request: Request) -> None:
        """Queue one request; ValueError if its name is still pending here."""
        name = request.meta.name
        with self._cond:
            self._check_running()
            if name in self._names:
                raise ValueError(
                    f"Requested to {request.meta.kind} a tensor with the same name as another operation that is "
                    f"still in progress on this rank: '{name}'. If you want to request another tensor, use a "
                    "different tensor name.")
            self._names.add(name)
            self._queue.append(request)
            self._cond.notify()

    def join(self) -> Handle:
        """Tell the other ranks this one has run out of work; the handle gets the rank that joined last."""
        with self._cond:
            self._check_running()
            if self._join is not None:
                raise ValueError("join() is already in progress on this rank")
            self._join = handle = Handle("join")
            self._cond.notify()
        return handle

    def shutdown(self, timeout: float = 60.0) -> None:
        """Ask every rank's engine to stop, and wait for this one to finish."""
        with self._cond:
            if not self.stopped:
                self._shutdown_requested = True
                self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                print(f"mpiml.torch: rank {self.rank}: the engine did not stop within {timeout:.0f} s",
                      file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)  # where it is stuck

    def set_timeline(self, path: str | None, mark_cycles: bool = False) -> None:
        """Start recording to ``path`` (or stop with None); closes the previous timeline of this rank."""
        with self._cond:
            old = self.timeline
            self.timeline = self.executor.timeline = Timeline(path, rank=self.rank, size=self.size)
            self.mark_cycles = mark_cycles
        old.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _check_running(self) -> None:
        if self.stopped:
            raise HorovodInternalError(self.stop_reason)

    # ------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        try:
            with torch.no_grad():
                while not self._cycle():
                    pass
        except BaseException as exc:  # noqa: BLE001 - a broken engine must fail every waiter, not hang them
            traceback.print_exc()
            self._stop(f"mpiml.torch engine failed on rank {self.rank}: {exc!r}", collective=False)
            # The other ranks' engines would wait for this one forever: end the job (no elastic mode here).
            from ..runtime import abort  # flushed and given time to reach the launcher before MPI_Abort
            abort(1, f"mpiml.torch: engine failed on rank {self.rank}; aborting the job")

    def _take(self) -> tuple[list[Request], bool, bool]:
        """Wait for work (or the cycle time), then take the new requests and flags."""
        with self._cond:
            if not (self._queue or self._shutdown_requested or (self._join is not None and not self._join_sent)):
                if self._pending or self._join is not None:
                    timeout = self.cycle_time
                else:  # idle: back off, up to IDLE_MAX_SECONDS; a submission wakes us at once
                    timeout = min(max(self.cycle_time, 1e-4) * 2 ** min(self._idle_cycles, 16),
                                  max(IDLE_MAX_SECONDS, self.cycle_time))
                self._cond.wait(timeout)
            new, self._queue = self._queue, []
            joined = self._join is not None and not self._join_sent
            self._join_sent = self._join_sent or joined
            return new, joined, self._shutdown_requested

    def _cycle(self) -> bool:
        """One negotiation cycle and its execution; True once shut down."""
        new, joined, shutdown = self._take()
        tl = self.timeline
        start = tl.now_us()
        for request in new:
            self._pending[request.meta.name] = request
        recording = tl.enabled or tl.failed
        plan = self._negotiate(Message([r.meta for r in new], joined, shutdown, recording))
        self.cycles += 1
        if tl.enabled and (new or plan):
            if self.mark_cycles:
                tl.instant("CYCLE_START", "cycle", row="engine")
            tl.complete("NEGOTIATE", "negotiate", start, tl.now_us() - start, row="engine", submitted=len(new),
                        responses=len(plan))
        self._idle_cycles = 0 if (plan or self._pending or new) else self._idle_cycles + 1
        for response in plan:
            if response.kind == "shutdown":
                reason = response.error or ("Horovod has been shut down on this rank." if shutdown
                                            else SHUTDOWN_BY_PEER)
                self._stop(reason, collective=True, merge=bool(response.extra))
                return True
            self._execute(response)
        self._reap_sends()
        return False

    def _negotiate(self, message: Message) -> list[Response]:
        comm = self.comm
        if self.rank != 0:
            self._sends.append(comm.isend(message, dest=0, tag=_REQUEST_TAG))
            incoming = self._poll(lambda: comm.improbe(source=0, tag=_RESPONSE_TAG))
            return pickle.loads(incoming.recv())
        coordinator = self.coordinator
        assert coordinator is not None
        coordinator.receive(0, message)
        for rank in range(1, self.size):  # rank order: "joined last" is decided deterministically
            incoming = self._poll(lambda r=rank: comm.improbe(source=r, tag=_REQUEST_TAG))
            coordinator.receive(rank, incoming.recv())
        plan = coordinator.plan()
        if self.size > 1:
            data = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
            self._sends.extend(comm.isend(data, dest=r, tag=_RESPONSE_TAG) for r in range(1, self.size))
        return plan

    @staticmethod
    def _poll(probe: Callable[[], Any]) -> Any:
        """Call ``probe`` until it returns something, without busy-waiting for long.

        A few immediate probes, then probes between ``sched_yield``s for up
        to ``_YIELD_SECONDS`` (other ranks sharing the core get to run), then
        sleeps growing to ``_MAX_POLL_SLEEP``.
        """
        start, spins, delay = time.perf_counter(), 0, 5e-5
        while True:
            found = probe()
            if found is not None:
                return found
            spins += 1
            if spins < 20:
                continue
            if time.perf_counter() - start < _YIELD_SECONDS:
                os.sched_yield()
            else:
                time.sleep(delay)
                delay = min(delay * 2, _MAX_POLL_SLEEP)

    def _reap_sends(self, wait: bool = False) -> None:
        if wait:
            while self._sends and not MPI.Request.Testall(self._sends):
                time.sleep(1e-4)
            self._sends = []
        else:
            self._sends = [s for s in self._sends if not s.Test()]

    def _execute(self, response: Response) -> None:
        kind, tl = response.kind, self.timeline
        if kind == "join":
            with self._cond:
                handle, self._join, self._join_sent = self._join, None, False
            if handle is not None:
                handle.set_result(int(response.extra))
            return
        requests = [self._pending.pop(name, None) for name in response.names]
        start = tl.now_us()
        if tl.enabled:
            for r in requests:
                if r is not None:
                    tl.complete(f"NEGOTIATE_{r.meta.kind.upper()}", "negotiate", r.submitted_us,
                                start - r.submitted_us, row=r.meta.name)
        if kind == "error":
            self._finish(requests, None, HorovodInternalError(response.error))
            return
        try:
            results = self.executor.run(response, requests)
        except Exception as exc:  # noqa: BLE001 - reported to the callers, the engine carries on
            self._finish(requests, None, HorovodInternalError(f"{kind} of {', '.join(response.names)} failed: {exc}"))
            return
        if tl.enabled:
            end = tl.now_us()
            for r in requests:
                if r is not None:
                    tl.complete(kind.upper(), kind, start, end - start, row=r.meta.name)
        self._finish(requests, results, None)

    def _finish(self, requests: list[Request | None], results: list[Any] | None, error: BaseException | None) -> None:
        with self._cond:  # free the names first: a caller woken below may reuse them at once
            for r in requests:
                if r is not None:
                    self._names.discard(r.meta.name)
        for i, r in enumerate(requests):
            if r is None:
                continue
            if error is not None:
                r.handle.set_error(error)
            else:
                r.handle.set_result(results[i] if results is not None else None)

    def _stop(self, reason: str, collective: bool, merge: bool = False) -> None:
        """Fail what is pending; ``collective``: every rank stops in this cycle (``merge``: and merges a trace)."""
        with self._cond:
            self.stopped, self.stop_reason = True, reason
            leftovers = list(self._pending.values()) + self._queue
            self._queue, self._pending, self._names = [], {}, set()
            join, self._join = self._join, None
        error = HorovodInternalError(reason)
        for r in leftovers:
            r.handle.set_error(error)
        if join is not None:
            join.set_error(error)
        if not collective:
            return
        self._reap_sends(wait=True)
        try:
            # Every rank is here, in the same cycle: merge the trace on rank 0. Without a trace anywhere, no
            # collective at all: a rank leaving this last call early could otherwise strand a peer in it.
            self.timeline.close(self.comm if merge else None)
        finally:
            self.comm.Free()
