"""The agreement check after a call shape has been agreed once: it runs beside the data (no round trip),
and a mismatch that appears only after many matching calls still raises CollectiveError on every rank,
never hangs, and leaves the communicator usable."""

import numpy as np
import pytest
from mpi4py import MPI

from mpiml import collectives
from mpiml.collectives import SPECULATE_BYTES, CollectiveError, auto

ALGORITHMS = ["mpi", "ring", "tree", "butterfly", "auto"]


def oracle_sum(world, x):
    expect = x.copy()
    world.Allreduce(MPI.IN_PLACE, expect, MPI.SUM)
    return expect


def speculates(comm, algorithm, nbytes):
    """Whether a call of an agreed shape runs beside its check (then a failed one replaces the data channel)."""
    if algorithm == "auto":
        algorithm = auto.known_choice(nbytes, collectives.private_comm(comm))
    return "allreduce" in collectives.ALGORITHMS[algorithm].speculative


def still_usable(world, comm, rng, before=None, speculated=True):
    """``before``: the data channel before the failed call; one that ran beside its check replaces it."""
    if before is not None:
        replaced = collectives.private_comm(comm) is not before
        assert replaced == speculated, "replaced" if replaced else "the failed call did not run beside its check"
    for algorithm in ALGORITHMS:
        x = rng.standard_normal(37)
        expect = oracle_sum(world, x)
        collectives.allreduce(x, algorithm=algorithm, comm=comm)
        assert np.allclose(x, expect, rtol=1e-12, atol=1e-12)


@pytest.fixture
def comm(world, monkeypatch):
    """A fresh channel (nothing cached from other tests) whose small calls run beside their check, as they do
    across hosts (the default, collectives.SPECULATE = "network", does it only there)."""
    monkeypatch.setattr(collectives, "SPECULATE", "always")
    c = world.Dup()
    yield c
    c.Free()


