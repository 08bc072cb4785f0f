import hashlib

import numpy as np
import pytest
from mpi4py import MPI


def _comms():
    """COMM_WORLD, a duplicate, COMM_SELF, and a split of the world into odd and even ranks in reverse order."""
    world = MPI.COMM_WORLD
    split = world.Split(color=world.rank % 2, key=-world.rank)
    return {"world": world, "dup": world.Dup(), "self": MPI.COMM_SELF, "split": split}


_COMMS = None


@pytest.fixture(params=["world", "dup", "self", "split"])
def comm(request):
    global _COMMS
    if _COMMS is None:
        _COMMS = _comms()
    return _COMMS[request.param]


@pytest.fixture
def world():
    return MPI.COMM_WORLD


@pytest.fixture
def rng():
    """Different random values on every rank (constant inputs hide layout bugs)."""
    return np.random.default_rng(12345 + 7919 * MPI.COMM_WORLD.rank)


def same_on_all_ranks(comm, data: bytes) -> bool:
    digests = comm.allgather(hashlib.sha256(data).hexdigest())
    return all(d == digests[0] for d in digests)
