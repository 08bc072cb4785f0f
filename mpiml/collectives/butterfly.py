"""Butterfly allreduce: recursive halving + recursive doubling (Rabenseifner).

With p a power of two, rank v pairs with v XOR mask. Reduce-scatter halves
the window each stage (mask = p/2, p/4, .. 1): keep the half your bit
selects, send the other half, add the partner's copy of the half you keep.
Allgather retraces the stages (mask = 1, 2, .. p/2), doubling the window::

    p = 4, blocks 0..3          halving                doubling
    rank 0 (00) <-> 2 (10)   mask 2: 0,1 | 2,3      mask 1: 0 <-> 1, 2 <-> 3
    rank 1 (01) <-> 3 (11)   mask 1: 0 | 1 ...      mask 2: 0 <-> 2, 1 <-> 3
    after halving rank v holds block v, complete; after doubling, everything.

Messages below ``SMALL_BYTES`` use recursive doubling instead: at every
stage exchange the whole vector with v XOR mask and add (lg p messages of n
bytes, latency-optimal).

Any other p folds first (MPICH's rule): with pof2 the largest power of two
<= p and rem = p - pof2, among ranks 0 .. 2 rem - 1 every even rank sends
its vector to the odd rank above it, which adds it and stands for both; the
pof2 survivors (new rank r//2 for those, r - rem for ranks >= 2 rem) run the
algorithm, and each odd rank sends the result back to its even partner.

Each element is finished on one rank and then copied, and pairwise sums are
commutative, so all ranks end bitwise identical.

Cost: large 2 lg p a + 2n(p-1)/p b + n(p-1)/p g, each rank sends 2n(p-1)/p
bytes; small lg p (a + n b + n g), each rank sends n lg p bytes; folding
adds n bytes for each rank of a folded pair.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from ._buffers import Reduction
from ._chunks import chunk_bounds, num_pieces, pieces
from ._schedule import DIRECT, FINAL, REDUCE, Schedule, Step, exchange, recv, run, send

__all__ = ["allreduce", "allreduce_schedule", "reduce_scatter", "allgather", "broadcast",
           "CHUNK_BYTES", "SMALL_BYTES", "DEPTH"]
# Collectives whose waits watch a running agreement check (see collectives._checked).
SPECULATIVE = ("allreduce", "reduce_scatter", "allgather", "broadcast")

CHUNK_BYTES = 256 * 1024  # tuned at 2 ranks (see README)
SMALL_BYTES = 16 * 1024
DEPTH = 2


class _Fold:
    """MPICH's non-power-of-two rule: who folds into whom, and the survivors' numbering."""

    def __init__(self, r: int, p: int) -> None:
        self.pof2 = 1 << (p.bit_length() - 1)
        self.rem = p - self.pof2
        if r < 2 * self.rem:
            self.v = -1 if r % 2 == 0 else r // 2
            self.partner = r + 1 if r % 2 == 0 else r - 1
        else:
            self.v = r - self.rem
            self.partner = -1

    def real(self, v: int) -> int:
        return 2 * v + 1 if v < self.rem else v + self.rem

    def first_rank(self, v: int) -> int:
        """The lowest real rank survivor v stands for."""
        return 2 * v if v < self.rem else v + self.rem


def _halving(f: _Fold, blocks: list[int], piece: int) -> list[Step]:
    """Recursive halving over pof2 ``blocks``; survivor v ends with block v reduced."""
    steps: list[Step] = []
    lo, hi, mask = 0, f.pof2, f.pof2 >> 1
    while mask:
        mid = lo + (hi - lo) // 2
        keep, give = ((mid, hi), (lo, mid)) if f.v & mask else ((lo, mid), (mid, hi))
        mode = REDUCE | (FINAL if mask == 1 else 0)
        steps += exchange(f.real(f.v ^ mask), blocks[give[0]], blocks[give[1]],
                          f.real(f.v ^ mask), blocks[keep[0]], blocks[keep[1]], mode, piece)
        lo, hi = keep
        mask >>= 1
    return steps


def _doubling(f: _Fold, blocks: list[int], piece: int) -> list[Step]:
    """Recursive doubling allgather over pof2 ``blocks``, starting from block v."""
    steps: list[Step] = []
    mask = 1
    while mask < f.pof2:
        mine = f.v & ~(mask - 1)
        theirs = mine ^ mask
        peer = f.real(f.v ^ mask)
        steps += exchange(peer, blocks[mine], blocks[mine + mask], peer, blocks[theirs], blocks[theirs + mask],
                          DIRECT, piece)
        mask <<= 1
    return steps


def _whole_doubling(f: _Fold, n: int, piece: int) -> list[Step]:
    """Small messages: exchange the whole vector with v XOR mask and add, lg pof2 times."""
    steps: list[Step] = []
    mask = 1
    while mask < f.pof2:
        peer = f.real(f.v ^ mask)
        mode = REDUCE | (FINAL if mask << 1 == f.pof2 else 0)
        steps += exchange(peer, 0, n, peer, 0, n, mode, piece)
        mask <<= 1
    return steps


def _survivor_blocks(f: _Fold, bounds: list[int]) -> list[int]:
    """Survivor v's block covers the segments of every real rank it stands for."""
    return [bounds[f.first_rank(v)] for v in range(f.pof2)] + [bounds[-1]]


