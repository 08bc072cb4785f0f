"""Butterfly mixing (Zhao and Canny, SDM 2013): after each local step, average with one partner.

    --topology butterfly-mixing

At step t rank r averages its parameters with rank ``r XOR 2**(t mod L)``
(L = ceil(lg K)); a rank whose partner would be K or more sits the stage out
(``mpiml.mixing``). One message of the model's size per step, no global
synchronisation. With ``compression`` the parameters travel as fp16/bf16
and each rank averages its own full-precision copy with its partner's
rounded one (partners then differ by the rounding; the replicas' drift
shows it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import mixing
from .base import PER_RANK, Strategy

if TYPE_CHECKING:
    from ..optimizer import DistributedOptimizer

__all__ = ["ButterflyMixing"]


class ButterflyMixing(Strategy):
    name = "butterfly-mixing"
    summary = "decentralised: average parameters with one butterfly partner after every step"
    topologies = ("butterfly-mixing",)
    options = frozenset({"compression", "backward_passes_per_step"})
    replicas_differ = True
    state = PER_RANK

    @classmethod
    def plan_step(cls, costs: Any, algorithms: list[str]) -> list[tuple[str, float]]:
        """One whole-model exchange with the stage's partner per step, averaged over the L stages."""
        p = costs.layout.size
        stages = mixing.stages(p)
        if not stages:
            return [("butterfly-mixing", costs.compute)]
        each = [costs.exchange(costs.nbytes, lambda r, s=s: mixing.partner_for_step(r, p, s)) for s in range(stages)]
        return [("butterfly-mixing", costs.compute + sum(each) / stages)]

    def __init__(self, algorithm: str, settings: dict[str, Any]) -> None:
        super().__init__(algorithm, settings)
        self.scratch: list[np.ndarray] = []

    def after_step(self, opt: DistributedOptimizer) -> None:
        if opt.comm.Get_size() > 1:
            with opt.timeline.span("mix parameters", "comm"):
                mixing.mix(opt.parameter_buffers, opt.comm, opt.step_count, self.scratch,
                           self.settings["compression"])


STRATEGY = ButterflyMixing
