"""A parameter server with bounded staleness: every rank is a worker and serves one shard of the parameters.

    ps = ParameterServer(flat_params, comm, staleness=2, lr=0.05, momentum=0.9)
    for batch in batches:
        ...                   # forward/backward at flat_params, gradients into flat_grads
        ps.set_lr(lr)         # optional (warm-up, schedules)
        ps.push(flat_grads)   # every server gets its shard of the gradient
        ps.pull()             # flat_params refreshed in place, within the staleness bound
    ps.finish()               # collective: every rank ends with the servers' final parameters

**Layout.** The n parameters are cut by ``chunk_bounds(n, K)``; rank s serves
shard s, so no rank holds or serves more than ceil(n/K) of them, from a
background thread with two duplicates of ``comm`` of its own (requests,
replies). A worker reaches its own rank's shard under a lock, without a
message (MPICH moves 2 MB between two polling threads of one process in
0.14 s here). K = 1 has no thread at all.

**Protocol.** Worker w's clock c_w counts its pushes. ``push(g)`` gives server
s (c_w, lr, g[shard s]); ``pull()`` sends every server a request carrying
c_w and waits for all K shards, which land directly in ``params``. Server s
answers a pull at clock t once ``min_v c_v >= t - S`` (S = ``staleness``;
c_v counts v's pushes that s has received; finished workers do not count),
deferring it until a push or a finishing worker makes that true.
``staleness=None`` (unbounded) answers every pull at once, as Downpour.

**Staleness guarantee.** MPI keeps messages between two ranks on one
communicator in order, so a server answering a pull at clock t holds every
push of clock <= t - S from every worker, and all of the puller's own: a
worker never computes with parameters missing an update older than S steps.
With S = 0, a pull after step t sees exactly the updates of steps 1..t.

**Update rule.** SGD with momentum and weight decay (torch.optim.SGD's
arithmetic, written out) on the shard, at the lr the pushing worker had
set. S = 0: the server waits for all gradients of clock t, sums them in rank
order, divides by their number and takes one step (lr: their mean): that
is synchronous SGD with averaged gradients, bitwise reproducible (a finished
worker no longer contributes). S > 0 or None: each push is applied on
arrival with gradient and weight decay divided by K, so K pushes move the
shard as far as one synchronous step. S = 0 holds the K gradient shards of
a pending clock (n elements per rank); otherwise a server holds only its
shard and its momentum.

**Cost per worker step.** K pushes (n elements in all, plus 16 bytes each),
K pull requests (8 bytes) and K replies (n elements), one of each in process:
2n(K-1)/K elements out and in per worker and per server, plus a copy of the
shard per batch of replies (so later updates cannot change one in flight).

**Threads and CPU.** MPI must provide MPI_THREAD_MULTIPLE. Nothing spins: the
server polls with ``Iprobe`` and a waiting worker with ``Testall``, sleeping
between polls from POLL_MIN_SECONDS (Linux grants about 0.1 ms), times
BACKOFF per idle poll, up to POLL_MAX_SECONDS; so a message waits at most
about 1 ms for an idle poller. An idle server thread uses about 2% of a
core, a worker waiting in ``pull`` about 1% more (measured on 2 cores, both
MPIs; stats ``server_cpu_seconds`` and ``server_wall_seconds``).

**Failures.** A worker's waits (``push``, ``pull``, ``finish``) are watched
by the stall watchdog like collectives (every worker makes the same calls
in the same order), so a worker that stops is named by rank 0 after
``stall_warning`` seconds and the job ends after ``timeout``. A server
thread that fails aborts the job with its traceback.

**Termination.** ``finish()`` (every rank) tells every server that this worker
is done, after its pushes (kept in order), so none is lost. A server stops
once all K workers are done and its replies delivered; then the shards are
allgathered into ``params``. Workers may run different numbers of steps.
"""

from __future__ import annotations

import math
import threading
import time
import traceback
import zlib
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from . import watchdog
from .collectives import chunk_bounds

__all__ = ["ParameterServer", "ShardServer", "POLL_MIN_SECONDS", "POLL_MAX_SECONDS", "BACKOFF"]

POLL_MIN_SECONDS = 20e-6
POLL_MAX_SECONDS = 1e-3
BACKOFF = 1.5
PUSH, PULL, DONE, REPLY = 1, 2, 3, 4
HEADER = 16  # bytes before a pushed shard: int64 clock, float64 lr
_MPI_TYPES = {torch.float32: MPI.FLOAT, torch.float64: MPI.DOUBLE}


