"""The core both DistributedOptimizers share: compression, host layout, agree-or-raise, optimizer state.

* mpiml.torch's allreduce through a lossy compressor is ``mpiml.compression.reduce_compressed``:
  an fp16 average is pre-scaled by 1/K before the cast (60000 on every rank averages to 60000, not
  inf), bit for bit the same as ``reduce_compressed`` over the same sum; Sum is not pre-scaled.
* local/cross rank and size come from one cached topology of the communicator given.
* ``runtime.agree`` raises the exception asked for, on every rank, naming the ranks.
* ``mpiml.broadcast_optimizer_state`` and ``hvd.broadcast_optimizer_state`` are one function: the
  tensors travel as a buffer, and a rank whose optimizer has no state yet ends like the root.
"""

import hashlib
import itertools
import pickle

import numpy as np
import pytest
import torch
from mpi4py import MPI

import mpiml
import mpiml.torch as hvd
from mpiml import collectives, compression, runtime
from mpiml.torch import ops
from mpiml.torch.compression import Compressor


@pytest.fixture(autouse=True)
def engine():
    hvd.init()
    ops._counter = itertools.count(MPI.COMM_WORLD.allreduce(next(ops._counter), op=MPI.MAX))


def mine(n, low, high, seed=0):
    """Different random float32 values on every rank."""
    g = np.random.default_rng(4321 + 7919 * MPI.COMM_WORLD.rank + 31 * seed)
    return torch.from_numpy(g.uniform(low, high, n).astype(np.float32))


def mpi_sum(t):
    """MPI's own Allreduce of ``t`` in float64."""
    out = np.empty(t.numel(), dtype=np.float64)
    MPI.COMM_WORLD.Allreduce(t.double().numpy(), out, op=MPI.SUM)
    return torch.from_numpy(out)


def fp16_tolerance(k):
    """Relative error bound of K float16 shares summed in float16 (each rounding at most 2**-11)."""
    return (k + 2) * 2.0 ** -11


def same_everywhere(data: bytes) -> bool:
    digests = MPI.COMM_WORLD.allgather(hashlib.sha256(data).hexdigest())
    return len(set(digests)) == 1


# ---------------------------------------------------------------- compression


@pytest.mark.mpi(min_size=1)
def test_one_compressor_interface():
    assert hvd.Compression is compression.Compression
    assert hvd.Compression.none is compression.NoneCompressor
    assert hvd.Compression.fp16 is compression.FP16Compressor
    assert Compressor is compression.Compressor


@pytest.mark.mpi(min_size=2)
def test_fp16_average_of_60000_per_rank_is_60000_not_inf():
    k = hvd.size()
    t = mine(257, 59000.0, 61000.0)
    expect = mpi_sum(t) / k
    out = hvd.allreduce(t, compression=hvd.Compression.fp16, name="shared.fp16.big")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.allclose(out.double(), expect, rtol=fp16_tolerance(k), atol=0)
    grouped = hvd.grouped_allreduce([t, t[:5]], compression=hvd.Compression.fp16, name="shared.fp16.group")
    assert torch.isfinite(grouped[0]).all()
    assert torch.allclose(grouped[0].double(), expect, rtol=fp16_tolerance(k), atol=0)
    assert torch.allclose(grouped[1].double(), expect[:5], rtol=fp16_tolerance(k), atol=0)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("groups", [None, 1])
def test_optimizer_fp16_average_of_60000_is_finite(groups):
    k = hvd.size()
    w = torch.nn.Parameter(torch.zeros(33))
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.0), named_parameters=[("w", w)],
                                   compression=hvd.Compression.fp16, groups=groups)
    c = mine(33, 59000.0, 61000.0, seed=1)
    (w * c).sum().backward()
    opt.synchronize()
    assert torch.isfinite(w.grad).all()
    assert torch.allclose(w.grad.double(), mpi_sum(c) / k, rtol=fp16_tolerance(k), atol=0)


@pytest.mark.mpi(min_size=2)
def test_optimizer_fp16_with_gradient_predivide_factor():
    k = hvd.size()
    w = torch.nn.Parameter(torch.zeros(17))
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.0), named_parameters=[("w", w)],
                                   compression=hvd.Compression.fp16, gradient_predivide_factor=2.0)
    c = mine(17, 59000.0, 61000.0, seed=2)
    (w * c).sum().backward()
    opt.synchronize()
    assert torch.allclose(w.grad.double(), mpi_sum(c) / k, rtol=fp16_tolerance(k), atol=0)


