"""Horovod's allreduce family, handles, ``poll``/``synchronize``, ``join`` and ``barrier``.

Every operation is keyed by a name: ``allreduce.<name>`` when one is given,
else ``allreduce.noname.<handle>`` where the handle counts this process's
operations (all kinds, as Horovod), so ranks making the same calls in the
same order get the same names. Ranks may submit *named* operations in any
order; the engine matches them by name. A barrier is always named
``barrier.noname`` (as Horovod's), so it matches across ranks even when
their handle counts differ, e.g. while an operation is pending on only some
of them: the barrier completes and that operation completes later.

Asynchronous calls return an integer handle; ``synchronize(handle)`` waits
and returns the result (raising ``HorovodInternalError``, a RuntimeError,
if the ranks disagreed), ``poll(handle)`` says whether it is done. The
synchronous forms are autograd functions: the gradient of an allreduce is
the same allreduce of the incoming gradient.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from typing import Any

import torch

from ..compression import Prepared, finish_reduce, is_lossy, prepare_reduce
from . import basics
from .basics import Average, global_process_set
from .compression import Compression, Compressor
from .negotiation import Meta
from .requests import Handle, HorovodInternalError, ReduceOp, Request, check_tensor, dtype_name, scaled

__all__ = ["allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "grouped_allreduce",
           "grouped_allreduce_", "grouped_allreduce_async", "grouped_allreduce_async_", "poll", "synchronize",
           "join", "barrier", "submit", "by_dtype", "resolve_op", "next_handle", "HorovodAllreduce",
           "HorovodGroupedAllreduce", "compressed_sum", "prepare_compressed", "finish_compressed"]

# handle -> (engine handles, function turning their results into what synchronize() returns)
_handle_map: dict[int, tuple[list[Handle], Callable[[list[Any]], Any]]] = {}
_counter = itertools.count()


def next_handle() -> int:
    """A new handle number (also the suffix of automatic names)."""
    return next(_counter)


def resolve_op(op: Any, average: bool | None) -> ReduceOp:
    """Horovod's ``op``/deprecated ``average`` rules; Adasum is refused."""
    if op is not None and average is not None:
        raise ValueError("The op parameter supersedes average. Please provide only one of them.")
    if average is not None:
        warnings.warn("Parameter `average` has been replaced with `op` and will be removed in v1.0",
                      DeprecationWarning, stacklevel=3)
        return Average if average else ReduceOp.Sum
    if op is None:
        return Average
    try:
        op = ReduceOp(op)
    except ValueError:
        raise ValueError(f"unknown reduction op {op!r}; use hvd.Average, Sum, Min, Max or Product") from None
    if op == ReduceOp.Adasum:
        raise ValueError("op=hvd.Adasum is not supported by mpiml.torch (it needs Horovod's Adasum reduction); "
                         "use hvd.Average or hvd.Sum")
    return op


def by_dtype(tensors: list[torch.Tensor]) -> dict[torch.dtype, list[int]]:
    """The positions of ``tensors`` grouped by dtype, in order of first appearance (one request per group)."""
    parts: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        parts.setdefault(t.dtype, []).append(i)
    return parts


def submit(kind: str, name: str | None, inputs: list[torch.Tensor], outputs: list[torch.Tensor],
           convert: Callable[[list[Any]], Any], prefix: str | None = None, exact_name: str | None = None,
           **fields: Any) -> int:
    """Queue one operation; returns its handle.

    Tensors of different dtypes (a mixed group) become one request per
    dtype (``by_dtype``), named ``<name>.<dtype>``. ``convert`` maps the
    list of the requests' results to what ``synchronize()`` returns.
    ``exact_name`` replaces the generated base name.
    """
    engine = basics.engine()
    handle = next_handle()
    base = exact_name or (f"{prefix or kind}.{name}" if name else f"{prefix or kind}.noname.{handle}")
    parts = by_dtype(inputs)
    if not parts:
        parts[torch.float32] = []
    handles = []
    for dtype, idx in parts.items():
        full = base if len(parts) == 1 else f"{base}.{dtype_name(dtype)}"
        meta = Meta(full, kind, dtype_name(dtype) if idx else "", tuple(tuple(inputs[i].shape) for i in idx),
                    **fields)
        h = Handle(full)
        engine.submit(Request(meta, h, [inputs[i] for i in idx], [outputs[i] for i in idx] if outputs else [],
                              engine.timeline.now_us()))
        handles.append(h)
    _handle_map[handle] = (handles, convert)
    return handle


