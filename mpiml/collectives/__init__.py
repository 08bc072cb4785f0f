"""Collective operations over any MPI intracommunicator, with swappable algorithms.

    from mpiml import collectives
    collectives.allreduce(x, op="sum", algorithm="ring", comm=None)     # in place, returns x
    collectives.reduce_scatter(x, op="sum", algorithm="ring", comm=None) # returns this rank's chunk (a view)
    collectives.allgather(chunk, algorithm="ring", comm=None)           # returns a new 1-D buffer
    collectives.allgather_inplace(x, algorithm="ring", comm=None)       # completes x from each rank's segment
    collectives.broadcast(x, root=0, algorithm="mpi", comm=None)        # in place, returns x

``x`` is a contiguous numpy array or CPU torch tensor of float16, float32,
float64, int32, int64 or (torch) bfloat16, of any length; ops are "sum",
"mean", "max", "min", "prod" (integer mean rounds down). ``ALGORITHMS`` maps
names to implementations: "mpi" (the library's own), "ring", "tree",
"butterfly", "hier" (node-aware, through shared memory) and "auto" (picks
one per call from a measured size table).

Every call first checks, with one small Allgather, that all ranks called the
same collective with the same algorithm, op, dtype and length (and root). If
they did not, or if any rank's arguments are invalid, *every* rank raises
``CollectiveError`` naming what differed and on which ranks, instead of
hanging or computing garbage. The algorithms then run on a private duplicate
of ``comm``, so their messages never meet the caller's own.

Elements are combined in logical (row-major) order whatever each rank's
memory layout: a Fortran-ordered array is reduced through a row-major copy
and the result written back. A float16 ``mean`` whose sum could leave
float16's range (on any rank, |x| * p > 65504) divides by p before summing.

One communicator, one thread at a time: collectives on a communicator must
be called in the same order on every rank, which two threads cannot promise.
A call made while another thread's call on the same communicator is still in
progress raises ``CollectiveError`` on that rank (and does nothing); give
each thread its own communicator (``comm.Dup()``).
"""

from __future__ import annotations

import array
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
from mpi4py import MPI

from .. import watchdog
from . import auto, butterfly, hier, mpi, ring, tree
from ._buffers import (
    DTYPES,
    E_ALGORITHM,
    E_NAME,
    E_ROOT,
    E_ROOT_TYPE,
    E_TYPE,
    ERROR_TEXT,
    OPS,
    Flat,
    InputError,
    flatten,
    float16_mean_may_overflow,
    like,
    prescale,
    reduction,
    write_back,
)
from ._chunks import chunk_bounds

__all__ = ["allreduce", "reduce_scatter", "allgather", "allgather_inplace", "broadcast", "ALGORITHMS", "Algorithm",
           "CollectiveError", "DTYPES", "OPS", "chunk_bounds", "private_comm", "busy"]


class Algorithm(NamedTuple):
    """One way of moving bytes; each function takes a 1-D numpy array and a communicator."""

    allreduce: Callable[..., None]
    reduce_scatter: Callable[..., tuple[int, int]]
    allgather: Callable[..., None]
    broadcast: Callable[..., None]


ALGORITHMS: dict[str, Algorithm] = {
    name: Algorithm(m.allreduce, m.reduce_scatter, m.allgather, m.broadcast)
    for name, m in (("mpi", mpi), ("ring", ring), ("tree", tree), ("butterfly", butterfly), ("hier", hier),
                    ("auto", auto))
}


class CollectiveError(ValueError):
    """Raised on every rank when ranks disagree about a collective or one passed bad arguments."""


# ---------------------------------------------------------------- private communicators

_keyval: int | None = None
_private_lock = threading.Lock()  # two threads' first calls must not both Dup (a collective) at once


def _drop_private(comm: MPI.Comm, keyval: int, private: MPI.Comm) -> None:
    try:
        private.Free()
    except MPI.Exception:  # already gone during MPI_Finalize
        pass


def private_comm(comm: MPI.Comm | None) -> MPI.Comm:
    """A duplicate of ``comm`` (COMM_WORLD if None), made once and cached on ``comm`` itself."""
    global _keyval
    comm = MPI.COMM_WORLD if comm is None else comm
    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(f"comm must be an MPI intracommunicator, got {type(comm).__name__}")
    private = comm.Get_attr(_keyval) if _keyval is not None else None
    if private is None:
        with _private_lock:
            if _keyval is None:
                _keyval = MPI.Comm.Create_keyval(delete_fn=_drop_private)
            private = comm.Get_attr(_keyval)
            if private is None:
                private = comm.Dup()
                comm.Set_attr(_keyval, private)
    return private


