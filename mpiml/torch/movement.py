"""Horovod's allgather, broadcast, alltoall and reducescatter (asynchronous, in-place, grouped and autograd forms).

Gradients follow Horovod: allgather's is the *average* of the incoming
gradients, narrowed to this rank's rows; broadcast's is that average on
the root and zero elsewhere; alltoall's is the alltoall of the gradient
back along the received splits; reducescatter's is the allgather of the
gradient (times the number of ranks for ``Sum``, and times the scale
factors). The grouped forms take a list of tensors, negotiated under one
name and executed together, and their gradients are the grouped forms of
the same rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import basics
from .basics import Average, global_process_set
from .compression import Compression, Compressor
from .ops import allreduce, by_dtype, grouped_allreduce, resolve_op, submit, synchronize
from .requests import HorovodInternalError, ReduceOp, check_tensor

__all__ = ["allgather", "allgather_async", "grouped_allgather", "grouped_allgather_async", "broadcast", "broadcast_",
           "broadcast_async", "broadcast_async_", "alltoall", "alltoall_async", "reducescatter",
           "reducescatter_async", "grouped_reducescatter", "grouped_reducescatter_async", "sparse_allreduce_async",
           "HorovodAllgather", "HorovodGroupedAllgather", "HorovodBroadcast", "HorovodAlltoall",
           "HorovodReducescatter", "HorovodGroupedReducescatter"]


def _first(results: list[Any]) -> Any:
    return results[0]


def _only(results: list[Any]) -> Any:
    """The one output of a one-tensor request (the executor returns a list per request)."""
    return results[0][0]


def _in_input_order(tensors: list[torch.Tensor]) -> Callable[[list[Any]], list[torch.Tensor]]:
    """Converter for a grouped request: per-dtype lists of outputs back into the order of ``tensors``."""
    parts = list(by_dtype(tensors).values())

    def convert(results: list[Any]) -> list[torch.Tensor]:
        out: list[Any] = [None] * len(tensors)
        for positions, outputs in zip(parts, results, strict=True):
            for i, t in zip(positions, outputs, strict=True):
                out[i] = t
        return out

    return convert


def _group(tensors: Any, what: str) -> list[torch.Tensor]:
    tensors = list(tensors)
    if not tensors:
        raise ValueError(f"{what} needs at least one tensor")
    return [_with_rows(t, what) for t in tensors]


def _my_offsets(counts: list[int], process_set: Any) -> list[int]:
    """For each of this rank's row counts, how many rows the lower ranks hold before it."""
    every = synchronize(allgather_async(torch.tensor([counts], dtype=torch.int64), process_set=process_set))
    return [int(x) for x in every[:basics.rank()].sum(dim=0)]


def _with_rows(tensor: torch.Tensor, what: str) -> torch.Tensor:
    check_tensor(tensor, what)
    if tensor.dim() == 0:
        raise ValueError(f"{what} needs a tensor with at least one dimension (it works on the first), got a scalar")
    return tensor.detach()


# ---------------------------------------------------------------- allgather


def allgather_async(tensor: torch.Tensor, name: str | None = None, process_set: Any = global_process_set) -> int:
    """Start concatenating every rank's ``tensor`` along the first dimension (which may differ by rank)."""
    basics.check_process_set(process_set)
    return submit("allgather", name, [_with_rows(tensor, "allgather")], [], _only)


class HorovodAllgather(torch.autograd.Function):
    """Allgather; the gradient is the average of all ranks' output gradients, narrowed to this rank's rows."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, name: str | None, process_set: Any) -> torch.Tensor:
        ctx.dim = tensor.shape[0] if tensor.dim() else 0
        ctx.process_set = process_set
        return synchronize(allgather_async(tensor, name, process_set))

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        grad_reduced = allreduce(grad_output.contiguous(), op=Average, process_set=ctx.process_set)
        dims = synchronize(allgather_async(torch.tensor([ctx.dim], dtype=torch.int64),
                                           process_set=ctx.process_set))
        offset = int(dims[:basics.rank()].sum())
        return grad_reduced.narrow(0, offset, ctx.dim), None, None


def allgather(tensor: torch.Tensor, name: str | None = None, process_set: Any = global_process_set) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dimension 0, in rank order; differentiable."""
    return HorovodAllgather.apply(tensor, name, process_set)