@pytest.mark.mpi(min_size=1)
def test_same_bits_as_reduce_compressed():
    """mpiml.torch's fp16 average is reduce_compressed's, whatever sums the wire (the same ring here)."""
    k = hvd.size()
    t = mine(1000, -60000.0, 60000.0, seed=3)  # pairs whose float16 sum overflows, shares that do not
    out = hvd.allreduce(t, compression=hvd.Compression.fp16, name="shared.bits")
    through_engine = compression.reduce_compressed(
        t, compression.Compression.fp16, k, True, lambda w: hvd.allreduce(w, op=hvd.Sum, name="shared.bits.sum"))
    algorithm = hvd.basics.engine().executor.algorithm
    through_ring = compression.reduce_compressed(
        t, compression.Compression.fp16, k, True,
        lambda w: collectives.allreduce(w, op="sum", algorithm=algorithm, comm=MPI.COMM_WORLD))
    assert out.view(torch.int32).tolist() == through_engine.view(torch.int32).tolist()
    assert out.view(torch.int32).tolist() == through_ring.view(torch.int32).tolist()
    assert torch.allclose(out.double(), mpi_sum(t) / k, rtol=0, atol=60000 * fp16_tolerance(k))
    assert same_everywhere(out.numpy().tobytes())


@pytest.mark.mpi(min_size=2)  # one rank: no allreduce at all (as Horovod)
def test_optimizer_same_bits_as_reduce_compressed():
    k = hvd.size()
    w = torch.nn.Parameter(torch.zeros(100))
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.0), named_parameters=[("w", w)],
                                   compression=hvd.Compression.fp16)
    c = mine(100, -60000.0, 60000.0, seed=4)
    (w * c).sum().backward()
    opt.synchronize()
    algorithm = hvd.basics.engine().executor.algorithm
    expect = compression.reduce_compressed(
        c, compression.Compression.fp16, k, True,
        lambda x: collectives.allreduce(x, op="sum", algorithm=algorithm, comm=MPI.COMM_WORLD))
    assert w.grad.view(torch.int32).tolist() == expect.view(torch.int32).tolist()


@pytest.mark.mpi(min_size=2)
def test_sum_is_not_prescaled_unless_asked():
    k = hvd.size()
    small = mine(64, -10.0, 10.0, seed=5)
    summed = hvd.allreduce(small, op=hvd.Sum, compression=hvd.Compression.fp16, name="shared.sum")
    assert torch.allclose(summed.double(), mpi_sum(small), rtol=0, atol=10 * k * fp16_tolerance(k))
    half = hvd.allreduce(small, op=hvd.Sum, compression=hvd.Compression.fp16, prescale_factor=0.5,
                         postscale_factor=3.0, name="shared.sum.scaled")
    assert torch.allclose(half.double(), 1.5 * mpi_sum(small), rtol=0, atol=30 * k * fp16_tolerance(k))
    big = torch.full((8,), 60000.0)
    assert torch.isinf(hvd.allreduce(big, op=hvd.Sum, compression=hvd.Compression.fp16, name="shared.inf")).all()
    shares = hvd.allreduce(big, op=hvd.Sum, compression=hvd.Compression.fp16, prescale_factor=1.0 / k,
                           name="shared.shares")
    assert torch.allclose(shares, torch.full((8,), 60000.0), rtol=fp16_tolerance(k))


@pytest.mark.mpi(min_size=1)
def test_average_with_scale_factors_and_integers():
    k = hvd.size()
    t = mine(50, -100.0, 100.0, seed=6)
    out = hvd.allreduce(t, compression=hvd.Compression.fp16, prescale_factor=2.0, postscale_factor=0.25,
                        name="shared.scaled")
    assert torch.allclose(out.double(), 0.5 * mpi_sum(t) / k, rtol=0, atol=100 * fp16_tolerance(k))
    ints = torch.arange(-7, 8, dtype=torch.int32) * (hvd.rank() + 1)
    plain = hvd.allreduce(ints, name="shared.ints.plain")
    assert torch.equal(hvd.allreduce(ints, compression=hvd.Compression.fp16, name="shared.ints"), plain)
    mixed = hvd.grouped_allreduce([t, ints], compression=hvd.Compression.fp16, name="shared.mixed")
    assert torch.equal(mixed[1], plain) and torch.allclose(mixed[0].double(), mpi_sum(t) / k, rtol=0,
                                                              atol=100 * fp16_tolerance(k))


@pytest.mark.mpi(min_size=1)
def test_fp16_allreduce_is_differentiable():
    t = mine(10, -1.0, 1.0, seed=7).requires_grad_(True)
    out = hvd.allreduce(t, compression=hvd.Compression.fp16, name="shared.grad")
    out.sum().backward()
    assert torch.allclose(t.grad, torch.ones(10), rtol=1e-3)


class ScaledHalf(Compressor):
    """A user's own compressor: float16 on the wire, as Horovod users write them."""

    @staticmethod
    def compress(tensor):
        return tensor.to(torch.float16), tensor.dtype

    @staticmethod
    def decompress(tensor, ctx):
        return tensor.to(ctx)


@pytest.mark.mpi(min_size=2)
def test_custom_compressor_subclassing_hvd_compressor():
    k = hvd.size()
    t = mine(40, 59000.0, 61000.0, seed=8)
    out = hvd.allreduce(t, compression=ScaledHalf, name="shared.custom")
    assert torch.allclose(out.double(), mpi_sum(t) / k, rtol=fp16_tolerance(k), atol=0)
    w = torch.nn.Parameter(torch.zeros(40))
    opt = hvd.DistributedOptimizer(torch.optim.SGD([w], lr=0.0), named_parameters=[("w", w)], compression=ScaledHalf)
    (w * t).sum().backward()
    opt.synchronize()
    assert torch.equal(w.grad, out)


