"""Broadcasting models, optimizer state and Python objects; gathering objects.

``broadcast_optimizer_state`` works for every ``torch.optim`` optimizer,
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
3. every tensor is broadcast (fused into few collectives), and the other
   ranks ``load_state_dict()`` the result. So ranks whose optimizers have
   not stepped yet, or have state for other parameters, end identical to
   the root.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch

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


class _Slot:
    """Stands for one tensor of a state dict while its structure travels."""

    __slots__ = ("index", "shape", "dtype")

    def __init__(self, index: int, shape: tuple[int, ...], dtype: str) -> None:
        self.index, self.shape, self.dtype = index, shape, dtype

    def __getstate__(self) -> tuple[int, tuple[int, ...], str]:
        return self.index, self.shape, self.dtype

    def __setstate__(self, state: tuple[int, tuple[int, ...], str]) -> None:
        self.index, self.shape, self.dtype = state


def _strip(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """``obj`` with every tensor replaced by a ``_Slot`` (the tensors are appended to ``tensors``)."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Slot(len(tensors) - 1, tuple(obj.shape), str(obj.dtype).removeprefix("torch."))
    if isinstance(obj, dict):
        return {k: _strip(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip(v, tensors) for v in obj)
    return obj


def _fill(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, _Slot):
        return tensors[obj.index]
    if isinstance(obj, dict):
        return {k: _fill(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(v, tensors) for v in obj)
    return obj


def _zero_missing_grads(optimizer: torch.optim.Optimizer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Give every trainable parameter without a gradient a zero one (as Horovod does); returns (param, copy)."""
    saved = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                saved.append((p, p.detach().clone()))
                if p.grad is None:
                    zero = torch.zeros_like(p)
                    p.grad = zero.to_sparse() if isinstance(optimizer, torch.optim.SparseAdam) else zero
    return saved


def _create_state(optimizer: torch.optim.Optimizer) -> None:
    """One step on zero gradients, so the optimizer's lazily created state exists; parameters are kept."""
    if isinstance(optimizer, torch.optim.LBFGS):
        return
    saved = _zero_missing_grads(optimizer)
    grads = [(p, p.grad) for p, _ in saved]
    for p, _ in saved:
        p.grad = torch.zeros_like(p.grad)
    if getattr(optimizer, "_mpiml_distributed", False):
        super(optimizer.__class__, optimizer).step()  # the wrapped class's step: no gradient exchange
    else:
        optimizer.step()
    with torch.no_grad():
        for (p, data), (_, grad) in zip(saved, grads, strict=True):
            p.copy_(data)
            p.grad = grad


def _skeleton(optimizer: torch.optim.Optimizer) -> tuple[Any, list[torch.Tensor]]:
    """The root's state dict as (structure, tensors), or ("error", message) for what cannot travel."""
    if not optimizer.state_dict()["state"]:
        _create_state(optimizer)
    tensors: list[torch.Tensor] = []
    structure = _strip(optimizer.state_dict(), tensors)
    for t in tensors:
        if t.device.type != "cpu" or t.layout != torch.strided or t.dtype.is_complex:
            return ("error", f"broadcast_optimizer_state: cannot broadcast a {t.dtype} {t.layout} state tensor "
                             f"on {t.device}"), []
    return ("ok", structure), [t.contiguous() for t in tensors]


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root_rank: int,
                              process_set: Any = global_process_set) -> None:
    """Give every rank ``root_rank``'s optimizer state: hyper-parameters and per-parameter state."""
    basics.check_process_set(process_set)
    root = basics.rank() == root_rank
    payload: Any = None
    tensors: list[torch.Tensor] = []
    if root:
        try:
            payload, tensors = _skeleton(optimizer)
        except Exception as e:  # noqa: BLE001 - every rank must hear about it, not just the root
            payload = ("error", f"broadcast_optimizer_state: rank {root_rank} could not prepare its state: {e!r}")
    status, structure = broadcast_object(payload, root_rank, name="broadcast_optimizer_state")
    if status == "error":
        raise ValueError(structure)
    if not root:
        slots: list[_Slot] = []
        _collect_slots(structure, slots)
        tensors = [torch.empty(s.shape, dtype=getattr(torch, s.dtype)) for s in sorted(slots, key=lambda s: s.index)]
    handles = [broadcast_async_(t, root_rank, f"broadcast_optimizer_state.{i}") for i, t in enumerate(tensors)]
    for h in handles:
        synchronize(h)
    if not root:
        if not optimizer.state_dict()["state"]:
            _zero_missing_grads(optimizer)  # as on the root (and as Horovod): fresh optimizers get zero gradients
        optimizer.load_state_dict(_fill(structure, tensors))


def _collect_slots(obj: Any, out: list[_Slot]) -> None:
    if isinstance(obj, _Slot):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect_slots(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect_slots(v, out)