@pytest.mark.mpi(min_size=2)
def test_on_one_host_calls_wait_for_their_check_by_default(world, rng):
    c = world.Dup()
    x = rng.standard_normal(64)
    for step in range(5):
        collectives.allreduce(x, algorithm="ring", comm=c, name=f"step {step}")
    before = collectives.private_comm(c)
    with pytest.raises(CollectiveError, match="ranks disagree on name"):
        collectives.allreduce(x, algorithm="ring", comm=c, name="step 5" if world.rank else "step 6")
    still_usable(world, c, rng, before, speculated=collectives.hier.topology(before).hosts > 1)
    c.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_many_matching_calls_agree_with_the_oracle(world, comm, rng, algorithm):
    """Speculative calls (a cached shape, below SPECULATE_BYTES) and checked ones both give MPI's result."""
    for n in (1, 7, 1000, 1000, 1000, SPECULATE_BYTES // 8, SPECULATE_BYTES // 8 + 1, 1000):
        for _ in range(3):
            x = rng.standard_normal(n)
            expect = oracle_sum(world, x)
            collectives.allreduce(x, algorithm=algorithm, comm=comm, name=f"n {n}")
            assert np.allclose(x, expect, rtol=1e-12, atol=1e-12)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_rank_that_skips_a_call_after_many_matching_ones_is_named(world, comm, rng, algorithm):
    x = rng.standard_normal(64)
    for step in range(40):
        collectives.allreduce(x, algorithm=algorithm, comm=comm, name=f"step {step}")
    steps = [40, 41] if world.rank != 1 else [41]  # rank 1 skipped step 40
    before = collectives.private_comm(comm)
    with pytest.raises(CollectiveError, match=r"ranks disagree on name: 'step 40' on ranks? 0.*'step 41' on rank 1"):
        for step in steps:
            collectives.allreduce(x, algorithm=algorithm, comm=comm, name=f"step {step}")
    still_usable(world, comm, rng, before, speculates(comm, algorithm, x.nbytes))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_length_mismatch_after_many_matching_calls(world, comm, rng, algorithm):
    for _ in range(20):
        collectives.allreduce(rng.standard_normal(500), algorithm=algorithm, comm=comm)
        collectives.allreduce(rng.standard_normal(501), algorithm=algorithm, comm=comm)
    n = 501 if world.rank == world.size - 1 else 500  # both shapes were agreed before, on every rank
    before = collectives.private_comm(comm)
    with pytest.raises(CollectiveError, match=f"ranks disagree on length: .*501 on rank {world.size - 1}"):
        collectives.allreduce(rng.standard_normal(n), algorithm=algorithm, comm=comm)
    still_usable(world, comm, rng, before, speculates(comm, algorithm, 8 * n))


@pytest.mark.mpi(min_size=2)
def test_an_algorithm_mismatch_after_both_algorithms_were_agreed(world, comm, rng):
    """Both sides' shapes are cached, so both run their (different) schedules before the check settles."""
    for _ in range(10):
        for algorithm in ("ring", "tree", "mpi"):
            collectives.allreduce(rng.standard_normal(300), algorithm=algorithm, comm=comm)
    for mine in (("ring", "tree"), ("mpi", "butterfly"), ("tree", "mpi")):
        algorithm = mine[0] if world.rank == 0 else mine[1]
        before = collectives.private_comm(comm)
        either = speculates(comm, mine[0], 2400) or speculates(comm, mine[1], 2400)
        with pytest.raises(CollectiveError, match=f"ranks disagree on algorithm: '{mine[0]}' on rank 0"):
            collectives.allreduce(rng.standard_normal(300), algorithm=algorithm, comm=comm)
        still_usable(world, comm, rng, before, either)
        for _ in range(2):  # the new channel must agree on the shapes again before speculating
            for algorithm in ("ring", "tree", "mpi", "butterfly"):
                collectives.allreduce(rng.standard_normal(300), algorithm=algorithm, comm=comm)


@pytest.mark.mpi(min_size=2)
def test_different_collectives_after_both_were_agreed(world, comm, rng):
    x = rng.standard_normal(100)
    for _ in range(5):
        collectives.allreduce(x, algorithm="ring", comm=comm)
        collectives.broadcast(x, algorithm="ring", comm=comm)
    before = collectives.private_comm(comm)
    with pytest.raises(CollectiveError, match="ranks disagree on collective: broadcast on rank 0"):
        if world.rank == 0:
            collectives.broadcast(x, algorithm="ring", comm=comm)
        else:
            collectives.allreduce(x, algorithm="ring", comm=comm)
    still_usable(world, comm, rng, before)


@pytest.mark.mpi(min_size=2)
def test_an_op_mismatch_after_both_ops_were_agreed(world, comm, rng):
    for _ in range(5):
        for op in ("sum", "max"):
            collectives.allreduce(rng.standard_normal(50), op=op, algorithm="butterfly", comm=comm)
    op = "max" if world.rank == 1 else "sum"
    before = collectives.private_comm(comm)
    with pytest.raises(CollectiveError, match="ranks disagree on op: .*'max' on rank 1"):
        collectives.allreduce(rng.standard_normal(50), op=op, algorithm="butterfly", comm=comm)
    still_usable(world, comm, rng, before)


@pytest.mark.mpi(min_size=2)
def test_bad_input_on_one_rank_after_many_good_calls(world, comm, rng):
    for _ in range(10):
        collectives.allreduce(rng.standard_normal(20), algorithm="ring", comm=comm)
    x = rng.standard_normal(20) if world.rank != 1 else rng.standard_normal(40)[::2]  # not contiguous
    before = collectives.private_comm(comm)
    with pytest.raises(CollectiveError, match="rank 1 passed a buffer that is not contiguous"):
        collectives.allreduce(x, algorithm="ring", comm=comm)
    still_usable(world, comm, rng, before)
