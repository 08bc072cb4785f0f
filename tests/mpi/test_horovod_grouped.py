"""grouped_allgather and grouped_reducescatter: values and gradients, with Horovod's rules.

Each rank's tensors are random, differ by rank, and (for allgather) have a
different number of rows on every rank; the expected values are built from
every rank's inputs, which any rank can regenerate from the seeds.
"""

import itertools

import pytest
import torch
from mpi4py import MPI
from test_horovod_api import everyone, rank_tensor

import mpiml.torch as hvd
from mpiml.torch import ops


@pytest.fixture(autouse=True)
def engine():
    hvd.init()
    ops._counter = itertools.count(MPI.COMM_WORLD.allreduce(next(ops._counter), op=MPI.MAX))


def rows_of(r, i):
    """Rank r's number of rows for the i-th tensor of a group (zero rows happen too)."""
    return (3 * r + 2 * i + 1) % 5


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("dtypes", [[torch.float32] * 3, [torch.int32, torch.float64, torch.uint8, torch.float64]])
def test_grouped_allgather_concatenates_each_tensor_in_rank_order(dtypes):
    size, rank = hvd.size(), hvd.rank()
    groups = [[rank_tensor(r, [rows_of(r, i), 3, 2], dtype, seed=4000 + i) for r in range(size)]
              for i, dtype in enumerate(dtypes)]
    gathered = hvd.grouped_allgather([g[rank] for g in groups], name=f"ga.{len(dtypes)}")
    assert len(gathered) == len(dtypes)
    for got, group, dtype in zip(gathered, groups, dtypes, strict=True):
        assert got.dtype == dtype
        assert torch.equal(got, torch.cat(group))
    handle = hvd.grouped_allgather_async([g[rank] for g in groups])
    assert all(torch.equal(a, b) for a, b in zip(hvd.synchronize(handle), gathered, strict=True))


@pytest.mark.mpi(min_size=1)
def test_grouped_allgather_gradient_is_the_average_narrowed_to_my_rows():
    size, rank = hvd.size(), hvd.rank()
    tensors = [rank_tensor(rank, [rows_of(rank, i), 4], torch.float64, seed=4100 + i).requires_grad_()
               for i in range(3)]
    gathered = hvd.grouped_allgather(tensors)
    total_rows = [sum(rows_of(r, i) for r in range(size)) for i in range(3)]
    # every rank brings its own output gradient; the gradient of each input is their average, at its rows
    grads = [[rank_tensor(r, [total_rows[i], 4], torch.float64, seed=4200 + i) for r in range(size)]
             for i in range(3)]
    torch.autograd.backward(gathered, [g[rank] for g in grads])
    for i, t in enumerate(tensors):
        start = sum(rows_of(r, i) for r in range(rank))
        mean = torch.stack(grads[i]).mean(0)
        torch.testing.assert_close(t.grad, mean[start:start + rows_of(rank, i)])


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("op", [hvd.Sum, hvd.Average])
def test_grouped_reducescatter_gives_each_rank_its_rows_of_each_result(op):
    size, rank = hvd.size(), hvd.rank()
    shapes = [[2 * size + 1, 3], [size, 2, 2], [size + 3]]
    dtypes = [torch.float64, torch.int32, torch.float64]
    inputs = [everyone(shape, dtype, seed=4300 + i) for i, (shape, dtype) in enumerate(zip(shapes, dtypes))]
    got = hvd.grouped_reducescatter([x[rank] for x in inputs], op=op, prescale_factor=2.0, postscale_factor=0.5)
    for out, per_rank, shape, dtype in zip(got, inputs, shapes, dtypes, strict=True):
        rows = shape[0]
        counts = [rows // size + (1 if r < rows % size else 0) for r in range(size)]
        start = sum(counts[:rank])
        total = torch.stack([x.to(torch.float64) for x in per_rank]).sum(0)
        if op == hvd.Average:
            total = total / size
        expected = total[start:start + counts[rank]]
        assert out.dtype == dtype and list(out.shape) == [counts[rank], *shape[1:]]
        torch.testing.assert_close(out.to(torch.float64), expected if dtype.is_floating_point else expected.trunc())


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("op", [hvd.Sum, hvd.Average])
def test_reducescatter_gradients_follow_horovod_including_scale_factors(op):
    size, rank = hvd.size(), hvd.rank()
    pre, post = 0.5, 3.0
    rows = 2 * size
    single = rank_tensor(rank, [rows, 3], torch.float64, seed=4400).requires_grad_()
    group = [rank_tensor(rank, [rows, 2], torch.float64, seed=4401 + i).requires_grad_() for i in range(2)]
    out = hvd.reducescatter(single, op=op, prescale_factor=pre, postscale_factor=post)
    outs = hvd.grouped_reducescatter(group, op=op, prescale_factor=pre, postscale_factor=post)
    # each rank's output gradient; the input gradient is every rank's gathered (Horovod: allgather of the
    # output gradients, times size for Sum, times both scale factors)
    factor = (size if op == hvd.Sum else 1) * pre * post
    out_grads = [rank_tensor(r, [2, 3], torch.float64, seed=4500) for r in range(size)]
    group_grads = [[rank_tensor(r, [2, 2], torch.float64, seed=4501 + i) for r in range(size)] for i in range(2)]
    torch.autograd.backward([out, *outs], [out_grads[rank], *[g[rank] for g in group_grads]])
    torch.testing.assert_close(single.grad, torch.cat(out_grads) * factor)
    for t, grads in zip(group, group_grads, strict=True):
        torch.testing.assert_close(t.grad, torch.cat(grads) * factor)


@pytest.mark.mpi(min_size=1)
def test_grouped_forms_refuse_scalars_and_empty_lists_on_every_rank():
    with pytest.raises(ValueError, match="at least one dimension"):
        hvd.grouped_reducescatter([torch.zeros(3, 1), torch.tensor(1.0)])
    with pytest.raises(ValueError, match="at least one dimension"):
        hvd.grouped_allgather([torch.tensor(1.0)])
    with pytest.raises(ValueError, match="at least one tensor"):
        hvd.grouped_allgather([])
    assert torch.equal(hvd.grouped_allgather([torch.ones(1)], name="after")[0], torch.ones(hvd.size()))


@pytest.mark.mpi(min_size=1)
def test_reducescatter_refuses_adasum_with_a_runtime_error_as_horovod():
    for call in (lambda: hvd.reducescatter(torch.ones(hvd.size() * 2), op=hvd.Adasum),
                 lambda: hvd.grouped_reducescatter([torch.ones(hvd.size())], op=hvd.Adasum),
                 lambda: hvd.reducescatter_async(torch.ones(hvd.size()), op=hvd.Adasum)):
        with pytest.raises(RuntimeError, match="Adasum"):
            call()
    assert torch.equal(hvd.reducescatter(torch.ones(hvd.size()), op=hvd.Sum, name="after adasum"),
                       torch.full((1,), float(hvd.size())))
