"""Issue 11's collective defects: bad arguments on one rank, memory layouts, float16 means, two threads.

Each test reproduces a defect found by trying mpiml as a user would (hang, crash or silently wrong result).
"""

import threading
import time

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpiml import collectives
from mpiml.collectives import CollectiveError


def still_usable(world):
    x = np.ones(5, dtype=np.int32)
    collectives.allreduce(x, algorithm="ring")
    assert x.tolist() == [world.size] * 5


# ---------------------------------------------------------------- defect 3: bad arguments on one rank only


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("root, fragment", [(0.5, "root"), (2 ** 63, "root"), (-(2 ** 70), "root"), ("0", "root")])
def test_a_bad_root_on_one_rank_raises_everywhere(world, root, fragment):
    mine = root if world.rank == 1 else 0
    with pytest.raises(CollectiveError, match=f"rank 1 passed .*{fragment}"):
        collectives.broadcast(np.ones(3), root=mine)
    still_usable(world)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("call", ["allreduce", "reduce_scatter", "allgather", "broadcast"])
def test_an_unhashable_algorithm_on_one_rank_raises_everywhere(world, call):
    algorithm = ["ring"] if world.rank == 1 else "ring"
    with pytest.raises(CollectiveError, match="rank 1 passed an unknown algorithm"):
        getattr(collectives, call)(np.ones(4), algorithm=algorithm)
    still_usable(world)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("name", [["step", 3], {"a": 1}, 7, b"bytes"])
def test_an_invalid_name_on_one_rank_raises_everywhere(world, name):
    mine = name if world.rank == 1 else "step 3"
    with pytest.raises(CollectiveError, match="rank 1 passed an invalid name"):
        collectives.allreduce(np.ones(4), name=mine)
    still_usable(world)


@pytest.mark.mpi(min_size=2)
def test_an_unhashable_op_on_one_rank_raises_everywhere(world):
    op = ["sum"] if world.rank == 1 else "sum"
    with pytest.raises(CollectiveError, match="rank 1 passed an unknown op"):
        collectives.allreduce(np.ones(4), op=op)
    still_usable(world)


# ---------------------------------------------------------------- defect 6: memory layouts


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["mpi", "ring", "tree", "butterfly"])
def test_mixed_c_and_fortran_layouts_reduce_in_logical_order(world, rng, algorithm):
    values = rng.integers(-50, 50, (5, 7)).astype(np.float64)
    x = np.asfortranarray(values) if world.rank % 2 else values.copy()
    out = collectives.allreduce(x, algorithm=algorithm)
    expect = values.copy()
    world.Allreduce(MPI.IN_PLACE, expect, MPI.SUM)
    assert out is x and x.shape == (5, 7)
    assert np.array_equal(x, expect)
    assert x.flags.f_contiguous == bool(world.rank % 2)  # the caller's array, in its own layout


@pytest.mark.mpi(min_size=2)
def test_reduce_scatter_and_broadcast_of_a_fortran_array_use_logical_order(world, rng):
    values = rng.integers(-50, 50, (4, 6)).astype(np.int64)
    total = values.copy()
    world.Allreduce(MPI.IN_PLACE, total, MPI.SUM)
    x = np.asfortranarray(values) if world.rank == 0 else values.copy()
    mine = collectives.reduce_scatter(x)
    bounds = collectives.chunk_bounds(24, world.size)
    assert np.array_equal(mine, total.reshape(-1)[bounds[world.rank]:bounds[world.rank + 1]])
    y = np.asfortranarray(values) if world.rank == 1 else values.copy()
    collectives.broadcast(y, root=0)
    assert np.array_equal(y, world.bcast(values, root=0))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("algorithm", ["mpi", "ring"])
def test_allgather_of_a_transposed_chunk_is_in_logical_order(world, rng, algorithm):
    chunk = rng.integers(-50, 50, (3, 2)).astype(np.int32)
    out = collectives.allgather(chunk.T, algorithm=algorithm)  # a Fortran-ordered view
    assert np.array_equal(out, np.concatenate([c.T.reshape(-1) for c in world.allgather(chunk)]))
    t = torch.from_numpy(chunk).T  # a non-contiguous tensor: read, so any layout is fine
    out = collectives.allgather(t, algorithm=algorithm)
    assert torch.equal(out, torch.cat([torch.from_numpy(c).T.reshape(-1) for c in world.allgather(chunk)]))


