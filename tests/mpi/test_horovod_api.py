"""mpiml.torch's collectives, in the style of Horovod's test/parallel/test_torch.py.

Every op x dtype x dimension, in-place and asynchronous (fused) forms,
scale factors, gradients through the collectives, and the error cases.
Every rank's input is random and different; expected values are computed
directly from all ranks' inputs, which every rank regenerates from their
seeds (no collective is trusted to build the reference).
"""

import itertools

import pytest
import torch
from mpi4py import MPI

import mpiml.torch as hvd
from mpiml.torch import ops

DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
          torch.float32, torch.float64]
FLOATS = [torch.float32, torch.float64]
DIMS = [1, 2, 3]


@pytest.fixture(autouse=True)
def engine():
    """Initialise, and give every rank the same next automatic name (join tests leave them apart, as Horovod)."""
    hvd.init()
    ops._counter = itertools.count(MPI.COMM_WORLD.allreduce(next(ops._counter), op=MPI.MAX))
    yield
    assert not ops._handle_map or all(h.done() for hs, _ in ops._handle_map.values() for h in hs)


def rank_tensor(r, shape, dtype, seed, values=None):
    """Rank r's random input (any rank can compute any rank's)."""
    g = torch.Generator().manual_seed(seed * 7919 + r * 104729 + 17)
    if values is not None:
        pick = torch.randint(0, len(values), shape, generator=g)
        return torch.tensor(values, dtype=torch.float64)[pick].to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).to(torch.bool)
    # integer values small enough that float16/bfloat16 sums over 8 ranks stay exact
    low, high = {torch.uint8: (0, 100), torch.bfloat16: (-16, 16)}.get(dtype, (-100, 100))
    return torch.randint(low, high, shape, generator=g).to(dtype)


def everyone(shape, dtype, seed, values=None):
    return [rank_tensor(r, shape, dtype, seed, values) for r in range(hvd.size())]


def wrap(t, dtype):
    """An int64/float64 reference narrowed to ``dtype`` (integers wrap, like the native arithmetic)."""
    return t.to(dtype)


def reference(inputs, op, dtype):
    exact = torch.stack([t.to(torch.int64 if not dtype.is_floating_point else torch.float64) for t in inputs])
    if op in (hvd.Sum, hvd.Average):
        total = wrap(exact.sum(0), dtype)
        if op == hvd.Sum:
            return total
        if dtype.is_floating_point:
            return wrap(exact.sum(0) / len(inputs), dtype)
        return (total.to(torch.float64) * (1.0 / len(inputs))).to(dtype)  # Horovod: scale in float64, truncate
    if op == hvd.Min:
        return wrap(exact.min(0).values, dtype)
    if op == hvd.Max:
        return wrap(exact.max(0).values, dtype)
    return wrap(exact.prod(0), dtype)


def assert_matches(actual, expected, dtype, loose=False):
    """Integers and sums of integer-valued floats must be exact; scaling rounds once (``loose``: every term)."""
    assert actual.dtype == dtype and actual.shape == expected.shape
    if dtype in (torch.float16, torch.bfloat16):
        tol = 0.02 if not loose else 0.02 * max(1.0, float(expected.double().abs().max()))
        torch.testing.assert_close(actual.double(), expected.double(), rtol=0.02, atol=tol)
    elif dtype.is_floating_point:
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(actual, expected), (actual, expected)


OP_VALUES = {hvd.Product: [-2, -1, 1, 2]}


def op_values(op, dtype):
    if op == hvd.Product:
        return [1, 2] if dtype == torch.uint8 else OP_VALUES[op]
    return None


# ---------------------------------------------------------------- allreduce


@pytest.mark.mpi(min_size=1)
def test_allreduce_every_dtype_and_dimension():
    for i, (dtype, dim) in enumerate(itertools.product(DTYPES, DIMS)):
        inputs = everyone([17] * dim, dtype, seed=i)
        mine = inputs[hvd.rank()].clone()
        summed = hvd.allreduce(mine, op=hvd.Sum)
        assert torch.equal(mine, inputs[hvd.rank()]), "allreduce modified its input"
        assert_matches(summed, reference(inputs, hvd.Sum, dtype), dtype)


@pytest.mark.mpi(min_size=1)
def test_allreduce_average_is_the_default_and_average_false_means_sum():
    for i, dtype in enumerate(DTYPES):
        inputs = everyone([5, 7], dtype, seed=100 + i)
        assert_matches(hvd.allreduce(inputs[hvd.rank()]), reference(inputs, hvd.Average, dtype), dtype)
        with pytest.warns(DeprecationWarning):
            summed = hvd.allreduce(inputs[hvd.rank()], average=False)
        assert_matches(summed, reference(inputs, hvd.Sum, dtype), dtype)


