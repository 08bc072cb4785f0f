"""GradientBuckets without MPI: layout, launch order, inner passes, unused parameters, compression."""

import threading

import pytest
import torch

from mpiml.buckets import GradientBuckets
from mpiml.strategies.hooks import compressed


def setup(sizes, bucket_bytes, overlap=True, passes=1, compression="none"):
    params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    total = sum(sizes)
    buffer = torch.zeros(total)
    spans, offset = [None] * len(sizes), 0
    for i in reversed(range(len(sizes))):  # reverse order, as DistributedOptimizer lays them out
        spans[i] = (buffer, offset, offset + sizes[i])
        params[i].grad = buffer[offset:offset + sizes[i]]
        offset += sizes[i]
    calls = []

    def reduce(view, op, name):
        calls.append((threading.current_thread().name, view.numel(), op, view.dtype, name))
        view.mul_(10)  # a recognisable stand-in for "averaged across ranks"
    hook = compressed(reduce, compression, 2)  # the compression wrapper around any hook
    return params, buffer, GradientBuckets(params, spans, bucket_bytes, hook, overlap, passes), calls


def backward(params, scale=1.0):
    sum((p * (i + 1) * scale).sum() for i, p in enumerate(params)).backward()


def test_layout_reverse_order_and_size():
    _, _, b, _ = setup([10, 20, 30, 40], bucket_bytes=4 * 50)
    # reverse order: 40 first; 40+30 > 50 elements, so buckets are [40], [30, 20], [10]
    assert [sorted(x.params) for x in b.buckets] == [[3], [1, 2], [0]]
    assert [(x.lo, x.hi) for x in b.buckets] == [(0, 40), (40, 90), (90, 100)]


def test_overlap_reduces_every_bucket_once_on_the_comm_thread():
    params, buffer, b, calls = setup([10, 20, 30, 40], bucket_bytes=4 * 50)
    backward(params)
    b.flush()
    b.wait()
    assert sorted(c[1] for c in calls) == [10, 40, 50]
    assert all(c[0] == "mpiml-comm" and c[2] == "mean" for c in calls)
    assert [c[4] for c in calls] == [f"gradients step 0 bucket {i}" for i in range(3)]
    for i, p in enumerate(params):
        assert torch.equal(p.grad, torch.full_like(p, 10.0 * (i + 1)))
    b.reset()
    b.close()


def test_inner_passes_do_not_communicate():
    params, _, b, calls = setup([5, 5], bucket_bytes=4 * 5, passes=3)
    backward(params)
    backward(params)
    assert calls == []
    backward(params)
    b.wait()
    assert len(calls) == 2
    assert torch.equal(params[0].grad, torch.full((5,), 30.0))  # 3 passes accumulated, then "averaged"
    b.close()


def test_unused_parameter_holds_back_later_buckets_until_flush():
    params, _, b, calls = setup([5, 5, 5], bucket_bytes=4 * 5)
    # parameter 1 (bucket 1) gets no gradient: bucket 0 may go, bucket 2 must wait for the flush
    (params[2].sum() + params[0].sum()).backward()
    launched = [x.launched for x in b.buckets]
    assert launched == [True, False, False]
    b.flush()
    b.wait()
    assert [x.launched for x in b.buckets] == [True, True, True]
    assert torch.equal(params[1].grad, torch.zeros(5))
    b.close()


def test_grad_set_to_none_is_put_back_into_the_bucket():
    params, buffer, b, _ = setup([4, 4], bucket_bytes=1 << 20)
    params[0].grad = None
    backward(params)
    b.flush()
    b.wait()
    assert params[0].grad.data_ptr() >= buffer.data_ptr()
    assert torch.equal(params[0].grad, torch.full((4,), 10.0))
    b.close()


@pytest.mark.parametrize("compression, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_compression_sends_half_precision_prescaled(compression, dtype):
    params, _, b, calls = setup([8], bucket_bytes=1 << 20, compression=compression)
    backward(params, scale=3.0)
    b.wait()
    assert calls[0][2] == "sum" and calls[0][3] == dtype
    assert torch.allclose(params[0].grad, torch.full((8,), 3.0 / 2 * 10))  # / world size 2, then "summed"
    b.close()


def test_unknown_compression():
    with pytest.raises(ValueError, match="unknown compression"):
        setup([3], 100, compression="int8")


def test_a_large_parameter_is_a_bucket_of_its_own_reduced_where_its_gradient_lies():
    params, buffer, _, calls = setup([10, 20, 30, 40], bucket_bytes=4 * 50, overlap=False)
    spans, offset = [None] * 4, 0
    for i in reversed(range(4)):
        spans[i] = (buffer, offset, offset + params[i].numel())
        offset += params[i].numel()

    def reduce(view, op, name):
        calls.append((view.data_ptr(), view.numel()))
        view.mul_(10)
    b = GradientBuckets(params, spans, 4 * 50, reduce, overlap=False, backward_passes_per_step=1,
                        alone_bytes=4 * 30)
    # the layout depends only on sizes: 40 and 30 alone, then [20, 10] together
    assert [(sorted(x.params), x.alone) for x in b.buckets] == [([3], True), ([2], True), ([0, 1], False)]
    assert b.in_place == {2, 3}
    for p in params:
        p.grad = None  # zero_grad(): backward hands over fresh tensors
    backward(params)
    fresh = {i: params[i].grad.data_ptr() for i in (2, 3)}
    for i in (0, 1):  # what the optimizer's reattach_grads does for the others
        lo, hi = spans[i][1:]
        buffer[lo:hi].copy_(params[i].grad)
        params[i].grad = buffer[lo:hi]
    b.flush()
    b.wait()
    assert [c[0] for c in calls[:2]] == [fresh[3], fresh[2]]  # reduced in place, not copied
    for i, p in enumerate(params):
        assert torch.equal(p.grad, torch.full_like(p, 10.0 * (i + 1)))
    b.reset()
    calls.clear()
    params[3].grad = None  # no gradient this time: zeros, in the bucket's view
    params[2].grad = torch.ones(60)[::2]  # not contiguous: copied into the view
    b.flush()
    b.wait()
    assert torch.equal(params[3].grad, torch.zeros(40)) and torch.equal(params[2].grad, torch.full((30,), 10.0))
    assert [c[0] for c in calls[:2]] == [buffer[0:40].data_ptr(), buffer[40:70].data_ptr()]
    b.close()