# ---------------------------------------------------------------- defect 9: float16 mean


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["mpi", "ring", "tree", "butterfly"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_float16_mean_of_large_values_does_not_overflow(world, rng, algorithm, kind):
    big = rng.uniform(40000, 65000, 33).astype(np.float16)
    x = big.copy() if kind == "numpy" else torch.from_numpy(big.copy())
    collectives.allreduce(x, op="mean", algorithm=algorithm)
    got = x if kind == "numpy" else x.numpy()
    wide = big.astype(np.float64)
    world.Allreduce(MPI.IN_PLACE, wide, MPI.SUM)
    expect = wide / world.size
    assert np.isfinite(got).all()
    assert np.allclose(got.astype(np.float64), expect, rtol=2e-3 * world.size)
    digests = world.allgather(got.tobytes())
    assert all(d == digests[0] for d in digests)


@pytest.mark.mpi(min_size=2)
def test_float16_mean_60000_on_every_rank_is_60000(world):
    x = np.full(4, 60000, dtype=np.float16)
    collectives.allreduce(x, op="mean", algorithm="ring")
    # pre-scaled by 1/K, the partial sums round in float16 (59968 at K = 8): finite and within its precision
    assert np.all(np.isfinite(x)) and np.allclose(x.astype(np.float64), 60000, rtol=2 ** -10 * world.size)
    # only one rank holding large values still decides for everyone (the same arithmetic everywhere)
    y = np.full(4, 60000 if world.rank == 0 else 0, dtype=np.float16)
    mine = collectives.reduce_scatter(y, op="mean")
    b = collectives.chunk_bounds(4, world.size)
    assert np.allclose(mine, np.full(b[world.rank + 1] - b[world.rank], 60000 / world.size), rtol=1e-3)


# ---------------------------------------------------------------- defect 4: two threads, one communicator


@pytest.mark.mpi(min_size=2)
def test_first_use_from_two_threads_makes_one_private_communicator(world):
    comm = world.Dup()
    start = threading.Barrier(2)
    made = []

    def first_use():
        start.wait()
        made.append(collectives.private_comm(comm))

    threads = [threading.Thread(target=first_use) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert made[0] is made[1]
    x = np.ones(3)
    collectives.allreduce(x, comm=comm)
    assert x.tolist() == [world.size] * 3


@pytest.mark.mpi(min_size=2)
def test_a_second_thread_on_a_busy_communicator_raises(world, rng):
    """Rank 0 starts an allreduce on a thread; the other ranks join it only after rank 0's main thread has
    tried a second collective on the same communicator, which must raise instead of mixing messages."""
    comm, signal = world.Dup(), world.Dup()
    collectives.private_comm(comm)  # made now, on every rank: the first call's Dup is itself collective
    values = rng.integers(-9, 10, 100).astype(np.float64)
    x = values.copy()
    errors = []
    if world.rank == 0:
        worker = threading.Thread(target=lambda: collectives.allreduce(x, comm=comm, name="from a thread"))
        worker.start()
        deadline = time.monotonic() + 30
        while not collectives.busy(comm) and time.monotonic() < deadline:
            time.sleep(0.001)
        try:
            collectives.allreduce(np.ones(100), comm=comm, name="from the main thread")
        except CollectiveError as e:
            errors.append(str(e))
        for r in range(1, world.size):
            signal.send(True, dest=r)
        worker.join()
    else:
        signal.recv(source=0)
        collectives.allreduce(x, comm=comm, name="from a thread")
    expect = values.copy()
    world.Allreduce(MPI.IN_PLACE, expect, MPI.SUM)
    assert np.array_equal(x, expect)
    if world.rank == 0:
        assert len(errors) == 1 and "another thread" in errors[0] and "from a thread" in errors[0], errors
    still_usable(world)
