"""Synchronous SGD: gradients averaged exactly through one collective algorithm before every step.

Gradients are cut into buckets of about ``bucket_bytes`` (reverse parameter
order) and each bucket goes through the communication hook (an allreduce,
wrapped by compression when asked for) as soon as backward has produced it,
on a communication thread when ``overlap`` (``mpiml.buckets``). Without
overlap, buckets only split the work, so by default they are large
(``SYNC_BUCKET_BYTES``: one collective for a model up to 64 MiB); with it,
parameters of ``ALONE_BYTES`` or more are buckets of their own, combined where
backward left their gradient. With
``--topology hier`` the gradient buffers live in the host's shared-memory
window, so the hierarchical allreduce reduces them in place. Every replica
ends each step bitwise identical.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .. import collectives, guards
from ..buckets import GradientBuckets
from .base import DEFAULT_BUCKET_BYTES, REPLICATED, SYNC_BUCKET_BYTES, Strategy
from .hooks import allreduce_hook, compressed

if TYPE_CHECKING:
    from ..optimizer import DistributedOptimizer

__all__ = ["Synchronous", "NETWORK_POLL_SECONDS", "spare_core", "exact_comm"]

# Between tests of a message that crosses a network: a 256 KiB chunk takes 2 ms on a 1 Gbit/s link.
NETWORK_POLL_SECONDS = 50e-6
# A parameter this large is a bucket of its own, combined where backward left its gradient (no copy into the
# flat buffer); smaller ones are coalesced into buckets, where one collective's fixed cost is shared.
ALONE_BYTES = 1 << 20


def spare_core(local_size: int) -> bool:
    """Whether a communication thread would get a core of its own: more cores than busy threads on this host.

    On one host overlap only pays when it does: where every core is computing, a thread that
    busy-polls shared memory takes its time from backward (measured in the README)."""
    return (os.cpu_count() or 1) > local_size * torch.get_num_threads()


def exact_comm(opt: DistributedOptimizer, poll_interval: float | None) -> tuple[Any, Any, float]:
    """A duplicate of the optimizer's communicator for its collectives (the caller's own collectives on
    ``comm`` can then never meet them, even while buckets are in flight), how its ranks sit on hosts
    (collective, cached on it), and how waits poll: across hosts, messages cross a network, so waits
    test and sleep instead of spinning and the CPU goes to backward and TCP (docs/cluster.md)."""
    comm = opt.comm.Dup()
    layout = collectives.hier.topology(collectives.private_comm(comm))
    poll = (NETWORK_POLL_SECONDS if layout.hosts > 1 else 0.0) if poll_interval is None else poll_interval
    return comm, layout, poll


class Synchronous(Strategy):
    name = "sync"
    summary = "synchronous SGD, gradients averaged exactly before every step"
    options = frozenset({"overlap", "bucket_bytes", "compression", "backward_passes_per_step", "poll_interval",
                         "check_consistency_every"})
    state = REPLICATED

    @classmethod
    def plan_step(cls, costs: Any, algorithms: list[str]) -> list[tuple[str, float]]:
        """Gradients combined after backward, or in buckets during it, or at 16 bits on the wire."""
        rows = []
        for a in algorithms:
            rows.append((f"sync {a}", costs.compute + costs.allreduce(costs.nbytes, a)))
            rows.append((f"sync {a} overlap", costs.overlapped(a, DEFAULT_BUCKET_BYTES)))
            rows.append((f"sync {a} fp16", costs.compute + costs.convert(costs.nbytes)
                         + costs.allreduce(costs.nbytes // 2, a)))
        return rows

    def __init__(self, algorithm: str, settings: dict[str, Any]) -> None:
        super().__init__(algorithm, settings)
        self.engine: GradientBuckets | None = None
        self.comm: Any = None
        self.layout: Any = None
        self.poll = 0.0

    def flat_gradients(self, opt: DistributedOptimizer) -> bool:
        return opt.comm.Get_size() > 1  # one rank sends nothing: no buffer to gather gradients into

    def prepare(self, opt: DistributedOptimizer) -> Callable[[torch.dtype, int], torch.Tensor] | None:
        if opt.comm.Get_size() == 1:
            return None
        self.comm, self.layout, self.poll = exact_comm(opt, self.settings["poll_interval"])
        opt.hosts = self.layout.hosts
        return self._shared_allocator(opt) if self.algorithm == "hier" else None

    def _shared_allocator(self, opt: DistributedOptimizer) -> Callable[[torch.dtype, int], torch.Tensor]:
        """Gradient buffers inside the host's shared window, so ``hier`` reduces them in place, copy-free."""
        sizes = opt.buffer_bytes()
        arena = collectives.hier.SharedArena(collectives.private_comm(self.comm),
                                             sum(-(-b // 64) * 64 for b in sizes.values()))
        offsets: dict[torch.dtype, int] = {}
        at = 0
        for d, nbytes in sizes.items():
            offsets[d] = at
            at += -(-nbytes // 64) * 64
        self.arena = arena

        def allocate(dtype: torch.dtype, count: int) -> torch.Tensor:
            return arena.tensor(dtype, offsets[dtype], count)
        return allocate

    def attach(self, opt: DistributedOptimizer) -> None:
        if self.comm is None:
            return
        collectives.private_comm(opt.comm)  # made here, not on the communication thread
        overlap = self.settings["overlap"]
        hook = compressed(allreduce_hook(self.algorithm, self.comm, self.poll), self.settings["compression"],
                          opt.comm.Get_size())
        overlap = spare_core(self.layout.local_size) if overlap is None else overlap
        bucket_bytes = self.settings["bucket_bytes"] or (DEFAULT_BUCKET_BYTES if overlap else SYNC_BUCKET_BYTES)
        # Lone buckets only where buckets start during backward (measured: without overlap, one collective
        # and a copy beat several collectives), and not for hier, which reduces inside its shared window.
        alone = ALONE_BYTES if overlap and self.algorithm != "hier" else None
        self.engine = GradientBuckets(opt.params, opt.grad_spans, bucket_bytes, hook, overlap,
                                      opt.backward_passes_per_step, alone_bytes=alone)

    def synchronize(self, opt: DistributedOptimizer) -> guards.Combined | None:
        if self.engine is None:
            return None
        own = [p.grad for p in opt.params]  # fresh gradients, still this rank's own after the copy below
        opt.reattach_grads(keep=self.engine.in_place)
        self.engine.flush()
        with opt.timeline.span("wait for gradients", "comm"):
            self.engine.wait()
        # An exact allreduce leaves the same bits everywhere, so one check of the combined gradients (hot in
        # cache, just written) decides for every rank: no check of each rank's own first, and no vote.
        verdict = guards.Combined(True)
        if not self.engine.combined_finite():  # rare: which ranks' own gradients were not finite?
            in_buffer = {id(v) for v in opt.gradient_views}
            verdict = guards.Combined(False, guards.finite([g for g in own if g is not None and id(g) not in
                                                            in_buffer and not self._combined_in_place(g)]))
        self.engine.reset()
        return verdict

    def _combined_in_place(self, g: torch.Tensor) -> bool:
        """Whether ``g`` is a lone bucket's gradient, combined where it lay (no longer this rank's own)."""
        return any(b.target is not None and b.target.data_ptr() == g.data_ptr() for b in self.engine.buckets)

    @property
    def comm_seconds(self) -> float | None:
        return self.engine.comm_seconds if self.engine is not None else 0.0

    @property
    def hooks_attach_gradients(self) -> bool:
        return self.engine is not None

    @property
    def buckets(self) -> list[Any]:
        return self.engine.buckets if self.engine is not None else []

    def set_timeline(self, timeline: Any) -> None:
        if self.engine is not None:
            self.engine.timeline = timeline

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


STRATEGY = Synchronous