@pytest.mark.mpi(min_size=1)
def test_allreduce_every_op_async_fused():
    ops_ = [hvd.Sum, hvd.Average, hvd.Min, hvd.Max, hvd.Product]
    pending, polled_false = [], False
    for i, (op, dtype, dim) in enumerate(itertools.product(ops_, DTYPES, DIMS)):
        inputs = everyone([6] * dim, dtype, seed=200 + i, values=op_values(op, dtype))
        handle = hvd.allreduce_async(inputs[hvd.rank()], op=op)
        polled_false |= not hvd.poll(handle)
        pending.append((handle, reference(inputs, op, dtype), dtype))
    assert polled_false, "hvd.poll() always returned True: not an asynchronous op?"
    for handle, expected, dtype in pending:
        assert_matches(hvd.synchronize(handle), expected, dtype)


@pytest.mark.mpi(min_size=1)
def test_allreduce_in_place_sync_and_async():
    handles = []
    for i, (dtype, dim) in enumerate(itertools.product(DTYPES, DIMS)):
        inputs = everyone([17] * dim, dtype, seed=300 + i)
        mine = inputs[hvd.rank()].clone()
        assert hvd.allreduce_(mine, op=hvd.Sum) is mine
        assert_matches(mine, reference(inputs, hvd.Sum, dtype), dtype)
        other = inputs[hvd.rank()].clone()
        handles.append((hvd.allreduce_async_(other, op=hvd.Max), other, reference(inputs, hvd.Max, dtype), dtype))
    for handle, tensor, expected, dtype in handles:
        assert hvd.synchronize(handle) is tensor
        assert_matches(tensor, expected, dtype)


@pytest.mark.mpi(min_size=1)
def test_allreduce_prescale_and_postscale():
    size = hvd.size()
    for i, (dtype, scale) in enumerate(itertools.product(DTYPES, ["pre", "post"])):
        factor = float(torch.rand(1, generator=torch.Generator().manual_seed(i)).item()) + 0.25
        inputs = everyone([9, 4], dtype, seed=400 + i)
        kwargs = {"prescale_factor": factor} if scale == "pre" else {"postscale_factor": factor}
        result = hvd.allreduce(inputs[hvd.rank()], op=hvd.Sum, **kwargs)
        compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else (
            dtype if dtype.is_floating_point else torch.float64)  # Horovod: integers scale in float64
        if scale == "pre":
            scaled = [(t.to(compute) * factor).to(dtype) for t in inputs]
            expected = reference(scaled, hvd.Sum, dtype)
        else:
            expected = (reference(inputs, hvd.Sum, dtype).to(compute) * factor).to(dtype)
        assert_matches(result, expected, dtype, loose=True)
    average = hvd.allreduce(torch.full((4,), 6.0 * size), op=hvd.Average, prescale_factor=0.5, postscale_factor=3.0)
    assert torch.allclose(average, torch.full((4,), 9.0 * size))


@pytest.mark.mpi(min_size=1)
def test_grouped_allreduce_plain_in_place_and_mixed_dtypes():
    for i, (dtype, dim) in enumerate(itertools.product(DTYPES, DIMS)):
        groups = [everyone([5] * dim, dtype, seed=500 + 10 * i + k) for k in range(4)]
        results = hvd.grouped_allreduce([g[hvd.rank()] for g in groups], op=hvd.Sum)
        for g, result in zip(groups, results, strict=True):
            assert_matches(result, reference(g, hvd.Sum, dtype), dtype)
    mixed = [everyone([3, 2], dtype, seed=600 + k) for k, dtype in enumerate(DTYPES)]
    mine = [m[hvd.rank()].clone() for m in mixed]
    out = hvd.grouped_allreduce_(mine, op=hvd.Min)
    assert all(a is b for a, b in zip(out, mine, strict=True))
    for m, result, dtype in zip(mixed, mine, DTYPES, strict=True):
        assert_matches(result, reference(m, hvd.Min, dtype), dtype)
    handle = hvd.grouped_allreduce_async([m[hvd.rank()] for m in mixed], op=hvd.Max)
    for m, result, dtype in zip(mixed, hvd.synchronize(handle), DTYPES, strict=True):
        assert_matches(result, reference(m, hvd.Max, dtype), dtype)


