"""Buffers and reductions: what the algorithms operate on, without MPI.

``flatten`` turns a caller's numpy array or CPU torch tensor into a 1-D numpy
view of the *same memory* (no copy), tagged with a dtype name, in logical
(row-major) element order. torch ``bfloat16`` has no numpy equivalent, so its
view is ``uint16`` and its arithmetic is done by torch on the same bytes.
Element i is always the i-th element in row-major order, whatever the
layout in memory: a Fortran-ordered numpy array is copied into row-major
order (``Flat.copied``; the caller writes the result back with
``write_back``), and a buffer that is only read (``writeable=False``) may
have any layout.

``Reduction`` is the element-wise operator an algorithm applies to two
chunks: ``combine(dst, src)`` leaves ``op(dst, src)`` in ``dst``, and
``finalize(view, p)`` turns a completed sum into a mean for ``op="mean"``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = ["DTYPES", "OPS", "Flat", "InputError", "Reduction", "flatten", "write_back", "reduction", "like",
           "float16_mean_may_overflow", "prescale"]

DTYPES: tuple[str, ...] = ("float16", "float32", "float64", "int32", "int64", "bfloat16")
OPS: tuple[str, ...] = ("sum", "mean", "max", "min", "prod")

_NUMPY_NAMES = {np.dtype(name): name for name in DTYPES if name != "bfloat16"}
_NUMPY_UFUNCS = {"sum": np.add, "mean": np.add, "max": np.maximum, "min": np.minimum, "prod": np.multiply}


class InputError(ValueError):
    """A problem with one rank's arguments; ``code`` travels to the other ranks."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# Codes for InputError, shared with the agreement check in collectives/__init__.py.
E_ALGORITHM, E_OP, E_TYPE, E_DTYPE, E_LAYOUT, E_ROOT, E_NAME, E_ROOT_TYPE = 1, 2, 3, 4, 5, 6, 7, 8
ERROR_TEXT = {
    E_ALGORITHM: "an unknown algorithm",
    E_OP: "an unknown op",
    E_TYPE: "a buffer that is neither a numpy array nor a CPU torch tensor",
    E_DTYPE: "an unsupported dtype",
    E_LAYOUT: "a buffer that is not contiguous or not writeable",
    E_ROOT: "a root outside the communicator",
    E_NAME: "an invalid name",
    E_ROOT_TYPE: "a root that is not an int",
}


class Flat(NamedTuple):
    """A 1-D view of a caller's buffer: ``array`` shares memory with ``source`` unless ``copied``
    (then ``array`` is ``source`` in row-major order, and ``write_back`` puts results into ``source``)."""

    array: np.ndarray
    dtype: str
    source: Any
    copied: bool = False


def _torch() -> Any:
    # torch is imported by the caller if they pass tensors; never import it for numpy users.
    return sys.modules.get("torch")


def flatten(x: Any, writeable: bool = True) -> Flat:
    """A zero-copy 1-D view of ``x``; raises InputError naming what is wrong with it."""
    if type(x) is np.ndarray:  # the common case, kept cheap (dtype.name alone costs ~1 us)
        name = _NUMPY_NAMES.get(x.dtype)
        flags = x.flags
        if name is not None and flags.c_contiguous and (flags.writeable or not writeable):
            return Flat(x if x.ndim == 1 else x.reshape(-1), name, x)
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        return _flatten_tensor(x, torch, writeable)
    if not isinstance(x, np.ndarray):
        raise InputError(f"expected a numpy array or a CPU torch tensor, got {type(x).__name__}", E_TYPE)
    name = _NUMPY_NAMES.get(x.dtype)
    if name is None:
        raise InputError(f"unsupported dtype {x.dtype}; supported: {', '.join(DTYPES)}", E_DTYPE)
    if not writeable:  # only read: any layout, copied into row-major order if need be
        return Flat(np.ascontiguousarray(x).reshape(-1), name, x)
    if not (x.flags.c_contiguous or x.flags.f_contiguous):
        raise InputError("array is not contiguous; collectives work in place on contiguous memory", E_LAYOUT)
    if not x.flags.writeable:
        raise InputError("array is read-only; this collective writes its result in place", E_LAYOUT)
    if x.flags.c_contiguous:
        return Flat(x.reshape(-1), name, x)
    # Fortran order: reduce in logical order, as the values mean the same on every rank whatever their layout
    # (reducing memory order would pair element (i, j) on one rank with (j, i)-ish on another).
    return Flat(np.ascontiguousarray(x).reshape(-1), name, x, copied=True)


def write_back(flat: Flat) -> None:
    """Put the result held in ``flat.array`` into the caller's buffer, if ``flatten`` had to copy it."""
    if flat.copied:
        np.copyto(flat.source, flat.array.reshape(flat.source.shape))


