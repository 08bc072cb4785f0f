"""Bytes each rank really sends through MPI, counted by wrapping the communicator, against DESIGN.md section 4."""

import numpy as np
import pytest
from costmodel import butterfly_expected, ring_expected, tree_expected

from mpiml.collectives import butterfly, private_comm, ring, tree
from mpiml.collectives._buffers import reduction


class CountingComm:
    """Forwards the point-to-point calls the algorithms make, counting the bytes this rank sends."""

    def __init__(self, comm):
        self.comm, self.sent, self.largest = comm, 0, 0

    def Get_rank(self):
        return self.comm.Get_rank()

    def Get_size(self):
        return self.comm.Get_size()

    def _count(self, spec):
        nbytes = np.asarray(spec[0]).nbytes
        self.sent += nbytes
        self.largest = max(self.largest, nbytes)

    def Isend(self, spec, dest, tag=0):
        self._count(spec)
        return self.comm.Isend(spec, dest, tag)

    def Irecv(self, spec, source, tag=0):
        return self.comm.Irecv(spec, source, tag)

    def Sendrecv(self, sendspec, dest, sendtag, recvspec, source, recvtag):
        self._count(sendspec)
        return self.comm.Sendrecv(sendspec, dest, sendtag, recvspec, source, recvtag)


def run_counted(world, module, n, **settings):
    mp = pytest.MonkeyPatch()
    for name, value in settings.items():
        mp.setattr(module, name, value)
    try:
        x = np.random.default_rng(world.rank).standard_normal(n)
        counting = CountingComm(private_comm(world))
        module.allreduce(x, reduction("sum", "float64"), counting)
    finally:
        mp.undo()
    return world.allgather(counting.sent // 8), world.allgather(counting.largest // 8)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("n", [10_000, 100_003])
def test_ring(world, n):
    sent, largest = run_counted(world, ring, n, CHUNK_BYTES=32 * 1024)
    assert sent == ring_expected(world.size, n)
    assert max(largest) <= 4096  # pipelined in 32 KiB chunks


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("n", [10_000, 100_003])
def test_butterfly_large(world, n):
    sent, largest = run_counted(world, butterfly, n, CHUNK_BYTES=32 * 1024, SMALL_BYTES=1)
    want = butterfly_expected(world.size, n, small=False)
    assert all(abs(s - w) <= 2 * world.size.bit_length() for s, w in zip(sent, want)), (sent, want)
    assert max(largest) <= 4096


@pytest.mark.mpi(min_size=1)
def test_butterfly_small_is_recursive_doubling(world):
    n = 300
    sent, _ = run_counted(world, butterfly, n, SMALL_BYTES=1 << 20)
    assert sent == butterfly_expected(world.size, n, small=True)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("n", [10_000, 100_003])
def test_tree(world, n):
    sent, largest = run_counted(world, tree, n, CHUNK_BYTES=32 * 1024)
    assert sent == tree_expected(world.size, n, 32 * 1024)
    assert max(sent) <= 2 * n + 2 * 4096
    assert max(largest) <= 4096