# ---------------------------------------------------------------- one thread at a time per communicator

_locks: dict[int, threading.Lock] = {}  # id of a private communicator -> held while a collective runs on it
_labels: dict[int, str] = {}  # ... and which collective that is


def _claim(private: MPI.Comm, kind: str, label: str) -> threading.Lock:
    """Hold ``private`` for this call; raise if another thread's collective is using it."""
    key = id(private)
    lock = _locks.get(key) or _locks.setdefault(key, threading.Lock())  # setdefault: one lock, even if racing
    if not lock.acquire(blocking=False):
        raise CollectiveError(
            f"{kind}: another thread is already in collective {_labels.get(key)!r} on this communicator; "
            "collectives on one communicator must be called one at a time, in the same order on every rank, "
            "which two threads cannot promise: give each thread its own communicator (comm.Dup())")
    _labels[key] = label
    return lock


@contextmanager
def _running(comm: MPI.Comm, kind: str, name: Any) -> Iterator[None]:
    """One collective call: this thread alone on ``comm``, and watched by the stall watchdog."""
    label = _label(name, kind)
    lock = _claim(comm, kind, label)
    try:
        with watchdog.watch(label):
            yield
    finally:
        lock.release()


def busy(comm: MPI.Comm | None = None) -> bool:
    """Whether an mpiml collective is running on ``comm`` now (in any thread of this process)."""
    comm = MPI.COMM_WORLD if comm is None else comm
    private = comm.Get_attr(_keyval) if _keyval is not None else None
    lock = _locks.get(id(private)) if private is not None else None
    return lock is not None and lock.locked()


# ---------------------------------------------------------------- agreement check

_KINDS = ("allreduce", "reduce_scatter", "allgather", "broadcast")
_FIELDS = ("collective", "algorithm", "op", "dtype", "length", "root", "error", "name", "float16 range")
_PRESCALE = 8  # the column saying this rank's float16 mean could overflow if summed before dividing


def _code(name: Any) -> int:
    return _crc(name) if isinstance(name, str) else -1  # anything else (even unhashable) is not a valid name


@lru_cache(maxsize=64)
def _crc(name: str) -> int:
    return zlib.crc32(name.encode())


class _Args(NamedTuple):
    kind: str
    algorithm: str
    op: str
    flat: Flat | None
    root: int
    error: InputError | None
    name: str | None = None
    prescale: bool = False


def _agree(comm: MPI.Comm, args: _Args, same_length: bool = True) -> np.ndarray | None:
    """Allgather every rank's call signature; raise CollectiveError on all ranks if they differ.

    Returns None when every rank sent the same signature; otherwise (or with
    ``same_length=False``) the (p, 9) int64 signature table (column 4 holds
    each rank's length, column 8 whether its float16 mean needs prescaling).
    """
    flat = args.flat
    mine = array.array("q", (
        _KINDS.index(args.kind),
        _code(args.algorithm),
        OPS.index(args.op) if isinstance(args.op, str) and args.op in OPS else -1,
        DTYPES.index(flat.dtype) if flat is not None else -1,
        flat.array.size if flat is not None else -1,
        args.root,
        args.error.code if args.error is not None else 0,
        _code(args.name) if args.name else 0,
        int(args.prescale),
    ))
    p = comm.Get_size()
    table = bytearray(len(mine) * mine.itemsize * p)
    comm.Allgather([mine, MPI.INT64_T], [table, MPI.INT64_T])
    if same_length and args.error is None and table == mine.tobytes() * p:
        return None  # everyone agrees: the common case, decided without decoding anything
    table = np.frombuffer(table, dtype=np.int64).reshape(p, len(mine))
    names = comm.allgather(args.name if isinstance(args.name, str) else None) if len(
        set(table[:, 7].tolist())) > 1 else None
    problems = _describe(table, comm.Get_rank(), args, same_length, names)
    if problems:
        raise CollectiveError(f"{args.kind}: " + "; ".join(problems))
    return table


