"""``DistributedOptimizer``: a model's gradients in one flat buffer, combined by a topology before each step.

    opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, topology="ring")
    mpiml.broadcast_parameters(model, root=0)
    mpiml.broadcast_optimizer_state(opt, root=0)
    ...
    loss.backward(); opt.step(); opt.zero_grad()

Parameters and ``.grad`` become views into one flat buffer per dtype, so
combining all gradients is one collective on one array, with no copy.
Exact topologies (``mpi``, ``ring``, ``tree``, ``butterfly``) average the
gradients before the wrapped optimizer steps, so every replica stays
identical. ``butterfly-mixing`` steps on the local gradient, then averages
parameters with one partner (see ``mpiml.mixing``). ``average_every=H``
(local SGD, periodic model averaging) steps on local gradients and
averages the *parameters* through the exact topology every H steps;
optimizer state (momentum) stays local to each rank. For SGD with momentum
and H = 1 this is synchronous SGD (the update is linear in the gradient, so
averaging parameters after the step equals stepping on averaged gradients,
momentum buffers included); with Adam it is not.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from . import collectives, guards, mixing, runtime, traffic
from .buckets import COMPRESSIONS, GradientBuckets
from .collectives._schedule import polling
from .runtime import UserError
from .timeline import Timeline

__all__ = ["DistributedOptimizer", "TOPOLOGIES", "EXACT_TOPOLOGIES", "DEFAULT_BUCKET_BYTES"]

EXACT_TOPOLOGIES = ("mpi", "ring", "tree", "butterfly", "hier", "auto")
DEFAULT_BUCKET_BYTES = 4 << 20
TOPOLOGIES = EXACT_TOPOLOGIES + ("butterfly-mixing", "ps")


class _FlatGroup:
    """Tensors of one dtype laid out back to back in one buffer, last tensor first.

    Reverse order puts the gradients backward produces first at the front,
    so gradient buckets are contiguous slices filled front to back.
    """

    def __init__(self, shapes: list[torch.Size], dtype: torch.dtype,
                 allocate: Callable[[torch.dtype, int], torch.Tensor] | None = None) -> None:
        self.shapes = shapes
        self.bounds: list[tuple[int, int]] = [(0, 0)] * len(shapes)
        offset = 0
        for i in reversed(range(len(shapes))):
            self.bounds[i] = (offset, offset + shapes[i].numel())
            offset += shapes[i].numel()
        self.buffer = allocate(dtype, offset) if allocate is not None else torch.zeros(offset, dtype=dtype)
        self.buffer.zero_()

    def view(self, i: int) -> torch.Tensor:
        lo, hi = self.bounds[i]
        return self.buffer[lo:hi].view(self.shapes[i])


# Between tests of a message that crosses a network: a 256 KiB chunk takes 2 ms on a 1 Gbit/s link.
NETWORK_POLL_SECONDS = 50e-6


def _spare_core(local_size: int) -> bool:
    """Whether a communication thread would get a core of its own: more cores than busy threads on this host.

    On one host overlap only pays when it does: where every core is computing, a thread that
    busy-polls shared memory takes its time from backward (measured in the README)."""
    return (os.cpu_count() or 1) > local_size * torch.get_num_threads()


def _grouped(params: list[torch.nn.Parameter]) -> dict[torch.dtype, list[int]]:
    groups: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.dtype, []).append(i)
    return groups


class DistributedOptimizer(torch.optim.Optimizer):
    """Wraps a torch optimizer; ``step()`` first combines gradients across ranks through ``topology``.

    ``overlap`` (default: when this host has a core to spare for the
    communication thread): gradients are grouped into buckets of about
    ``bucket_bytes`` in reverse parameter order, and each bucket's allreduce
    starts on a communication thread as soon as backward has produced it
    (see ``mpiml.buckets``); ``step()`` waits only for what is still in
    flight. Without overlap, everything is combined in ``step()``.
    ``compression``: "none", "fp16" or "bf16" on the wire.
    ``poll_interval``: how a wait for gradients waits: 0 spins in MPI_Wait, a
    positive number of seconds tests and sleeps that long in between; default:
    50 µs when the ranks span several hosts (the network is slow next to the
    CPU, which is better spent on compute and TCP), spin on one host.
    ``backward_passes_per_step``: gradients of that many backward passes are
    accumulated locally before one combined step (call ``step()`` once after
    them; nothing is sent on the inner passes). ``zero_grad()`` zeroes the
    flat gradient buffer in place (the ``.grad`` views must survive, so
    ``set_to_none`` is ignored). Parameters that got no gradient on some
    rank count as zero there.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None,
                 topology: str = "ring", backward_passes_per_step: int = 1, comm: MPI.Comm | None = None,
                 overlap: bool | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES, compression: str = "none",
                 on_nan: str = "abort", check_consistency_every: int = 0, average_every: int = 0,
                 staleness: int | None = 0, poll_interval: float | None = None) -> None:
        if topology not in TOPOLOGIES:
            raise UserError(f"unknown topology {topology!r}; choose from {', '.join(TOPOLOGIES)}")
        if backward_passes_per_step < 1:
            raise UserError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
        if compression not in COMPRESSIONS:
            raise UserError(f"unknown compression {compression!r}; choose from {', '.join(COMPRESSIONS)}")
        if bucket_bytes < 1:
            raise UserError(f"bucket_bytes must be positive, got {bucket_bytes}")
        if on_nan not in ("abort", "skip"):
            raise UserError(f"on_nan must be 'abort' or 'skip', got {on_nan!r}")
        if check_consistency_every < 0:
            raise UserError(f"check_consistency_every must be >= 0, got {check_consistency_every}")
        if average_every < 0:
            raise UserError(f"average_every must be >= 0, got {average_every}")
        if poll_interval is not None and not 0 <= poll_interval <= 1:
            raise UserError(f"poll_interval must be between 0 and 1 second, got {poll_interval}")
        if average_every and topology not in EXACT_TOPOLOGIES:
            raise UserError(f"average_every (local SGD) averages through an exact topology, not {topology!r}")
        self._inner: torch.optim.Optimizer | None = None
        # Optimizer's own constructor sets up hooks; its throwaway groups never reach the wrapped optimizer.
        super().__init__([torch.zeros(0, requires_grad=True)], {})
        self._inner = optimizer
        self.topology, self.backward_passes_per_step = topology, backward_passes_per_step
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self._params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        self.names = [names.get(id(p), f"param.{i}") for i, p in enumerate(self._params)]
        self._check_same_layout()
        self._param_groups: list[_FlatGroup] = []
        self._grad_groups: list[_FlatGroup] = []
        self._grad_views: list[torch.Tensor] = [None] * len(self._params)  # type: ignore[list-item]
        spans: list[tuple[torch.Tensor, int, int]] = [None] * len(self._params)  # type: ignore[list-item]
        grouped = _grouped(self._params)
        exact = topology in EXACT_TOPOLOGIES and self.comm.Get_size() > 1 and not average_every
        # Gradient buckets travel on a communicator of their own: the caller's collectives on ``comm``
        # (even while buckets are in flight during backward) can never meet them.
        self._bucket_comm = self.comm.Dup() if exact else None
        if exact:
            collectives.private_comm(self._bucket_comm)
        # How the ranks sit on hosts (collective on comm, cached on it). Across hosts, messages cross a
        # network: waits test and sleep instead of spinning (mpiml.collectives._schedule.polling), so the
        # CPU goes to backward, to other ranks and to the kernel's TCP work (docs/cluster.md).
        layout = collectives.hier.topology(collectives.private_comm(self._bucket_comm)) if exact else None
        self.hosts = layout.hosts if layout is not None else 1
        self._poll = (NETWORK_POLL_SECONDS if self.hosts > 1 else 0.0) if poll_interval is None else poll_interval
        allocate = self._shared_allocator(grouped) if topology == "hier" and exact else None
        for dtype, idx in grouped.items():
            shapes = [self._params[i].shape for i in idx]
            pg, gg = _FlatGroup(shapes, dtype), _FlatGroup(shapes, dtype, allocate)
            for j, i in enumerate(idx):
                p = self._params[i]
                pg.view(j).copy_(p.detach())
                p.data = pg.view(j)
                if p.grad is not None:
                    gg.view(j).copy_(p.grad)
                p.grad = self._grad_views[i] = gg.view(j)
                spans[i] = (gg.buffer, *gg.bounds[j])
            self._param_groups.append(pg)
            self._grad_groups.append(gg)
        self.on_nan, self.check_consistency_every = on_nan, check_consistency_every
        self.average_every = average_every
        self._timeline = Timeline(None)
        self.skipped_steps: list[tuple[int, list[int]]] = []  # (step, ranks with non-finite gradients)
        self.step_count = 0
        self._local_finite = True
        self.wait_seconds = 0.0  # time step() spent waiting for communication (the exposed part)
        self._mixing_seconds = 0.0
        self._synchronized = False
        self._should_sync = True
        self._scratch: list[np.ndarray] = []
        if topology in EXACT_TOPOLOGIES and self.comm.Get_size() > 1:
            collectives.private_comm(self.comm)  # made here, not on the communication thread
        self._buckets = GradientBuckets(
            self._params, spans, bucket_bytes, self._reduce, self.comm.Get_size(),
            (_spare_core(layout.local_size) if overlap is None else overlap) and exact,
            backward_passes_per_step, compression) if exact else None
        self._ps = self._parameter_server(staleness) if topology == "ps" else None

    # -- the wrapped optimizer's state is this optimizer's state
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self._inner.param_groups if self._inner is not None else self._own_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if self._inner is None:
            self._own_groups = value
        else:
            self._inner.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self._inner.state if self._inner is not None else self._own_state

    @state.setter
    def state(self, value: Any) -> None:
        if self._inner is None:
            self._own_state = value
        else:
            self._inner.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self._inner.defaults if self._inner is not None else self._own_defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        if self._inner is None:
            self._own_defaults = value
        else:
            self._inner.defaults = value

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped optimizer."""
        return self._inner  # type: ignore[return-value]

    def state_dict(self) -> dict[str, Any]:
        return self._inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._inner.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._inner is None:
            super().add_param_group(param_group)
            return
        raise UserError("DistributedOptimizer: add parameter groups to the wrapped optimizer before wrapping it")

    def __repr__(self) -> str:
        return f"DistributedOptimizer(topology={self.topology!r}, {self._inner!r})"

    # -- buffers
    @property
    def parameter_buffers(self) -> list[torch.Tensor]:
        """The flat parameter buffers (one per dtype); the parameters are views into them."""
        return [g.buffer for g in self._param_groups]

    @property
    def gradient_buffers(self) -> list[torch.Tensor]:
        return [g.buffer for g in self._grad_groups]

    def _check_same_layout(self) -> None:
        mine = hashlib.sha256(repr([(tuple(p.shape), str(p.dtype)) for p in self._params]).encode()).hexdigest()
        everyone = self.comm.allgather((len(self._params), mine))
        if any(e != everyone[0] for e in everyone):
            counts = ", ".join(f"rank {r}: {n} tensors" for r, (n, _) in enumerate(everyone))
            raise UserError(f"DistributedOptimizer: the ranks' models differ in parameter shapes ({counts})")

    def _shared_allocator(self, grouped: dict[torch.dtype, list[int]]) -> Callable[[torch.dtype, int], torch.Tensor]:
        """Gradient buffers inside the host's shared window, so ``hier`` reduces them in place, copy-free."""
        sizes = {d: sum(self._params[i].numel() for i in idx) * self._params[idx[0]].element_size()
                 for d, idx in grouped.items()}
        arena = collectives.hier.SharedArena(collectives.private_comm(self._bucket_comm), sum(-(-b // 64) * 64 for b in
                                                                                      sizes.values()))
        offsets: dict[torch.dtype, int] = {}
        at = 0
        for d, nbytes in sizes.items():
            offsets[d] = at
            at += -(-nbytes // 64) * 64

        def allocate(dtype: torch.dtype, count: int) -> torch.Tensor:
            return arena.tensor(dtype, offsets[dtype], count)
        self._arena = arena
        return allocate

    @property
    def replicas_differ(self) -> bool:
        """Whether ranks may hold different parameters between steps (mixing, local SGD, parameter server)."""
        return self.topology in ("butterfly-mixing", "ps") or bool(self.average_every)

    def _parameter_server(self, staleness: int | None) -> Any:
        """``topology="ps"``: the servers run SGD on their shards; this wraps only the hyper-parameters."""
        from .ps import ParameterServer
        if len(self._param_groups) != 1 or not isinstance(self._inner, torch.optim.SGD):
            raise UserError("--topology ps runs SGD (momentum, weight decay) on the servers: it needs "
                            "--optimizer sgd and parameters of one floating-point dtype")
        group = self._inner.param_groups[0]
        return ParameterServer(self._param_groups[0].buffer, self.comm, staleness, lr=group["lr"],
                               momentum=group["momentum"], weight_decay=group["weight_decay"])

    def _ps_step(self) -> None:
        """Push this rank's gradient to the servers and pull parameters within the staleness bound."""
        grads = self._grad_groups[0].buffer
        if not guards.finite([grads]):  # decided locally: a collective here would undo the asynchrony
            message = guards.non_finite_message([self.comm.Get_rank()], self.step_count, "")
            if self.on_nan == "abort":  # flushed and given time to reach the launcher before MPI_Abort
                runtime.abort(2, f"mpiml: error: {message}aborting (--on-nan abort)", self.comm)
            self.skipped_steps.append((self.step_count, [self.comm.Get_rank()]))
            grads.zero_()  # the clocks still advance: a zero update instead of a poisoned one
        start = time.perf_counter()
        self._ps.set_lr(self._inner.param_groups[0]["lr"])
        self._ps.push(grads)
        self._ps.pull()
        k = self.comm.Get_size()
        traffic.add(2 * grads.numel() * grads.element_size() * (k - 1) / k)  # pushes out, replies from servers
        self._mixing_seconds += time.perf_counter() - start
        self.wait_seconds += time.perf_counter() - start
        self.step_count += 1

    def finish(self) -> None:
        """Collective: end a parameter-server run, every rank then holds the servers' final parameters."""
        if self._ps is not None:
            self._ps.finish()
            self._ps = None

    def _reduce(self, view: torch.Tensor, op: str, name: str) -> None:
        with polling(self._poll):
            collectives.allreduce(view, op=op, algorithm=self.topology, comm=self._bucket_comm, name=name)

    @property
    def comm_seconds(self) -> float:
        """Seconds spent communicating (overlapped with backward or not)."""
        return (self._buckets.comm_seconds if self._buckets is not None else 0.0) + self._mixing_seconds

    @property
    def buckets(self) -> list[Any]:
        return self._buckets.buckets if self._buckets is not None else []

    def _reattach_grads(self) -> None:
        """Put gradients that autograd or the user replaced back into the flat buffer."""
        for p, view in zip(self._params, self._grad_views):
            g = p.grad
            if g is view:
                continue
            if g is None:
                view.zero_()
            elif g.data_ptr() != view.data_ptr():
                view.copy_(g)
            p.grad = view

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffer in place; ``.grad`` stays a view of it (``set_to_none`` is ignored:
        zeroing and letting backward accumulate into the buffer measured faster than copying fresh
        gradients into it, 0.6 ms against 0.9 ms a step for the 1.86M-parameter MLP here)."""
        for g in self._grad_groups:
            g.buffer.zero_()
        self._reattach_grads()

    # -- communication
    @property
    def timeline(self) -> Any:
        return self._timeline

    @timeline.setter
    def timeline(self, value: Any) -> None:
        """A ``mpiml.timeline.Timeline``: waits and each bucket's allreduce appear in it."""
        self._timeline = value
        if self._buckets is not None:
            self._buckets.timeline = value

    def synchronize(self) -> None:
        """Finish averaging gradients across ranks (exact topologies); a no-op for butterfly mixing."""
        if self._buckets is not None:
            start = time.perf_counter()
            self._reattach_grads()
            self._buckets.flush()
            with self._timeline.span("wait for gradients", "comm"):
                self._buckets.wait()
            self._local_finite = self._buckets.local_finite
            self._buckets.reset()
            self.wait_seconds += time.perf_counter() - start
        self._synchronized = True

    def _gradients_ok(self) -> bool:
        """Collectively decide whether this step's gradients may reach the parameters (see mpiml.guards)."""
        if self.comm.Get_size() == 1 and guards.finite(self.gradient_buffers):
            return True
        local = self._local_finite if self._buckets is not None else guards.finite(self.gradient_buffers)
        bad = guards.agree_finite(local, self.comm, self.step_count) if self.comm.Get_size() > 1 else (
            [] if local else [0])
        if not bad:
            return True
        if self.on_nan == "abort":
            raise guards.NonFiniteGradient(guards.non_finite_message(bad, self.step_count, "aborting (--on-nan abort)"))
        self.skipped_steps.append((self.step_count, bad))
        if self.comm.Get_rank() == 0:
            print("warning: " + guards.non_finite_message(bad, self.step_count, "step skipped"), flush=True)
        for g in self._grad_groups:
            g.buffer.zero_()
        return False

    @contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Inside, ``step()`` does not combine gradients (use after calling ``synchronize()`` yourself)."""
        self._should_sync = False
        try:
            yield
        finally:
            self._should_sync = True

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._buckets is None:
            self._reattach_grads()  # gradients into the flat buffer (no bucket hooks did it)
        if self._ps is not None:
            self._ps_step()
            return loss
        if self._should_sync and not self._synchronized:
            self.synchronize()
        self._synchronized = False
        if not self._gradients_ok():
            self.step_count += 1
            return loss
        self._inner.step()
        if self.comm.Get_size() > 1 and (self.topology == "butterfly-mixing" or self.average_every):
            start = time.perf_counter()
            with torch.no_grad():
                if self.topology == "butterfly-mixing":
                    mixing.mix(self.parameter_buffers, self.comm, self.step_count, self._scratch)
                elif (self.step_count + 1) % self.average_every == 0:  # local SGD: average the models
                    for i, buf in enumerate(self.parameter_buffers):
                        collectives.allreduce(buf, op="mean", algorithm=self.topology, comm=self.comm,
                                              name=f"parameters step {self.step_count} buffer {i}")
            self._mixing_seconds += time.perf_counter() - start
            self.wait_seconds += time.perf_counter() - start
        self.step_count += 1
        if (self.check_consistency_every and not self.replicas_differ
                and self.step_count % self.check_consistency_every == 0):
            guards.check_consistency(self.parameter_buffers, self.comm, self.step_count - 1)
        return loss
