"""Ring allreduce: reduce-scatter then allgather around the ring, in pipelined chunks.

The buffer is cut into p segments (``chunk_bounds``; segment i is owned by rank
i at the end of the reduce-scatter) and every segment into the same number of
cache-sized chunks. Rank r always sends to r+1 and receives from r-1::

    reduce-scatter, step s = 0 .. p-2          allgather, step s = 0 .. p-2
    send seg (r-1-s), recv seg (r-2-s), add    send seg (r-s), recv seg (r-1-s)

    p = 3, segments A B C, owners 0 1 2:
      step 0:  0 --C--> 1 --A--> 2 --B--> 0     (each adds what it receives)
      step 1:  0 --B--> 1 --C--> 2 --A--> 0     now 0 owns A, 1 owns B, 2 owns C
      allgather passes the finished segments on the same way, twice.

Each element is reduced in exactly one place (its owner) and then copied, so
every rank ends with bitwise identical values. Chunks are processed in
windows of ``WINDOW`` chunk columns: a window's reduce-scatter steps, then its
allgather steps, while the executor keeps the next chunk on the wire during
each reduction; a window is small enough to stay in cache between the two
phases.

Cost (n bytes, p ranks): 2(p-1) messages per chunk column;
time 2(p-1)a + 2n(p-1)/p b + n(p-1)/p g; each rank sends 2n(p-1)/p bytes.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from ._buffers import Reduction
from ._chunks import chunk_bounds, num_pieces, pieces
from ._schedule import DIRECT, FINAL, REDUCE, Schedule, Step, recv, run, send

__all__ = ["allreduce", "allreduce_schedule", "reduce_scatter", "allgather", "broadcast",
           "CHUNK_BYTES", "WINDOW", "DEPTH"]
# Collectives whose waits watch a running agreement check (see collectives._checked).
SPECULATIVE = ("allreduce", "reduce_scatter", "allgather", "broadcast")

CHUNK_BYTES = 256 * 1024  # tuned at 2 ranks with scripts/tune_chunks.py (see README)
WINDOW = 16
DEPTH = 2


def _chunk_pieces(bounds: list[int], piece: int) -> list[list[tuple[int, int]]]:
    """Every segment cut into the same number of pieces (the longest segment decides)."""
    longest = max(bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1))
    count = num_pieces(longest, piece)
    return [pieces(bounds[i], bounds[i + 1], count) for i in range(len(bounds) - 1)]


def _reduce_scatter_steps(segs: list[list[tuple[int, int]]], r: int, p: int, cols: range) -> list[Step]:
    right, left = (r + 1) % p, (r - 1) % p
    steps = []
    for s in range(p - 1):
        out, into = segs[(r - 1 - s) % p], segs[(r - 2 - s) % p]
        mode = REDUCE | (FINAL if s == p - 2 else 0)
        steps.extend(Step(right, *out[j], left, *into[j], mode) for j in cols)
    return steps


def _allgather_steps(segs: list[list[tuple[int, int]]], r: int, p: int, cols: range) -> list[Step]:
    right, left = (r + 1) % p, (r - 1) % p
    steps = []
    for s in range(p - 1):
        out, into = segs[(r - s) % p], segs[(r - 1 - s) % p]
        steps.extend(Step(right, *out[j], left, *into[j], DIRECT) for j in cols)
    return steps


def _piece(itemsize: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // itemsize)


@lru_cache(maxsize=256)
def _allreduce_schedule(n: int, itemsize: int, p: int, r: int, chunk_bytes: int, window: int,
                        depth: int) -> Schedule:
    segs = _chunk_pieces(chunk_bounds(n, p), _piece(itemsize, chunk_bytes))
    ncols = len(segs[0])
    steps: list[Step] = []
    for start in range(0, ncols, window):
        cols = range(start, min(start + window, ncols))
        steps += _reduce_scatter_steps(segs, r, p, cols)
        steps += _allgather_steps(segs, r, p, cols)
    return Schedule(steps, depth)


@lru_cache(maxsize=256)
def _phase_schedule(bounds: tuple[int, ...], itemsize: int, r: int, chunk_bytes: int, gather: bool,
                    depth: int) -> Schedule:
    p = len(bounds) - 1
    segs = _chunk_pieces(list(bounds), _piece(itemsize, chunk_bytes))
    phase = _allgather_steps if gather else _reduce_scatter_steps
    return Schedule(phase(segs, r, p, range(len(segs[0]))), depth)


@lru_cache(maxsize=256)
def _broadcast_schedule(n: int, itemsize: int, p: int, r: int, root: int, chunk_bytes: int, depth: int) -> Schedule:
    v = (r - root) % p
    prev = (r - 1) % p if v > 0 else -1
    nxt = (r + 1) % p if v < p - 1 else -1
    steps = []
    for lo, hi in pieces(0, n, num_pieces(n, _piece(itemsize, chunk_bytes))):
        if prev >= 0:
            steps.append(recv(prev, lo, hi, DIRECT))
        if nxt >= 0:
            steps.append(send(nxt, lo, hi))
    return Schedule(steps, depth)


def allreduce_schedule(n: int, itemsize: int, p: int, r: int) -> Schedule:
    """Rank r's allreduce schedule for ``n`` elements of ``itemsize`` bytes on p ranks, with the current
    settings: what ``allreduce`` runs, and what ``mpiml.plan`` and ``mpiml.cluster`` replay and count."""
    return _allreduce_schedule(n, itemsize, p, r, CHUNK_BYTES, WINDOW, DEPTH)


def allreduce(a: np.ndarray, red: Reduction, comm: Any) -> None:
    """Reduce the 1-D array ``a`` across ``comm`` in place."""
    p, r = comm.Get_size(), comm.Get_rank()
    if p > 1:
        run(comm, a, _allreduce_schedule(a.size, a.itemsize, p, r, CHUNK_BYTES, WINDOW, DEPTH), red)


def reduce_scatter(a: np.ndarray, red: Reduction, comm: Any) -> tuple[int, int]:
    """Reduce ``a`` so that segment r of ``chunk_bounds(a.size, p)`` is complete on rank r.

    Returns that segment's ``(start, stop)``; the rest of ``a`` is left as scratch.
    """
    p, r = comm.Get_size(), comm.Get_rank()
    bounds = tuple(chunk_bounds(a.size, p))
    if p > 1:
        run(comm, a, _phase_schedule(bounds, a.itemsize, r, CHUNK_BYTES, False, DEPTH), red)
    return bounds[r], bounds[r + 1]


def allgather(out: np.ndarray, bounds: list[int], comm: Any) -> None:
    """Fill ``out`` from every rank's segment ``bounds[i]:bounds[i+1]`` (own one already in place)."""
    p, r = comm.Get_size(), comm.Get_rank()
    if p > 1:
        run(comm, out, _phase_schedule(tuple(bounds), out.itemsize, r, CHUNK_BYTES, True, DEPTH), None)


def broadcast(a: np.ndarray, root: int, comm: Any) -> None:
    """Pipelined chain: root -> root+1 -> ... -> root-1, one chunk behind the other."""
    p, r = comm.Get_size(), comm.Get_rank()
    if p > 1:
        run(comm, a, _broadcast_schedule(a.size, a.itemsize, p, r, root, CHUNK_BYTES, DEPTH), None)
