"""Node-aware allreduce: ranks on one host share memory instead of sending messages.

The ranks of a host (``Split_type(COMM_TYPE_SHARED)``) allocate one MPI-3
shared-memory window (``Win.Allocate_shared``); every rank can read every
other's segment directly. With L ranks per host and H hosts, the vector is
cut into L slices; local rank i owns slice i::

    1. vector into own segment            (skipped when it already lives there)
    2. rank i adds slice i of every peer's segment into its own   (reads n, writes n/L)
    3. rank i allreduces slice i with local rank i of every other host
       (ring over the "cross" communicator; only when H > 1)
    4. rank i copies every other slice from its owner's segment    (reads n(L-1)/L)

So inside a host no byte goes through MPI's transport (which copies twice,
into and out of its own shared cells), and across hosts every rank talks
to its counterparts in parallel, each carrying 1/L of the vector. Each
element is reduced in one place and copied, so all ranks end bitwise
identical. Barriers on the host's communicator (with ``Win.Sync``) separate
the phases; the last one keeps a rank from overwriting its segment while a
peer still reads it.

``SharedArena`` hands out buffers that live inside the window; a buffer
allocated there at the same offset on every rank (``DistributedOptimizer``
with ``topology="hier"`` puts its gradient buckets there) skips step 1 and
the copy back: allreduce in place, zero copies.

Hosts whose rank counts differ fall back to the ring algorithm (the slices
would not line up). ``MPIML_FAKE_HOSTS=H`` splits the ranks of one machine
into H contiguous groups that act as hosts, which is how the tests exercise
steps 3 on one machine.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from mpi4py import MPI

from . import ring
from ._buffers import Reduction, reduction
from ._chunks import chunk_bounds

__all__ = ["allreduce", "reduce_scatter", "allgather", "broadcast", "SharedArena", "topology", "CHUNK_BYTES"]
SPECULATIVE: tuple[str, ...] = ()  # its waits do not watch the agreement check (collectives._checked)

CHUNK_BYTES = 256 * 1024
_keyval: int | None = None


class _Topology:
    """How one communicator's ranks sit on hosts, and the host's shared window."""

    def __init__(self, comm: MPI.Intracomm) -> None:
        fake = int(os.environ.get("MPIML_FAKE_HOSTS", "0") or 0)
        if fake > 0:
            self.node = comm.Split(color=comm.Get_rank() * min(fake, comm.Get_size()) // comm.Get_size(),
                                   key=comm.Get_rank())
        else:
            self.node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        self.local, self.local_size = self.node.Get_rank(), self.node.Get_size()
        sizes = comm.allgather(self.local_size)
        self.hosts = comm.allgather(self.local).count(0)
        self.uniform = len(set(sizes)) == 1
        self.cross = comm.Split(color=self.local, key=comm.Get_rank())
        self.world_size = comm.Get_size()
        self.window: MPI.Win | None = None
        self.capacity = 0
        self.segments: list[np.ndarray] = []
        self.arenas: list[SharedArena] = []

    def scratch(self, nbytes: int) -> list[np.ndarray]:
        """Every local rank's scratch segment (uint8), at least ``nbytes`` long; collective on the host."""
        if nbytes > self.capacity:
            if self.window is not None:
                self.window.Unlock_all()
                self.window.Free()
            self.capacity = max(nbytes, 2 * self.capacity)
            self.window, self.segments = _allocate(self.node, self.capacity)
        return self.segments

    def sync(self, window: MPI.Win) -> None:
        """Make every rank's stores to ``window`` visible to the host's other ranks, and wait for them all."""
        window.Sync()
        self.node.Barrier()
        window.Sync()


def _allocate(node: MPI.Intracomm, nbytes: int) -> tuple[MPI.Win, list[np.ndarray]]:
    win = MPI.Win.Allocate_shared(max(nbytes, 1), 1, comm=node)
    win.Lock_all(MPI.MODE_NOCHECK)
    segments = []
    for r in range(node.Get_size()):
        buf, _ = win.Shared_query(r)
        segments.append(np.frombuffer(buf, dtype=np.uint8))
    return win, segments


