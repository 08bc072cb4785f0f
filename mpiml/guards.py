"""Guards against numbers that went wrong and replicas that drifted apart.

- ``finite(buffers)``: whether this rank's gradients are all finite (one
  vectorised sum; an element-wise check only when that sum overflows).
- ``agree_finite(ok, comm, step)``: a collective decision (one tiny
  allreduce): the ranks whose gradients were not finite, identical on every
  rank, so every rank skips or aborts the same step before anything
  non-finite reaches a parameter.
- ``check_consistency(buffers, comm, step)``: CRC-32 of each rank's
  parameters, compared across ranks; raises ``ReplicasDiverged`` naming the
  step and which ranks hold which fingerprint.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from mpi4py import MPI

from . import collectives
from .runtime import UserError

__all__ = ["NonFiniteGradient", "ReplicasDiverged", "finite", "agree_finite", "check_consistency", "Combined"]


class NonFiniteGradient(UserError):
    """A gradient held NaN or Inf; raised on every rank, naming the ranks and the step."""


class ReplicasDiverged(UserError):
    """Ranks hold different parameters where an exact topology promises identical ones."""


class Combined(NamedTuple):
    """What a strategy that checked the *combined* gradients found: identical on every rank (they hold the
    same bits), so no vote is needed when ``finite``. If not, ``local`` says whether this rank's own
    gradients were finite (to name the culprits; True where they could not be checked)."""

    finite: bool
    local: bool = True


def all_finite(buffer: torch.Tensor) -> bool:
    """No NaN or Inf in ``buffer``: one vectorised sum (NaN and Inf survive it); only if that sum
    overflows is every element checked, so huge but finite values are not mistaken for Inf."""
    return bool(torch.isfinite(buffer.sum())) or bool(torch.isfinite(buffer).all())


def finite(buffers: Sequence[torch.Tensor]) -> bool:
    return all(all_finite(b) for b in buffers if b.numel())


def agree_finite(ok: bool, comm: MPI.Comm, step: int) -> list[int]:
    """Ranks whose gradients were not finite at ``step`` (the same list on every rank; empty if none)."""
    flag = np.array([1 if ok else 0], dtype=np.int32)
    # butterfly (a point-to-point exchange per stage), not the library's: it runs beside its agreement check
    collectives.allreduce(flag, op="min", algorithm="butterfly", comm=comm, name=f"finite gradients step {step}")
    if flag[0] == 1:
        return []
    flags = collectives.allgather(np.array([1 if ok else 0], dtype=np.int32), algorithm="mpi", comm=comm)
    return [r for r, f in enumerate(flags.tolist()) if f == 0]


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))}"


def non_finite_message(bad: list[int], step: int, action: str) -> str:
    if not bad:
        return (f"non-finite averaged gradient (NaN or Inf) at step {step}, though no rank's own gradient was "
                f"found non-finite (their sum overflowed, or gradients accumulated in place left nothing to "
                f"check); {action}")
    return f"non-finite gradient (NaN or Inf) at step {step} on {_ranks(bad)}; {action}"


def check_consistency(buffers: Sequence[torch.Tensor], comm: MPI.Comm, step: int) -> None:
    crc = 0
    for b in buffers:
        crc = zlib.crc32(b.detach().contiguous().view(torch.uint8).numpy(), crc)
    crcs = comm.allgather(crc)
    if len(set(crcs)) > 1:
        groups: dict[int, list[int]] = {}
        for r, c in enumerate(crcs):
            groups.setdefault(c, []).append(r)
        detail = "; ".join(f"{_ranks(rs)} hold{'' if len(rs) > 1 else 's'} parameters with CRC {c:08x}"
                           for c, rs in groups.items())
        raise ReplicasDiverged(f"replicas diverged by step {step}: {detail}")
