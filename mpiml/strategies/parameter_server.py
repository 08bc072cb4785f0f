"""The parameter server: every rank a worker and the server of one shard, with bounded staleness.

    --topology ps --staleness 2        DistributedOptimizer(opt, model, topology="ps", staleness=2)

Each step the worker pushes its gradient to the servers and pulls the
parameters, at most ``staleness`` steps stale (0: synchronous, None / 'inf':
fully asynchronous); the servers step the user's optimizer on their shards
(``mpiml.ps``). Whether a gradient is finite is decided on each rank alone
(a collective would undo the asynchrony): a non-finite one aborts the job
or, with ``on_nan="skip"``, is replaced by zeros so the clocks still advance.
Checkpoints are not supported: the servers' state lives on their threads.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .. import traffic
from ..runtime import UserError
from .base import PER_RANK, Strategy

if TYPE_CHECKING:
    from ..optimizer import DistributedOptimizer

__all__ = ["ParameterServerStrategy"]


class ParameterServerStrategy(Strategy):
    name = "ps"
    summary = "parameter server: push gradients, pull parameters within a staleness bound"
    topologies = ("ps",)
    options = frozenset({"staleness", "backward_passes_per_step"})
    replicas_differ = True
    state = PER_RANK
    nan_scope = "local"
    checkpoints = False

    @classmethod
    def plan_step(cls, costs: Any, algorithms: list[str]) -> list[tuple[str, float]]:
        """Push each server its shard of the gradient, then pull every shard of the parameters."""
        return [("ps", costs.compute + costs.alltoall(costs.nbytes, True) + costs.alltoall(costs.nbytes, False))]

    def __init__(self, algorithm: str, settings: dict[str, Any]) -> None:
        super().__init__(algorithm, settings)
        self.server: Any = None
        self._waited = 0.0

    @property
    def average_at_end(self) -> bool:
        return False  # after finish() every rank holds the servers' final parameters

    def attach(self, opt: DistributedOptimizer) -> None:
        from ..ps import ParameterServer
        if len(opt.parameter_buffers) != 1:
            raise UserError("--topology ps needs parameters of one floating-point dtype (the servers' shards "
                            "are cut from one flat buffer)")
        try:
            self.server = ParameterServer(opt.parameter_buffers[0], opt.comm, self.settings["staleness"],
                                          optimizer=opt.optimizer, spans=opt.spans, group_of=opt.group_of)
        except (TypeError, ValueError) as e:
            raise UserError(f"--topology ps: {e}") from None

    def apply(self, opt: DistributedOptimizer) -> None:
        grads = opt.gradient_buffers[0]
        start = time.perf_counter()
        self.server.push(grads)
        self.server.pull()
        k = opt.comm.Get_size()
        traffic.add(2 * grads.numel() * grads.element_size() * (k - 1) / k)  # pushes out, replies from servers
        self._waited = time.perf_counter() - start

    def apply_wait(self, start: float, end: float) -> float:
        return self._waited

    def finish(self, opt: DistributedOptimizer) -> None:
        if self.server is not None:
            self.server.finish()
            self.server = None

    def optimizer_state(self, opt: DistributedOptimizer) -> dict[str, Any]:
        raise UserError("--topology ps keeps the optimizer state on its server threads; checkpoints are not "
                        "supported with it (use an exact topology, butterfly-mixing, gossip or --average-every)")


STRATEGY = ParameterServerStrategy