def grouped_allgather_async(tensors: list[torch.Tensor], name: str | None = None,
                            process_set: Any = global_process_set) -> int:
    """Start allgathering each tensor of a list (one negotiation for the group); ``synchronize`` gives the list."""
    basics.check_process_set(process_set)
    srcs = _group(tensors, "grouped_allgather")
    return submit("allgather", name, srcs, [], _in_input_order(srcs), prefix="grouped_allgather")


class HorovodGroupedAllgather(torch.autograd.Function):
    """Grouped allgather; each gradient is the average of the ranks' output gradients, narrowed to this rank's rows."""

    @staticmethod
    def forward(ctx: Any, name: str | None, process_set: Any, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.dims = [t.shape[0] if t.dim() else 0 for t in tensors]
        ctx.process_set = process_set
        return tuple(synchronize(grouped_allgather_async(list(tensors), name, process_set)))

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[Any, ...]:
        reduced = grouped_allreduce([g.contiguous() for g in grad_outputs], op=Average, process_set=ctx.process_set)
        offsets = _my_offsets(ctx.dims, ctx.process_set)
        return (None, None, *[g.narrow(0, o, d) for g, o, d in zip(reduced, offsets, ctx.dims, strict=True)])


def grouped_allgather(tensors: list[torch.Tensor], name: str | None = None,
                      process_set: Any = global_process_set) -> list[torch.Tensor]:
    """``allgather`` of each tensor in the list, negotiated and run together; differentiable."""
    return list(HorovodGroupedAllgather.apply(name, process_set, *tensors))


# ---------------------------------------------------------------- broadcast


def _broadcast_async(tensor: torch.Tensor, root_rank: int, name: str | None, in_place: bool,
                     process_set: Any) -> int:
    basics.check_process_set(process_set)
    src = check_tensor(tensor, "broadcast").detach()
    out = src if in_place else torch.empty_like(src)
    result = tensor if in_place else out
    return submit("broadcast", name, [src], [out], lambda results: result, root=int(root_rank))


def broadcast_async(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                    process_set: Any = global_process_set) -> int:
    """Start copying rank ``root_rank``'s ``tensor`` into a new tensor on every rank."""
    return _broadcast_async(tensor, root_rank, name, False, process_set)


def broadcast_async_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
                     process_set: Any = global_process_set) -> int:
    """Start overwriting ``tensor`` on every rank with rank ``root_rank``'s."""
    return _broadcast_async(tensor, root_rank, name, True, process_set)


def broadcast_(tensor: torch.Tensor, root_rank: int, name: str | None = None,
               process_set: Any = global_process_set) -> torch.Tensor:
    """In-place broadcast; returns ``tensor``."""
    return synchronize(broadcast_async_(tensor, root_rank, name, process_set))


class HorovodBroadcast(torch.autograd.Function):
    """Broadcast; the gradient is the average of the output gradients on the root, zero elsewhere."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, root_rank: int, name: str | None, process_set: Any) -> torch.Tensor:
        ctx.root_rank = root_rank
        ctx.process_set = process_set
        return synchronize(broadcast_async(tensor, root_rank, name, process_set))

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        grad_reduced = allreduce(grad_output.contiguous(), op=Average, process_set=ctx.process_set)
        if basics.rank() != ctx.root_rank:
            grad_reduced = grad_reduced * 0
        return grad_reduced, None, None, None


def broadcast(tensor: torch.Tensor, root_rank: int, name: str | None = None,
              process_set: Any = global_process_set) -> torch.Tensor:
    """Rank ``root_rank``'s ``tensor``, as a new tensor on every rank; differentiable."""
    return HorovodBroadcast.apply(tensor, root_rank, name, process_set)


# ---------------------------------------------------------------- alltoall


