"""reduce_scatter, allgather and broadcast for every algorithm, against MPI's own collectives."""

import numpy as np
import pytest
import torch
from conftest import same_on_all_ranks
from mpi4py import MPI

from mpiml import collectives
from mpiml.collectives import chunk_bounds

ALGORITHMS = ["mpi", "ring", "tree", "butterfly", "hier", "auto"]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("op", ["sum", "mean", "max", "min", "prod"])
def test_reduce_scatter(comm, rng, algorithm, op):
    p, r = comm.size, comm.rank
    for n in (0, 1, p + 1, 1001, 70001):
        values = rng.choice(np.array([-2, -1, 1, 2]), n) if op == "prod" else rng.integers(-9, 10, n)
        x = values.astype(np.float64)
        mine = collectives.reduce_scatter(x, op=op, algorithm=algorithm, comm=comm)
        full = values.astype(np.float64)
        comm.Allreduce(MPI.IN_PLACE, full, {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN,
                                            "prod": MPI.PROD}[op])
        if op == "mean":
            full /= p
        b = chunk_bounds(n, p)
        assert np.array_equal(mine, full[b[r]:b[r + 1]])
        assert mine.size == 0 or np.shares_memory(mine, x)  # a view of the caller's buffer


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_reduce_scatter_torch_bfloat16(world, rng, algorithm):
    n = 999
    values = rng.integers(-9, 10, n)
    t = torch.from_numpy(values).to(torch.bfloat16)
    mine = collectives.reduce_scatter(t, algorithm=algorithm)
    full = values.astype(np.float64)
    world.Allreduce(MPI.IN_PLACE, full, MPI.SUM)
    b = chunk_bounds(n, world.size)
    assert isinstance(mine, torch.Tensor) and mine.dtype == torch.bfloat16
    assert torch.equal(mine, torch.from_numpy(full[b[world.rank]:b[world.rank + 1]]).to(torch.bfloat16))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", ["float16", "float32", "int64"])
def test_allgather_variable_lengths(comm, rng, algorithm, dtype):
    for scale in (0, 1, 40000):
        n = int(rng.integers(0, 5)) + scale * (comm.rank % 3)
        chunk = rng.integers(-100, 100, n).astype(dtype)
        out = collectives.allgather(chunk, algorithm=algorithm, comm=comm)
        parts = comm.allgather(chunk)
        assert out.dtype == chunk.dtype and np.array_equal(out, np.concatenate(parts))
        assert same_on_all_ranks(comm, out.tobytes())


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_allgather_torch(world, algorithm):
    t = torch.arange(3, dtype=torch.bfloat16) + world.rank
    out = collectives.allgather(t, algorithm=algorithm)
    expect = torch.cat([torch.arange(3, dtype=torch.bfloat16) + r for r in range(world.size)])
    assert isinstance(out, torch.Tensor) and torch.equal(out, expect)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_broadcast_every_root(comm, rng, algorithm):
    for root in range(comm.size):
        for n in (0, 1, 77, 90001):
            x = rng.standard_normal(n)
            expect = comm.bcast(x, root=root)
            out = collectives.broadcast(x, root=root, algorithm=algorithm, comm=comm)
            assert out is x and np.array_equal(x, expect)


@pytest.mark.mpi(min_size=1)
def test_broadcast_torch_parameters(world):
    torch.manual_seed(world.rank)
    model = torch.nn.Linear(5, 3)
    for param in model.parameters():
        collectives.broadcast(param.data, root=0, algorithm="tree")
    torch.manual_seed(0)
    reference = torch.nn.Linear(5, 3)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)