@pytest.mark.mpi(min_size=1)
def test_named_requests_are_matched_by_name_not_order():
    """Each rank submits the same names in its own random order; results still pair up by name."""
    names = [f"t{i}" for i in range(12)]
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(hvd.rank())).tolist()
    shapes = {n: [i + 1, 3] for i, n in enumerate(names)}
    handles = {}
    for k in order:
        n = names[k]
        handles[n] = hvd.allreduce_async(rank_tensor(hvd.rank(), shapes[n], torch.float64, seed=k), name=n,
                                         op=hvd.Sum)
    for k, n in enumerate(names):
        expected = sum(rank_tensor(r, shapes[n], torch.float64, seed=k) for r in range(hvd.size()))
        torch.testing.assert_close(hvd.synchronize(handles[n]), expected)


@pytest.mark.mpi(min_size=1)
def test_many_small_tensors_are_fused_into_few_collectives(monkeypatch):
    from mpiml.torch import execute
    calls = []
    real = execute.collectives.allreduce
    monkeypatch.setattr(execute.collectives, "allreduce",
                        lambda buf, **kw: calls.append(buf.numel()) or real(buf, **kw))
    engine = hvd.basics.engine()
    inputs = [everyone([3 + i % 5], torch.float32, seed=700 + i) for i in range(60)]
    with engine._cond:  # hold the engine back so all 60 travel in one message from every rank
        handles = [hvd.allreduce_async(t[hvd.rank()], name=f"fuse.{i}", op=hvd.Sum) for i, t in enumerate(inputs)]
    for h, t in zip(handles, inputs, strict=True):
        torch.testing.assert_close(hvd.synchronize(h), reference(t, hvd.Sum, torch.float32))
    assert len(calls) == 1 and calls[0] == sum(t[0].numel() for t in inputs), calls
    if engine.coordinator is not None:
        monkeypatch.setattr(engine.coordinator, "fusion_threshold", 40 * 4)  # bytes: 40 float32 per bucket
    calls.clear()
    with engine._cond:
        handles = [hvd.allreduce_async(t[hvd.rank()], name=f"fuse.{i}", op=hvd.Sum) for i, t in enumerate(inputs)]
    for h in handles:
        hvd.synchronize(h)
    assert 1 < len(calls) < 60 and max(calls) <= 40, calls


# ---------------------------------------------------------------- allgather, broadcast, alltoall, reducescatter


@pytest.mark.mpi(min_size=1)
def test_allgather_variable_first_dimension_every_dtype():
    sizes = [17, 0, 32, 81, 12, 15, 23, 22, 5, 9]
    rows = [sizes[r % len(sizes)] for r in range(hvd.size())]
    pending = []
    for i, (dtype, dim) in enumerate(itertools.product(DTYPES + [torch.bool], DIMS)):
        inputs = [rank_tensor(r, [rows[r]] + [4] * (dim - 1), dtype, seed=800 + i) for r in range(hvd.size())]
        gathered = hvd.allgather(inputs[hvd.rank()])
        assert torch.equal(gathered, torch.cat(inputs)), (dtype, dim)
        pending.append((hvd.allgather_async(inputs[hvd.rank()]), torch.cat(inputs)))
    for handle, expected in pending:
        assert torch.equal(hvd.synchronize(handle), expected)


@pytest.mark.slow  # one broadcast per root: grows with the number of ranks
@pytest.mark.mpi(min_size=1)
def test_broadcast_every_dtype_dimension_and_root():
    for i, (dtype, dim, root) in enumerate(itertools.product(DTYPES, DIMS, range(hvd.size()))):
        inputs = everyone([7] * dim, dtype, seed=900 + i)
        mine = inputs[hvd.rank()].clone()
        out = hvd.broadcast(mine, root)
        assert torch.equal(out, inputs[root])
        assert torch.equal(mine, inputs[hvd.rank()]), "broadcast modified its input"
        assert hvd.broadcast_(mine, root, name=f"b{i}") is mine
        assert torch.equal(mine, inputs[root])


@pytest.mark.mpi(min_size=1)
def test_broadcast_async_in_place_fused():
    handles = []
    for i, dtype in enumerate(DTYPES):
        inputs = everyone([4, 3], dtype, seed=1000 + i)
        mine = inputs[hvd.rank()].clone()
        root = i % hvd.size()
        handles.append((hvd.broadcast_async_(mine, root), mine, inputs[root]))
        handles.append((hvd.broadcast_async(inputs[hvd.rank()], root), None, inputs[root]))
    for handle, tensor, expected in handles:
        out = hvd.synchronize(handle)
        assert torch.equal(out, expected) and (tensor is None or out is tensor)


