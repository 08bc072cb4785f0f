"""Decentralised gossip SGD (D-PSGD, Lian et al., NeurIPS 2017): after each local step, average with neighbours.

    --topology gossip [--gossip-graph exponential|ring]

Every rank steps on its own gradient, then replaces its parameters by the
plain average of its own and its neighbours' in a fixed graph:

- ``ring``: both ring neighbours, r - 1 and r + 1 (mod K), weights 1/3 each
  (K = 2: the one other rank, 1/2);
- ``exponential`` (default): the one-peer exponential graph (Ying et al.,
  NeurIPS 2021): at step t rank r sends to r + 2^j and receives from
  r - 2^j (mod K), j = t mod ceil(lg K), weights 1/2. One message per step
  instead of two, and consensus in lg K steps for K a power of two.

Both mixing matrices are doubly stochastic (every rank receives from as
many as it sends to, with equal weights), so the average of the replicas
is what synchronous SGD on their mean would give, and the replicas are
drawn together every step. No global synchronisation: each rank waits only
for its neighbours. ``compression`` sends the parameters as fp16/bf16.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .. import mixing
from ..runtime import UserError
from .base import PER_RANK, Option, Strategy

if TYPE_CHECKING:
    from ..optimizer import DistributedOptimizer

__all__ = ["Gossip", "GRAPHS", "peers"]

GRAPHS = ("exponential", "ring")


def peers(graph: str, rank: int, size: int, step: int) -> list[tuple[int, int]]:
    """(send to, receive from) pairs of ``rank`` at ``step`` in ``graph``."""
    if size < 2:
        return []
    if graph == "ring":
        right, left = (rank + 1) % size, (rank - 1) % size
        return [(right, left)] if size == 2 else [(right, left), (left, right)]
    shift = 1 << (step % (size - 1).bit_length())
    return [((rank + shift) % size, (rank - shift) % size)]


class Gossip(Strategy):
    name = "gossip"
    summary = "decentralised: average parameters with graph neighbours after every step (D-PSGD)"
    topologies = ("gossip",)
    options = frozenset({"gossip_graph", "compression", "backward_passes_per_step"})
    declares = (Option("gossip_graph", "--gossip-graph", "exponential",
                       "gossip: average with one peer 2^j away, j cycling, or with both ring neighbours",
                       choices=GRAPHS),)
    replicas_differ = True
    state = PER_RANK

    def __init__(self, algorithm: str, settings: dict[str, Any]) -> None:
        super().__init__(algorithm, settings)
        self.graph = self.settings["gossip_graph"]
        if self.graph not in GRAPHS:
            raise UserError(f"gossip_graph must be one of {', '.join(GRAPHS)}, got {self.graph!r}")
        self.scratch: list[np.ndarray] = []

    def after_step(self, opt: DistributedOptimizer) -> None:
        pairs = peers(self.graph, opt.comm.Get_rank(), opt.comm.Get_size(), opt.step_count)
        if pairs:
            with opt.timeline.span("gossip parameters", "comm"):
                mixing.average_with(opt.parameter_buffers, opt.comm, pairs, self.scratch,
                                    self.settings["compression"])


STRATEGY = Gossip
