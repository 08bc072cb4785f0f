"""Ranks that disagree, or pass bad input on one rank only: a clear error on every rank, never a hang."""

import numpy as np
import pytest
from mpi4py import MPI

from mpiml import collectives
from mpiml.collectives import CollectiveError


def expect_error_everywhere(world, call, *fragments):
    with pytest.raises(CollectiveError) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    # the communicator is still usable afterwards: nothing was left in flight
    x = np.ones(5, dtype=np.int32)
    collectives.allreduce(x, algorithm="ring")
    assert x.tolist() == [world.size] * 5
    return message


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["mpi", "ring", "tree", "butterfly"])
def test_length_mismatch(world, algorithm):
    n = 1000 + (1 if world.rank == world.size - 1 else 0)
    expect_error_everywhere(world, lambda: collectives.allreduce(np.ones(n), algorithm=algorithm),
                            "allreduce", "length", f"1001 on rank {world.size - 1}", "1000 on rank")


@pytest.mark.mpi(min_size=2)
def test_dtype_mismatch(world):
    dtype = np.float64 if world.rank == 0 else np.float32
    expect_error_everywhere(world, lambda: collectives.allreduce(np.ones(10, dtype=dtype)),
                            "dtype", "float64 on rank 0", "float32 on rank")


@pytest.mark.mpi(min_size=2)
def test_op_mismatch(world):
    op = "max" if world.rank == 1 else "sum"
    expect_error_everywhere(world, lambda: collectives.allreduce(np.ones(10), op=op),
                            "ranks disagree on op", "'max' on rank 1")


@pytest.mark.mpi(min_size=2)
def test_algorithm_mismatch(world):
    algorithm = "tree" if world.rank == 0 else "ring"
    expect_error_everywhere(world, lambda: collectives.allreduce(np.ones(10), algorithm=algorithm),
                            "ranks disagree on algorithm", "'tree' on rank 0", "'ring' on rank")


@pytest.mark.mpi(min_size=2)
def test_collective_mismatch(world):
    def call():
        if world.rank == 0:
            collectives.broadcast(np.ones(10))
        else:
            collectives.allreduce(np.ones(10))
    expect_error_everywhere(world, call, "ranks disagree on collective", "broadcast on rank 0")


@pytest.mark.mpi(min_size=2)
def test_unknown_algorithm_on_one_rank(world):
    algorithm = "rnig" if world.rank == 1 else "ring"
    message = expect_error_everywhere(world, lambda: collectives.allreduce(np.ones(4), algorithm=algorithm),
                                      "rank 1 passed an unknown algorithm")
    if world.rank == 1:
        assert "'rnig'" in message and "choose from" in message


@pytest.mark.mpi(min_size=2)
def test_bad_buffer_on_one_rank(world):
    def call():
        x = np.ones((10, 2))[:, 0] if world.rank == 0 else np.ones(10)
        collectives.allreduce(x)
    expect_error_everywhere(world, call, "rank 0 passed a buffer that is not contiguous")


@pytest.mark.mpi(min_size=2)
def test_unsupported_dtype_on_one_rank(world):
    def call():
        x = np.ones(10, dtype=np.complex128 if world.rank == 1 else np.float64)
        collectives.allreduce(x)
    expect_error_everywhere(world, call, "rank 1 passed an unsupported dtype")


@pytest.mark.mpi(min_size=2)
def test_broadcast_root_mismatch(world):
    root = 1 if world.rank == 0 else 0
    expect_error_everywhere(world, lambda: collectives.broadcast(np.ones(3), root=root), "ranks disagree on root")


@pytest.mark.mpi(min_size=1)
def test_root_out_of_range(world):
    expect_error_everywhere(world, lambda: collectives.broadcast(np.ones(3), root=world.size),
                            "a root outside the communicator")


@pytest.mark.mpi(min_size=2)
def test_allgather_dtype_mismatch_but_lengths_may_differ(world):
    out = collectives.allgather(np.arange(world.rank, dtype=np.int64))
    assert out.tolist() == [i for r in range(world.size) for i in range(r)]
    dtype = np.int32 if world.rank == 0 else np.int64
    expect_error_everywhere(world, lambda: collectives.allgather(np.ones(3, dtype=dtype)), "dtype")


@pytest.mark.mpi(min_size=1)
def test_intercommunicator_rejected(world):
    with pytest.raises(TypeError, match="intracommunicator"):
        collectives.allreduce(np.ones(3), comm="not a communicator")
    assert isinstance(MPI.COMM_WORLD, MPI.Intracomm)


@pytest.mark.mpi(min_size=2)
def test_a_rank_that_skipped_a_named_collective_is_named(world):
    """Same length, dtype and op: only the name tells the skipped call from the next one."""
    x = np.ones(8)
    names = ["step 3", "step 4"] if world.rank != 1 else ["step 4"]  # rank 1 skipped step 3
    with pytest.raises(CollectiveError, match=r"ranks disagree on name: 'step 3' on ranks? 0.*'step 4' on rank 1"):
        for name in names:
            collectives.allreduce(x, name=name)
    collectives.allreduce(x, name="step 4")  # everyone agrees again: the communicator still works
