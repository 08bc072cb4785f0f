"""One compressor interface for every path that puts floating-point data on the wire.

    compressed, ctx = Compression.fp16.compress(t)   # what is sent, and what is needed to undo it
    t2 = Compression.fp16.decompress(received, ctx)

The interface is Horovod's (``compress``/``decompress`` static methods), so a
user's custom Horovod compressor works in both ``mpiml.DistributedOptimizer``
and ``mpiml.torch.DistributedOptimizer``. ``reduce_compressed`` is the one way
both of them average through a compressor: when the wire dtype is narrower
than the tensor's (fp16, bf16), the tensor is first **pre-scaled by 1/K**, then
compressed and *summed*, so a sum of K values that fits in float32 cannot
overflow float16 on the wire when each 1/K share fits (a gradient of 60000 on
each of 8 ranks: 8 x 60000 overflows float16, 8 x 7500 does not).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

__all__ = ["Compressor", "NoneCompressor", "FP16Compressor", "BF16Compressor", "Compression", "COMPRESSORS",
           "compressor", "is_lossy", "reduce_compressed", "Prepared", "scale_factors", "prepare_reduce",
           "finish_reduce"]


class Compressor(abc.ABC):
    """Interface for compressing and decompressing a given tensor (Horovod's, for custom compressors)."""

    @staticmethod
    @abc.abstractmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Compresses a tensor and returns it with the context needed to decompress it."""

    @staticmethod
    @abc.abstractmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Decompress the tensor with the given context."""


class NoneCompressor(Compressor):
    """Default no-op compression."""

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return tensor, None

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        return tensor


def _cast_compressor(wire: torch.dtype, label: str) -> type[Compressor]:
    class _Cast(Compressor):
        __doc__ = f"Compress all floating point tensors to {label}; other dtypes pass through unchanged."
        dtype = wire

        @staticmethod
        def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
            compressed = tensor.to(wire) if tensor.dtype.is_floating_point else tensor
            return compressed, tensor.dtype

        @staticmethod
        def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
            return tensor.to(ctx) if ctx is not None and ctx.is_floating_point else tensor
    return _Cast


FP16Compressor = _cast_compressor(torch.float16, "16-bit (float16)")
FP16Compressor.__name__ = FP16Compressor.__qualname__ = "FP16Compressor"
BF16Compressor = _cast_compressor(torch.bfloat16, "bfloat16")
BF16Compressor.__name__ = BF16Compressor.__qualname__ = "BF16Compressor"


class Compression:
    """Optional gradient compression algorithm used during allreduce."""

    none = NoneCompressor
    """Do not compress the gradients. This is the default."""

    fp16 = FP16Compressor
    """Compress all floating point gradients to 16-bit."""

    bf16 = BF16Compressor
    """Compress all floating point gradients to bfloat16 (float32's range, fewer mantissa bits)."""


COMPRESSORS: dict[str, type[Compressor]] = {"none": NoneCompressor, "fp16": FP16Compressor, "bf16": BF16Compressor}


def compressor(name: str) -> type[Compressor]:
    """The compressor registered as ``name`` ("none", "fp16", "bf16"); ValueError naming the choices otherwise."""
    try:
        return COMPRESSORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown compression {name!r}; choose from {', '.join(COMPRESSORS)}") from None


def is_lossy(c: type[Compressor] | Compressor) -> bool:
    """Whether ``c`` is anything but the no-op compressor."""
    return not (c is NoneCompressor or isinstance(c, NoneCompressor))


class Prepared(NamedTuple):
    """A tensor made ready to be summed through a compressor: what to send, and how to undo it."""

    wire: torch.Tensor
    """The pre-scaled, compressed tensor to sum across ranks."""
    ctx: Any
    """The compressor's context, for ``decompress``."""
    after: float
    """The factor applied after decompressing (1.0: none)."""
    floor_div: int
    """For an integer tensor being averaged: divide by this after the sum (rounding down); else 0."""


def scale_factors(c: type[Compressor] | Compressor, dtype: torch.dtype, size: int, average: bool,
                  prescale: float = 1.0, postscale: float = 1.0) -> tuple[float, float]:
    """(before, after): the factors a ``dtype`` tensor is scaled by before compressing and after decompressing.

    Averaging through a lossy compressor puts the 1/K before the cast (each share fits where the sum may
    not); otherwise after the sum."""
    lossy = is_lossy(c) and dtype.is_floating_point
    before = prescale * (1.0 / size if average and lossy else 1.0)
    after = postscale * (1.0 / size if average and not lossy else 1.0)
    return before, after


def prepare_reduce(tensor: torch.Tensor, c: type[Compressor] | Compressor, size: int, average: bool,
                   prescale: float = 1.0, postscale: float = 1.0) -> Prepared:
    """The first half of ``reduce_compressed``: scale and compress ``tensor`` (for asynchronous sums)."""
    floating = tensor.dtype.is_floating_point
    before, after = scale_factors(c, tensor.dtype, size, average, prescale, postscale)
    if floating and before != 1.0:
        tensor = tensor * before
    wire, ctx = c.compress(tensor)
    return Prepared(wire, ctx, after if floating else 1.0, size if average and not floating else 0)


def finish_reduce(summed: torch.Tensor, prepared: Prepared, c: type[Compressor] | Compressor) -> torch.Tensor:
    """The second half of ``reduce_compressed``: decompress the sum of the wires and scale it."""
    out = c.decompress(summed, prepared.ctx)
    if prepared.after != 1.0:
        out = out * prepared.after if out.requires_grad else out.mul_(prepared.after)  # autograd: out of place
    elif prepared.floor_div:
        out = (out.div(prepared.floor_div, rounding_mode="floor") if out.requires_grad
               else out.div_(prepared.floor_div, rounding_mode="floor"))
    return out


def reduce_compressed(tensor: torch.Tensor, c: type[Compressor] | Compressor, size: int, average: bool,
                      reduce_sum: Callable[[torch.Tensor], torch.Tensor | None],
                      prescale: float = 1.0, postscale: float = 1.0) -> torch.Tensor:
    """Sum (``average``: mean) ``tensor`` over ``size`` ranks through compressor ``c``; returns the result.

    ``reduce_sum(wire)`` sums the compressed tensor across ranks, in place or by returning the sum. A
    floating-point tensor is scaled by ``prescale`` (times 1/K when averaging through a lossy
    compressor) before compressing, and by ``postscale`` (times 1/K when averaging without a lossy
    compressor) after decompressing: with fp16 the mean is then the sum of shares that each fit.
    The result may be ``tensor`` itself (no-op compressor, summed in place) or a new tensor.

    ``prepare_reduce`` and ``finish_reduce`` are its two halves, for callers whose sum is asynchronous
    (``mpiml.torch``): the same arithmetic, so the same bits for the same sum."""
    prepared = prepare_reduce(tensor, c, size, average, prescale, postscale)
    summed = reduce_sum(prepared.wire)
    return finish_reduce(prepared.wire if summed is None else summed, prepared, c)
