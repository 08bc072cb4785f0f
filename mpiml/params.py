"""Broadcasting parameters and optimizer state, and fingerprinting parameters."""

from __future__ import annotations

import hashlib
import math
import pickle
from collections.abc import Iterable
from typing import Any

import torch
from mpi4py import MPI

from . import collectives
from .runtime import agree

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


class _Slot:
    """Stands for one tensor of a state dict while its structure travels (its bytes travel as a buffer)."""

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


def _slots(obj: Any, out: list[_Slot]) -> list[_Slot]:
    if isinstance(obj, _Slot):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _slots(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _slots(v, out)
    return out


def _zero_missing_grads(optimizer: torch.optim.Optimizer) -> None:
    """Give every trainable parameter without a gradient a zero one (as Horovod does)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and p.grad is None:
                zero = torch.zeros_like(p)
                p.grad = zero.to_sparse() if isinstance(optimizer, torch.optim.SparseAdam) else zero


def _local_step(optimizer: torch.optim.Optimizer) -> bool:
    """One step of ``optimizer`` that communicates nothing (a distributed wrapper's own optimizer's step)."""
    if getattr(optimizer, "_mpiml_distributed", False):  # mpiml.torch's: the wrapped class's step
        super(optimizer.__class__, optimizer).step()
        return True
    from . import optimizer as distributed
    if isinstance(optimizer, getattr(distributed, "DistributedOptimizer", ())):  # mpiml's: the optimizer it wraps
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            return False  # nothing local to step: the state stays as it is
        optimizer = inner
    optimizer.step()
    return True


def _create_state(optimizer: torch.optim.Optimizer) -> None:
    """One step on zero gradients, so the optimizer's lazily created state exists; parameters are kept.

    As Horovod, parameters that had no gradient keep a zero one. L-BFGS needs a closure: no state."""
    if isinstance(optimizer, torch.optim.LBFGS):
        return
    _zero_missing_grads(optimizer)
    saved = [(p, p.detach().clone(), p.grad) for group in optimizer.param_groups for p in group["params"]
             if p.requires_grad]
    for p, _, grad in saved:
        p.grad = torch.zeros_like(grad)
    try:
        _local_step(optimizer)
    finally:
        with torch.no_grad():
            for p, data, grad in saved:
                p.copy_(data)
                p.grad = grad


def _padded(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of 16, so every tensor's bytes start aligned for any dtype."""
    return -(-nbytes // 16) * 16


def _to_words(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The bytes of ``tensors`` as one int64 buffer, each tensor's starting at a multiple of 16 bytes."""
    offsets, at = [], 0
    for t in tensors:
        offsets.append(at)
        at += _padded(t.numel() * t.element_size())
    words = torch.zeros(at // 8, dtype=torch.int64)
    raw = words.view(torch.uint8)
    for t, o in zip(tensors, offsets, strict=True):
        n = t.numel() * t.element_size()
        if n:
            raw[o:o + n].copy_(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8))
    return words


def _from_words(words: torch.Tensor, slots: list[_Slot]) -> list[torch.Tensor]:
    raw, out, at = words.view(torch.uint8), [], 0
    for s in slots:
        dtype = getattr(torch, s.dtype)
        t = torch.empty(s.shape, dtype=dtype)
        n = t.numel() * t.element_size()
        if n:
            t.reshape(-1).view(torch.uint8).copy_(raw[at:at + n])
        out.append(t)
        at += _padded(n)
    return out


def _root_structure(optimizer: torch.optim.Optimizer) -> tuple[bytes, list[torch.Tensor]]:
    """The root's state dict as (pickled structure, tensors); ValueError for what cannot travel."""
    if not optimizer.state_dict()["state"]:
        _create_state(optimizer)
    tensors: list[torch.Tensor] = []
    structure = _strip(optimizer.state_dict(), tensors)
    for t in tensors:
        if t.layout != torch.strided:
            raise ValueError(f"cannot broadcast a {t.dtype} {t.layout} state tensor")
    try:
        data = pickle.dumps(structure)
    except Exception as e:  # noqa: BLE001 - a hyper-parameter that does not pickle
        raise ValueError(f"cannot pickle the state's structure: {e!r}") from None
    return data, tensors


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root: int = 0, comm: MPI.Comm | None = None) -> None:
    """Give every rank of ``comm`` (default COMM_WORLD) rank ``root``'s optimizer state, in place.

    Hyper-parameters and per-parameter state, for every ``torch.optim`` optimizer and both
    distributed wrappers (``mpiml.DistributedOptimizer``, ``mpiml.torch.DistributedOptimizer``;
    ``hvd.broadcast_optimizer_state`` calls this on ``hvd.init``'s communicator). Collective:

    1. if the root's optimizer has no state yet (before its first step), the root creates it as
       Horovod does, with one local step on zero gradients (a wrapper's own optimizer's step: nothing
       is communicated), then puts its parameters back; trainable parameters that had no gradient
       keep a zero one (on every rank whose optimizer had no state, so all match the root). L-BFGS
       needs a closure, so its state stays empty until its first real step;
    2. the root broadcasts the state dict's *structure* (scalars, hyper-parameters, nesting, each
       tensor replaced by its shape and dtype), pickled;
    3. the tensors' bytes travel as one buffer (``mpiml.collectives.broadcast``), not pickled, and
       the other ranks ``load_state_dict`` the result, so ranks whose optimizer has not stepped yet,
       or holds state for other parameters, end identical to the root.

    A problem on the root (a state that cannot travel) or on any rank loading it raises ValueError
    on every rank (``mpiml.runtime.agree``), naming the ranks.
    """
    comm = MPI.COMM_WORLD if comm is None else comm
    me = comm.Get_rank()
    prepared: list[Any] = [b"", []]

    def prepare() -> None:
        if me == root:
            prepared[:] = _root_structure(optimizer)
    agree(comm, prepare, errors=(Exception,), raise_as=lambda m: ValueError(f"broadcast_optimizer_state: {m}"))
    data, tensors = prepared
    structure = pickle.loads(comm.bcast(data if me == root else None, root=root))
    slots = _slots(structure, [])
    if me == root:
        words = _to_words(tensors)
    else:
        words = torch.empty(sum(_padded(math.prod(s.shape) * getattr(torch, s.dtype).itemsize) for s in slots) // 8,
                            dtype=torch.int64)
    if words.numel():
        collectives.broadcast(words, root=root, comm=comm, name="broadcast_optimizer_state")

    def load() -> None:
        if me == root:
            return
        if not optimizer.state_dict()["state"]:
            _zero_missing_grads(optimizer)  # as on the root (and as Horovod): fresh optimizers get zero gradients
        optimizer.load_state_dict(_fill(structure, _from_words(words, sorted(slots, key=lambda s: s.index))))
    agree(comm, load, errors=(Exception,), raise_as=lambda m: ValueError(f"broadcast_optimizer_state: {m}"))


def parameters_sha256(params: Iterable[torch.Tensor]) -> str:
    """SHA-256 of the parameters' bytes, in order: equal hashes mean bitwise equal replicas."""
    h = hashlib.sha256()
    for t in params:
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
