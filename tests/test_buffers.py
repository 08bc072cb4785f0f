import numpy as np
import pytest
import torch

from mpiml.collectives._buffers import (
    DTYPES,
    InputError,
    flatten,
    float16_mean_may_overflow,
    prescale,
    reduction,
    write_back,
)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int32", "int64"])
def test_flatten_numpy_is_a_view(dtype):
    x = np.zeros((3, 4), dtype=dtype)
    flat = flatten(x)
    assert flat.dtype == dtype and flat.array.shape == (12,)
    flat.array[5] = 7
    assert x.reshape(-1)[5] == 7


def test_flatten_fortran_order_is_logical_order_written_back():
    """Element i is the i-th in row-major order on every rank, whatever each rank's layout (issue 11, #6)."""
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    x = np.asfortranarray(values)
    flat = flatten(x)
    assert flat.copied and flat.array.tolist() == values.reshape(-1).tolist()
    flat.array[:] = np.arange(100, 112)
    write_back(flat)
    assert x.flags.f_contiguous and x.tolist() == (values + 100).tolist()


def test_flatten_read_only_takes_any_layout_in_logical_order():
    values = np.arange(12, dtype=np.int64).reshape(3, 4)
    assert flatten(values.T, writeable=False).array.tolist() == values.T.reshape(-1).tolist()
    assert flatten(values[:, ::2], writeable=False).array.tolist() == values[:, ::2].reshape(-1).tolist()
    t = torch.from_numpy(values).T
    assert flatten(t, writeable=False).array.tolist() == t.reshape(-1).tolist()


def test_float16_mean_overflow_is_predicted_from_the_largest_magnitude():
    big = flatten(np.array([1.0, -40000.0], dtype=np.float16))
    assert float16_mean_may_overflow(big, 2) and not float16_mean_may_overflow(big, 1)
    assert not float16_mean_may_overflow(flatten(np.array([30000.0], dtype=np.float16)), 2)
    assert not float16_mean_may_overflow(flatten(np.array([1e30], dtype=np.float32)), 2)
    x = np.array([60000.0, -60000.0], dtype=np.float16)
    prescale(flatten(x), 2)
    assert x.tolist() == [30000.0, -30000.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64, torch.int32, torch.int64,
                                   torch.bfloat16])
def test_flatten_tensor_is_a_view(dtype):
    t = torch.zeros(2, 5, dtype=dtype, requires_grad=dtype.is_floating_point)
    flat = flatten(t)
    assert flat.dtype == str(dtype).removeprefix("torch.") and flat.array.size == 10
    reduction("sum", flat.dtype).combine(flat.array, flatten(torch.ones(10, dtype=dtype)).array)
    assert (t.detach() == 1).all()


@pytest.mark.parametrize("bad, code, match", [
    ([1, 2, 3], 3, "numpy array or a CPU torch tensor"),
    (np.zeros(4, dtype=np.complex64), 4, "unsupported dtype"),
    (np.zeros(4, dtype=np.uint8), 4, "unsupported dtype"),
    (np.zeros((4, 4), dtype=np.float32)[:, 1], 5, "not contiguous"),
    (torch.zeros(4, 4)[:, 1], 5, "not contiguous"),
    (torch.zeros(4, dtype=torch.complex64), 4, "unsupported dtype"),
])
def test_flatten_rejects(bad, code, match):
    with pytest.raises(InputError, match=match) as info:
        flatten(bad)
    assert info.value.code == code


def test_flatten_read_only():
    x = np.zeros(4, dtype=np.float32)
    x.flags.writeable = False
    with pytest.raises(InputError, match="read-only"):
        flatten(x)
    assert flatten(x, writeable=False).array.size == 4


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != "bfloat16"])
@pytest.mark.parametrize("op, expect", [("sum", [5, 1]), ("max", [3, 4]), ("min", [2, -3]), ("prod", [6, -12])])
def test_reductions(dtype, op, expect):
    a = np.array([2, -3], dtype=dtype)
    reduction(op, dtype).combine(a, np.array([3, 4], dtype=dtype))
    assert a.tolist() == expect


def test_mean_divides_float_and_floors_int():
    f = np.array([3.0, -3.0], dtype=np.float32)
    reduction("mean", "float32").finalize(f, 2)
    assert f.tolist() == [1.5, -1.5]
    i = np.array([3, -3], dtype=np.int64)
    reduction("mean", "int64").finalize(i, 2)
    assert i.tolist() == [1, -2]


def test_bfloat16_arithmetic_matches_torch():
    a = torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)
    b = torch.tensor([0.25, 7.0, -1.0], dtype=torch.bfloat16)
    expect = a + b
    red = reduction("sum", "bfloat16")
    red.combine(flatten(a).array, flatten(b).array)
    assert torch.equal(a, expect)
    red = reduction("mean", "bfloat16")
    red.finalize(flatten(a).array, 2)
    assert torch.equal(a, expect / 2)


def test_unknown_op():
    with pytest.raises(InputError, match="unknown op 'avg'"):
        reduction("avg", "float32")