def _flatten_tensor(x: Any, torch: Any, writeable: bool) -> Flat:
    if x.device.type != "cpu":
        raise InputError(f"tensor is on {x.device}; mpiml collectives take CPU tensors", E_TYPE)
    if x.layout != torch.strided:
        raise InputError(f"tensor has layout {x.layout}; mpiml collectives take dense (strided) tensors", E_TYPE)
    name = str(x.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise InputError(f"unsupported dtype {name}; supported: {', '.join(DTYPES)}", E_DTYPE)
    if not x.is_contiguous():
        if writeable:
            raise InputError("tensor is not contiguous; call .contiguous() first (the result is written in place)",
                             E_LAYOUT)
        x = x.contiguous()  # only read: a row-major copy
    flat = x.detach().reshape(-1)
    if name == "bfloat16":
        flat = flat.view(torch.uint16)
    return Flat(flat.numpy(), name, x)


def like(flat: Flat, n: int) -> tuple[Any, np.ndarray]:
    """A new buffer of ``n`` elements of the same kind as ``flat.source`` and its 1-D numpy view."""
    torch = _torch()
    if torch is not None and isinstance(flat.source, torch.Tensor):
        out = torch.empty(n, dtype=flat.source.dtype)
        view = out.view(torch.uint16) if flat.dtype == "bfloat16" else out
        return out, view.numpy()
    out = np.empty(n, dtype=flat.array.dtype)
    return out, out


@dataclass(frozen=True)
class Reduction:
    """The element-wise operator of one collective call."""

    op: str
    dtype: str
    combine: Callable[[np.ndarray, np.ndarray], None]
    finalize: Callable[[np.ndarray, int], None]


def _no_finalize(view: np.ndarray, p: int) -> None:
    return None


def _numpy_combine(ufunc: Any) -> Callable[[np.ndarray, np.ndarray], None]:
    def combine(dst: np.ndarray, src: np.ndarray) -> None:
        ufunc(dst, src, out=dst)
    return combine


def _numpy_mean(integer: bool) -> Callable[[np.ndarray, int], None]:
    divide = np.floor_divide if integer else np.divide

    def finalize(view: np.ndarray, p: int) -> None:
        if p > 1:
            divide(view, p, out=view)
    return finalize


def _half_reduction(op: str, dtype: str) -> Reduction:
    """Half precision through torch's kernels: numpy emulates float16 arithmetic (36x slower here) and
    has no bfloat16 at all. Both round each operation's exact result to the half type, as numpy does."""
    import torch
    half = torch.bfloat16 if dtype == "bfloat16" else torch.float16
    fn = {"sum": torch.add, "mean": torch.add, "max": torch.maximum, "min": torch.minimum, "prod": torch.mul}[op]

    def as_half(a: np.ndarray) -> Any:
        return torch.from_numpy(a).view(half)

    def combine(dst: np.ndarray, src: np.ndarray) -> None:
        d = as_half(dst)
        fn(d, as_half(src), out=d)

    def finalize(view: np.ndarray, p: int) -> None:
        if p > 1:
            as_half(view).div_(p)

    return Reduction(op, dtype, combine, finalize if op == "mean" else _no_finalize)


_CACHE: dict[tuple[str, str], Reduction] = {}


def reduction(op: str, dtype: str) -> Reduction:
    """The Reduction for ``op`` on ``dtype``; raises InputError for unknown ones."""
    if not isinstance(op, str):
        raise InputError(f"unknown op {op!r}; choose from {', '.join(OPS)}", E_OP)
    key = (op, dtype)
    red = _CACHE.get(key)
    if red is not None:
        return red
    if op not in OPS:
        raise InputError(f"unknown op {op!r}; choose from {', '.join(OPS)}", E_OP)
    if dtype not in DTYPES:
        raise InputError(f"unsupported dtype {dtype}; supported: {', '.join(DTYPES)}", E_DTYPE)
    if dtype in ("bfloat16", "float16"):
        red = _half_reduction(op, dtype)
    else:
        finalize = _numpy_mean(dtype.startswith("int")) if op == "mean" else _no_finalize
        red = Reduction(op, dtype, _numpy_combine(_NUMPY_UFUNCS[op]), finalize)
    _CACHE[key] = red
    return red


FLOAT16_MAX = 65504.0


def float16_mean_may_overflow(flat: Flat, p: int) -> bool:
    """Whether summing ``p`` ranks' float16 values like these before dividing could exceed float16's range.

    If every rank's largest magnitude m satisfies m * p <= 65504, no partial sum can overflow.
    """
    if flat.dtype != "float16" or p < 2 or not flat.array.size:
        return False
    import torch
    lo, hi = torch.aminmax(torch.from_numpy(flat.array))
    return max(float(hi), -float(lo)) * p > FLOAT16_MAX


def prescale(flat: Flat, p: int) -> None:
    """Divide a float16 buffer by ``p`` in place, so that a sum of ``p`` of them is their mean."""
    import torch
    torch.from_numpy(flat.array).div_(p)
