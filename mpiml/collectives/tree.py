"""Binary-tree allreduce: reduce up the tree, broadcast down, both pipelined in chunks.

Ranks are numbered from the root (v = (rank - root) mod p) and laid out as a
binary heap: v's children are 2v+1 and 2v+2, its parent (v-1)//2::

                  0                 chunk j travels up: each node adds its
               /     \\              children's chunk j into its own and
              1       2             passes the sum to its parent; the root
             / \\     / \\            holds the finished chunk j and sends it
            3   4   5   6           down the same edges.

The buffer is cut into chunks of ``CHUNK_BYTES``. Chunk j's reduction and
chunk (j - LAG)'s broadcast share one step of the schedule, so every level
of the tree is busy with a different chunk at once and no message carries
the whole buffer. LAG covers the time a chunk needs to reach the root and
come back, so nobody waits on it while the next chunks are in flight.

Cost (n bytes, c chunks, height h = floor(lg p)): about (2h + c) a + 2n b
on the critical path; a leaf sends n bytes, the root 2n (n to each child),
an inner node 3n (n up, n to each child).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from ._buffers import Reduction
from ._chunks import chunk_bounds, num_pieces, pieces
from ._schedule import DIRECT, FINAL, REDUCE, Schedule, Step, exchange, recv, run, send

__all__ = ["allreduce", "allreduce_schedule", "reduce_scatter", "allgather", "broadcast", "CHUNK_BYTES", "DEPTH"]
# Collectives whose waits watch a running agreement check (see collectives._checked).
SPECULATIVE = ("allreduce", "reduce_scatter", "allgather", "broadcast")

CHUNK_BYTES = 512 * 1024  # tuned at 2 ranks (see README)
DEPTH = 4


class _Node:
    """This rank's place in a binary heap tree, in real ranks.

    Heap slot v holds rank ``(v + root) % p``, or ``p - 1 - v`` for the
    mirrored tree, whose inner nodes are the plain tree's leaves.
    """

    def __init__(self, r: int, p: int, root: int, mirrored: bool = False) -> None:
        def rank(v: int) -> int:
            return p - 1 - v if mirrored else (v + root) % p
        v = p - 1 - r if mirrored else (r - root) % p
        self.is_root = v == 0
        self.parent = rank((v - 1) // 2) if v > 0 else -1
        self.children = [rank(c) for c in (2 * v + 1, 2 * v + 2) if c < p]
        self.lag = 2 * (p.bit_length() - 1) + 1


def _chunks(n: int, itemsize: int, chunk_bytes: int) -> list[tuple[int, int]]:
    return pieces(0, n, num_pieces(n, max(1, chunk_bytes // itemsize)))


def _up(node: _Node, lo: int, hi: int) -> list[Step]:
    """Chunk [lo, hi): add the children's partial sums, pass ours to the parent."""
    steps = []
    for i, c in enumerate(node.children):
        last = node.is_root and i == len(node.children) - 1
        steps.append(recv(c, lo, hi, REDUCE | (FINAL if last else 0)))
    if not node.is_root:
        steps.append(send(node.parent, lo, hi))
    return steps


def _down(node: _Node, lo: int, hi: int) -> list[Step]:
    """Chunk [lo, hi): take the finished chunk from the parent, hand it to the children."""
    steps = [] if node.is_root else [recv(node.parent, lo, hi, DIRECT)]
    return steps + [send(c, lo, hi) for c in node.children]


def _updown(nodes: list[_Node], chunks: list[tuple[int, int]], up: bool, down: bool) -> list[Step]:
    """Chunk j goes through tree ``nodes[j % len(nodes)]``; its broadcast trails its reduction by the lag."""
    lag = nodes[0].lag if up and down else 0
    steps: list[Step] = []
    for j in range(len(chunks) + lag):
        if up and j < len(chunks):
            steps += _up(nodes[j % len(nodes)], *chunks[j])
        if down and j >= lag:
            steps += _down(nodes[(j - lag) % len(nodes)], *chunks[j - lag])
    return steps