@lru_cache(maxsize=256)
def _allreduce_schedule(n: int, itemsize: int, p: int, r: int, chunk_bytes: int, small_bytes: int,
                        depth: int) -> Schedule:
    f, piece = _Fold(r, p), max(1, chunk_bytes // itemsize)
    if f.v < 0:  # folded: hand over the vector, get the answer back
        return Schedule(exchange(f.partner, 0, n, -1, 0, 0, 0, piece) +
                        exchange(-1, 0, 0, f.partner, 0, n, DIRECT, piece), depth)
    steps = exchange(-1, 0, 0, f.partner, 0, n, REDUCE, piece) if f.partner >= 0 else []
    if n * itemsize < small_bytes:
        steps += _whole_doubling(f, n, piece)
    else:
        blocks = chunk_bounds(n, f.pof2)
        steps += _halving(f, blocks, piece) + _doubling(f, blocks, piece)
    if f.partner >= 0:
        steps += exchange(f.partner, 0, n, -1, 0, 0, 0, piece)
    return Schedule(steps, depth)


@lru_cache(maxsize=256)
def _reduce_scatter_schedule(n: int, itemsize: int, p: int, r: int, chunk_bytes: int, depth: int) -> Schedule:
    f, piece = _Fold(r, p), max(1, chunk_bytes // itemsize)
    bounds = chunk_bounds(n, p)
    if f.v < 0:
        return Schedule(exchange(f.partner, 0, n, -1, 0, 0, 0, piece) +
                        exchange(-1, 0, 0, f.partner, bounds[r], bounds[r + 1], DIRECT, piece), depth)
    steps = exchange(-1, 0, 0, f.partner, 0, n, REDUCE, piece) if f.partner >= 0 else []
    steps += _halving(f, _survivor_blocks(f, bounds), piece)
    if f.partner >= 0:
        steps += exchange(f.partner, bounds[f.partner], bounds[f.partner + 1], -1, 0, 0, 0, piece)
    return Schedule(steps, depth)


@lru_cache(maxsize=256)
def _allgather_schedule(bounds: tuple[int, ...], itemsize: int, r: int, chunk_bytes: int, depth: int) -> Schedule:
    p, n = len(bounds) - 1, bounds[-1]
    f, piece = _Fold(r, p), max(1, chunk_bytes // itemsize)
    if f.v < 0:
        return Schedule(exchange(f.partner, bounds[r], bounds[r + 1], -1, 0, 0, 0, piece) +
                        exchange(-1, 0, 0, f.partner, 0, n, DIRECT, piece), depth)
    steps = []
    if f.partner >= 0:
        steps += exchange(-1, 0, 0, f.partner, bounds[f.partner], bounds[f.partner + 1], DIRECT, piece)
    steps += _doubling(f, _survivor_blocks(f, list(bounds)), piece)
    if f.partner >= 0:
        steps += exchange(f.partner, 0, n, -1, 0, 0, 0, piece)
    return Schedule(steps, depth)


@lru_cache(maxsize=256)
def _broadcast_schedule(n: int, itemsize: int, p: int, r: int, root: int, chunk_bytes: int, depth: int) -> Schedule:
    v = (r - root) % p
    parent, mask = -1, 1
    while mask < p:
        if v & mask:
            parent = (v - mask + root) % p
            break
        mask <<= 1
    children = []
    mask >>= 1
    while mask:
        if v + mask < p:
            children.append((v + mask + root) % p)
        mask >>= 1
    steps: list[Step] = []
    for lo, hi in pieces(0, n, num_pieces(n, max(1, chunk_bytes // itemsize))):
        if parent >= 0:
            steps.append(recv(parent, lo, hi, DIRECT))
        steps += [send(c, lo, hi) for c in children]
    return Schedule(steps, depth)


def allreduce_schedule(n: int, itemsize: int, p: int, r: int) -> Schedule:
    """Rank r's allreduce schedule for ``n`` elements of ``itemsize`` bytes on p ranks, with the current
    settings: what ``allreduce`` runs, and what ``mpiml.plan`` and ``mpiml.cluster`` replay and count."""
    return _allreduce_schedule(n, itemsize, p, r, CHUNK_BYTES, SMALL_BYTES, DEPTH)


def allreduce(a: np.ndarray, red: Reduction, comm: Any) -> None:
    """Reduce the 1-D array ``a`` across ``comm`` in place."""
    p, r = comm.Get_size(), comm.Get_rank()
    if p > 1:
        run(comm, a, _allreduce_schedule(a.size, a.itemsize, p, r, CHUNK_BYTES, SMALL_BYTES, DEPTH), red)


def reduce_scatter(a: np.ndarray, red: Reduction, comm: Any) -> tuple[int, int]:
    """Reduce ``a`` so that segment r of ``chunk_bounds(a.size, p)`` is complete on rank r."""
    p, r = comm.Get_size(), comm.Get_rank()
    bounds = chunk_bounds(a.size, p)
    if p > 1:
        run(comm, a, _reduce_scatter_schedule(a.size, a.itemsize, p, r, CHUNK_BYTES, DEPTH), red)
    return bounds[r], bounds[r + 1]


def allgather(out: np.ndarray, bounds: list[int], comm: Any) -> None:
    """Fill ``out`` from every rank's segment (own one already in place)."""
    if comm.Get_size() > 1:
        run(comm, out, _allgather_schedule(tuple(bounds), out.itemsize, comm.Get_rank(), CHUNK_BYTES, DEPTH), None)


def broadcast(a: np.ndarray, root: int, comm: Any) -> None:
    """Binomial-tree broadcast from ``root``, pipelined in chunks."""
    p, r = comm.Get_size(), comm.Get_rank()
    if p > 1:
        run(comm, a, _broadcast_schedule(a.size, a.itemsize, p, r, root, CHUNK_BYTES, DEPTH), None)
