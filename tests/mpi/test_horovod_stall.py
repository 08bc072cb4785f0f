"""Operations pending on only some ranks: barriers pass them, object ops match, stalls end in a bounded time.

Every test here runs with a short ``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS``,
so a regression (two ranks waiting under different names) fails with
``HorovodInternalError`` after a few seconds instead of hanging the suite.
"""

import itertools
import time

import pytest
import torch
from mpi4py import MPI
from test_horovod_api import everyone, rank_tensor

import mpiml.torch as hvd
from mpiml.torch import ops

SHUTDOWN_AFTER = 4


@pytest.fixture(autouse=True)
def stall_shutdown(monkeypatch):
    """An engine that shuts every rank down when a name waits SHUTDOWN_AFTER seconds for some rank."""
    monkeypatch.setenv("HOROVOD_STALL_CHECK_TIME_SECONDS", "1")
    monkeypatch.setenv("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(SHUTDOWN_AFTER))
    hvd.shutdown()
    hvd.init()
    ops._counter = itertools.count(MPI.COMM_WORLD.allreduce(next(ops._counter), op=MPI.MAX))
    yield
    monkeypatch.undo()
    hvd.shutdown()
    hvd.init()


def _late(kind, tensor):
    """Start one named op of ``kind`` (Horovod's duplicate-name tests use these three)."""
    if kind == "allreduce":
        return hvd.allreduce_async(tensor, name="late", op=hvd.Sum)
    if kind == "allgather":
        return hvd.allgather_async(tensor, name="late")
    return hvd.broadcast_async(tensor, root_rank=0, name="late")


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("kind", ["allreduce", "allgather", "broadcast"])
def test_barrier_completes_while_an_op_is_pending_on_only_some_ranks(kind):
    size, rank = hvd.size(), hvd.rank()
    inputs = everyone([5, 3], torch.float64, seed=5000)
    expected = {"allreduce": torch.stack(inputs).sum(0), "allgather": torch.cat(inputs), "broadcast": inputs[0]}[kind]
    handle = None
    if rank == 0:
        handle = _late(kind, inputs[rank])
        with pytest.raises(ValueError, match="same name"):  # a refused call takes a handle, as in Horovod
            _late(kind, inputs[rank])
    hvd.barrier()  # rank 0 has "late" pending; the others have not submitted it yet
    if rank > 0:
        handle = _late(kind, inputs[rank])
    hvd.barrier()
    torch.testing.assert_close(hvd.synchronize(handle), expected)
    assert torch.equal(hvd.allgather(torch.tensor([rank]), name="after"), torch.arange(size))


@pytest.mark.mpi(min_size=2)
def test_object_ops_match_whatever_the_other_ranks_pass():
    rank = hvd.rank()
    root = hvd.size() - 1
    payload = {"weights": rank_tensor(root, [3], torch.float64, seed=5100).tolist(), "step": 7}
    assert hvd.broadcast_object(payload if rank == root else None, root_rank=root) == payload
    assert hvd.broadcast_object(payload if rank == root else [], root_rank=root) == payload
    mixed = [r if r % 2 else str(r) for r in range(hvd.size())]  # an int on some ranks, a str on others
    assert hvd.allgather_object(mixed[rank]) == mixed


@pytest.mark.mpi(min_size=2)
def test_stall_shutdown_fails_every_rank_naming_the_cause():
    rank = hvd.rank()
    start = time.monotonic()
    with pytest.raises(hvd.HorovodInternalError, match="HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"):
        hvd.allreduce(torch.ones(2), name="rank0 only" if rank == 0 else "the others")
    assert time.monotonic() - start < SHUTDOWN_AFTER + 60  # bounded, not a hang (the margin is for slow machines)
    assert not hvd.is_initialized()
    with pytest.raises(hvd.HorovodInternalError, match="HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"):
        hvd.allreduce(torch.ones(2), name="after the shutdown")
    hvd.init()  # a fresh engine works again
    assert torch.equal(hvd.allreduce(torch.ones(2), op=hvd.Sum, name="again"), torch.full((2,), float(hvd.size())))
