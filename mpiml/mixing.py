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
from .compression import compressor

__all__ = ["stages", "partner_for_step", "mix", "average_with", "replica_drift", "average_replicas"]


def stages(size: int) -> int:
    """L = ceil(lg K): stages in one butterfly round (0 for a single rank)."""
    return (size - 1).bit_length()


def partner_for_step(rank: int, size: int, step: int) -> int | None:
    """The rank to average with at ``step``, or None when this rank sits the stage out."""
    if size < 2:
        return None
    partner = rank ^ (1 << (step % stages(size)))
    return partner if partner < size else None


def mix(buffers: Sequence[torch.Tensor], comm: MPI.Comm, step: int, scratch: list[np.ndarray],
        compression: str = "none") -> None:
    """Average every buffer with this step's partner, in place (both partners end bitwise equal, unless
    the parameters travel compressed: then each averages its own with the partner's rounded copy)."""
    partner = partner_for_step(comm.Get_rank(), comm.Get_size(), step)
    if partner is not None:
        average_with(buffers, comm, [(partner, partner)], scratch, compression)


def average_with(buffers: Sequence[torch.Tensor], comm: MPI.Comm, peers: Sequence[tuple[int, int]],
                 scratch: list[np.ndarray], compression: str = "none") -> None:
    """Replace each buffer by the plain average of itself and what ``peers`` send, in place.

    ``peers`` is a list of (send to, receive from) pairs, one exchange each, in that order (every rank
    must list the matching pairs: a rank that sends to r must be in r's list as the source). The sum is
    taken in a fixed order, own buffer first, so the result is reproducible bit for bit; with two
    parties (one pair) both partners get the same bits (a + b == b + a, and halving is exact).
    ``compression`` ("fp16", "bf16") sends the buffers in that dtype (``mpiml.compression``); ``scratch``
    keeps the receive buffers from call to call."""
    c = compressor(compression)
    need = len(buffers) * len(peers)
    while len(scratch) < need:
        scratch.append(np.empty(0, dtype=np.uint8))
    for i, buf in enumerate(buffers):
        wire, ctx = c.compress(buf.detach())
        out = _bits(wire)
        received = []
        for j, (to, frm) in enumerate(peers):
            slot = i * len(peers) + j
            if scratch[slot].dtype != out.dtype or scratch[slot].size != out.size:
                scratch[slot] = np.empty_like(out)
            comm.Sendrecv(out, to, 11, scratch[slot], frm, 11)
            traffic.add(out.nbytes)
            received.append(scratch[slot])
        mine = buf.detach().numpy()
        for r in received:
            mine += r if ctx is None else c.decompress(torch.from_numpy(r).view(wire.dtype), ctx).numpy()
        mine *= 1.0 / (1 + len(received))  # 1/2 is exactly 0.5: two partners get the same bits


def _bits(t: torch.Tensor) -> np.ndarray:
    """A tensor's memory as numpy (bfloat16, which numpy lacks, as int16: only moved, never computed on)."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


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
