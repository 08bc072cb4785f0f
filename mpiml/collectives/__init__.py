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

Every call checks that all ranks called the same collective with the same
algorithm, op, dtype, length, root and name: one tiny allreduce of a 62-bit
code of the call's signature, on a duplicate of ``comm`` of its own. If they
did not, or if any rank's arguments are invalid, *every* rank raises
``CollectiveError`` naming what differed and on which ranks, instead of
hanging or computing garbage. The first call of each shape waits for the
check before moving data; across hosts (``SPECULATE``), later calls up to
``SPECULATE_BYTES`` run beside it, so the check adds no round trip (see ``_checked``; after such a call
fails, the buffer's contents are undefined, as after an MPI error). The
algorithms run on another private duplicate of ``comm``, so their messages
never meet the caller's own.

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
import os
import threading
import zlib
from collections.abc import Callable
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
from ._schedule import Mismatch, guard

__all__ = ["allreduce", "reduce_scatter", "allgather", "allgather_inplace", "broadcast", "ALGORITHMS", "Algorithm",
           "CollectiveError", "DTYPES", "OPS", "chunk_bounds", "private_comm", "busy"]


class Algorithm(NamedTuple):
    """One way of moving bytes; each function takes a 1-D numpy array and a communicator.

    ``speculative``: the collectives whose every wait watches a running agreement check
    (``_schedule.wait``), so that they may run beside it (see ``_checked``).
    """

    allreduce: Callable[..., None]
    reduce_scatter: Callable[..., tuple[int, int]]
    allgather: Callable[..., None]
    broadcast: Callable[..., None]
    speculative: frozenset[str] = frozenset()


ALGORITHMS: dict[str, Algorithm] = {
    name: Algorithm(m.allreduce, m.reduce_scatter, m.allgather, m.broadcast, frozenset(m.SPECULATIVE))
    for name, m in (("mpi", mpi), ("ring", ring), ("tree", tree), ("butterfly", butterfly), ("hier", hier),
                    ("auto", auto))
}


class CollectiveError(ValueError):
    """Raised on every rank when ranks disagree about a collective or one passed bad arguments."""


# ---------------------------------------------------------------- one channel per caller's communicator

_keyval: int | None = None
_channel_lock = threading.Lock()  # two threads' first calls must not both Dup (a collective) at once


class _Channel:
    """What mpiml keeps for one caller's communicator, cached on it: a private duplicate for the algorithms'
    messages (``data``), another for the agreement checks (``check``), the call shapes this rank has seen
    agreed, and the lock that admits one thread at a time."""

    __slots__ = ("data", "check", "size", "agreed", "word", "request", "lock", "label", "abandoned")

    def __init__(self, comm: MPI.Intracomm) -> None:
        self.check = comm.Dup()
        self.data = comm.Dup()
        self.size = comm.Get_size()
        self.agreed: dict[tuple[Any, ...], list[Any]] = {}  # call shapes seen -> _plan
        self.word = np.zeros(2, dtype=np.int64)  # the agreement check's [code, -code]
        self.request: Any = None  # the check: a persistent allreduce (MPI-4) on ``check``, made on first use
        self.lock = threading.Lock()
        self.label = ""
        self.abandoned: list[Any] = []  # communicators left with messages of failed calls in flight

    def start_check(self, code: int) -> Any:
        """Start this call's agreement check (collective: every call on the channel starts exactly one)."""
        word = self.word
        word[0] = code
        word[1] = -code
        request = self.request
        if request is None:
            try:
                request = self.request = self.check.Allreduce_init(MPI.IN_PLACE, [word, MPI.INT64_T], MPI.MAX)
            except NotImplementedError:  # an MPI before 4.0 (every rank runs the same library: all take this)
                return self.check.Iallreduce(MPI.IN_PLACE, [word, MPI.INT64_T], MPI.MAX)
        request.Start()
        return request

    def free(self) -> None:
        if self.request is not None:
            try:
                self.request.Free()
            except MPI.Exception:
                pass
        for c in (self.data, self.check):
            try:
                c.Free()
            except MPI.Exception:  # already gone during MPI_Finalize
                pass


def _drop_channel(comm: MPI.Comm, keyval: int, channel: _Channel) -> None:
    channel.free()


_world: _Channel | None = None  # COMM_WORLD's (comm=None), kept here: the attribute lookup costs a call


def _channel(comm: MPI.Comm | None) -> _Channel:
    global _keyval, _world
    if comm is None:
        if _world is None:
            _world = _channel(MPI.COMM_WORLD)
        return _world
    if _keyval is not None:
        try:
            found = comm.Get_attr(_keyval)
        except AttributeError:
            found = None
        if found is not None:
            return found
    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(f"comm must be an MPI intracommunicator, got {type(comm).__name__}")
    with _channel_lock:
        if _keyval is None:
            _keyval = MPI.Comm.Create_keyval(delete_fn=_drop_channel)
        found = comm.Get_attr(_keyval)
        if found is None:
            found = _Channel(comm)
            comm.Set_attr(_keyval, found)
    return found


def private_comm(comm: MPI.Comm | None) -> MPI.Comm:
    """The duplicate of ``comm`` (COMM_WORLD if None) that mpiml's algorithms send on, made once, cached on it."""
    return _channel(comm).data


# ---------------------------------------------------------------- one thread at a time per communicator


def _enter(ch: _Channel, kind: str, name: Any) -> int:
    """Admit this thread alone to the channel (else CollectiveError) and tell the watchdog; see ``_leave``."""
    if not ch.lock.acquire(blocking=False):
        raise CollectiveError(
            f"{kind}: another thread is already in collective {ch.label!r} on this communicator; "
            "collectives on one communicator must be called one at a time, in the same order on every rank, "
            "which two threads cannot promise: give each thread its own communicator (comm.Dup())")
    label = ch.label = name if name.__class__ is str and name else kind
    return watchdog.enter(label)


def _leave(ch: _Channel, seq: int) -> None:
    watchdog.leave(seq)
    ch.lock.release()


def busy(comm: MPI.Comm | None = None) -> bool:
    """Whether an mpiml collective is running on ``comm`` now (in any thread of this process)."""
    comm = MPI.COMM_WORLD if comm is None else comm
    ch = comm.Get_attr(_keyval) if _keyval is not None else None
    return ch is not None and ch.lock.locked()


# ---------------------------------------------------------------- agreement check

_KINDS = ("allreduce", "reduce_scatter", "allgather", "broadcast")
_FIELDS = ("collective", "algorithm", "op", "dtype", "length", "root", "error", "name", "float16 range",
           "speculated")
_LENGTH, _ERROR, _NAME, _PRESCALE, _SPECULATED = 4, 6, 7, 8, 9
# Up to this size the agreement check of a call shape seen agreed before may run beside the data instead of
# before it: a round trip costs about as much as the data there. Above it, one round trip is under 2%.
SPECULATE_BYTES = 1 << 20
# When calls run beside their check: "network" (default) when the ranks span several hosts, where a round trip
# is network latency that running beside hides, and no host has more ranks than cores; "always"; "never".
# Measured on one 2-core host: at 2 ranks the check costs about the same either way (both are CPU work on
# shared memory), and with more ranks than cores a call running beside its check took 5 ms instead of 0.1 ms
# at 4 KiB (every wait then spins through other ranks' time slices). $MPIML_SPECULATE overrides it.
SPECULATE = os.environ.get("MPIML_SPECULATE", "network")
if SPECULATE not in ("network", "always", "never"):
    raise ValueError(f"MPIML_SPECULATE must be network, always or never, got {SPECULATE!r}")
_MASK62 = (1 << 62) - 1


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


_KIND_CODES = {k: i for i, k in enumerate(_KINDS)}
_OP_CODES = {o: i for i, o in enumerate(OPS)}
_DTYPE_CODES = {d: i for i, d in enumerate(DTYPES)}


def _fields(args: _Args, same_length: bool) -> tuple[int, ...]:
    """The call's shape: everything the ranks must agree on except its name (``_LENGTH`` .. ``_ERROR``)."""
    flat, op = args.flat, args.op
    return (
        _KIND_CODES[args.kind],
        _code(args.algorithm),
        _OP_CODES.get(op, -1) if op.__class__ is str else -1,
        _DTYPE_CODES[flat.dtype] if flat is not None else -1,
        flat.array.size if flat is not None and same_length else -1,
        args.root,
        args.error.code if args.error is not None else 0,
    )


def _signature_code(shape: tuple[int, ...]) -> int:
    """A 62-bit code of a call's shape, the same on every rank (CRC-based, not Python's salted hash)."""
    packed = array.array("q", shape).tobytes()
    return (zlib.crc32(packed) << 31 ^ zlib.crc32(packed, 0x5BD1E995)) & _MASK62


def _named(base: int, name: str | None) -> int:
    """A shape's code with the call's name mixed in (no name: the shape's own)."""
    return (base ^ _code(name) * 0x9E3779B1) & _MASK62 if name else base


class _Agreed(NamedTuple):
    """What the check established beyond "all ranks agree": each rank's length (allgather), and whether any
    rank's float16 mean must divide before summing."""

    lengths: list[int] | None = None
    prescale: bool = False


_AGREED = _Agreed()


def _may_speculate(ch: _Channel, args: _Args) -> bool:
    """Whether calls of this (agreed) shape may run beside their agreement check: where ``SPECULATE`` says so,
    small, not a float16 mean, and an algorithm whose waits watch the check (``Algorithm.speculative``).
    Collective on a new data channel (its host layout), called by every rank after the same agreed call."""
    if SPECULATE == "never":
        return False
    if SPECULATE != "always":
        layout = hier.topology(ch.data)
        if layout.hosts < 2 or layout.local_size > (os.cpu_count() or 1):
            return False
    flat = args.flat
    if args.prescale or flat.array.nbytes > SPECULATE_BYTES or not flat.array.size:
        return False
    if flat.dtype == "float16" and args.op == "mean":
        return False
    algorithm = args.algorithm
    if algorithm == "auto":
        algorithm = auto.known_choice(flat.array.nbytes, ch.data, flat.dtype)
        if algorithm is None:
            return False
    return args.kind in ALGORITHMS[algorithm].speculative and not (algorithm == "mpi" and flat.dtype == "bfloat16")


def _plan(ch: _Channel, args: _Args, same_length: bool) -> list[Any]:
    """What the channel knows about calls of this shape: [signature code without the name, whether they may
    run beside their check (None: not agreed yet)]. Looked up by the caller's own values (cheap to hash)."""
    flat = args.flat
    if args.error is not None or flat is None:
        return [_signature_code(_fields(args, same_length)), None]
    key = (args.kind, args.algorithm, args.op, flat.dtype, flat.array.size if same_length else -1, args.root)
    plan = ch.agreed.get(key)
    if plan is None:
        if len(ch.agreed) > 4096:  # a program that never repeats a shape: forget, rather than grow
            ch.agreed.clear()
        plan = ch.agreed[key] = [_signature_code(_fields(args, same_length)), None]
    return plan


def _checked(ch: _Channel, args: _Args, body: Callable[[_Channel, _Args, _Agreed], Any],
             same_length: bool = True) -> Any:
    """Check that every rank of the channel called the same collective, and run ``body(ch, args, agreed)``;
    raise CollectiveError on every rank if they did not (or if any rank's arguments are invalid).

    Every call starts the same tiny allreduce on ``ch.check`` (``_Channel.start_check``): the MAX of
    ``[code, -code]`` of its signature (``_signature_code``, ``_named``); the ranks agree iff the result is ``[c, -c]``.
    The first time a shape (the signature without its name) is seen, the body runs once the check has
    passed. After that, calls of a shape that may speculate (``_may_speculate``: small ones) run the body
    *beside* the check, which then costs no round trip: the algorithms' waits also watch it
    (``_schedule.Guard``), so a mismatch stops them instead of hanging, and the data channel, which may then
    hold stray messages, is replaced on every rank. Any disagreement ends in one Allgather of the full
    signatures, to say what differed on which ranks.
    """
    if ch.size == 1:
        if args.error is not None:
            raise CollectiveError(f"{args.kind}: " + "; ".join(_describe(_table(args, False)[None], 0, args, True)))
        return body(ch, args, _AGREED)
    plan = _plan(ch, args, same_length)
    request = ch.start_check(_named(plan[0], args.name))
    speculate = plan[1]
    if not speculate:
        request.Wait()
        word = ch.word
        if word[0] != -word[1] or args.error is not None:  # (an error is in the code: then all ranks have it)
            _disagreement(ch, args, same_length, False)
        result = body(ch, args, _details(ch, args, same_length))
        if speculate is None and args.error is None and same_length:
            plan[1] = _may_speculate(ch, args)
        return result
    guard.request, guard.word = request, ch.word
    try:
        result = body(ch, args, _AGREED)
        guard.settle()
        return result
    except Mismatch:
        _disagreement(ch, args, same_length, True)
    except MPI.Exception:
        try:
            guard.settle()
        except Mismatch:
            _disagreement(ch, args, same_length, True)
        raise
    finally:
        pending = guard.request
        guard.request = guard.word = None
        if pending is not None:  # the body failed otherwise: finish the check (every rank started it)
            pending.Wait()


def _details(ch: _Channel, args: _Args, same_length: bool) -> _Agreed:
    """After the ranks agreed on the signature: each rank's length where lengths may differ (allgather), and
    whether any rank's float16 mean needs prescaling (only then: one more tiny collective on ``ch.check``)."""
    if same_length and (args.op != "mean" or args.flat.dtype != "float16"):
        return _AGREED  # the common case: nothing more to agree on
    lengths = None
    if not same_length:
        lengths = ch.check.allgather(args.flat.array.size)
    prescale = False
    if args.op == "mean" and args.flat.dtype == "float16" and args.kind in ("allreduce", "reduce_scatter"):
        prescale = bool(ch.check.allreduce(int(args.prescale), op=MPI.MAX))
    return _Agreed(lengths, prescale)


def _table(args: _Args, speculated: bool) -> np.ndarray:
    return np.array(_fields(args, True) + (_code(args.name) if args.name else 0, int(args.prescale),
                                           int(speculated)), dtype=np.int64)


def _disagreement(ch: _Channel, args: _Args, same_length: bool, speculated: bool) -> None:
    """The check failed: gather every rank's full signature on ``ch.check`` and raise CollectiveError saying
    what differed on which ranks. Collective: every rank of the channel gets here from the same check."""
    mine = _table(args, speculated)
    p = ch.check.Get_size()
    table = np.empty((p, mine.size), dtype=np.int64)
    ch.check.Allgather([mine, MPI.INT64_T], [table, MPI.INT64_T])
    names = ch.check.allgather(args.name if isinstance(args.name, str) else None) if len(
        set(table[:, _NAME].tolist())) > 1 else None
    if table[:, _SPECULATED].any():  # messages of the failed call may be left in flight: a fresh channel
        ch.abandoned.append(ch.data)
        ch.data = ch.check.Dup()
        ch.agreed.clear()
    problems = _describe(table, ch.check.Get_rank(), args, same_length, names) or [
        "ranks disagree on the call (signature codes differ)"]
    raise CollectiveError(f"{args.kind}: " + "; ".join(problems))


def _describe(table: np.ndarray, me: int, args: _Args, same_length: bool,
              call_names: list[str | None] | None = None) -> list[str]:
    problems = []
    for rank in np.flatnonzero(table[:, _ERROR]):
        code = int(table[rank, _ERROR])
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


_VALID: set[tuple[str, str, str, str]] = set()  # (kind, algorithm, op, dtype) combinations checked valid


def _prepare(kind: str, x: Any, algorithm: str, op: str, root: Any, ch: _Channel, writeable: bool = True,
             name: Any = None) -> _Args:
    """Validate one rank's arguments without raising: errors travel through the agreement check.

    Whatever a rank passed (a float or huge root, an unhashable algorithm or
    name), it reaches the agreement check, marked invalid, so that every
    rank raises instead of this one alone.
    """
    flat, error, valid_root = None, None, -1
    try:
        flat = flatten(x, writeable=writeable)
        if name is not None and name.__class__ is not str:
            raise InputError(f"name must be a str or None, got {type(name).__name__}", E_NAME)
        if (root.__class__ is not int or algorithm.__class__ is not str or op.__class__ is not str
                or not 0 <= root < ch.size or (kind, algorithm, op, flat.dtype) not in _VALID):
            _validate(kind, algorithm, op, root, ch.size, flat)
        valid_root = int(root)
    except InputError as e:
        error = e
    except Exception as e:  # anything odd about the buffer is still reported collectively
        error = InputError(f"{type(e).__name__}: {e}", E_TYPE)
    mean16 = error is None and op == "mean" and flat.dtype == "float16" and float16_mean_may_overflow(flat, ch.size)
    return _Args(kind, algorithm, op, flat, valid_root, error, name if name.__class__ is str else None, mean16)


def _validate(kind: str, algorithm: Any, op: Any, root: Any, size: int, flat: Flat) -> None:
    """The checks ``_prepare`` skips for combinations it has seen valid before; raises InputError."""
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        raise InputError(f"unknown algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}", E_ALGORITHM)
    if isinstance(root, bool) or not isinstance(root, (int, np.integer)):
        raise InputError(f"root must be an int rank, got {type(root).__name__} {root!r}", E_ROOT_TYPE)
    if not 0 <= root < size:
        raise InputError(f"root {root} is not a rank of a communicator of size {size}", E_ROOT)
    if kind in ("allreduce", "reduce_scatter"):
        reduction(op, flat.dtype)
    if op.__class__ is str:
        _VALID.add((kind, algorithm, op, flat.dtype))


def _label(name: Any, kind: str) -> str:
    """What the watchdog calls this call (never raises, whatever ``name`` is)."""
    return name if isinstance(name, str) and name else kind


def _op_to_run(args: _Args, agreed: _Agreed, p: int) -> str:
    """``args.op``, or "sum" after dividing by p where any rank's float16 mean could overflow if summed first."""
    if args.op == "mean" and agreed.prescale:
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
    ch = _channel(comm)
    seq = _enter(ch, "allreduce", name)
    try:
        _checked(ch, _prepare("allreduce", x, algorithm, op, 0, ch, name=name), _allreduce)
    finally:
        _leave(ch, seq)
    return x


def _allreduce(ch: _Channel, args: _Args, agreed: _Agreed) -> None:
    flat = args.flat
    if flat.array.size:
        op = _op_to_run(args, agreed, ch.size)
        ALGORITHMS[args.algorithm].allreduce(flat.array, reduction(op, flat.dtype), ch.data)
        write_back(flat)


def reduce_scatter(x: Any, op: str = "sum", algorithm: str = "ring", comm: MPI.Comm | None = None,
                   name: str | None = None) -> Any:
    """Reduce ``x`` across ranks, leaving rank r's segment complete; returns that segment.

    Segments follow ``chunk_bounds(len, p)`` over the flattened ``x`` (the
    first ``len % p`` ranks get one element more). The returned segment is a
    view into ``x`` (a new array if ``x`` is a Fortran-ordered numpy array:
    segments are in logical order); the rest of ``x`` is used as scratch and
    left undefined.
    """
    ch = _channel(comm)
    seq = _enter(ch, "reduce_scatter", name)
    try:
        args = _prepare("reduce_scatter", x, algorithm, op, 0, ch, name=name)
        lo, hi = _checked(ch, args, _reduce_scatter)
    finally:
        _leave(ch, seq)
    return _view(args.flat, lo, hi)


def _reduce_scatter(ch: _Channel, args: _Args, agreed: _Agreed) -> tuple[int, int]:
    flat = args.flat
    if not flat.array.size:
        return 0, 0
    op = _op_to_run(args, agreed, ch.size)
    lo, hi = ALGORITHMS[args.algorithm].reduce_scatter(flat.array, reduction(op, flat.dtype), ch.data)
    write_back(flat)
    return lo, hi


def allgather(chunk: Any, algorithm: str = "ring", comm: MPI.Comm | None = None, name: str | None = None) -> Any:
    """Concatenate every rank's (flattened) ``chunk`` in rank order; returns a new 1-D buffer.

    Chunks may have different lengths on different ranks; dtypes must agree.
    A chunk of any layout is taken in logical (row-major) order. The result
    is a numpy array or torch tensor, like ``chunk``.
    """
    ch = _channel(comm)
    seq = _enter(ch, "allgather", name)
    try:
        args = _prepare("allgather", chunk, algorithm, "sum", 0, ch, writeable=False, name=name)
        return _checked(ch, args, _allgather, same_length=False)
    finally:
        _leave(ch, seq)


def _allgather(ch: _Channel, args: _Args, agreed: _Agreed) -> Any:
    lengths = agreed.lengths if agreed.lengths is not None else [args.flat.array.size]
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    out, view = like(args.flat, bounds[-1])
    r = ch.check.Get_rank() if len(lengths) > 1 else 0
    view[bounds[r]:bounds[r + 1]] = args.flat.array
    if bounds[-1] and len(lengths) > 1:
        ALGORITHMS[args.algorithm].allgather(view, bounds, ch.data)
    return out


def allgather_inplace(x: Any, algorithm: str = "ring", comm: MPI.Comm | None = None, name: str | None = None) -> Any:
    """Complete ``x`` in place from every rank's segment of it; returns ``x``.

    Rank r's segment is ``chunk_bounds(len, p)[r:r + 2]`` of the flattened ``x``, the one
    ``reduce_scatter`` leaves complete (reduce_scatter followed by this is an allreduce); the rest of
    ``x`` is overwritten by the other ranks' segments. No buffer is allocated for contiguous ``x``.
    """
    ch = _channel(comm)
    seq = _enter(ch, "allgather", name)
    try:
        _checked(ch, _prepare("allgather", x, algorithm, "sum", 0, ch, name=name), _allgather_inplace)
    finally:
        _leave(ch, seq)
    return x


def _allgather_inplace(ch: _Channel, args: _Args, agreed: _Agreed) -> None:
    a = args.flat.array
    if a.size:
        ALGORITHMS[args.algorithm].allgather(a, chunk_bounds(a.size, ch.size), ch.data)
        write_back(args.flat)


def broadcast(x: Any, root: int = 0, algorithm: str = "mpi", comm: MPI.Comm | None = None,
              name: str | None = None) -> Any:
    """Copy ``x`` from rank ``root`` to every rank, in place; returns ``x``."""
    ch = _channel(comm)
    seq = _enter(ch, "broadcast", name)
    try:
        _checked(ch, _prepare("broadcast", x, algorithm, "sum", root, ch, name=name), _broadcast)
    finally:
        _leave(ch, seq)
    return x


def _broadcast(ch: _Channel, args: _Args, agreed: _Agreed) -> None:
    if args.flat.array.size:
        ALGORITHMS[args.algorithm].broadcast(args.flat.array, args.root, ch.data)
        write_back(args.flat)


def _view(flat: Flat, lo: int, hi: int) -> Any:
    """Elements [lo, hi) of the flattened caller's buffer, as the caller's type."""
    src = flat.source
    if isinstance(src, np.ndarray) or flat.copied:
        return flat.array[lo:hi]
    return src.detach().reshape(-1)[lo:hi]
