"""Broadcasting models, optimizer state and Python objects; gathering objects.

``broadcast_optimizer_state`` is ``mpiml.params.broadcast_optimizer_state``
(one implementation for mpiml and mpiml.torch) run on the communicator
``hvd.init`` was given. It works for every ``torch.optim`` optimizer,
including state that is created lazily on the first ``step()``:

1. if the root's optimizer has no state yet, the root creates it the way
   Horovod does, with one step on zero gradients (for a
   ``DistributedOptimizer``, the wrapped class's own step, so nothing is
   communicated). Unlike Horovod, the parameters are put back afterwards,
   so weight decay in that step does not move the root's weights
   (gradients that were missing stay zero, as in Horovod). L-BFGS needs a
   closure, so its state stays empty until its first real step (Horovod
   refuses L-BFGS altogether);
2. the root broadcasts the *structure* of its ``state_dict()`` (every
   scalar, hyper-parameter and nested list, with each tensor replaced by
   its shape and dtype) as one pickled object;
3. the tensors' bytes are broadcast as one buffer, and the other ranks
   ``load_state_dict()`` the result. So ranks whose optimizers have
   not stepped yet, or have state for other parameters, end identical to
   the root.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch

from .. import params
from . import basics
from .basics import global_process_set
from .movement import allgather_async, broadcast_async_
from .ops import synchronize

try:  # Horovod pickles with cloudpickle (lambdas, local classes); fall back to pickle without it
    import cloudpickle as _pickler
except ImportError:  # pragma: no cover - depends on the environment
    _pickler = pickle

__all__ = ["broadcast_parameters", "broadcast_optimizer_state", "broadcast_object", "allgather_object"]


def _to_words(data: bytes) -> torch.Tensor:
    """Bytes as int64 words (zero padded): moved without the widening that uint8 tensors get."""
    padded = data + b"\0" * (-len(data) % 8)
    return torch.frombuffer(bytearray(padded), dtype=torch.int64) if padded else torch.zeros(0, dtype=torch.int64)


def _from_words(words: torch.Tensor, length: int) -> bytes:
    return words.numpy().tobytes()[:length]


def broadcast_object(obj: Any, root_rank: int = 0, name: str | None = None,
                     process_set: Any = global_process_set) -> Any:
    """Pickle ``obj`` on ``root_rank`` and return it on every rank.

    Without ``name`` the operation is named ``broadcast_object``, whatever
    ``obj`` is: the other ranks typically pass a placeholder (``None``), so a
    name derived from the object (Horovod uses its type) would differ
    between the root and the others and they would never match.
    """
    basics.check_process_set(process_set)
    name = name or "broadcast_object"
    if basics.rank() == root_rank:
        data = _pickler.dumps(obj)
        length = torch.tensor([len(data)], dtype=torch.int64)
        synchronize(broadcast_async_(length, root_rank, f"{name}.sz"))
        words = _to_words(data)
    else:
        length = torch.zeros(1, dtype=torch.int64)
        synchronize(broadcast_async_(length, root_rank, f"{name}.sz"))
        words = torch.zeros((int(length) + 7) // 8, dtype=torch.int64)
    synchronize(broadcast_async_(words, root_rank, f"{name}.t"))
    if basics.rank() == root_rank:
        return obj
    return _pickler.loads(_from_words(words, int(length)))


def allgather_object(obj: Any, name: str | None = None, process_set: Any = global_process_set) -> list[Any]:
    """Pickle ``obj`` on every rank; returns the list of all ranks' objects, in rank order.

    Without ``name`` the operation is named ``allgather_object`` (not after
    the object's type, which may differ by rank).
    """
    basics.check_process_set(process_set)
    name = name or "allgather_object"
    data = _pickler.dumps(obj)
    lengths = synchronize(allgather_async(torch.tensor([len(data)], dtype=torch.int64), f"{name}.sz")).tolist()
    words = synchronize(allgather_async(_to_words(data), f"{name}.t"))
    out, start = [], 0
    for n in lengths:
        count = (n + 7) // 8
        out.append(_pickler.loads(_from_words(words[start:start + count], n)))
        start += count
    return out


def broadcast_parameters(params: Any, root_rank: int, process_set: Any = global_process_set) -> None:
    """Overwrite every rank's tensors with ``root_rank``'s, in place.

    ``params``: a dict such as ``model.state_dict()`` (broadcast in sorted key
    order, each under its key), or a list/iterable of tensors or of
    ``(name, tensor)`` pairs such as ``model.named_parameters()``.
    """
    basics.check_process_set(process_set)
    if isinstance(params, dict):
        items = sorted(params.items())
    else:
        try:
            items = [p if isinstance(p, tuple) else (None, p) for p in params]
        except TypeError:
            raise ValueError(f"invalid params of type: {type(params)}") from None
    handles, copies = [], []
    for name, p in items:
        target = p.data if isinstance(p, torch.nn.Parameter) else p
        if not target.is_contiguous():  # broadcast a contiguous copy, then write it back
            copies.append((target, target.contiguous()))
            target = copies[-1][1]
        handles.append(broadcast_async_(target, root_rank, name))
    for h in handles:
        synchronize(h)
    with torch.no_grad():
        for original, copy in copies:
            original.copy_(copy)


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int,
                              process_set: Any = global_process_set) -> None:
    """Give every rank ``root_rank``'s optimizer state: hyper-parameters and per-parameter state.

    ``mpiml.params.broadcast_optimizer_state`` (the one implementation, shared with
    ``mpiml.broadcast_optimizer_state``) on the communicator ``hvd.init`` was given; see there."""
    basics.check_process_set(process_set)
    params.broadcast_optimizer_state(optimizer, root=root_rank, comm=basics._get().comm)