def _describe(table: np.ndarray, me: int, args: _Args, same_length: bool,
              call_names: list[str | None] | None = None) -> list[str]:
    problems = []
    for rank in np.flatnonzero(table[:, 6]):
        code = int(table[rank, 6])
        text = f"rank {rank} passed {ERROR_TEXT.get(code, f'bad input (code {code})')}"
        if rank == me and args.error is not None:
            text += f" ({args.error})"
        problems.append(text)
    names = {_code(n): n for n in ALGORITHMS}
    if isinstance(args.algorithm, str):
        names[_code(args.algorithm)] = args.algorithm
    decode = {
        0: lambda c: _KINDS[c],
        1: lambda c: repr(names.get(c, f"<algorithm #{c}>")),
        2: lambda c: repr(OPS[c]) if c >= 0 else "an unknown op",
        3: lambda c: DTYPES[c] if c >= 0 else "no valid buffer",
        4: lambda c: str(c),
        5: lambda c: str(c),
        7: lambda c: repr(next((n for n in call_names or [] if n and _code(n) == c), None)),
    }
    compared = [0, 1, 3, 5, 7] + ([2] if args.kind in ("allreduce", "reduce_scatter") else []) + (
        [4] if same_length else [])
    for col in sorted(compared):
        values = table[:, col]
        if (values == values[0]).all():
            continue
        groups = {}
        for rank, v in enumerate(values.tolist()):
            groups.setdefault(v, []).append(rank)
        detail = "; ".join(f"{decode[col](v)} on rank{'s' if len(r) > 1 else ''} {_ranks(r)}"
                           for v, r in groups.items())
        problems.append(f"ranks disagree on {_FIELDS[col]}: {detail}")
    return problems


def _ranks(ranks: list[int]) -> str:
    return ",".join(map(str, ranks)) if len(ranks) <= 8 else f"{ranks[0]}..{ranks[-1]} ({len(ranks)} ranks)"


def _prepare(kind: str, x: Any, algorithm: str, op: str, root: Any, comm: MPI.Comm, writeable: bool = True,
             name: Any = None) -> _Args:
    """Validate one rank's arguments without raising: errors travel through the agreement check.

    Whatever a rank passed (a float or huge root, an unhashable algorithm or
    name), it reaches the agreement check, marked invalid, so that every
    rank raises instead of this one alone.
    """
    flat, error, valid_root = None, None, -1
    try:
        flat = flatten(x, writeable=writeable)
        if name is not None and not isinstance(name, str):
            raise InputError(f"name must be a str or None, got {type(name).__name__}", E_NAME)
        if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
            raise InputError(f"unknown algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}", E_ALGORITHM)
        if isinstance(root, bool) or not isinstance(root, (int, np.integer)):
            raise InputError(f"root must be an int rank, got {type(root).__name__} {root!r}", E_ROOT_TYPE)
        if not 0 <= root < comm.Get_size():
            raise InputError(f"root {root} is not a rank of a communicator of size {comm.Get_size()}", E_ROOT)
        valid_root = int(root)
        if kind in ("allreduce", "reduce_scatter"):
            reduction(op, flat.dtype)
    except InputError as e:
        error = e
    except Exception as e:  # anything odd about the buffer is still reported collectively
        error = InputError(f"{type(e).__name__}: {e}", E_TYPE)
    mean16 = error is None and op == "mean" and float16_mean_may_overflow(flat, comm.Get_size())
    return _Args(kind, algorithm, op, flat, valid_root, error, name if isinstance(name, str) else None, mean16)


def _label(name: Any, kind: str) -> str:
    """What the watchdog calls this call (never raises, whatever ``name`` is)."""
    return name if isinstance(name, str) and name else kind


def _op_to_run(args: _Args, table: np.ndarray | None, p: int) -> str:
    """``args.op``, or "sum" after dividing by p where any rank's float16 mean could overflow if summed first."""
    if args.op == "mean" and (args.prescale if table is None else bool(table[:, _PRESCALE].any())):
        prescale(args.flat, p)
        return "sum"
    return args.op


# ---------------------------------------------------------------- public collectives


def allreduce(x: Any, op: str = "sum", algorithm: str = "ring", comm: MPI.Comm | None = None,
              name: str | None = None) -> Any:
    """Reduce ``x`` element-wise across all ranks of ``comm``, in place; returns ``x``.

    Every rank ends with bitwise identical values. Raises CollectiveError on
    every rank if the ranks disagree on algorithm, op, dtype, length or
    ``name`` (an optional label: a rank that skipped a call shows up as
    passing a different name), or if any rank's arguments are invalid.
    """
    comm = private_comm(comm)
    label = _label(name, "allreduce")
    lock = _claim(comm, "allreduce", label)
    seq = watchdog.enter(label)
    try:
        args = _prepare("allreduce", x, algorithm, op, 0, comm, name=name)
        table = _agree(comm, args)
        flat = args.flat
        if flat.array.size:
            op = _op_to_run(args, table, comm.Get_size())
            ALGORITHMS[algorithm].allreduce(flat.array, reduction(op, flat.dtype), comm)
            write_back(flat)
    finally:
        watchdog.leave(seq)
        lock.release()
    return x


