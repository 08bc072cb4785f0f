"""join(): ranks with fewer batches finish early while the others' allreduces go on, as Horovod documents.

A rank that has joined contributes zeros to sums and averages (the average
still divides by the full number of ranks, as in Horovod's own test) and
the identity to min, max and product. Other collectives fail on the ranks
that have not joined. join() returns the rank that joined last.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

import mpiml.torch as hvd
from mpiml.torch import ops

INTS = (torch.int32, torch.int64)


@pytest.fixture(autouse=True)
def engine():
    hvd.init()
    ops._counter = itertools.count(MPI.COMM_WORLD.allreduce(next(ops._counter), op=MPI.MAX))


def value(r, step, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(10007 * seed + 101 * r + step)
    return torch.randint(-100, 100, shape, generator=g).to(dtype)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float32, torch.float64])
def test_join_with_uneven_batches_allreduce(dtype):
    """Rank r runs r + 1 steps; at step s only ranks r >= s are still submitting."""
    rank, size = hvd.rank(), hvd.size()
    for step in range(rank + 1):
        a = hvd.allreduce_async(value(rank, step, [5, 3], dtype), name="tensor_a", op=hvd.Average)
        b = hvd.allreduce_async(value(rank, step, [17], dtype, seed=1), name="tensor_b", op=hvd.Sum)
        averaged, summed = hvd.synchronize(a), hvd.synchronize(b)
        active = range(step, size)
        total_a = sum(value(r, step, [5, 3], torch.float64) for r in active)
        expected_a = (total_a / size).to(dtype) if dtype.is_floating_point else (total_a * (1.0 / size)).to(dtype)
        expected_b = sum(value(r, step, [17], torch.float64, seed=1) for r in active).to(dtype)
        assert torch.allclose(averaged, expected_a) and torch.equal(summed, expected_b), (step, dtype)
    assert hvd.join() == size - 1


@pytest.mark.mpi(min_size=2)
def test_joined_ranks_leave_min_max_and_product_unchanged():
    rank, size = hvd.rank(), hvd.size()
    if rank == 0:
        last = hvd.join()
        assert 0 < last < size and MPI.COMM_WORLD.allgather(last) == [last] * size  # one of 1.., the same everywhere
        return
    shape = [4, 4]
    mine = value(rank, 0, shape, torch.float32)
    low, high = hvd.allreduce(mine, op=hvd.Min), hvd.allreduce(mine, op=hvd.Max)
    signs = torch.where(value(rank, 1, shape, torch.float32) > 0, 1.0, -1.0)
    product = hvd.allreduce(signs, op=hvd.Product)
    others = range(1, size)
    assert torch.equal(low, torch.stack([value(r, 0, shape, torch.float32) for r in others]).min(0).values)
    assert torch.equal(high, torch.stack([value(r, 0, shape, torch.float32) for r in others]).max(0).values)
    expected = torch.stack([torch.where(value(r, 1, shape, torch.float32) > 0, 1.0, -1.0) for r in others]).prod(0)
    assert torch.equal(product, expected)
    last = hvd.join()
    assert 0 < last < size and MPI.COMM_WORLD.allgather(last) == [last] * size


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("collective", ["allgather", "broadcast", "reducescatter", "alltoall"])
def test_other_collectives_fail_after_a_rank_joined(collective):
    rank, size = hvd.rank(), hvd.size()
    if rank == 0:
        hvd.join()
        return
    t = torch.ones(2 * size, 3)
    call = {"allgather": lambda: hvd.allgather(t), "broadcast": lambda: hvd.broadcast(t, 1),
            "reducescatter": lambda: hvd.reducescatter(t), "alltoall": lambda: hvd.alltoall(t)}[collective]
    with pytest.raises(RuntimeError, match="join"):
        call()
    hvd.join()


@pytest.mark.mpi(min_size=1)
def test_distributed_optimizer_with_uneven_batches_and_join():
    """The use join() exists for: ranks hold different numbers of batches and stop at their own end."""
    rank, size = hvd.rank(), hvd.size()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters())
    for step in range(2 + rank):
        g = torch.Generator().manual_seed(100 * rank + step)
        opt.zero_grad()
        F.mse_loss(model(torch.randn(3, 4, generator=g)), torch.randn(3, 2, generator=g)).backward()
        opt.step()
    assert hvd.join() == size - 1
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 2)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(2 + size - 1):
        ref_opt.zero_grad()
        active = [r for r in range(size) if step < 2 + r]
        losses = []
        for r in active:
            g = torch.Generator().manual_seed(100 * r + step)
            losses.append(F.mse_loss(ref(torch.randn(3, 4, generator=g)), torch.randn(3, 2, generator=g)))
        (sum(losses) / size).backward()  # joined ranks add zero gradients; the average divides by every rank
        ref_opt.step()
        if step == 1 + rank:  # this rank's last step: its model stops here
            torch.testing.assert_close(model.weight, ref.weight, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(model.bias, ref.bias, rtol=1e-5, atol=1e-6)