def topology(comm: MPI.Intracomm) -> _Topology:
    """The host layout of ``comm`` (a private communicator), made once and cached on it."""
    global _keyval
    if _keyval is None:
        _keyval = MPI.Comm.Create_keyval()
    topo = comm.Get_attr(_keyval)
    if topo is None:
        topo = _Topology(comm)
        comm.Set_attr(_keyval, topo)
    return topo


class SharedArena:
    """One buffer of ``nbytes`` per rank inside a new shared window of the host (collective on ``comm``).

    ``tensor(dtype, offset, count)`` returns a torch tensor over this rank's
    part; allreduce with ``algorithm="hier"`` on a tensor living here works
    in place without copies, provided every rank passes the same offset.
    """

    def __init__(self, comm: MPI.Intracomm, nbytes: int) -> None:
        self.topo = topology(comm)
        self.window, self.segments = _allocate(self.topo.node, nbytes)
        self.nbytes = nbytes
        self.base = self.segments[self.topo.local].ctypes.data
        self.topo.arenas.append(self)

    def tensor(self, dtype: torch.dtype, offset: int, count: int) -> torch.Tensor:
        mine = self.segments[self.topo.local]
        return torch.frombuffer(memoryview(mine), dtype=dtype, offset=offset, count=count)

    def locate(self, a: np.ndarray) -> int | None:
        """Byte offset of ``a`` in this rank's part of the arena, or None if it lives elsewhere."""
        address = a.ctypes.data
        if self.base <= address and address + a.nbytes <= self.base + self.nbytes:
            return address - self.base
        return None


def _peer_views(topo: _Topology, a: np.ndarray) -> tuple[list[np.ndarray], MPI.Win, bool]:
    """Every local rank's copy of ``a`` (typed views), their window, and whether ``a`` is already in it."""
    index, offset = -1, -1
    for i, arena in enumerate(topo.arenas):
        found = arena.locate(a)
        if found is not None:
            index, offset = i, found
            break
    # In place only if every rank found its buffer in the same arena at the same offset.
    agreed = len(set(topo.node.allgather((index, offset)))) == 1
    if index >= 0 and agreed:
        arena = topo.arenas[index]
        return [seg[offset:offset + a.nbytes].view(a.dtype) for seg in arena.segments], arena.window, True
    segments = topo.scratch(a.nbytes)
    return [seg[:a.nbytes].view(a.dtype) for seg in segments], topo.window, False


def _sum_of(red: Reduction) -> Reduction:
    """The same op without the division of ``mean``: that happens once, with the global rank count."""
    return reduction("sum", red.dtype) if red.op == "mean" else red


def allreduce(a: np.ndarray, red: Reduction, comm: Any) -> None:
    """Reduce the 1-D array ``a`` across ``comm`` in place through the hosts' shared memory."""
    topo = topology(comm)
    if not topo.uniform:
        ring.allreduce(a, red, comm)
        return
    views, window, in_place = _peer_views(topo, a)
    mine = views[topo.local]
    if not in_place:
        mine[...] = a
    bounds = chunk_bounds(a.size, topo.local_size)
    lo, hi = bounds[topo.local], bounds[topo.local + 1]
    topo.sync(window)
    combine = _sum_of(red).combine
    step = max(1, CHUNK_BYTES // a.itemsize)
    for c in range(lo, hi, step):  # chunk by chunk, so the running sum stays in cache
        e = min(c + step, hi)
        for j, peer in enumerate(views):
            if j != topo.local:
                combine(mine[c:e], peer[c:e])
    if topo.cross.Get_size() > 1 and hi > lo:
        ring.allreduce(mine[lo:hi], _sum_of(red), topo.cross)
    red.finalize(mine[lo:hi], topo.world_size)
    topo.sync(window)
    target = mine if in_place else a
    for j, peer in enumerate(views):
        if j != topo.local or not in_place:
            target[bounds[j]:bounds[j + 1]] = peer[bounds[j]:bounds[j + 1]]
    topo.sync(window)


# The other collectives gain nothing from a host-level split here; they use the ring's.
reduce_scatter = ring.reduce_scatter
allgather = ring.allgather
broadcast = ring.broadcast
