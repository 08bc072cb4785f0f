"""Local SGD (periodic model averaging): local steps, parameters averaged exactly every H steps.

    --topology ring --average-every 4      DistributedOptimizer(opt, model, topology="ring", average_every=4)

Each rank steps on its own gradients; after every H-th step the parameters
are averaged through the exact algorithm named by ``--topology``, so all
replicas are identical again. Optimizer state (momentum, Adam's moments)
stays local to each rank. For SGD with momentum and H = 1 this is
synchronous SGD (the update is linear in the gradient, so averaging
parameters after the step equals stepping on averaged gradients, momentum
buffers included); with Adam it is not.

With ``compression`` the ranks exchange, compressed, how far each moved
since the last averaging (parameters minus the anchor every rank shares),
not the parameters themselves: fp16 then rounds the H steps' change, not
the weights, and every rank still ends bitwise identical (anchor plus the
same averaged change). The anchor is kept only with compression, and saved
in checkpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .base import PER_RANK, Strategy
from .hooks import allreduce_hook, compressed
from .synchronous import exact_comm

if TYPE_CHECKING:
    from ..optimizer import DistributedOptimizer

__all__ = ["LocalSGD"]


class LocalSGD(Strategy):
    name = "local-sgd"
    summary = "local SGD: local steps, parameters averaged exactly every H steps"
    mode_option = "average_every"
    options = frozenset({"average_every", "compression", "backward_passes_per_step", "poll_interval"})
    replicas_differ = True
    state = PER_RANK

    @classmethod
    def plan_step(cls, costs: Any, algorithms: list[str]) -> list[tuple[str, float]]:
        """One exact allreduce of the parameters every H steps (the ring, as the CLI's default)."""
        return [(f"local-sgd H={h} ring", costs.compute + costs.allreduce(costs.nbytes, "ring") / h) for h in (4, 16)]

    def __init__(self, algorithm: str, settings: dict[str, Any]) -> None:
        super().__init__(algorithm, settings)
        self.every = int(self.settings["average_every"])
        self.comm: Any = None
        self.anchor: list[torch.Tensor] | None = None

    def prepare(self, opt: DistributedOptimizer) -> None:
        if opt.comm.Get_size() > 1:
            self.comm, layout, poll = exact_comm(opt, self.settings["poll_interval"])
            opt.hosts = layout.hosts
            self.hook = compressed(allreduce_hook(self.algorithm, self.comm, poll), self.settings["compression"],
                                   opt.comm.Get_size())
        return None

    def synchronize(self, opt: DistributedOptimizer) -> bool | None:
        # The anchor is taken at the first step, once the caller has broadcast rank 0's parameters.
        if self.anchor is None and self.comm is not None and self.settings["compression"] != "none":
            self.anchor = [b.detach().clone() for b in opt.parameter_buffers]
        return None

    def after_step(self, opt: DistributedOptimizer) -> None:
        if self.comm is None or (opt.step_count + 1) % self.every:
            return
        with opt.timeline.span("average parameters", "comm"):
            for i, buf in enumerate(opt.parameter_buffers):
                name = f"parameters step {opt.step_count} buffer {i}"
                if self.anchor is None:
                    self.hook(buf, "mean", name)
                    continue
                delta = buf - self.anchor[i]
                self.hook(delta, "mean", name)
                buf.copy_(self.anchor[i].add_(delta))

    def optimizer_state(self, opt: DistributedOptimizer) -> dict[str, Any]:
        state = opt.optimizer.state_dict()
        return state if self.anchor is None else {**state, "mpiml_anchor": [a.clone() for a in self.anchor]}

    def load_optimizer_state(self, opt: DistributedOptimizer, saved: list[dict[str, Any]]) -> None:
        state = dict(saved[0])
        anchor = state.pop("mpiml_anchor", None)
        opt.optimizer.load_state_dict(state)
        if anchor is not None and self.settings["compression"] != "none":
            self.anchor = [a.clone() for a in anchor]


STRATEGY = LocalSGD
