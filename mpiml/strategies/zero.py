"""Sharded optimizer state (ZeRO stage 1): each rank keeps and updates only its shard of the model.

    --topology ring --zero         DistributedOptimizer(opt, model, topology="ring", zero=True)

Each flat gradient buffer is **reduce-scattered** through the chosen exact
algorithm: rank r ends with the average of everyone's gradients on its
segment ``chunk_bounds(n, K)[r:r + 2]``, the same values an allreduce would
give there (ring's allreduce *is* its reduce-scatter followed by its
allgather). Rank r then steps **the user's own optimizer class**, with the
same parameter groups' hyper-parameters, on that segment only
(``mpiml.sharding``): momentum, Adam's moments and the like exist for 1/K of
the parameters per rank. Then the updated segments are **allgathered**, in
place, so every rank again holds the whole model. For element-wise
optimizers (SGD, Adam, AdamW, RMSprop...) that is bitwise equal to
synchronous training over the same algorithm *when synchronous training
reduces the gradients as one bucket* (``bucket_bytes`` at least the
model's size); with smaller buckets ring sums each element in an order that
depends on where it falls in its bucket, so at K >= 3 the two differ in the
last bits (measured: docs/strategies_results.md).

Why an option on an exact topology rather than a topology of its own: the
sharding composes with every exact algorithm (ring, tree, butterfly, mpi,
hier, auto each provide reduce-scatter and allgather), just as local SGD's
``--average-every`` does, and the choice of algorithm stays where users
already make it.

Communication per step: a reduce-scatter plus an allgather moves the same
bytes as one ring allreduce, 2n(K-1)/K per rank. Gradients are combined
after backward, in one reduce-scatter per buffer (no overlap with backward:
``--overlap`` and ``--bucket-bytes`` are refused). Gradient memory is not
sharded (that would be ZeRO-2); the optimizer state is.

Checkpoints hold the model once (rank 0's, identical everywhere) and every
rank's state shard with the elements it covers, so ``--resume`` at another
K reassembles each new shard from the old ones (``load_shard_states``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .. import collectives, guards
from ..runtime import UserError
from ..sharding import load_shard_states, shard_optimizer, shard_pieces, shard_state, sync_hyperparameters
from .base import SHARDED, Strategy
from .hooks import compressed, reduce_scatter_hook
from .synchronous import exact_comm

if TYPE_CHECKING:
    from ..optimizer import DistributedOptimizer

__all__ = ["ShardedState"]


class ShardedState(Strategy):
    name = "zero"
    summary = "synchronous SGD with the optimizer state sharded across ranks (ZeRO-1)"
    mode_option = "zero"
    options = frozenset({"zero", "compression", "backward_passes_per_step", "poll_interval",
                         "check_consistency_every"})
    state = SHARDED

    @classmethod
    def plan_step(cls, costs: Any, algorithms: list[str]) -> list[tuple[str, float]]:
        """Reduce-scatter of gradients plus all-gather of parameters: a ring allreduce's bytes and messages."""
        return [("zero ring", costs.compute + costs.allreduce(costs.nbytes, "ring"))]

    def __init__(self, algorithm: str, settings: dict[str, Any]) -> None:
        super().__init__(algorithm, settings)
        self.comm: Any = None
        self.poll = 0.0
        self.shard: Any = None
        self.pieces: list[Any] = []
        self._gathered = 0.0

    def prepare(self, opt: DistributedOptimizer) -> None:
        if opt.comm.Get_size() > 1:
            self.comm, layout, self.poll = exact_comm(opt, self.settings["poll_interval"])
            opt.hosts = layout.hosts
        return None

    def attach(self, opt: DistributedOptimizer) -> None:
        k, r = opt.comm.Get_size(), opt.comm.Get_rank()
        shards = []
        for buf in opt.parameter_buffers:
            bounds = collectives.chunk_bounds(buf.numel(), k)
            shards.append((bounds[r], bounds[r + 1]))
        self.pieces = shard_pieces(opt.spans, shards)
        params, grads = opt.parameter_buffers, opt.gradient_buffers
        try:
            self.shard = shard_optimizer(opt.optimizer, opt.group_of, self.pieces,
                                         lambda pc: params[pc.buffer][pc.lo:pc.hi],
                                         lambda pc: grads[pc.buffer][pc.lo:pc.hi])
        except ValueError as e:
            raise UserError(f"--zero: {e}") from None
        # The full optimizer keeps its groups (schedulers change them) but no state: it never steps.
        opt.optimizer.state.clear()
        if self.comm is not None:
            self.hook = compressed(reduce_scatter_hook(self.algorithm, self.comm, self.poll),
                                   self.settings["compression"], k)

    def synchronize(self, opt: DistributedOptimizer) -> bool | None:
        finite = guards.finite(opt.gradient_buffers)  # this rank's own gradients, before they are combined
        if self.comm is not None:
            with opt.timeline.span("reduce-scatter gradients", "comm"):
                for i, g in enumerate(opt.gradient_buffers):
                    self.hook(g, "mean", f"gradients step {opt.step_count} buffer {i}")
        return finite

    def apply(self, opt: DistributedOptimizer) -> None:
        sync_hyperparameters(opt.optimizer, self.shard)
        self.shard.step()
        started = time.perf_counter()
        if self.comm is not None:
            with opt.timeline.span("allgather parameters", "comm"):
                for i, p in enumerate(opt.parameter_buffers):
                    collectives.allgather_inplace(p.detach(), algorithm=self.algorithm, comm=self.comm,
                                                  name=f"parameters step {opt.step_count} buffer {i}")
        self._gathered = time.perf_counter() - started

    def apply_wait(self, start: float, end: float) -> float:
        return self._gathered

    def optimizer_state(self, opt: DistributedOptimizer) -> dict[str, Any]:
        return {"param_groups": opt.optimizer.state_dict()["param_groups"], "shard": shard_state(self.shard,
                                                                                                 self.pieces)}

    def load_optimizer_state(self, opt: DistributedOptimizer, saved: list[dict[str, Any]]) -> None:
        groups = saved[0]["param_groups"]
        if len(groups) != len(opt.optimizer.param_groups):
            raise ValueError(f"the checkpoint has {len(groups)} parameter groups, this optimizer "
                             f"{len(opt.optimizer.param_groups)}")
        for mine, theirs in zip(opt.optimizer.param_groups, groups, strict=True):
            mine.update({k: v for k, v in theirs.items() if k != "params"})
        load_shard_states(self.shard, self.pieces, [s["shard"] for s in saved])


STRATEGY = ShardedState
