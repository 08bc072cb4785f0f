"""A parameter server with bounded staleness: every rank is a worker and serves one shard of the parameters.

    ps = ParameterServer(flat_params, comm, staleness=2, optimizer=opt, spans=spans, group_of=group_of)
    for batch in batches:
        ...                   # forward/backward at flat_params, gradients into flat_grads
        scheduler.step()      # optional: each push carries the lr of every one of opt's groups
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
s (c_w, the lr of each of the optimizer's groups, g[shard s]); ``pull()``
sends every server a request carrying c_w and waits for all K shards, which
land directly in ``params``. Server s answers a pull at clock t once
``min_v c_v >= t - S`` (S = ``staleness``; c_v counts v's pushes that s has
received; finished workers do not count), deferring it until a push or a
finishing worker makes that true.
``staleness=None`` (unbounded) answers every pull at once, as Downpour.

**Staleness guarantee.** MPI keeps messages between two ranks on one
communicator in order, so a server answering a pull at clock t holds every
push of clock <= t - S from every worker, and all of the puller's own: a
worker never computes with parameters missing an update older than S steps.
With S = 0, a pull after step t sees exactly the updates of steps 1..t.

**Update rule.** The user's torch optimizer, on the shard: the server steps
a new optimizer of ``optimizer``'s class, built by
``mpiml.sharding.shard_optimizer`` over 1-D views of its shard of each
parameter (``spans[i] = (0, lo, hi)``: parameter i's range in ``params``),
each in its parameter group (``group_of[i]``) with that group's
hyper-parameters. An element-wise optimizer (SGD with momentum, Nesterov or
weight decay, Adam, AdamW, RMSprop, Adagrad...) then computes on every
element exactly what it would on the whole model. Before each step the
server sets each group's lr to the one the pushes carried (schedulers and
warm-up work); every other hyper-parameter (momentum, betas, weight decay...)
is the one the optimizer had when the server was built, agreed on by all
ranks (a scheduler's changes to them do not reach the servers).
``lr=, momentum=, weight_decay=`` instead of ``optimizer`` means a
torch.optim.SGD with those. The workers never step ``optimizer`` itself (an
lr scheduler attached to it warns that ``optimizer.step()`` was not called
before it: harmless here).

S = 0: the server waits for all gradients of clock t, sums them in rank
order, divides by their number and steps once, each group's lr the mean of
the pushes': that is synchronous data-parallel training with averaged
gradients and this optimizer, bitwise (a finished worker no longer
contributes). S > 0 or None: each push is applied on arrival as one step on
its gradient divided by K, so that K pushes move an SGD shard as far as one
synchronous step. Weight decay is a term of each step, so K steps would
apply it K times per round at full strength: for S > 0 the shard optimizer's
``weight_decay`` is divided by K (for SGD, one push is then exactly SGD on
(g + weight_decay * w) / K; AdamW's decoupled decay also sums to one
round's worth). Optimizers that normalise the gradient (Adam, RMSprop,
Adagrad...) are nearly blind to the 1/K: there each push moves the shard
about a full step, so a round of K pushes moves it about K times as far as a
synchronous step; lower the lr accordingly. A server holds its shard, a
gradient buffer of its size and the optimizer's state for it (one or two
shard-sized tensors for momentum or Adam); S = 0 also holds the K gradient
shards of a pending clock (n elements per rank).

**Cost per worker step.** K pushes (n elements in all, plus 8 + 8G bytes
each for G parameter groups), K pull requests (8 bytes) and K replies (n
elements), one of each in process: 2n(K-1)/K elements out and in per worker
and per server, plus a copy of the shard per batch of replies (so later
updates cannot change one in flight).

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
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from . import watchdog
from .collectives import chunk_bounds
from .sharding import shard_optimizer, shard_pieces

__all__ = ["ParameterServer", "ShardServer", "POLL_MIN_SECONDS", "POLL_MAX_SECONDS", "BACKOFF"]

POLL_MIN_SECONDS = 20e-6
POLL_MAX_SECONDS = 1e-3
BACKOFF = 1.5
PUSH, PULL, DONE, REPLY = 1, 2, 3, 4
_MPI_TYPES = {torch.float32: MPI.FLOAT, torch.float64: MPI.DOUBLE}


class ShardServer:
    """One shard's server state without any MPI: clocks, pending updates, deferred pulls, the optimizer step.

    ``shard``: the initial values of the shard, elements ``[lo, lo + len)`` of the flat parameters.
    ``optimizer``: the user's optimizer (only its class, groups' hyper-parameters and defaults are
    used), ``spans[i] = (0, lo_i, hi_i)`` parameter i's range in the flat parameters (default: one
    parameter, the shard), ``group_of[i]`` its group's index (default 0). Without ``optimizer``:
    torch.optim.SGD with ``momentum`` and ``weight_decay``. Events come in through ``push``,
    ``done`` and ``pull``; ``pull`` and ``ready`` say which pulls may be answered now, with
    ``snapshot()``.
    """

    def __init__(self, shard: torch.Tensor, workers: int, staleness: int | None, momentum: float = 0.0,
                 weight_decay: float = 0.0, *, optimizer: torch.optim.Optimizer | None = None,
                 spans: Sequence[tuple[int, int, int]] | None = None, group_of: Sequence[int] | None = None,
                 lo: int = 0) -> None:
        self.workers, self.staleness = workers, staleness
        self.synchronous = staleness == 0
        self.weights = shard.detach().clone()
        self._grad = torch.zeros_like(self.weights)
        if optimizer is None:
            optimizer = _sgd(self.weights.dtype, 0.0, momentum, weight_decay)
        hi = lo + self.weights.numel()
        spans = [(0, lo, hi)] if spans is None else spans
        group_of = [0] * len(spans) if group_of is None else group_of
        self.groups = len(optimizer.param_groups)
        self.pieces = shard_pieces(spans, [(lo, hi)])
        self.optimizer = shard_optimizer(optimizer, group_of, self.pieces,
                                         param_view=lambda pc: self.weights[pc.lo - lo:pc.hi - lo],
                                         grad_view=lambda pc: self._grad[pc.lo - lo:pc.hi - lo])
        if not self.synchronous:  # K steps a round: each applies 1/K of the decay (module docstring)
            for group in self.optimizer.param_groups:
                if group.get("weight_decay"):
                    group["weight_decay"] = group["weight_decay"] / workers
        self.clocks, self.finished = [0] * workers, [False] * workers
        self.applied = 0  # S = 0: clocks whose averaged step has been applied
        self._pending: dict[int, tuple[np.ndarray, list[tuple[float, ...]]]] = {}
        self._spare: list[np.ndarray] = []
        self._deferred: list[tuple[int, int]] = []
        self.stats: dict[str, float] = {"pushes": 0, "updates": 0, "pulls": 0, "deferred_pulls": 0,
                                        "max_staleness": 0, "cpu_seconds": 0.0, "wall_seconds": 0.0}

    def min_clock(self) -> float:
        """The smallest clock among workers that have not finished (infinity when all have)."""
        return min((c for c, f in zip(self.clocks, self.finished, strict=True) if not f), default=math.inf)

    def push(self, worker: int, clock: int, lr: float | Sequence[float], grad: np.ndarray) -> None:
        """Worker ``worker``'s gradient shard of step ``clock`` (its pushes arrive in order), with the lr of
        each parameter group (one number: every group's)."""
        if self.finished[worker] or clock != self.clocks[worker] + 1:
            raise RuntimeError(f"parameter server: push of clock {clock} from worker {worker} out of order "
                               f"(expected {self.clocks[worker] + 1}, finished: {self.finished[worker]})")
        lrs = (float(lr),) * self.groups if isinstance(lr, (int, float)) else tuple(float(x) for x in lr)
        if len(lrs) != self.groups:
            raise RuntimeError(f"parameter server: push from worker {worker} carries {len(lrs)} learning rates "
                               f"for {self.groups} parameter groups")
        self.clocks[worker] = clock
        self.stats["pushes"] += 1
        if not self.synchronous:
            self._grad.copy_(torch.from_numpy(grad))
            self._grad.div_(self.workers)
            self._step(lrs)
            return
        if clock not in self._pending:
            slots = self._spare.pop() if self._spare else np.empty((self.workers, grad.size), grad.dtype)
            self._pending[clock] = (slots, [()] * self.workers)
        slots, pushed_lrs = self._pending[clock]
        slots[worker] = grad
        pushed_lrs[worker] = lrs
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
            self._grad.copy_(torch.from_numpy(slots[members[0]]))
            for w in members[1:]:
                self._grad.add_(torch.from_numpy(slots[w]))
            self._grad.div_(len(members))
            self._step([sum(lrs[w][j] for w in members) / len(members) for j in range(self.groups)])
            self.applied = t
            self._spare.append(slots)

    def _step(self, lrs: Sequence[float]) -> None:
        """One step of the shard optimizer on ``self._grad``, each group at its lr."""
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self.optimizer.step()
        self.stats["updates"] += 1


class ParameterServer:
    """Bounded-staleness parameter server over ``comm``: see the module docstring.

    ``params``: this rank's flat float32 (or float64) CPU tensor, equal on
    all ranks at the start; ``pull()`` and ``finish()`` overwrite it.
    ``staleness``: S >= 0, or None for unbounded. ``optimizer``: the user's
    torch optimizer (element-wise: SGD, Adam, AdamW, RMSprop...), never
    stepped here: the servers step their own copies of it on their shards,
    and each push carries the lr its groups have then. ``spans[i] = (0, lo,
    hi)``: parameter i's elements in ``params`` (default: one parameter, all
    of ``params``); ``group_of[i]``: the index of its group in
    ``optimizer.param_groups`` (default: 0). Or, without ``optimizer``:
    ``lr``, ``momentum``, ``weight_decay`` of a torch.optim.SGD. The
    constructor and ``finish()`` are collective over ``comm``;
    ``push``/``pull`` are not.
    """

    def __init__(self, params: torch.Tensor, comm: MPI.Comm, staleness: int | None,
                 optimizer: torch.optim.Optimizer | None = None, spans: Sequence[tuple[int, int, int]] | None = None,
                 group_of: Sequence[int] | None = None, *, lr: float | None = None, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        if not isinstance(comm, MPI.Intracomm):
            raise TypeError(f"ParameterServer: comm must be an MPI intracommunicator, got {type(comm).__name__}")
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        if self.size > 1 and MPI.Query_thread() < MPI.THREAD_MULTIPLE:
            raise RuntimeError(f"ParameterServer: MPI provides thread level {MPI.Query_thread()}, not "
                               "MPI_THREAD_MULTIPLE; initialise it with MPI.Init_thread(MPI.THREAD_MULTIPLE), "
                               "as mpi4py does by default")
        problem: Exception | None = None
        settings: dict[str, Any] = {}
        try:
            _check_arguments(params, staleness, optimizer, lr, momentum, weight_decay)
            if optimizer is None:
                optimizer = _sgd(params.dtype, lr, momentum, weight_decay)  # type: ignore[arg-type]
            spans = [(0, 0, params.numel())] if spans is None else [tuple(int(v) for v in sp) for sp in spans]
            group_of = [0] * len(spans) if group_of is None else [int(g) for g in group_of]
            _check_layout(params.numel(), spans, group_of, len(optimizer.param_groups))
            settings = {"staleness": staleness, "optimizer": type(optimizer).__qualname__,
                        "hyper-parameters except lr": _hyperparameters(optimizer),
                        "parameter layout (spans, group_of)": (spans, group_of)}
            self.optimizer = optimizer
            _group_lrs(optimizer)
            self.bounds = b = chunk_bounds(params.numel(), self.size)
            self._mine = slice(b[self.rank], b[self.rank + 1])
            self.server = ShardServer(params.detach()[self._mine], self.size, staleness, optimizer=optimizer,
                                      spans=spans, group_of=group_of, lo=b[self.rank])
        except (TypeError, ValueError) as e:
            problem = e
        _agree(comm, problem, params, settings)
        self.params, self.staleness = params, staleness
        self._flat, self._type = params.detach().numpy(), _MPI_TYPES[params.dtype]
        self._header = 8 + 8 * len(self.optimizer.param_groups)  # int64 clock, a float64 lr per group
        self.clock, self.finished, self._pull_seconds = 0, False, 0.0
        self._lock, self._local_reply = threading.Lock(), threading.Event()
        self._push_requests: list[MPI.Request] = []
        self._sending: list[tuple[MPI.Request, np.ndarray]] = []
        self._others = [(self.rank + i) % self.size for i in range(1, self.size)]  # not everyone to rank 0 first
        if self._others:
            item = params.element_size()
            self._sendbufs = {s: np.empty(self._header + (b[s + 1] - b[s]) * item, np.uint8) for s in self._others}
            self._requests, self._replies = comm.Dup(), comm.Dup()
            self._thread = threading.Thread(target=self._serve, name=f"mpiml-ps-server-{self.rank}", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------ worker side

    def set_lr(self, lr: float | Sequence[float]) -> None:
        """Set the optimizer's lr (one number: every group's; a sequence: one per group) for the next pushes.

        Each push carries the lr its groups have then, so changing them any other way (an lr scheduler on
        ``optimizer``) works as well."""
        groups = self.optimizer.param_groups
        lrs = list(lr) if isinstance(lr, Sequence) and not isinstance(lr, str) else [lr] * len(groups)
        if len(lrs) != len(groups):
            raise ValueError(f"ParameterServer: {len(lrs)} learning rates for {len(groups)} parameter groups")
        for x in lrs:
            _check_number("lr", x)
        for group, x in zip(groups, lrs, strict=True):
            group["lr"] = float(x)

    def set_lrs(self, lrs: Sequence[float]) -> None:
        """``set_lr`` with one lr per parameter group."""
        if not isinstance(lrs, Sequence) or isinstance(lrs, str):
            raise TypeError(f"ParameterServer.set_lrs: one lr per parameter group, got {type(lrs).__name__}")
        self.set_lr(lrs)

    def push(self, grads: torch.Tensor) -> None:
        """Send every server its shard of ``grads`` (flat, same length and dtype as ``params``)."""
        self._check_open("push")
        g = _check_grads(grads, self.params)
        with watchdog.watch("parameter server push"):
            self._push(g)

    def _push(self, g: np.ndarray) -> None:
        lrs = _group_lrs(self.optimizer)  # checked before the clock moves: a bad lr sends nothing
        self.clock += 1
        if self._others:
            _wait(self._push_requests)  # the previous push's buffers are free again
            h = self._header
            for s in self._others:
                buf = self._sendbufs[s]
                buf[:8].view(np.int64)[0] = self.clock
                buf[8:h].view(np.float64)[:] = lrs
                buf[h:].view(self._flat.dtype)[:] = g[self.bounds[s]:self.bounds[s + 1]]
            self._push_requests = [self._requests.Isend([self._sendbufs[s], MPI.BYTE], dest=s, tag=PUSH)
                                   for s in self._others]
        with self._lock:  # this rank's own shard: no message, the server's bookkeeping directly
            self.server.push(self.rank, self.clock, lrs, g[self._mine])
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
        h = self._header
        pushed = np.empty(h + server.weights.numel() * self._flat.itemsize, np.uint8)
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
                    clock, lrs = int(pushed[:8].view(np.int64)[0]), pushed[8:h].view(np.float64).tolist()
                    server.push(source, clock, lrs, pushed[h:].view(self._flat.dtype))
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


def _check_arguments(params: Any, staleness: Any, optimizer: Any, lr: Any, momentum: Any,
                     weight_decay: Any) -> None:
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
    if optimizer is None:
        if lr is None:
            raise TypeError("ParameterServer: give the optimizer (or lr, momentum, weight_decay of an SGD)")
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            _check_number(name, value)
        return
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"ParameterServer: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if lr is not None or momentum or weight_decay:
        raise TypeError("ParameterServer: lr, momentum and weight_decay come from the optimizer's groups; "
                        "pass either the optimizer or them")
    if isinstance(optimizer, (torch.optim.LBFGS, torch.optim.SparseAdam)):
        raise ValueError(f"ParameterServer: {type(optimizer).__name__} is not an element-wise optimizer the "
                         "servers can step on shards of the parameters")


def _check_layout(n: int, spans: list[tuple[int, ...]], group_of: list[int], groups: int) -> None:
    """``spans`` in one buffer of n elements, disjoint; ``group_of`` one valid group index per span."""
    if len(group_of) != len(spans):
        raise ValueError(f"ParameterServer: {len(group_of)} group indices for {len(spans)} parameters")
    end = 0
    for i, sp in sorted(enumerate(spans), key=lambda e: e[1][1:]):
        if len(sp) != 3 or sp[0] != 0 or not end <= sp[1] <= sp[2] <= n:
            raise ValueError(f"ParameterServer: parameter {i}'s span {sp} is not a range (0, lo, hi) of the "
                             f"{n} parameters disjoint from the others")
        end = sp[2]
    bad = [g for g in group_of if not 0 <= g < groups]
    if bad:
        raise ValueError(f"ParameterServer: group index {bad[0]} out of range: the optimizer has {groups} groups")


def _sgd(dtype: torch.dtype, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer of the ``lr=, momentum=, weight_decay=`` form (it is never stepped itself)."""
    return torch.optim.SGD([torch.zeros(0, dtype=dtype)], lr=lr, momentum=momentum, weight_decay=weight_decay)


def _group_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """Every group's lr as a float, each checked (a 1-element tensor counts as its number)."""
    lrs = []
    for group in optimizer.param_groups:
        lr = group.get("lr")
        if torch.is_tensor(lr) and lr.numel() == 1:
            lr = lr.item()
        _check_number("lr", lr)
        lrs.append(float(lr))
    return lrs


def _hyperparameters(optimizer: torch.optim.Optimizer) -> str:
    """What every rank's optimizer must agree on: its defaults and groups, less params and lr."""
    def plain(d: dict[str, Any]) -> list[tuple[str, str]]:
        return sorted((k, repr(v.tolist() if torch.is_tensor(v) else v)) for k, v in d.items()
                      if k not in ("params", "lr", "initial_lr"))
    return repr([plain(optimizer.defaults)] + [plain(g) for g in optimizer.param_groups])


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


def _agree(comm: MPI.Comm, problem: Exception | None, params: Any, settings: dict[str, Any]) -> None:
    """Raise on every rank if any rank's arguments are bad or the ranks disagree, rather than hang one rank."""
    mine: tuple = (str(problem),) if problem is not None else (
        params.numel(), str(params.dtype), *settings.values(), zlib.crc32(params.detach().numpy().view(np.uint8)))
    everyone = comm.allgather(mine)
    if problem is not None:
        raise problem
    bad = [r for r, e in enumerate(everyone) if len(e) == 1]
    if bad:
        raise ValueError(f"ParameterServer: rank {bad[0]} passed bad arguments: {everyone[bad[0]][0]}")
    names = ("parameter count", "dtype", *settings, "initial parameters")
    for i, name in enumerate(names):
        differ = [r for r, e in enumerate(everyone) if e[i] != everyone[0][i]]
        if differ:
            detail = ("broadcast rank 0's first, e.g. mpiml.broadcast_parameters" if i == len(names) - 1 else
                      f"{everyone[0][i]} on rank 0, {everyone[differ[0]][i]} on rank {differ[0]}")
            raise ValueError(f"ParameterServer: ranks {differ} differ from rank 0 in {name} ({detail})")