@lru_cache(maxsize=256)
def _allreduce_schedule(n: int, itemsize: int, p: int, r: int, chunk_bytes: int, depth: int) -> Schedule:
    trees = [_Node(r, p, 0), _Node(r, p, 0, mirrored=True)]
    return Schedule(_updown(trees, _chunks(n, itemsize, chunk_bytes), True, True), depth)


@lru_cache(maxsize=256)
def _reduce_scatter_schedule(n: int, itemsize: int, p: int, r: int, chunk_bytes: int, depth: int) -> Schedule:
    bounds = chunk_bounds(n, p)
    node = _Node(r, p, 0)
    steps = _updown([node], _chunks(n, itemsize, chunk_bytes), True, False)
    piece = max(1, chunk_bytes // itemsize)
    if node.is_root:
        for i in range(1, p):
            steps += exchange(i, bounds[i], bounds[i + 1], -1, 0, 0, 0, piece)
    else:
        steps += exchange(-1, 0, 0, 0, bounds[r], bounds[r + 1], DIRECT, piece)
    return Schedule(steps, depth)


@lru_cache(maxsize=256)
def _allgather_schedule(bounds: tuple[int, ...], itemsize: int, r: int, chunk_bytes: int, depth: int) -> Schedule:
    p = len(bounds) - 1
    piece = max(1, chunk_bytes // itemsize)
    node = _Node(r, p, 0)
    steps: list[Step] = []
    if node.is_root:
        for i in range(1, p):
            steps += exchange(-1, 0, 0, i, bounds[i], bounds[i + 1], DIRECT, piece)
    else:
        steps += exchange(0, bounds[r], bounds[r + 1], -1, 0, 0, 0, piece)
    return Schedule(steps + _updown([node], _chunks(bounds[-1], itemsize, chunk_bytes), False, True), depth)


@lru_cache(maxsize=256)
def _broadcast_schedule(n: int, itemsize: int, p: int, r: int, root: int, chunk_bytes: int, depth: int) -> Schedule:
    return Schedule(_updown([_Node(r, p, root)], _chunks(n, itemsize, chunk_bytes), False, True), depth)


def allreduce_schedule(n: int, itemsize: int, p: int, r: int) -> Schedule:
    """Rank r's allreduce schedule for ``n`` elements of ``itemsize`` bytes on p ranks, with the current
    settings: what ``allreduce`` runs, and what ``mpiml.plan`` and ``mpiml.cluster`` replay and count."""
    return _allreduce_schedule(n, itemsize, p, r, CHUNK_BYTES, DEPTH)


def allreduce(a: np.ndarray, red: Reduction, comm: Any) -> None:
    """Reduce the 1-D array ``a`` across ``comm`` in place (tree rooted at rank 0)."""
    p, r = comm.Get_size(), comm.Get_rank()
    if p > 1:
        run(comm, a, _allreduce_schedule(a.size, a.itemsize, p, r, CHUNK_BYTES, DEPTH), red)


def reduce_scatter(a: np.ndarray, red: Reduction, comm: Any) -> tuple[int, int]:
    """Reduce up the tree to rank 0, which sends segment i to rank i; returns this rank's segment."""
    p, r = comm.Get_size(), comm.Get_rank()
    bounds = chunk_bounds(a.size, p)
    if p > 1:
        run(comm, a, _reduce_scatter_schedule(a.size, a.itemsize, p, r, CHUNK_BYTES, DEPTH), red)
    return bounds[r], bounds[r + 1]


def allgather(out: np.ndarray, bounds: list[int], comm: Any) -> None:
    """Every rank sends its segment to rank 0, which broadcasts the whole down the tree."""
    if comm.Get_size() > 1:
        run(comm, out, _allgather_schedule(tuple(bounds), out.itemsize, comm.Get_rank(), CHUNK_BYTES, DEPTH), None)


def broadcast(a: np.ndarray, root: int, comm: Any) -> None:
    """Pipelined binary-tree broadcast from ``root``."""
    p, r = comm.Get_size(), comm.Get_rank()
    if p > 1:
        run(comm, a, _broadcast_schedule(a.size, a.itemsize, p, r, root, CHUNK_BYTES, DEPTH), None)