def reduce_scatter(x: Any, op: str = "sum", algorithm: str = "ring", comm: MPI.Comm | None = None,
                   name: str | None = None) -> Any:
    """Reduce ``x`` across ranks, leaving rank r's segment complete; returns that segment.

    Segments follow ``chunk_bounds(len, p)`` over the flattened ``x`` (the
    first ``len % p`` ranks get one element more). The returned segment is a
    view into ``x`` (a new array if ``x`` is a Fortran-ordered numpy array:
    segments are in logical order); the rest of ``x`` is used as scratch and
    left undefined.
    """
    comm = private_comm(comm)
    with _running(comm, "reduce_scatter", name):
        args = _prepare("reduce_scatter", x, algorithm, op, 0, comm, name=name)
        table = _agree(comm, args)
        flat = args.flat
        lo = hi = 0
        if flat.array.size:
            op = _op_to_run(args, table, comm.Get_size())
            lo, hi = ALGORITHMS[algorithm].reduce_scatter(flat.array, reduction(op, flat.dtype), comm)
            write_back(flat)
    return _view(flat, lo, hi)


def allgather(chunk: Any, algorithm: str = "ring", comm: MPI.Comm | None = None, name: str | None = None) -> Any:
    """Concatenate every rank's (flattened) ``chunk`` in rank order; returns a new 1-D buffer.

    Chunks may have different lengths on different ranks; dtypes must agree.
    A chunk of any layout is taken in logical (row-major) order. The result
    is a numpy array or torch tensor, like ``chunk``.
    """
    comm = private_comm(comm)
    with _running(comm, "allgather", name):
        args = _prepare("allgather", chunk, algorithm, "sum", 0, comm, writeable=False, name=name)
        table = _agree(comm, args, same_length=False)
        bounds = [0]
        for n in table[:, 4].tolist():
            bounds.append(bounds[-1] + n)
        out, view = like(args.flat, bounds[-1])
        r = comm.Get_rank()
        view[bounds[r]:bounds[r + 1]] = args.flat.array
        if bounds[-1]:
            ALGORITHMS[algorithm].allgather(view, bounds, comm)
    return out


def allgather_inplace(x: Any, algorithm: str = "ring", comm: MPI.Comm | None = None, name: str | None = None) -> Any:
    """Complete ``x`` in place from every rank's segment of it; returns ``x``.

    Rank r's segment is ``chunk_bounds(len, p)[r:r + 2]`` of the flattened ``x``, the one
    ``reduce_scatter`` leaves complete (reduce_scatter followed by this is an allreduce); the rest of
    ``x`` is overwritten by the other ranks' segments. No buffer is allocated for contiguous ``x``.
    """
    comm = private_comm(comm)
    with _running(comm, "allgather", name):
        args = _prepare("allgather", x, algorithm, "sum", 0, comm, name=name)
        _agree(comm, args)
        if args.flat.array.size:
            ALGORITHMS[algorithm].allgather(args.flat.array, chunk_bounds(args.flat.array.size, comm.Get_size()),
                                            comm)
            write_back(args.flat)
    return x


def broadcast(x: Any, root: int = 0, algorithm: str = "mpi", comm: MPI.Comm | None = None,
              name: str | None = None) -> Any:
    """Copy ``x`` from rank ``root`` to every rank, in place; returns ``x``."""
    comm = private_comm(comm)
    with _running(comm, "broadcast", name):
        args = _prepare("broadcast", x, algorithm, "sum", root, comm, name=name)
        _agree(comm, args)
        if args.flat.array.size:
            ALGORITHMS[algorithm].broadcast(args.flat.array, args.root, comm)
            write_back(args.flat)
    return x


def _view(flat: Flat, lo: int, hi: int) -> Any:
    """Elements [lo, hi) of the flattened caller's buffer, as the caller's type."""
    src = flat.source
    if isinstance(src, np.ndarray) or flat.copied:
        return flat.array[lo:hi]
    return src.detach().reshape(-1)[lo:hi]
