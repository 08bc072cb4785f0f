"""Broadcasting parameters and optimizer state, and fingerprinting parameters."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch
from mpi4py import MPI

from . import collectives

__all__ = ["broadcast_parameters", "broadcast_optimizer_state", "parameters_sha256"]


def _tensors(params: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(params, torch.nn.Module):
        return list(params.state_dict().items())
    if isinstance(params, dict):
        return list(params.items())
    items = list(params)
    if items and isinstance(items[0], tuple):
        return [(str(n), t) for n, t in items]
    return [(f"tensor.{i}", t) for i, t in enumerate(items)]


def broadcast_parameters(params: torch.nn.Module | dict[str, torch.Tensor] | Iterable[Any], root: int = 0,
                         comm: MPI.Comm | None = None) -> None:
    """Overwrite every rank's tensors with rank ``root``'s, in place.

    ``params``: a module (its state_dict, buffers included), a state dict,
    ``named_parameters()``, or an iterable of tensors, in the same order on
    every rank.
    """
    with torch.no_grad():
        for _, t in _tensors(params):
            if t.is_contiguous():
                collectives.broadcast(t.data, root=root, comm=comm)
            else:
                tmp = t.detach().contiguous()
                collectives.broadcast(tmp, root=root, comm=comm)
                t.data.copy_(tmp)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root: int = 0, comm: MPI.Comm | None = None) -> None:
    """Give every rank rank ``root``'s optimizer state (hyper-parameters and per-parameter buffers)."""
    comm = MPI.COMM_WORLD if comm is None else comm
    state = optimizer.state_dict() if comm.Get_rank() == root else None
    state = comm.bcast(state, root=root)
    if comm.Get_rank() != root:
        optimizer.load_state_dict(state)


def parameters_sha256(params: Iterable[torch.Tensor]) -> str:
    """SHA-256 of the parameters' bytes, in order: equal hashes mean bitwise equal replicas."""
    h = hashlib.sha256()
    for t in params:
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
