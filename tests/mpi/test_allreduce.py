"""allreduce: every algorithm x op x dtype x length, numpy and torch, checked against MPI's own Allreduce."""

import numpy as np
import pytest
import torch
from conftest import same_on_all_ranks
from mpi4py import MPI

from mpiml import collectives

OPEN_MPI = "Open MPI" in MPI.Get_library_version()

ALGORITHMS = ["mpi", "ring", "tree", "butterfly", "hier"]  # "auto" dispatches to these: tested below
OPS = ["sum", "mean", "max", "min", "prod"]
NUMPY_DTYPES = ["float16", "float32", "float64", "int32", "int64"]
MPI_OPS = {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD}


def lengths(p):
    # 70001 elements: more than one chunk of every algorithm for every dtype, so pipelining runs.
    return sorted({0, 1, max(p - 1, 0), p + 1, 7, 13, 1001, 70001})


def integer_values(rng, op, n):
    """Small integers, so every sum and product is exact in every dtype (float16 and bfloat16 included)."""
    if op == "prod":
        return rng.choice(np.array([-2, -1, 1, 2]), n)
    return rng.integers(-9, 10, n)


def oracle(values, op, dtype, comm):
    """MPI_Allreduce on the same values, in float64 for the half types (exact for these integers), then mean."""
    wide = values.astype(np.float64 if dtype in ("float16", "bfloat16") else dtype)
    comm.Allreduce(MPI.IN_PLACE, wide, MPI_OPS[op])
    if dtype == "bfloat16":
        out = torch.from_numpy(wide).to(torch.bfloat16)
        return out / comm.size if op == "mean" else out
    out = wide.astype(dtype)
    if op == "mean":
        out = out // dtype_cast(comm.size, dtype) if dtype.startswith("int") else out / dtype_cast(comm.size, dtype)
    return out


def dtype_cast(v, dtype):
    return np.array(v, dtype=dtype)


def as_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.view(torch.uint16).numpy() if x.dtype == torch.bfloat16 else x.numpy()
    return x


def make(values, dtype, kind):
    if dtype == "bfloat16":
        return torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16)
    arr = values.astype(dtype)
    return torch.from_numpy(arr) if kind == "torch" else arr


CASES = [(d, "numpy") for d in NUMPY_DTYPES] + [(d, "torch") for d in NUMPY_DTYPES + ["bfloat16"]]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype, kind", CASES)
def test_matches_mpi_exactly(world, rng, algorithm, op, dtype, kind):
    for n in lengths(world.size):
        values = integer_values(rng, op, n)
        x = make(values, dtype, kind)
        address = as_numpy(x).ctypes.data
        out = collectives.allreduce(x, op=op, algorithm=algorithm)
        assert out is x and as_numpy(x).ctypes.data == address  # in place, same memory
        expect = oracle(values, op, dtype, world)
        got = as_numpy(x)
        want = as_numpy(expect) if isinstance(expect, torch.Tensor) else expect
        assert got.tobytes() == np.ascontiguousarray(want).tobytes(), f"n={n}: {got[:8]} != {want[:8]}"
        assert same_on_all_ranks(world, got.tobytes())


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_random_floats_within_tolerance(world, rng, algorithm, dtype):
    """Non-integer values: rounding differs from MPI's order, by at most a few ulps per rank."""
    p = world.size
    eps = np.finfo(dtype).eps
    for n in (1, 13, 70001):
        x = rng.standard_normal(n).astype(dtype)
        ref = x.astype(np.float64)
        world.Allreduce(MPI.IN_PLACE, ref, MPI.SUM)
        collectives.allreduce(x, algorithm=algorithm)
        scale = np.sqrt(p) * 4 + 1  # |partial sums| grow like sqrt(p) for these inputs
        np.testing.assert_allclose(x.astype(np.float64), ref, rtol=0, atol=4 * p * eps * scale)
        assert same_on_all_ranks(world, x.tobytes())


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_any_communicator(comm, rng, algorithm):
    """World, a duplicate, COMM_SELF and a reordered split all work, and the caller's comm is untouched."""
    for n in (0, 5, 30001):
        values = rng.integers(-9, 10, n)
        x = values.astype(np.int64)
        collectives.allreduce(x, algorithm=algorithm, comm=comm)
        comm.Allreduce(MPI.IN_PLACE, values, MPI.SUM)
        assert np.array_equal(x, values)
        assert same_on_all_ranks(comm, x.tobytes())


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype, kind", [("float32", "numpy"), ("bfloat16", "torch"), ("int64", "numpy")])
def test_auto_matches_mpi(world, rng, dtype, kind):
    from mpiml.collectives import auto, private_comm
    chosen = set()
    for n in (0, 1, 1001, 300001):
        values = integer_values(rng, "sum", n)
        x = make(values, dtype, kind)
        collectives.allreduce(x, algorithm="auto")
        want = oracle(values, "sum", dtype, world)
        assert as_numpy(x).tobytes() == np.ascontiguousarray(as_numpy(want)).tobytes()
        chosen.add(auto.choose(as_numpy(x).nbytes, private_comm(world)))
    assert chosen <= set(ALGORITHMS)


@pytest.mark.mpi(min_size=1)
def test_many_short_lived_communicators(world):
    """Each communicator caches a private duplicate; freeing the communicator frees it (no leak of contexts)."""
    for i in range(300):
        sub = world.Split(color=0, key=world.rank)
        x = np.full(3, world.rank + i, dtype=np.int32)
        collectives.allreduce(x, algorithm="ring", comm=sub)
        assert x.tolist() == [sum(range(world.size)) + i * world.size] * 3
        sub.Free()


@pytest.mark.mpi(min_size=1)
def test_multidimensional_and_fortran_order(world, rng):
    x = np.asfortranarray(rng.integers(-9, 10, (31, 7)).astype(np.float64))
    ref = np.ascontiguousarray(x)
    world.Allreduce(MPI.IN_PLACE, ref, MPI.SUM)
    collectives.allreduce(x, algorithm="butterfly")
    assert np.array_equal(x, ref)
    t = torch.from_numpy(rng.integers(-9, 10, (5, 6, 7))).float().requires_grad_()
    expect = t.detach().clone()
    world.Allreduce(MPI.IN_PLACE, expect.numpy(), MPI.SUM)
    collectives.allreduce(t, algorithm="tree")
    assert torch.equal(t.detach(), expect)


@pytest.mark.slow
@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_hundred_million_elements(world, algorithm):
    # What 100M elements test (byte counts past 2^31 bits, big chunks) does not depend on K: under MPICH they run
    # at 2 ranks (make test), under Open MPI at 3.
    if world.size == 3 and not OPEN_MPI:
        pytest.skip("at 3 ranks under MPICH: uneven chunks are tested at smaller sizes; 100M elements run at 2")
    n = 100_000_000
    rng = np.random.default_rng(world.rank)
    values = rng.integers(-9, 10, n, dtype=np.int8)
    x = values.astype(np.float32)
    collectives.allreduce(x, algorithm=algorithm)
    expect = values.astype(np.float32)
    world.Allreduce(MPI.IN_PLACE, expect, MPI.SUM)
    assert np.array_equal(x, expect)
    assert same_on_all_ranks(world, x[::9973].tobytes() + x[-1000:].tobytes())