class ShardServer:
    """One shard's server state without any MPI: clocks, pending updates, deferred pulls, the SGD step.

    Events come in through ``push``, ``done`` and ``pull``; ``pull`` and
    ``ready`` say which pulls may be answered now, with ``snapshot()``.
    """

    def __init__(self, shard: torch.Tensor, workers: int, staleness: int | None, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        self.workers, self.staleness, self.momentum = workers, staleness, momentum
        self.synchronous = staleness == 0
        self.weight_decay = weight_decay if self.synchronous else weight_decay / workers
        self.weights, self.momentum_buffer = shard.detach().clone(), None
        self.clocks, self.finished = [0] * workers, [False] * workers
        self.applied = 0  # S = 0: clocks whose averaged step has been applied
        self._pending: dict[int, tuple[np.ndarray, list[float]]] = {}
        self._spare: list[np.ndarray] = []
        self._deferred: list[tuple[int, int]] = []
        self.stats: dict[str, float] = {"pushes": 0, "updates": 0, "pulls": 0, "deferred_pulls": 0,
                                        "max_staleness": 0, "cpu_seconds": 0.0, "wall_seconds": 0.0}

    def min_clock(self) -> float:
        """The smallest clock among workers that have not finished (infinity when all have)."""
        return min((c for c, f in zip(self.clocks, self.finished, strict=True) if not f), default=math.inf)

    def push(self, worker: int, clock: int, lr: float, grad: np.ndarray) -> None:
        """Worker ``worker``'s gradient shard of step ``clock`` (its pushes arrive in order)."""
        if self.finished[worker] or clock != self.clocks[worker] + 1:
            raise RuntimeError(f"parameter server: push of clock {clock} from worker {worker} out of order "
                               f"(expected {self.clocks[worker] + 1}, finished: {self.finished[worker]})")
        self.clocks[worker] = clock
        self.stats["pushes"] += 1
        if not self.synchronous:
            self._step(torch.from_numpy(grad) / self.workers, lr)
            return
        if clock not in self._pending:
            slots = self._spare.pop() if self._spare else np.empty((self.workers, grad.size), grad.dtype)
            self._pending[clock] = (slots, [0.0] * self.workers)
        slots, lrs = self._pending[clock]
        slots[worker] = grad
        lrs[worker] = lr
        self._apply_complete()

    def done(self, worker: int, clock: int) -> None:
        """Worker ``worker`` finished after ``clock`` pushes; it no longer holds anyone back."""
        if clock != self.clocks[worker]:
            raise RuntimeError(f"parameter server: worker {worker} finished at clock {clock}, "
                               f"but {self.clocks[worker]} of its pushes arrived")
        self.finished[worker] = True
        if self.synchronous:
            self._apply_complete()

    def pull(self, worker: int, clock: int) -> bool:
        """True if a pull at ``clock`` may be answered now; otherwise it waits for ``ready()``."""
        if self._answerable(clock):
            self._count(clock)
            return True
        self._deferred.append((worker, clock))
        self.stats["deferred_pulls"] += 1
        return False

    def ready(self) -> list[tuple[int, int]]:
        """Deferred (worker, clock) pulls that may be answered now; they are no longer deferred."""
        now = [(w, c) for w, c in self._deferred if self._answerable(c)]
        if now:
            self._deferred = [(w, c) for w, c in self._deferred if not self._answerable(c)]
            for _, c in now:
                self._count(c)
        return now

    def snapshot(self) -> np.ndarray:
        """A copy of the shard, safe to send while later updates change the original."""
        return self.weights.numpy().copy()

    def _answerable(self, clock: int) -> bool:
        return self.staleness is None or self.min_clock() >= clock - self.staleness

    def _count(self, clock: int) -> None:
        low = self.min_clock()
        self.stats["pulls"] += 1
        if low != math.inf:
            self.stats["max_staleness"] = max(self.stats["max_staleness"], clock - int(low))

    def _apply_complete(self) -> None:
        """S = 0: apply every clock whose gradients are all in, in order, averaged in rank order."""
        while self.applied + 1 in self._pending and self.min_clock() >= self.applied + 1:
            t = self.applied + 1
            slots, lrs = self._pending.pop(t)
            members = [w for w in range(self.workers) if self.clocks[w] >= t]
            total = slots[members[0]].copy()
            for w in members[1:]:
                total += slots[w]
            total /= len(members)
            self._step(torch.from_numpy(total), sum(lrs[w] for w in members) / len(members))
            self.applied = t
            self._spare.append(slots)

    def _step(self, grad: torch.Tensor, lr: float) -> None:
        """torch.optim.SGD's single-tensor step (dampening 0, no Nesterov), op for op: bitwise the same."""
        if self.weight_decay:
            grad = grad.add(self.weights, alpha=self.weight_decay)
        if self.momentum:
            if self.momentum_buffer is None:
                self.momentum_buffer = grad.clone()
            else:
                self.momentum_buffer.mul_(self.momentum).add_(grad)
            grad = self.momentum_buffer
        self.weights.add_(grad, alpha=-lr)
        self.stats["updates"] += 1


class ParameterServer:
    """Bounded-staleness parameter server over ``comm``: see the module docstring.

    ``params``: this rank's flat float32 (or float64) CPU tensor, equal on
    all ranks at the start; ``pull()`` and ``finish()`` overwrite it.
    ``staleness``: S >= 0, or None for unbounded. The constructor and
    ``finish()`` are collective over ``comm``; ``push``/``pull`` are not.
    """

    def __init__(self, params: torch.Tensor, comm: MPI.Comm, staleness: int | None, lr: float,
                 momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError(f"ParameterServer: comm must be an MPI intracommunicator, got {type(comm).__name__}")
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        if self.size > 1 and MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise RuntimeError(f"ParameterServer: MPI provides thread level {MPI.Query_thread()}, not "
                               "MPI_THREAD_MULTIPLE; initialise it with MPI.Init_thread(MPI.THREAD_MULTIPLE), "
                               "as mpi4py does by default")
        problem: Exception | None = None
        try:
            _check_arguments(params, staleness, lr, momentum, weight_decay)
        except (TypeError, ValueError) as e:
            problem = e
        _agree(comm, problem, params, (staleness, momentum, weight_decay))
        self.params, self.staleness = params, staleness
        self._flat, self._type = params.detach().numpy(), _MPI_TYPES[params.dtype]
        self.bounds = b = chunk_bounds(params.numel(), self.size)
        self._mine = slice(b[self.rank], b[self.rank + 1])
        self.server = ShardServer(params.detach()[self._mine], self.size, staleness, momentum, weight_decay)
        self.clock, self.finished, self._lr, self._pull_seconds = 0, False, float(lr), 0.0
        self._lock, self._local_reply = threading.Lock(), threading.Event()
        self._push_requests: list[MPI.Request] = []
        self._sending: list[tuple[MPI.Request, np.ndarray]] = []
        self._others = [(self.rank + i) % self.size for i in range(1, self.size)]  # not everyone to rank 0 first
        if self._others:
            item = params.element_size()
            self._sendbufs = {s: np.empty(HEADER + (b[s + 1] - b[s]) * item, np.uint8) for s in self._others}
            self._requests, self._replies = comm.Dup(), comm.Dup()
            self._thread = threading.Thread(target=self._serve, name=f"mpiml-ps-server-{self.rank}", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------ worker side

    def set_lr(self, lr: float) -> None:
        """The learning rate for this worker's next pushes (each push carries it to the servers)."""
        _check_number("lr", lr)
        self._lr = float(lr)

    def push(self, grads: torch.Tensor) -> None:
        """Send every server its shard of ``grads`` (flat, same length and dtype as ``params``)."""
        self._check_open("push")
        g = _check_grads(grads, self.params)
        with watchdog.watch("parameter server push"):
            self._push(g)

    def _push(self, g: np.ndarray) -> None:
        self.clock += 1
        if self._others:
            _wait(self._push_requests)  # the previous push's buffers are free again
            for s in self._others:
                buf = self._sendbufs[s]
                buf[:8].view(np.int64)[0] = self.clock
                buf[8:HEADER].view(np.float64)[0] = self._lr
                buf[HEADER:].view(self._flat.dtype)[:] = g[self.bounds[s]:self.bounds[s + 1]]
            self._push_requests = [self._requests.Isend([self._sendbufs[s], MPI.BYTE], dest=s, tag=PUSH)
                                   for s in self._others]
        with self._lock:  # this rank's own shard: no message, the server's bookkeeping directly
            self.server.push(self.rank, self.clock, self._lr, g[self._mine])
            self._answer(self.server.ready())

    def pull(self) -> None:
        """Refresh ``params`` in place from all servers; blocks until the staleness bound allows it."""
        self._check_open("pull")
        with watchdog.watch("parameter server pull"):
            self._pull()

    def _pull(self) -> None:
        start = time.perf_counter()
        b, header = self.bounds, np.array([self.clock], dtype=np.int64)
        requests = [self._replies.Irecv([self._flat[b[s]:b[s + 1]], self._type], source=s, tag=REPLY)
                    for s in self._others]
        requests += [self._requests.Isend([header, MPI.INT64_T], dest=s, tag=PULL) for s in self._others]
        self._local_reply.clear()
        with self._lock:
            if self.server.pull(self.rank, self.clock):
                self._answer([(self.rank, self.clock)])
        _wait(requests + self._push_requests, self._local_reply)
        self._push_requests = []
        self._pull_seconds += time.perf_counter() - start

    def finish(self) -> None:
        """Collective: this worker is done; servers drain and stop; ``params`` gets the final parameters."""
        self._check_open("finish")
        with watchdog.watch("parameter server finish"):
            self._finish()

    def _finish(self) -> None:
        self.finished = True
        final = np.array([self.clock], dtype=np.int64)
        requests = [self._requests.Isend([final, MPI.INT64_T], dest=s, tag=DONE) for s in self._others]
        with self._lock:
            self.server.done(self.rank, self.clock)
            self._answer(self.server.ready())
        _wait(self._push_requests + requests)  # DONE follows this worker's pushes: MPI keeps them in order
        self._push_requests = []
        if not self._others:
            self._flat[:] = self.server.snapshot()
            return
        self._thread.join()  # the server stops once every worker is done and its replies are delivered
        counts = np.diff(self.bounds).tolist()
        self._requests.Allgatherv([self.server.weights.numpy(), self._type],
                                  [self._flat, (counts, self.bounds[:-1]), self._type])
        self._requests.Free()
        self._replies.Free()

    @property
    def stats(self) -> dict[str, float]:
        """This rank's server counters (``server_*``) and worker counters (``worker_*``)."""
        out = {f"server_{k}": v for k, v in self.server.stats.items()}
        out.update(worker_clock=self.clock, worker_pull_seconds=self._pull_seconds)
        return out

    def _check_open(self, what: str) -> None:
        if self.finished:
            raise RuntimeError(f"ParameterServer.{what}: finish() was already called")

    # ------------------------------------------------------------ server side (either thread, lock held)

    def _answer(self, answers: list[tuple[int, int]]) -> None:
        """Send the shard to every worker in ``answers``; this rank's own worker gets it copied in place."""
        if not answers:
            return
        snap = self.server.snapshot()  # one copy serves every pull answered now
        for worker, _ in answers:
            if worker == self.rank:
                self._flat[self._mine] = snap
                self._local_reply.set()
            else:
                self._sending.append((self._replies.Isend([snap, self._type], dest=worker, tag=REPLY), snap))

    def _serve(self) -> None:
        try:
            self._serve_until_done()
        except BaseException:  # noqa: BLE001 - workers would wait forever for this server: end the job
            from .runtime import abort
            abort(1, f"[rank {self.rank}] mpiml.ps: server thread failed\n" + traceback.format_exc())

    def _serve_until_done(self) -> None:
        comm, server, status = self._requests, self.server, MPI.Status()
        pushed = np.empty(HEADER + server.weights.numel() * self._flat.itemsize, np.uint8)
        small = np.empty(1, dtype=np.int64)
        cpu, wall, pause = time.thread_time(), time.perf_counter(), POLL_MIN_SECONDS
        sources, turn = self._others, 0
        while True:
            # Named sources, in turn, not MPI_ANY_SOURCE: with MPICH 5.0.2 over UCX's TCP transport
            # (several hosts), ANY_SOURCE probes and receives can miss messages (README, Failures).
            found = False
            for i in range(len(sources)):
                if comm.Iprobe(sources[(turn + i) % len(sources)], MPI.ANY_TAG, status):
                    turn, found = (turn + i + 1) % len(sources), True
                    break
            if not found:
                with self._lock:
                    self._sending = [(r, buf) for r, buf in self._sending if not r.Test()]
                    if all(server.finished) and not self._sending:
                        break
                time.sleep(pause)
                pause = min(pause * BACKOFF, POLL_MAX_SECONDS)
                continue
            pause = POLL_MIN_SECONDS
            source, tag = status.Get_source(), status.Get_tag()
            if tag not in (PUSH, PULL, DONE):
                raise RuntimeError(f"parameter server: unexpected message tag {tag} from rank {source}")
            comm.Recv([pushed, MPI.BYTE] if tag == PUSH else [small, MPI.INT64_T], source, tag)
            with self._lock:
                if tag == PUSH:
                    clock, lr = int(pushed[:8].view(np.int64)[0]), float(pushed[8:HEADER].view(np.float64)[0])
                    server.push(source, clock, lr, pushed[HEADER:].view(self._flat.dtype))
                    self._answer(server.ready())
                elif tag == PULL:
                    self._answer([(source, int(small[0]))] if server.pull(source, int(small[0])) else [])
                else:
                    server.done(source, int(small[0]))
                    self._answer(server.ready())
        server.stats["cpu_seconds"] = time.thread_time() - cpu
        server.stats["wall_seconds"] = time.perf_counter() - wall


def _wait(requests: list[MPI.Request], event: threading.Event | None = None) -> None:
    """Wait for ``requests`` (and ``event``) without spinning a core: poll, sleeping a little longer each miss."""
    pause = POLL_MIN_SECONDS
    while not (MPI.Request.Testall(requests) and (event is None or event.is_set())):
        time.sleep(pause)
        pause = min(pause * BACKOFF, POLL_MAX_SECONDS)


def _check_arguments(params: Any, staleness: Any, lr: Any, momentum: Any, weight_decay: Any) -> None:
    if not isinstance(params, torch.Tensor) or params.dtype not in _MPI_TYPES:
        got = params.dtype if isinstance(params, torch.Tensor) else type(params).__name__
        raise TypeError(f"ParameterServer: params must be a float32 or float64 torch.Tensor, got {got}")
    if params.dim() != 1 or not params.is_contiguous() or params.device.type != "cpu":
        raise ValueError(f"ParameterServer: params must be a flat (1-D), contiguous CPU tensor, got shape "
                         f"{tuple(params.shape)} on {params.device}")
    if staleness is not None and (isinstance(staleness, bool) or not isinstance(staleness, (int, np.integer))):
        raise TypeError(f"ParameterServer: staleness must be an int or None, got {type(staleness).__name__}")
    if staleness is not None and staleness < 0:
        raise ValueError(f"ParameterServer: staleness must be >= 0 (or None for unbounded), got {staleness}")
    for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        _check_number(name, value)


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"ParameterServer: {name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"ParameterServer: {name} must be finite and >= 0, got {value}")


def _check_grads(grads: Any, params: torch.Tensor) -> np.ndarray:
    if not isinstance(grads, torch.Tensor):
        raise TypeError(f"ParameterServer.push: grads must be a torch.Tensor, got {type(grads).__name__}")
    if grads.dtype != params.dtype or grads.device.type != "cpu":
        raise TypeError(f"ParameterServer.push: grads must be a CPU tensor of the params' dtype {params.dtype}, "
                        f"got {grads.dtype} on {grads.device}")
    if grads.numel() != params.numel():
        raise ValueError(f"ParameterServer.push: grads has {grads.numel()} elements, params {params.numel()}")
    return grads.detach().reshape(-1).numpy()


def _agree(comm: MPI.Comm, problem: Exception | None, params: Any, settings: tuple) -> None:
    """Raise on every rank if any rank's arguments are bad or the ranks disagree, rather than hang one rank."""
    mine: tuple = (str(problem),) if problem is not None else (
        params.numel(), str(params.dtype), settings, zlib.crc32(params.detach().numpy().view(np.uint8)))
    everyone = comm.allgather(mine)
    if problem is not None:
        raise problem
    bad = [r for r, e in enumerate(everyone) if len(e) == 1]
    if bad:
        raise ValueError(f"ParameterServer: rank {bad[0]} passed bad arguments: {everyone[bad[0]][0]}")
    for i, name in enumerate(("parameter count", "dtype", "(staleness, momentum, weight_decay)", "initial parameters")):
        differ = [r for r, e in enumerate(everyone) if e[i] != everyone[0][i]]
        if differ:
            detail = ("broadcast rank 0's first, e.g. mpiml.broadcast_parameters" if i == 3 else
                      f"{everyone[0][i]} on rank 0, {everyone[differ[0]][i]} on rank {differ[0]}")
            raise ValueError(f"ParameterServer: ranks {differ} differ from rank 0 in {name} ({detail})")
