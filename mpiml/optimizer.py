"""``DistributedOptimizer``: a model's gradients in one flat buffer, combined by a strategy before each step.

    opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, topology="ring")
    mpiml.broadcast_parameters(model, root=0)
    mpiml.broadcast_optimizer_state(opt, root=0)
    ...
    loss.backward(); opt.step(); opt.zero_grad()

Parameters and ``.grad`` become views into one flat buffer per dtype, so
combining all gradients is one collective on one array, with no copy. This
class keeps only those buffers, the guards (non-finite gradients, replica
fingerprints) and the timing; *how* replicas agree is the strategy's
(``mpiml.strategies``), chosen from ``topology`` and the options:

- an exact algorithm (``mpi``, ``ring``, ``tree``, ``butterfly``, ``hier``,
  ``auto``): synchronous SGD, gradients averaged before every step, every
  replica identical; with ``zero=True`` the optimizer state is sharded
  (ZeRO-1); with ``average_every=H`` local SGD (parameters averaged every H
  steps, optimizer state local to each rank);
- ``butterfly-mixing``, ``gossip``: decentralised averaging with partners;
- ``ps``: a parameter server with bounded ``staleness``.

An option that the chosen strategy does not honour is refused (UserError
naming the option and the strategy), never silently ignored.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from mpi4py import MPI

from . import guards, runtime, strategies
from .compression import COMPRESSORS
from .runtime import UserError
from .strategies.base import DEFAULT_BUCKET_BYTES
from .timeline import Timeline

__all__ = ["DistributedOptimizer", "TOPOLOGIES", "EXACT_TOPOLOGIES", "DEFAULT_BUCKET_BYTES"]

EXACT_TOPOLOGIES = strategies.EXACT_TOPOLOGIES
TOPOLOGIES = strategies.TOPOLOGIES


_ALIGN_BYTES = 64  # a cache line: every tensor in a flat buffer starts on one


def _layout(shapes: list[torch.Size], dtype: torch.dtype) -> tuple[list[tuple[int, int]], int]:
    """Each tensor's [lo, hi) in a flat buffer (last tensor first, each on a cache line) and its length."""
    align = max(1, _ALIGN_BYTES // torch.empty(0, dtype=dtype).element_size())
    bounds: list[tuple[int, int]] = [(0, 0)] * len(shapes)
    offset = 0
    for i in reversed(range(len(shapes))):
        bounds[i] = (offset, offset + shapes[i].numel())
        offset = -(-(offset + shapes[i].numel()) // align) * align
    return bounds, offset


class _FlatGroup:
    """Tensors of one dtype laid out back to back in one buffer, last tensor first, each starting on a
    cache line (the few elements of padding stay zero).

    Reverse order puts the gradients backward produces first at the front,
    so gradient buckets are contiguous slices filled front to back. Alignment
    matters for the matrix kernels: weights that started 40 bytes into a line
    made backward of the 784-1024-1024-10 MLP 5% slower than in plain PyTorch.
    """

    def __init__(self, shapes: list[torch.Size], dtype: torch.dtype,
                 allocate: Callable[[torch.dtype, int], torch.Tensor] | None = None) -> None:
        self.shapes = shapes
        self.bounds, offset = _layout(shapes, dtype)
        self.buffer = allocate(dtype, offset) if allocate is not None else torch.zeros(offset, dtype=dtype)
        self.buffer.zero_()

    def view(self, i: int) -> torch.Tensor:
        lo, hi = self.bounds[i]
        return self.buffer[lo:hi].view(self.shapes[i])


def _grouped(params: list[torch.nn.Parameter]) -> dict[torch.dtype, list[int]]:
    groups: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.dtype, []).append(i)
    return groups


class DistributedOptimizer(torch.optim.Optimizer):
    """Wraps a torch optimizer; ``step()`` first lets the strategy combine gradients across ranks.

    ``topology``: see the module docstring (``mpiml.TOPOLOGIES``).
    ``overlap`` (default: when this host has a core to spare for the
    communication thread): gradients are grouped into buckets of about
    ``bucket_bytes`` in reverse parameter order, and each bucket's allreduce
    starts on a communication thread as soon as backward has produced it
    (see ``mpiml.buckets``); ``step()`` waits only for what is still in
    flight. Without overlap, everything is combined in ``step()``.
    ``compression``: "none", "fp16" or "bf16" on the wire (gradients, or the
    parameters that mixing, gossip and local SGD exchange).
    ``poll_interval``: how a wait for gradients waits: 0 spins in MPI_Wait, a
    positive number of seconds tests and sleeps that long in between; default:
    50 µs when the ranks span several hosts (the network is slow next to the
    CPU, which is better spent on compute and TCP), spin on one host.
    ``backward_passes_per_step``: gradients of that many backward passes are
    accumulated locally before one combined step (call ``step()`` once after
    them; nothing is sent on the inner passes). ``zero_grad()`` zeroes the
    flat gradient buffer in place (the ``.grad`` views must survive, so
    ``set_to_none`` is ignored). Parameters that got no gradient on some
    rank count as zero there. ``average_every``, ``zero`` and ``staleness``
    choose and configure the strategy (module docstring); options a strategy
    declares itself (e.g. gossip's ``gossip_graph``) are further keywords.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None,
                 topology: str = "ring", backward_passes_per_step: int = 1, comm: MPI.Comm | None = None,
                 overlap: bool | None = None, bucket_bytes: int | None = None, compression: str = "none",
                 on_nan: str = "abort", check_consistency_every: int = 0, average_every: int = 0,
                 staleness: int | None = 0, poll_interval: float | None = None, zero: bool = False,
                 **strategy_options: Any) -> None:
        if backward_passes_per_step < 1:
            raise UserError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
        if compression not in COMPRESSORS:
            raise UserError(f"unknown compression {compression!r}; choose from {', '.join(COMPRESSORS)}")
        if bucket_bytes is not None and bucket_bytes < 1:
            raise UserError(f"bucket_bytes must be positive, got {bucket_bytes}")
        if on_nan not in ("abort", "skip"):
            raise UserError(f"on_nan must be 'abort' or 'skip', got {on_nan!r}")
        if check_consistency_every < 0:
            raise UserError(f"check_consistency_every must be >= 0, got {check_consistency_every}")
        if average_every < 0:
            raise UserError(f"average_every must be >= 0, got {average_every}")
        if poll_interval is not None and not 0 <= poll_interval <= 1:
            raise UserError(f"poll_interval must be between 0 and 1 second, got {poll_interval}")
        if staleness is not None and staleness < 0:
            raise UserError(f"staleness must be >= 0 (or None for unbounded), got {staleness}")
        unknown = sorted(set(strategy_options) - set(strategies.OPTIONS))
        if unknown:
            raise UserError(f"DistributedOptimizer: unknown option {', '.join(unknown)}; strategies declare "
                            f"{', '.join(sorted(strategies.OPTIONS))}")
        self.strategy = strategies.select(topology, dict(
            overlap=overlap, bucket_bytes=bucket_bytes, compression=compression, poll_interval=poll_interval,
            backward_passes_per_step=backward_passes_per_step, check_consistency_every=check_consistency_every,
            average_every=average_every, staleness=staleness, zero=zero, **strategy_options))
        self._inner: torch.optim.Optimizer | None = None
        # Optimizer's own constructor sets up hooks; its throwaway groups never reach the wrapped optimizer.
        super().__init__([torch.zeros(0, requires_grad=True)], {})
        self._inner = optimizer
        self.topology, self.backward_passes_per_step = topology, backward_passes_per_step
        self.comm = MPI.COMM_WORLD if comm is None else comm
        groups = [(gi, p) for gi, g in enumerate(optimizer.param_groups) for p in g["params"] if p.requires_grad]
        self.params = [p for _, p in groups]
        self.group_of = [gi for gi, _ in groups]  # each parameter's group in the wrapped optimizer
        names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        self.names = [names.get(id(p), f"param.{i}") for i, p in enumerate(self.params)]
        self._check_same_layout()
        self.hosts = 1  # hosts the ranks span (strategies that communicate through collectives set it)
        self.on_nan, self.check_consistency_every = on_nan, check_consistency_every
        self._timeline = Timeline(None)
        self.skipped_steps: list[tuple[int, list[int]]] = []  # (step, ranks with non-finite gradients)
        self.step_count = 0
        self.wait_seconds = 0.0  # time step() spent waiting for communication (the exposed part)
        self._blocking_seconds = 0.0  # communication the optimizer waited for (synchronize, apply, after_step)
        self._synchronized = False
        self._local_finite: bool | guards.Combined | None = None
        self._should_sync = True
        self._flat_grads = self.strategy.flat_gradients(self)
        allocate = self.strategy.prepare(self)
        self._build_buffers(allocate)
        self.strategy.attach(self)

    def _build_buffers(self, allocate: Callable[[torch.dtype, int], torch.Tensor] | None) -> None:
        """Every parameter and gradient becomes a view into one flat buffer per dtype."""
        self._param_groups: list[_FlatGroup] = []
        self._grad_groups: list[_FlatGroup] = []
        self._grad_views: list[torch.Tensor] = [None] * len(self.params)  # type: ignore[list-item]
        self.spans: list[tuple[int, int, int]] = [(0, 0, 0)] * len(self.params)  # (buffer, lo, hi) per parameter
        for b, (dtype, idx) in enumerate(_grouped(self.params).items()):
            shapes = [self.params[i].shape for i in idx]
            pg = _FlatGroup(shapes, dtype)
            gg = _FlatGroup(shapes, dtype, allocate) if self._flat_grads else None
            for j, i in enumerate(idx):
                p = self.params[i]
                pg.view(j).copy_(p.detach())
                p.data = pg.view(j)
                self.spans[i] = (b, *pg.bounds[j])
                if gg is None:
                    continue
                if p.grad is not None:
                    gg.view(j).copy_(p.grad)
                p.grad = self._grad_views[i] = gg.view(j)
            self._param_groups.append(pg)
            if gg is not None:
                self._grad_groups.append(gg)

    def buffer_bytes(self) -> dict[torch.dtype, int]:
        """Bytes of each dtype's flat buffer (known before the buffers exist: for ``Strategy.prepare``)."""
        return {d: _layout([self.params[i].shape for i in idx], d)[1] * self.params[idx[0]].element_size()
                for d, idx in _grouped(self.params).items()}

    @property
    def gradient_views(self) -> list[torch.Tensor]:
        """Each parameter's gradient view of the flat buffer (empty without flat gradients)."""
        return list(self._grad_views) if self._flat_grads else []

    @property
    def grad_spans(self) -> list[tuple[torch.Tensor, int, int]]:
        """Where each parameter's gradient lives: (flat gradient buffer, lo, hi)."""
        return [(self._grad_groups[b].buffer, lo, hi) for b, lo, hi in self.spans]

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

    def packed_parameters(self) -> list[torch.Tensor]:
        """A copy of the parameters, one tensor per dtype in buffer order without the alignment padding (what
        a checkpoint holds and a digest covers: the same bytes whatever the padding)."""
        return [torch.cat([g.buffer[lo:hi] for lo, hi in sorted(g.bounds)]) for g in self._param_groups]

    def load_packed_parameters(self, packed: list[torch.Tensor]) -> None:
        """The inverse of ``packed_parameters``; raises ValueError if they are not this model's."""
        sizes = [(sum(hi - lo for lo, hi in g.bounds), g.buffer.dtype) for g in self._param_groups]
        if sizes != [(t.numel(), t.dtype) for t in packed]:
            raise ValueError(f"its parameters ({[(t.numel(), t.dtype) for t in packed]}) are not this model's "
                             f"({sizes})")
        with torch.no_grad():
            for g, t in zip(self._param_groups, packed):
                at = 0
                for lo, hi in sorted(g.bounds):
                    g.buffer[lo:hi].copy_(t[at:at + hi - lo])
                    at += hi - lo

    @property
    def gradient_buffers(self) -> list[torch.Tensor]:
        """The flat gradient buffers, or (a strategy without them, ``Strategy.flat_gradients``) the gradients."""
        if self._flat_grads:
            return [g.buffer for g in self._grad_groups]
        return [p.grad for p in self.params if p.grad is not None]

    def _check_same_layout(self) -> None:
        mine = hashlib.sha256(repr([(tuple(p.shape), str(p.dtype)) for p in self.params]).encode()).hexdigest()
        everyone = self.comm.allgather((len(self.params), mine))
        if any(e != everyone[0] for e in everyone):
            counts = ", ".join(f"rank {r}: {n} tensors" for r, (n, _) in enumerate(everyone))
            raise UserError(f"DistributedOptimizer: the ranks' models differ in parameter shapes ({counts})")

    @property
    def replicas_differ(self) -> bool:
        """Whether ranks may hold different parameters between steps (mixing, gossip, local SGD, ps)."""
        return self.strategy.replicas_differ

    def finish(self) -> None:
        """Collective, at the end of training: e.g. a parameter server's last updates land everywhere."""
        self.strategy.finish(self)

    @property
    def comm_seconds(self) -> float:
        """Seconds spent communicating (overlapped with backward or not)."""
        own = self.strategy.comm_seconds
        return own if own is not None else self._blocking_seconds

    @property
    def buckets(self) -> list[Any]:
        return self.strategy.buckets

    def reattach_grads(self, keep: frozenset[int] = frozenset()) -> None:
        """Put gradients that autograd made fresh (after ``zero_grad()``) or the user replaced into the flat
        buffer; ``.grad`` becomes a view of it again (except parameters in ``keep``, reduced where they lie)."""
        if not self._flat_grads:  # no buffer; a parameter without a gradient still counts as zero, as with one
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            return
        for i, (p, view) in enumerate(zip(self.params, self._grad_views)):
            g = p.grad
            if g is view or i in keep:
                continue
            if g is None:
                view.zero_()
            elif g.data_ptr() != view.data_ptr():
                view.copy_(g)
            p.grad = view

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's: ``.grad`` becomes None (default), or zero in place (``set_to_none=False``: then it stays
        a view of the flat buffer, and backward accumulates into it).

        With None, backward hands over fresh tensors (autograd keeps the first gradient it computes rather
        than adding it to zeros), which are copied into the flat buffer once, when they are combined: one
        pass over the gradients instead of zeroing and an accumulating add (measured in docs/performance.md).
        """
        if set_to_none:
            for p in self.params:
                p.grad = None
            return
        self._clear_grads()

    def _clear_grads(self) -> None:
        """Zero every gradient in place; with flat buffers, ``.grad`` is a view of them again."""
        if self._flat_grads:
            for g in self._grad_groups:
                g.buffer.zero_()
            for p, view in zip(self.params, self._grad_views):
                p.grad = view
        else:
            for p in self.params:
                if p.grad is not None:
                    p.grad.zero_()

    # -- communication
    @property
    def timeline(self) -> Any:
        return self._timeline

    @timeline.setter
    def timeline(self, value: Any) -> None:
        """A ``mpiml.timeline.Timeline``: waits and each bucket's allreduce appear in it."""
        self._timeline = value
        self.strategy.set_timeline(value)

    def synchronize(self) -> None:
        """Combine gradients across ranks as the strategy does (a no-op for those that exchange parameters)."""
        if not self.strategy.hooks_attach_gradients:
            self.reattach_grads()  # gradients into the flat buffer (no bucket hooks did it)
        start = time.perf_counter()
        self._local_finite = self.strategy.synchronize(self)
        waited = time.perf_counter() - start
        self.wait_seconds += waited
        self._blocking_seconds += waited
        self._synchronized = True

    def _gradients_ok(self) -> bool:
        """Decide whether this step's gradients may reach the parameters (see mpiml.guards): collectively,
        or on this rank alone for asynchronous strategies."""
        local = self._local_finite if self._local_finite is not None else guards.finite(self.gradient_buffers)
        size = self.comm.Get_size()
        if isinstance(local, guards.Combined):  # checked after combining: the same verdict on every rank
            if local.finite:
                return True
            bad = guards.agree_finite(local.local, self.comm, self.step_count)
        elif self.strategy.nan_scope == "local" or size == 1:
            if local:
                return True
            bad = [self.comm.Get_rank()]
            if self.on_nan == "abort" and size > 1:  # flushed and given time to reach the launcher first
                runtime.abort(2, f"mpiml: error: {guards.non_finite_message(bad, self.step_count, '')}"
                                 "aborting (--on-nan abort)", self.comm)
        else:
            bad = guards.agree_finite(local, self.comm, self.step_count)
            if not bad:
                return True
        if self.on_nan == "abort":
            raise guards.NonFiniteGradient(guards.non_finite_message(bad, self.step_count, "aborting (--on-nan abort)"))
        self.skipped_steps.append((self.step_count, bad))
        if self.comm.Get_rank() == 0 or self.strategy.nan_scope == "local":
            print("warning: " + guards.non_finite_message(bad, self.step_count, "step skipped"), flush=True)
        self._clear_grads()
        # An asynchronous strategy still takes part (its clocks advance) with zero gradients.
        return self.strategy.nan_scope == "local"

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
        if self._should_sync and not self._synchronized:
            self.synchronize()
        elif not self.strategy.hooks_attach_gradients:
            self.reattach_grads()
        self._synchronized = False
        ok = self._gradients_ok()
        self._local_finite = None
        if not ok:
            self.step_count += 1
            return loss
        start = time.perf_counter()
        with torch.no_grad():
            self.strategy.apply(self)
            after = time.perf_counter()
            self.strategy.after_step(self)
        exposed = time.perf_counter() - after + self.strategy.apply_wait(start, after)
        self.wait_seconds += exposed
        self._blocking_seconds += exposed
        self.step_count += 1
        # Only strategies whose replicas are identical honour check_consistency_every (the others refuse it).
        if self.check_consistency_every and self.step_count % self.check_consistency_every == 0:
            guards.check_consistency(self.parameter_buffers, self.comm, self.step_count - 1)
        return loss

    # -- checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        """This rank's optimizer state as the strategy keeps it (see ``Strategy.state``)."""
        return self.strategy.optimizer_state(self)

    def load_checkpoint_state(self, saved: list[dict[str, Any]]) -> None:
        """Restore from a checkpoint's optimizer states: [the one], [this rank's], or every saved shard."""
        self.strategy.load_optimizer_state(self, saved)

    def close(self) -> None:
        """Stop the strategy's threads and remove its hooks (an optimizer that is not used any more)."""
        self.strategy.close()