def _splits(splits: Any, rows: int, size: int) -> tuple[int, ...]:
    if splits is None:
        if rows % size:
            raise ValueError(f"alltoall without splits divides the first dimension equally, but {rows} rows do "
                             f"not divide by {size} ranks; pass splits")
        return (rows // size,) * size
    if isinstance(splits, torch.Tensor):
        if splits.dtype.is_floating_point or splits.dtype.is_complex or splits.dtype == torch.bool:
            raise ValueError(f"alltoall splits must be integers (torch.int32), got {splits.dtype}")
        values = [int(v) for v in splits.reshape(-1).tolist()]
    else:
        values = list(splits)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"alltoall splits must be integers, got {splits!r}")
    if len(values) != size:
        raise ValueError(f"alltoall splits has {len(values)} entries; it needs one per rank ({size})")
    if min(values) < 0:
        raise ValueError(f"alltoall splits must not be negative: {values}")
    if sum(values) > rows:
        raise ValueError(f"alltoall splits add up to {sum(values)}, more than the first dimension ({rows})")
    return tuple(values)


def alltoall_async(tensor: torch.Tensor, splits: Any = None, name: str | None = None,
                   process_set: Any = global_process_set) -> int:
    """Start sending ``splits[r]`` consecutive rows to rank r; ``synchronize`` gives (output, received_splits)."""
    basics.check_process_set(process_set)
    src = _with_rows(tensor, "alltoall")
    return submit("alltoall", name, [src], [], _first, splits=_splits(splits, src.shape[0], basics.size()))


class HorovodAlltoall(torch.autograd.Function):
    """Alltoall; the gradient travels back along the received splits."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, splits: Any, name: str | None, process_set: Any) -> Any:
        output, received = synchronize(alltoall_async(tensor, splits, name, process_set))
        ctx.recvsplits = received
        ctx.process_set = process_set
        if splits is None:
            return output
        ctx.mark_non_differentiable(received)
        return output, received

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, *dead: Any) -> tuple[Any, ...]:
        grad, _ = synchronize(alltoall_async(grad_output.contiguous(), ctx.recvsplits, process_set=ctx.process_set))
        return grad, None, None, None


def alltoall(tensor: torch.Tensor, splits: Any = None, name: str | None = None,
             process_set: Any = global_process_set) -> Any:
    """Scatter rows to all ranks and gather theirs: the output, and the received splits if ``splits`` was given."""
    return HorovodAlltoall.apply(tensor, splits, name, process_set)


# ---------------------------------------------------------------- reducescatter


def reducescatter_async(tensor: torch.Tensor, name: str | None = None, op: Any = Average,
                        process_set: Any = global_process_set, prescale_factor: float = 1.0,
                        postscale_factor: float = 1.0) -> int:
    """Start reducing ``tensor`` over all ranks, each keeping its share of the first dimension's rows."""
    basics.check_process_set(process_set)
    op = _scatter_op(op)
    src = _with_rows(tensor, "reducescatter")
    return submit("reducescatter", name, [src], [], _only, op=int(op), prescale=float(prescale_factor),
                  postscale=float(postscale_factor))


def _scatter_op(op: Any) -> ReduceOp:
    """``op`` for a reducescatter; Adasum is refused with a RuntimeError, as Horovod's reducescatter does."""
    if isinstance(op, int) and op == ReduceOp.Adasum:
        raise HorovodInternalError("reducescatter does not support op=hvd.Adasum; use hvd.Average or hvd.Sum")
    return resolve_op(op, None)


