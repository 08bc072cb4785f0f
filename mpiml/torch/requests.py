"""Handles, requests and the arithmetic rules shared by the ops and the engine.

A ``Request`` is one asynchronous operation on one rank: its ``Meta`` (what
is sent to the coordinator), the tensors it reads and writes, and the
``Handle`` the caller waits on. The engine fills the handle with the result
or with a ``HorovodInternalError``.

dtypes: mpiml's collectives move float16, bfloat16, float32, float64,
int32 and int64. uint8, int8, int16 and bool travel widened to int32 and
are narrowed back afterwards (sums and products wrap exactly as they would
in the narrow type). Scaling (``prescale_factor``, ``postscale_factor``,
and the 1/size of ``Average``) follows Horovod: integers are scaled in
float64 and truncated toward zero, 16-bit floats in float32.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch

from .negotiation import Meta

__all__ = ["HorovodInternalError", "ReduceOp", "Handle", "Request", "SUPPORTED_DTYPES", "wire_dtype", "dtype_name",
           "scaled", "write_scaled", "identity", "check_tensor", "MPIML_OPS"]


class HorovodInternalError(RuntimeError):
    """A collective failed: the ranks disagreed about it, or the engine was shut down."""


class ReduceOp(IntEnum):
    """Reduction ops, with Horovod's numeric values."""

    Average = 0
    Sum = 1
    Adasum = 2
    Min = 3
    Max = 4
    Product = 5


# The mpiml.collectives op that does the data movement for each ReduceOp (Average = sum, then scale).
MPIML_OPS = {ReduceOp.Average: "sum", ReduceOp.Sum: "sum", ReduceOp.Min: "min", ReduceOp.Max: "max",
             ReduceOp.Product: "prod"}

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8,
                    torch.int16, torch.int32, torch.int64, torch.bool)
_WIDENED = {torch.uint8: torch.int32, torch.int8: torch.int32, torch.int16: torch.int32, torch.bool: torch.int32}
_BY_NAME = {str(d).removeprefix("torch."): d for d in SUPPORTED_DTYPES}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def from_name(name: str) -> torch.dtype:
    return _BY_NAME[name]


def wire_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor of ``dtype`` travels as through mpiml.collectives."""
    return _WIDENED.get(dtype, dtype)


def check_tensor(tensor: Any, what: str) -> torch.Tensor:
    """Raise ValueError (TypeError for non-tensors) for anything the engine cannot move; return the tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} expects a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise ValueError(f"{what}: {tensor.layout} tensors are not supported; pass a dense tensor "
                         "(DistributedOptimizer handles sparse gradients itself)")
    if tensor.device.type != "cpu":
        raise ValueError(f"{what}: tensor is on {tensor.device}; mpiml.torch moves CPU tensors only "
                         "(use .cpu() first)")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"Tensor type {tensor.type()} is not supported.")
    if not tensor.is_contiguous():
        raise ValueError("Tensor is required to be contiguous.")
    return tensor


def scaled(t: torch.Tensor, factor: float, dtype: torch.dtype) -> torch.Tensor:
    """``t * factor`` as a tensor of ``dtype``, with Horovod's arithmetic (see module docstring)."""
    if factor == 1.0:
        return t if t.dtype == dtype else t.to(dtype)
    if dtype in (torch.float16, torch.bfloat16):
        return (t.to(torch.float32) * factor).to(dtype)
    if dtype.is_floating_point:
        return t.to(dtype) * factor
    return (t.to(torch.float64) * factor).to(dtype)


def write_scaled(dst: torch.Tensor, src: torch.Tensor, factor: float, dtype: torch.dtype) -> None:
    """``dst[:] = src * factor`` computed as in ``scaled``; ``dst`` may have another (wider) dtype."""
    if factor == 1.0:
        dst.copy_(src)
    elif dtype in (torch.float32, torch.float64) and src.dtype == dtype == dst.dtype:
        torch.mul(src, factor, out=dst)
    else:
        dst.copy_(scaled(src, factor, dtype))


def identity(op: ReduceOp, dtype: torch.dtype) -> float | int:
    """The value a rank that has joined contributes: it leaves every other rank's values unchanged."""
    if op in (ReduceOp.Average, ReduceOp.Sum):
        return 0
    if op == ReduceOp.Product:
        return 1
    if dtype.is_floating_point:
        return float("inf") if op == ReduceOp.Min else float("-inf")
    info = torch.iinfo(dtype)
    return info.max if op == ReduceOp.Min else info.min


class Handle:
    """The completion of one asynchronous operation: a result or an error, and an event to wait on."""

    __slots__ = ("name", "result", "error", "_event")

    def __init__(self, name: str) -> None:
        self.name = name
        self.result: Any = None
        self.error: BaseException | None = None
        self._event = threading.Event()

    def set_result(self, result: Any) -> None:
        self.result = result
        self._event.set()

    def set_error(self, error: BaseException) -> None:
        self.error = error
        self._event.set()

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<Handle {self.name!r} {state}>"


@dataclass(eq=False)
class Request:
    """One operation on this rank: what the coordinator sees (``meta``) and what the engine moves."""

    meta: Meta
    handle: Handle
    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    submitted_us: float = 0.0
