"""Butterfly mixing (Zhao and Canny, SDM 2013): after each local step, average with one partner.

At step t, with L = ceil(lg K) stages, rank r averages its parameters with
rank ``r XOR 2**(t mod L)``. For K a power of two this is the butterfly: after
L steps every replica has mixed with every other. For any other K our rule
is: **a rank whose partner would be K or more sits the stage out** (keeps its
parameters). Every stage is then a doubly-stochastic averaging of the
replicas, so the average of all replicas is unchanged by mixing, and the
pairs used over L stages connect all K ranks (clearing one bit at a time
leads from any r < K to rank 0 without leaving range(K)), so repeated mixing
drives the replicas to consensus. One message of n bytes per step, no
global synchronisation: a slow rank delays only its partner.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from . import collectives, traffic

__all__ = ["stages", "partner_for_step", "mix", "replica_drift", "average_replicas"]


def stages(size: int) -> int:
    """L = ceil(lg K): stages in one butterfly round (0 for a single rank)."""
    return (size - 1).bit_length()


def partner_for_step(rank: int, size: int, step: int) -> int | None:
    """The rank to average with at ``step``, or None when this rank sits the stage out."""
    if size < 2:
        return None
    partner = rank ^ (1 << (step % stages(size)))
    return partner if partner < size else None


def mix(buffers: Sequence[torch.Tensor], comm: MPI.Comm, step: int, scratch: list[np.ndarray]) -> None:
    """Average every buffer with this step's partner, in place (both partners end bitwise equal)."""
    partner = partner_for_step(comm.Get_rank(), comm.Get_size(), step)
    if partner is None:
        return
    while len(scratch) < len(buffers):
        scratch.append(np.empty(0, dtype=np.uint8))
    for i, buf in enumerate(buffers):
        mine = buf.detach().numpy()
        if scratch[i].dtype != mine.dtype or scratch[i].size != mine.size:
            scratch[i] = np.empty_like(mine)
        comm.Sendrecv(mine, partner, 11, scratch[i], partner, 11)
        traffic.add(mine.nbytes)
        np.add(mine, scratch[i], out=mine)  # a + b == b + a bitwise, and halving is exact
        mine *= 0.5


def replica_drift(buffers: Sequence[torch.Tensor], comm: Any) -> float:
    """max over ranks of ||theta_r - mean theta|| / ||mean theta|| (0 when all replicas agree)."""
    mine = torch.cat([b.detach().reshape(-1).double() for b in buffers]) if buffers else torch.zeros(0)
    mean = mine.clone()
    collectives.allreduce(mean, op="mean", algorithm="mpi", comm=comm)
    local = float(torch.linalg.vector_norm(mine - mean)) / max(float(torch.linalg.vector_norm(mean)), 1e-30)
    return comm.allreduce(local, op=MPI.MAX)


def average_replicas(buffers: Sequence[torch.Tensor], comm: Any, algorithm: str = "ring") -> None:
    """Replace every replica by the exact average of all of them (identical on every rank afterwards)."""
    for buf in buffers:
        collectives.allreduce(buf, op="mean", algorithm=algorithm, comm=comm)
