"""Communication hooks: how a gradient bucket (or a parameter buffer) is combined across ranks.

As DDP's comm hooks, a hook is a function ``hook(tensor, op, name)`` that
combines ``tensor`` across the ranks, in place: ``op`` is "mean" or "sum";
``name`` says which step and bucket it is, so a rank that skipped a step is
caught by the collectives' agreement check. Hooks compose:

    allreduce_hook("ring", comm)                          # exact mean, in place
    compressed(allreduce_hook("ring", comm), "fp16", K)   # the same through float16 on the wire
    reduce_scatter_hook("ring", comm)                     # only this rank's chunk is combined (ZeRO)

``compressed`` wraps any hook: the tensor is pre-scaled by 1/K, cast to
the wire dtype, summed by the inner hook and cast back (see
``mpiml.compression.reduce_compressed``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from mpi4py import MPI

from .. import collectives
from ..collectives._schedule import polling
from ..compression import compressor, is_lossy, reduce_compressed

__all__ = ["Hook", "allreduce_hook", "reduce_scatter_hook", "compressed"]

Hook = Callable[[torch.Tensor, str, str], None]


def allreduce_hook(algorithm: str, comm: MPI.Comm, poll: float = 0.0) -> Hook:
    """Allreduce through ``algorithm`` on ``comm``; waits poll every ``poll`` seconds (0: spin)."""
    def hook(tensor: torch.Tensor, op: str, name: str) -> None:
        with polling(poll):
            collectives.allreduce(tensor, op=op, algorithm=algorithm, comm=comm, name=name)
    return hook


def reduce_scatter_hook(algorithm: str, comm: MPI.Comm, poll: float = 0.0) -> Hook:
    """Reduce-scatter through ``algorithm``: afterwards only this rank's chunk of ``tensor``
    (``collectives.chunk_bounds(len, K)[rank:rank + 2]``) holds the combined values."""
    def hook(tensor: torch.Tensor, op: str, name: str) -> None:
        with polling(poll):
            collectives.reduce_scatter(tensor, op=op, algorithm=algorithm, comm=comm, name=name)
    return hook


def compressed(inner: Hook, compression: str, size: int) -> Hook:
    """``inner`` with the tensor on the wire compressed (``compression``: "none", "fp16", "bf16")."""
    c = compressor(compression)
    if not is_lossy(c):
        return inner

    def hook(tensor: torch.Tensor, op: str, name: str) -> None:
        def sum_wire(wire: torch.Tensor) -> None:
            inner(wire, "sum", name)
        out = reduce_compressed(tensor, c, size, op == "mean", sum_wire)
        if out is not tensor:
            tensor.copy_(out)
    return hook