def _scattered_grad(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    """Horovod's rule for a reducescatter's output gradient before it is gathered back."""
    factor = (basics.size() if ctx.op == ReduceOp.Sum else 1) * ctx.scale[0] * ctx.scale[1]
    return (grad * factor if factor != 1 else grad).contiguous()


class HorovodReducescatter(torch.autograd.Function):
    """Reducescatter; the gradient is the allgather of the output gradients (times size for Sum, and the scales)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, name: str | None, op: Any, process_set: Any,
                prescale_factor: float, postscale_factor: float) -> torch.Tensor:
        ctx.op = _scatter_op(op)
        ctx.process_set = process_set
        ctx.scale = (prescale_factor, postscale_factor)
        return synchronize(reducescatter_async(tensor, name, ctx.op, process_set, prescale_factor, postscale_factor))

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        grad = synchronize(allgather_async(_scattered_grad(ctx, grad_output), process_set=ctx.process_set))
        return grad, None, None, None, None, None


def reducescatter(tensor: torch.Tensor, name: str | None = None, compression: type[Compressor] = Compression.none,
                  op: Any = Average, process_set: Any = global_process_set, prescale_factor: float = 1.0,
                  postscale_factor: float = 1.0) -> torch.Tensor:
    """This rank's rows of the reduced tensor: ``rows // size`` each, the first ``rows % size`` ranks one more."""
    compressed, ctx = compression.compress(tensor)
    reduced = HorovodReducescatter.apply(compressed, name, op, process_set, prescale_factor, postscale_factor)
    return compression.decompress(reduced, ctx)


def grouped_reducescatter_async(tensors: list[torch.Tensor], name: str | None = None, op: Any = Average,
                                process_set: Any = global_process_set, prescale_factor: float = 1.0,
                                postscale_factor: float = 1.0) -> int:
    """Start reducescattering each tensor of a list (one negotiation for the group)."""
    basics.check_process_set(process_set)
    op = _scatter_op(op)
    srcs = _group(tensors, "grouped_reducescatter")
    return submit("reducescatter", name, srcs, [], _in_input_order(srcs), prefix="grouped_reducescatter",
                  op=int(op), prescale=float(prescale_factor), postscale=float(postscale_factor))


class HorovodGroupedReducescatter(torch.autograd.Function):
    """Grouped reducescatter; gradients are the grouped allgather of the output gradients (scaled as above)."""

    @staticmethod
    def forward(ctx: Any, name: str | None, op: Any, process_set: Any, prescale_factor: float,
                postscale_factor: float, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.op = _scatter_op(op)
        ctx.process_set = process_set
        ctx.scale = (prescale_factor, postscale_factor)
        return tuple(synchronize(grouped_reducescatter_async(list(tensors), name, ctx.op, process_set,
                                                             prescale_factor, postscale_factor)))

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[Any, ...]:
        grads = [_scattered_grad(ctx, g) for g in grad_outputs]
        return (None, None, None, None, None,
                *synchronize(grouped_allgather_async(grads, process_set=ctx.process_set)))


def grouped_reducescatter(tensors: list[torch.Tensor], name: str | None = None,
                          compression: type[Compressor] = Compression.none, op: Any = Average,
                          process_set: Any = global_process_set, prescale_factor: float = 1.0,
                          postscale_factor: float = 1.0) -> list[torch.Tensor]:
    """``reducescatter`` of each tensor in the list, negotiated and run together; differentiable."""
    compressed, ctxs = zip(*[compression.compress(t) for t in tensors], strict=True) if tensors else ((), ())
    reduced = HorovodGroupedReducescatter.apply(name, op, process_set, prescale_factor, postscale_factor,
                                                *compressed)
    return [compression.decompress(t, c) for t, c in zip(reduced, ctxs, strict=True)]


# ---------------------------------------------------------------- sparse gradients


def sparse_allreduce_async(tensor: torch.Tensor, name: str, op: Any,
                           process_set: Any = global_process_set) -> Callable[[], torch.Tensor]:
    """Allreduce a sparse COO tensor by allgathering its indices and values; returns a callable giving the result."""
    op = resolve_op(op, None)
    indices = allgather_async(tensor._indices().transpose(0, 1).contiguous(), name=f"{name}.indices",
                              process_set=process_set)
    values = allgather_async(tensor._values().contiguous(), name=f"{name}.values", process_set=process_set)

    def handle() -> torch.Tensor:
        v = synchronize(values)
        i = synchronize(indices)
        if op == Average:
            v = v / basics.size()
        return torch.sparse_coo_tensor(i.transpose(0, 1), v, tensor.size())

    return handle