@pytest.mark.mpi(min_size=1)
def test_alltoall_with_splits_and_equal_splits():
    size, rank = hvd.size(), hvd.rank()
    for i, (dtype, dim) in enumerate(itertools.product(DTYPES, DIMS)):
        split = [[(s + 2 * r + i) % 4 for r in range(size)] for s in range(size)]  # split[sender][receiver]
        inputs = [rank_tensor(s, [sum(split[s]) + 1] + [3] * (dim - 1), dtype, seed=1100 + i) for s in range(size)]
        out, received = hvd.alltoall(inputs[rank], splits=torch.tensor(split[rank], dtype=torch.int32))
        expected = torch.cat([inputs[s][sum(split[s][:rank]):sum(split[s][:rank + 1])] for s in range(size)])
        assert torch.equal(out, expected) and received.tolist() == [split[s][rank] for s in range(size)]
        equal = [rank_tensor(s, [2 * size] + [2] * (dim - 1), dtype, seed=1200 + i) for s in range(size)]
        out = hvd.alltoall(equal[rank])
        assert torch.equal(out, torch.cat([equal[s][2 * rank:2 * rank + 2] for s in range(size)]))


@pytest.mark.mpi(min_size=1)
def test_reducescatter_sum_and_average_with_uneven_rows():
    size, rank = hvd.size(), hvd.rank()
    for i, (dtype, op, rows) in enumerate(itertools.product(DTYPES, [hvd.Sum, hvd.Average], [size * 4, 2 * size + 1])):
        inputs = everyone([rows, 3], dtype, seed=1300 + i)
        out = hvd.reducescatter(inputs[rank], op=op)
        counts = [rows // size + (r < rows % size) for r in range(size)]
        start = sum(counts[:rank])
        assert_matches(out, reference(inputs, op, dtype)[start:start + counts[rank]], dtype)
    handle = hvd.reducescatter_async(torch.ones(size, 2), op=hvd.Sum, postscale_factor=0.5)
    assert torch.equal(hvd.synchronize(handle), torch.full((1, 2), size * 0.5))


# ---------------------------------------------------------------- gradients


@pytest.mark.mpi(min_size=1)
def test_gradients_through_allreduce_and_grouped_allreduce():
    size = hvd.size()
    for dtype, dim, op in itertools.product(FLOATS, DIMS, [hvd.Sum, hvd.Average]):
        x = rank_tensor(hvd.rank(), [5] * dim, dtype, seed=dim).requires_grad_()
        grad_in = rank_tensor(hvd.rank(), [5] * dim, dtype, seed=50 + dim)
        hvd.allreduce(x, op=op).backward(grad_in)
        expected = reference(everyone([5] * dim, dtype, seed=50 + dim), op, dtype)
        torch.testing.assert_close(x.grad, expected)
        xs = [rank_tensor(hvd.rank(), [4] * dim, dtype, seed=k).requires_grad_() for k in range(3)]
        for y in hvd.grouped_allreduce(xs, op=op):
            y.backward(torch.ones_like(y))
        for t in xs:
            torch.testing.assert_close(t.grad, torch.full_like(t, size if op == hvd.Sum else 1.0))


@pytest.mark.mpi(min_size=1)
def test_gradients_through_allgather_broadcast_alltoall_reducescatter():
    size, rank = hvd.size(), hvd.rank()
    rows = [3, 2, 7, 4, 6, 8, 10, 1][:size] + [2] * max(0, size - 8)
    for dtype, dim in itertools.product(FLOATS, DIMS):
        x = torch.zeros([rows[rank]] + [5] * (dim - 1), dtype=dtype, requires_grad=True)
        grads = [rank_tensor(r, [sum(rows)] + [5] * (dim - 1), dtype, seed=60 + dim) for r in range(size)]
        hvd.allgather(x).backward(grads[rank])
        start = sum(rows[:rank])
        torch.testing.assert_close(x.grad, (sum(grads) / size)[start:start + rows[rank]])  # Horovod: average
        for root in range(size):
            y = torch.zeros([4] * dim, dtype=dtype, requires_grad=True)
            g = [rank_tensor(r, [4] * dim, dtype, seed=70 + root) for r in range(size)]
            hvd.broadcast(y, root).backward(g[rank])
            torch.testing.assert_close(y.grad, sum(g) / size if rank == root else torch.zeros_like(y))
        z = torch.ones([2 * size] + [3] * (dim - 1), dtype=dtype, requires_grad=True)
        out, _ = hvd.alltoall(z, splits=[2] * size)
        (out * (rank + 1)).sum().backward()
        torch.testing.assert_close(z.grad, torch.cat([torch.full([2] + [3] * (dim - 1), r + 1.0, dtype=dtype)
                                                      for r in range(size)]))
        w = torch.ones([size * 2, 3], dtype=dtype, requires_grad=True)
        hvd.reducescatter(w, op=hvd.Sum).backward(torch.full((2, 3), rank + 1.0, dtype=dtype))
        expected = torch.cat([torch.full((2, 3), (r + 1.0) * size, dtype=dtype) for r in range(size)])
        torch.testing.assert_close(w.grad, expected)
