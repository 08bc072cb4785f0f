"""The node-aware algorithm: zero-copy buffers in the shared window, and several (simulated) hosts."""

import os

import numpy as np
import pytest
import torch
from conftest import same_on_all_ranks
from mpi4py import MPI

from mpiml import collectives
from mpiml.collectives import hier


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("op", ["sum", "mean", "max"])
def test_in_place_in_the_shared_window(world, rng, op):
    private = collectives.private_comm(world)
    arena = hier.SharedArena(private, 8 * 50001)
    t = arena.tensor(torch.float64, 8 * 1, 50000)
    values = rng.integers(-9, 10, 50000)
    t.copy_(torch.from_numpy(values.astype(np.float64)))
    expect = values.astype(np.float64)
    world.Allreduce(MPI.IN_PLACE, expect, {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX}[op])
    if op == "mean":
        expect /= world.size
    scratch_before = hier.topology(private).capacity
    collectives.allreduce(t, op=op, algorithm="hier")
    assert np.array_equal(t.numpy(), expect)
    assert hier.topology(private).capacity == scratch_before  # no scratch copy was needed


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("hosts", [2, 3])
def test_several_simulated_hosts(world, rng, hosts):
    """MPIML_FAKE_HOSTS groups ranks into hosts, so the cross-host step runs (or the ring fallback)."""
    os.environ["MPIML_FAKE_HOSTS"] = str(hosts)
    try:
        comm = world.Dup()  # a fresh communicator: its host layout is computed now, with the setting
        topo = hier.topology(collectives.private_comm(comm))
        assert topo.hosts == min(hosts, world.size)
        for n in (1, 7, 100003):
            values = rng.integers(-9, 10, n)
            x = values.astype(np.float32)
            collectives.allreduce(x, algorithm="hier", comm=comm)
            world.Allreduce(MPI.IN_PLACE, values, MPI.SUM)
            assert np.array_equal(x, values.astype(np.float32))
            assert same_on_all_ranks(world, x.tobytes())
        comm.Free()
    finally:
        del os.environ["MPIML_FAKE_HOSTS"]