# ---------------------------------------------------------------- host layout


@pytest.mark.mpi(min_size=1)
def test_host_layout_is_one_cached_topology():
    world = MPI.COMM_WORLD
    topo = runtime.topology(world)
    assert runtime.topology(world) is topo
    assert topo is collectives.hier.topology(collectives.private_comm(world))
    local = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.rank)
    try:
        assert (hvd.local_rank(), hvd.local_size()) == (local.rank, local.size)
        assert (mpiml.local_rank(), mpiml.local_size()) == (local.rank, local.size)
        cross = world.Split(color=local.rank, key=world.rank)
        assert (hvd.cross_rank(), hvd.cross_size()) == (cross.rank, cross.size)
        assert hvd.is_homogeneous() == (len(set(world.allgather(local.size))) == 1)
        cross.Free()
    finally:
        local.Free()


@pytest.mark.mpi(min_size=2)
def test_host_layout_of_a_sub_communicator_asks_only_its_ranks():
    world = MPI.COMM_WORLD
    half = world.Split(color=world.rank % 2, key=world.rank)
    try:
        if world.rank % 2 == 0:  # the odd ranks never call: nothing but ``half`` may be used
            local = half.Split_type(MPI.COMM_TYPE_SHARED, key=half.rank)
            assert (runtime.local_rank(half), runtime.local_size(half)) == (local.rank, local.size)
            local.Free()
        world.Barrier()
    finally:
        half.Free()


# ---------------------------------------------------------------- agree


@pytest.mark.mpi(min_size=2)
def test_agree_raises_the_requested_exception_everywhere():
    world = MPI.COMM_WORLD

    def check():
        if world.rank == 1:
            raise ValueError("bad value")
        return world.rank
    with pytest.raises(RuntimeError, match=r"^bad value \(rank 1\)$") as info:
        runtime.agree(world, check, errors=(ValueError,), raise_as=RuntimeError)
    assert info.value.ranks == [1]
    with pytest.raises(runtime.UserError, match="bad value"):
        runtime.agree(world, check, errors=(ValueError,))
    assert runtime.agree(world, lambda: world.rank) == world.rank


# ---------------------------------------------------------------- broadcast_optimizer_state


class SpyComm(MPI.Intracomm):
    """COMM_WORLD, recording how many bytes go through the pickling ``bcast``."""

    pickled: list[int] = []

    def bcast(self, obj, root=0):
        SpyComm.pickled.append(len(pickle.dumps(obj)))
        return super().bcast(obj, root)


def digest(state):
    return hashlib.sha256(pickle.dumps({k: (v.tolist() if isinstance(v, torch.Tensor) else v)
                                        for k, v in _flat(state)})).hexdigest()


def _flat(obj, prefix=""):
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _flat(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _flat(v, f"{prefix}/{i}")
    else:
        yield prefix, obj


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("case", ["all", "root_only", "others_only"])
@pytest.mark.parametrize("wrapper", ["none", "mpiml", "hvd"])
def test_broadcast_optimizer_state_one_implementation(case, wrapper):
    world = MPI.COMM_WORLD
    root = world.size - 1
    torch.manual_seed(0)
    model = torch.nn.Linear(300, 200)  # 60k parameters: Adam's state is ~0.5 MB
    opt = torch.optim.Adam(model.parameters(), lr=0.001 * (world.rank + 1))
    if wrapper == "mpiml":
        opt = mpiml.DistributedOptimizer(opt, model)
    elif wrapper == "hvd":
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    stepped = {"all": True, "root_only": world.rank == root, "others_only": world.rank != root}[case]
    if stepped:  # a local step (different on every rank), so nothing is communicated
        inner = opt.optimizer if wrapper == "mpiml" else opt
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(world.rank))
        if wrapper == "hvd":
            super(opt.__class__, opt).step()
        else:
            inner.step()
    params = [p.detach().clone() for p in model.parameters()]
    SpyComm.pickled = []
    if wrapper == "hvd":
        hvd.broadcast_optimizer_state(opt, root_rank=root)
    else:
        mpiml.broadcast_optimizer_state(opt, root=root, comm=SpyComm(world))
        assert SpyComm.pickled and max(SpyComm.pickled) < 20000, SpyComm.pickled  # tensors are not pickled
    state = opt.state_dict()
    assert state["state"], "no state after the broadcast"
    assert same_everywhere(digest(state).encode())
    assert state["param_groups"][0]["lr"] == pytest.approx(0.001 * (root + 1))
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True)), "parameters moved"


@pytest.mark.mpi(min_size=2)
def test_broadcast_optimizer_state_refused_everywhere_when_a_rank_cannot_load():
    world = MPI.COMM_WORLD
    model = torch.nn.Linear(3, 2 + (world.rank == 1))
    opt = torch.optim.SGD(model.parameters() if world.rank != 1 else [model.weight], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"broadcast_optimizer_state: .*\(rank 1\)"):
        mpiml.broadcast_optimizer_state(opt, root=0)