def poll(handle: int) -> bool:
    """Whether the operation behind ``handle`` has finished (``synchronize`` then returns at once)."""
    entry = _handle_map.get(handle)
    if entry is None:
        raise ValueError(f"unknown handle {handle!r} (already synchronized?)")
    return all(h.done() for h in entry[0])


def _wait(handle: Handle) -> None:
    engine = basics._state.engine if basics._state is not None else None
    timeline = engine.timeline if engine is not None else None
    if handle.done() or timeline is None or not timeline.enabled:
        span = None
    else:
        span = timeline.span("WAIT", "wait", op=handle.name)
        span.__enter__()
    try:
        while not handle.wait(0.2):
            if engine is None or not engine.alive:
                raise HorovodInternalError(getattr(engine, "stop_reason", "") or "mpiml.torch engine is not running")
    finally:
        if span is not None:
            span.__exit__(None, None, None)


def synchronize(handle: int) -> Any:
    """Wait for ``handle`` and return its result (None for unknown handles, as Horovod)."""
    entry = _handle_map.get(handle)
    if entry is None:
        return None
    handles, convert = entry
    try:
        for h in handles:
            _wait(h)
    finally:
        _handle_map.pop(handle, None)
    for h in handles:
        if h.error is not None:
            raise type(h.error)(*h.error.args)
    return convert([h.result for h in handles])


def join(device: int = -1) -> int:
    """This rank has no more data: until every rank joins, others' allreduces get zeros from it.

    Blocks until all ranks have joined and returns the rank that joined last.
    ``device`` is accepted for compatibility (CPU only).
    """
    engine = basics.engine()
    next_handle()  # Horovod's join takes a handle too: keep automatic names in step with it
    h = engine.join()
    _wait(h)
    if h.error is not None:
        raise type(h.error)(*h.error.args)
    return int(h.result)


def barrier(process_set: Any = global_process_set) -> None:
    """Wait until every rank has reached a barrier (operations still pending elsewhere do not hold it up)."""
    basics.check_process_set(process_set)
    synchronize(submit("barrier", None, [], [], lambda results: None, exact_name="barrier.noname"))


# ---------------------------------------------------------------- allreduce


def _allreduce_async(tensor: torch.Tensor, in_place: bool, name: str | None, op: ReduceOp, prescale_factor: float,
                     postscale_factor: float, process_set: Any) -> int:
    basics.check_process_set(process_set)
    src = check_tensor(tensor, "allreduce").detach()
    out = src if in_place else torch.empty_like(src)
    result = tensor if in_place else out
    return submit("allreduce", name, [src], [out], lambda results: result, op=int(op),
                  prescale=float(prescale_factor), postscale=float(postscale_factor))


def allreduce_async(tensor: torch.Tensor, average: bool | None = None, name: str | None = None, op: Any = None,
                    prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                    process_set: Any = global_process_set) -> int:
    """Start averaging (or summing, ...) ``tensor`` over all ranks into a new tensor; returns a handle."""
    return _allreduce_async(tensor, False, name, resolve_op(op, average), prescale_factor, postscale_factor,
                            process_set)


def allreduce_async_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None, op: Any = None,
                     prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                     process_set: Any = global_process_set) -> int:
    """Like ``allreduce_async``, writing the result into ``tensor`` itself."""
    return _allreduce_async(tensor, True, name, resolve_op(op, average), prescale_factor, postscale_factor,
                            process_set)


def allreduce_(tensor: torch.Tensor, average: bool | None = None, name: str | None = None, op: Any = None,
               prescale_factor: float = 1.0, postscale_factor: float = 1.0,
               process_set: Any = global_process_set) -> torch.Tensor:
    """In-place allreduce; returns ``tensor``."""
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor, process_set))


class HorovodAllreduce(torch.autograd.Function):
    """Allreduce whose gradient is the same allreduce of the output's gradient."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, average: bool | None, name: str | None, op: Any,
                prescale_factor: float, postscale_factor: float, process_set: Any) -> torch.Tensor:
        ctx.op = resolve_op(op, average)
        ctx.scale = (prescale_factor, postscale_factor)
        ctx.process_set = process_set
        return synchronize(_allreduce_async(tensor, False, name, ctx.op, prescale_factor, postscale_factor,
                                            process_set))

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        grad = allreduce(grad_output.contiguous(), op=ctx.op, prescale_factor=ctx.scale[0],
                         postscale_factor=ctx.scale[1], process_set=ctx.process_set)
        return (grad, None, None, None, None, None, None)


def compressed_sum(compression: Any, op: ReduceOp, tensors: list[torch.Tensor]) -> bool:
    """Whether an allreduce with ``compression`` and ``op`` runs as ``mpiml.compression.reduce_compressed``:
    a lossy compressor, a sum or an average, and a floating-point tensor among ``tensors``. Then every
    tensor is scaled before it is compressed (an average's 1/size too, for floating point) and the
    engine only sums the compressed tensors; otherwise the compressed tensors are reduced with ``op``
    and the engine scales them, as in Horovod."""
    return op in (ReduceOp.Average, ReduceOp.Sum) and is_lossy(compression) and any(
        t.dtype.is_floating_point for t in tensors)


def prepare_compressed(tensor: torch.Tensor, compression: Any, op: ReduceOp, prescale_factor: float,
                       postscale_factor: float) -> Prepared:
    """``prepare_reduce`` for a floating-point tensor; for an integer one, Horovod's arithmetic (the engine's)."""
    if tensor.dtype.is_floating_point:
        return prepare_reduce(tensor, compression, basics.size(), op == ReduceOp.Average, prescale_factor,
                              postscale_factor)
    wire, ctx = compression.compress(scaled(tensor, prescale_factor, tensor.dtype))
    after = postscale_factor / basics.size() if op == ReduceOp.Average else postscale_factor
    return Prepared(wire, ctx, after, 0)


def finish_compressed(summed: torch.Tensor, prepared: Prepared, compression: Any, dtype: torch.dtype) -> torch.Tensor:
    """The result of an allreduce prepared by ``prepare_compressed`` from the sum of its wire tensors."""
    if dtype.is_floating_point:
        return finish_reduce(summed, prepared, compression)
    out = compression.decompress(summed, prepared.ctx)
    return scaled(out, prepared.after, out.dtype)


def allreduce(tensor: torch.Tensor, average: bool | None = None, name: str | None = None,
              compression: type[Compressor] = Compression.none, op: Any = None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0, process_set: Any = global_process_set) -> torch.Tensor:
    """Average (by default) ``tensor`` over all ranks; a new tensor, differentiable. ``tensor`` is unchanged.

    With a lossy ``compression`` (fp16), a floating-point sum or average runs as
    ``mpiml.compression.reduce_compressed``: scaled (average: by 1/size) before it is compressed."""
    if is_lossy(compression) and tensor.dtype.is_floating_point:
        resolved = resolve_op(op, average)
        if compressed_sum(compression, resolved, [tensor]):
            prepared = prepare_compressed(tensor, compression, resolved, prescale_factor, postscale_factor)
            summed = HorovodAllreduce.apply(prepared.wire, None, name, ReduceOp.Sum, 1.0, 1.0, process_set)
            return finish_compressed(summed, prepared, compression, tensor.dtype)
        op, average = resolved, None
    compressed, ctx = compression.compress(tensor)
    reduced = HorovodAllreduce.apply(compressed, average, name, op, prescale_factor, postscale_factor, process_set)
    return compression.decompress(reduced, ctx)


# ---------------------------------------------------------------- grouped allreduce


def _grouped_async(tensors: list[torch.Tensor], in_place: bool, name: str | None, op: ReduceOp,
                   prescale_factor: float, postscale_factor: float, process_set: Any) -> int:
    basics.check_process_set(process_set)
    tensors = list(tensors)
    if not tensors:
        raise ValueError("grouped_allreduce needs at least one tensor")
    srcs = [check_tensor(t, "grouped_allreduce").detach() for t in tensors]
    outs = srcs if in_place else [torch.empty_like(s) for s in srcs]
    final = tensors if in_place else outs
    return submit("allreduce", name, srcs, outs, lambda results: list(final), prefix="grouped_allreduce",
                  op=int(op), prescale=float(prescale_factor), postscale=float(postscale_factor))


def grouped_allreduce_async(tensors: list[torch.Tensor], average: bool | None = None, name: str | None = None,
                            op: Any = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                            process_set: Any = global_process_set) -> int:
    """Start one allreduce for a list of tensors, reduced together (one fused collective when they fit)."""
    return _grouped_async(tensors, False, name, resolve_op(op, average), prescale_factor, postscale_factor,
                          process_set)


def grouped_allreduce_async_(tensors: list[torch.Tensor], average: bool | None = None, name: str | None = None,
                             op: Any = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                             process_set: Any = global_process_set) -> int:
    """In-place ``grouped_allreduce_async``."""
    return _grouped_async(tensors, True, name, resolve_op(op, average), prescale_factor, postscale_factor,
                          process_set)


def grouped_allreduce_(tensors: list[torch.Tensor], average: bool | None = None, name: str | None = None,
                       op: Any = None, prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                       process_set: Any = global_process_set) -> list[torch.Tensor]:
    """In-place grouped allreduce; returns the tensors."""
    return synchronize(grouped_allreduce_async_(tensors, average, name, op, prescale_factor, postscale_factor,
                                                process_set))


class HorovodGroupedAllreduce(torch.autograd.Function):
    """Grouped allreduce with the grouped allreduce of the gradients as its backward."""

    @staticmethod
    def forward(ctx: Any, average: bool | None, name: str | None, op: Any, prescale_factor: float,
                postscale_factor: float, process_set: Any, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.op = resolve_op(op, average)
        ctx.scale = (prescale_factor, postscale_factor)
        ctx.process_set = process_set
        return tuple(synchronize(_grouped_async(list(tensors), False, name, ctx.op, prescale_factor,
                                                postscale_factor, process_set)))

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[Any, ...]:
        grads = grouped_allreduce([g.contiguous() for g in grad_outputs], op=ctx.op, prescale_factor=ctx.scale[0],
                                  postscale_factor=ctx.scale[1], process_set=ctx.process_set)
        return (None, None, None, None, None, None, *grads)


def grouped_allreduce(tensors: list[torch.Tensor], average: bool | None = None, name: str | None = None,
                      compression: type[Compressor] = Compression.none, op: Any = None, prescale_factor: float = 1.0,
                      postscale_factor: float = 1.0, process_set: Any = global_process_set) -> list[torch.Tensor]:
    """Allreduce a list of tensors together; new tensors, differentiable (compression: as ``allreduce``)."""
    tensors = list(tensors)
    if is_lossy(compression) and any(t.dtype.is_floating_point for t in tensors):
        resolved = resolve_op(op, average)
        if compressed_sum(compression, resolved, tensors):
            prepared = [prepare_compressed(t, compression, resolved, prescale_factor, postscale_factor)
                        for t in tensors]
            summed = HorovodGroupedAllreduce.apply(None, name, ReduceOp.Sum, 1.0, 1.0, process_set,
                                                   *[p.wire for p in prepared])
            return [finish_compressed(s, p, compression, t.dtype)
                    for s, p, t in zip(summed, prepared, tensors, strict=True)]
        op, average = resolved, None
    compressed, ctxs = zip(*[compression.compress(t) for t in tensors], strict=True) if tensors else ((), ())
    reduced = HorovodGroupedAllreduce.apply(average, name, op, prescale_factor, postscale_factor, process_set,
                                            *compressed)
    return [compression.decompress(t, c) for t, c in zip(reduced, ctxs, strict=True)]
