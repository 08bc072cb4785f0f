"""mpiml.torch's DistributedOptimizer and broadcast helpers, as Horovod's test_torch.py exercises them.

Optimizer state is broadcast for every torch.optim optimizer, in the three
situations that matter: every rank has (different) state, only the root has
state (the others' is created lazily), and only the others have state.
"""

import hashlib
import inspect
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

import mpiml.torch as hvd
from mpiml.torch import ops

OPTIMIZERS = sorted((c for c in torch.optim.Optimizer.__subclasses__() if c.__module__.startswith("torch.optim")),
                    key=lambda c: c.__name__)


@pytest.fixture(autouse=True)
def engine():
    hvd.init()
    ops._counter = itertools.count(MPI.COMM_WORLD.allreduce(next(ops._counter), op=MPI.MAX))


def rng(rank, seed=0):
    return torch.Generator().manual_seed(1000 * seed + rank + 1)


def mlp():
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def batch(rank, seed=0, n=8):
    g = rng(rank, seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def same_everywhere(value):
    values = MPI.COMM_WORLD.allgather(value)
    return all(v == values[0] for v in values)


def digest(obj):
    """A hash of nested state (tensors by dtype, shape and bytes; dict keys in sorted order)."""
    h = hashlib.sha256()

    def walk(o):
        if isinstance(o, torch.Tensor):
            h.update(repr((o.dtype, tuple(o.shape))).encode())
            h.update(o.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            for k in sorted(o, key=repr):
                h.update(repr(k).encode())
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            h.update(type(o).__name__.encode())
            for v in o:
                walk(v)
        else:
            h.update(repr((type(o).__name__, o)).encode())
    walk(obj)
    return h.hexdigest()


# ---------------------------------------------------------------- DistributedOptimizer


@pytest.mark.mpi(min_size=1)
def test_gradients_are_averaged_like_one_big_batch():
    rank, size = hvd.rank(), hvd.size()
    torch.manual_seed(0)
    model = mlp()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters())
    x, y = batch(rank)
    F.cross_entropy(model(x), y).backward()
    if size > 1:  # the hooks started every allreduce during backward, before step() or synchronize()
        assert len(opt._handles) == 4 and all(h is not None for h, _ in opt._handles.values())
    opt.synchronize()
    torch.manual_seed(0)
    ref = mlp()
    (sum(F.cross_entropy(ref(bx), by) for bx, by in (batch(r) for r in range(size))) / size).backward()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    with opt.skip_synchronize():
        opt.step()
    assert same_everywhere(digest(model.state_dict()))
    assert isinstance(opt, torch.optim.SGD) and type(opt).__name__ == "SGD"


@pytest.mark.mpi(min_size=1)
def test_parameters_without_gradient_on_some_ranks():
    rank, size = hvd.rank(), hvd.size()
    torch.manual_seed(1)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 2), "b": torch.nn.Linear(3, 2), "c": torch.nn.Linear(3, 2)})
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters())
    used = {r: ["a", "b"] if r % 2 == 0 else ["b", "c"] for r in range(size)}  # "c" unused on even ranks, ...
    for step in range(3):
        opt.zero_grad()
        x = torch.randn(4, 3, generator=rng(rank, step))
        sum(model[k](x).sum() for k in used[rank]).backward()
        opt.step()
    assert same_everywhere(digest(model.state_dict()))
    torch.manual_seed(1)
    ref = torch.nn.ModuleDict({k: torch.nn.Linear(3, 2) for k in "abc"})
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(3):
        ref_opt.zero_grad()
        (sum(ref[k](torch.randn(4, 3, generator=rng(r, step))).sum() for r in range(size) for k in used[r]) /
         size).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.mpi(min_size=1)
def test_backward_passes_per_step_accumulates_and_refuses_extra_passes():
    rank, size = hvd.rank(), hvd.size()
    model = torch.nn.Linear(3, 1, bias=False)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0),
                                   named_parameters=model.named_parameters(), backward_passes_per_step=2)
    xs = [torch.randn(2, 3, generator=rng(r, k)) for r in range(size) for k in range(2)]
    for k in range(2):
        model(xs[2 * rank + k]).sum().backward()
    opt.synchronize()
    torch.testing.assert_close(model.weight.grad, sum(x.sum(0, keepdim=True) for x in xs) / size)
    with opt.skip_synchronize():
        opt.step()
    opt.zero_grad()
    if size > 1:
        for _ in range(2):
            model(xs[0]).sum().backward()
        with pytest.raises(AssertionError, match="backward_passes_per_step"):
            model(xs[0]).sum().backward()
        opt.synchronize()


@pytest.mark.mpi(min_size=2)
def test_synchronize_step_warning_clipping_and_zero_grad_guard():
    model = torch.nn.Linear(1, 1)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters())
    F.mse_loss(model(torch.ones(1, 1) * (hvd.rank() + 1)), torch.ones(1, 1)).backward()
    with pytest.raises(AssertionError, match="zero_grad"):
        opt.zero_grad()
    opt.synchronize()
    before = model.weight.grad.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    assert abs(model.weight.grad.item()) < abs(before)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert any("optimizer.step() called without optimizer.skip_synchronize()" in str(w.message) for w in caught)
    opt.zero_grad()
    F.mse_loss(model(torch.ones(1, 1)), torch.zeros(1, 1)).backward()
    opt.synchronize()
    with warnings.catch_warnings(record=True) as caught, opt.skip_synchronize():
        warnings.simplefilter("always")
        opt.step()
    assert not [w for w in caught if "skip_synchronize" in str(w.message)]


@pytest.mark.mpi(min_size=1)
def test_named_parameters_must_be_unique_complete_tuples():
    a, b = torch.nn.Conv2d(1, 1, 1), torch.nn.Conv2d(1, 1, 1)
    opt = torch.optim.SGD(itertools.chain(a.parameters(), b.parameters()), lr=0.1)
    with pytest.raises(ValueError, match="unique"):
        hvd.DistributedOptimizer(opt, named_parameters=itertools.chain(a.named_parameters(), b.named_parameters()))
    with pytest.raises(ValueError, match="not named"):
        hvd.DistributedOptimizer(opt, named_parameters=list(a.named_parameters()))
    with pytest.raises(ValueError, match="tuples"):
        hvd.DistributedOptimizer(opt, named_parameters=list(a.parameters()) + list(b.parameters()))
    with pytest.raises(ValueError, match="predivide"):
        hvd.DistributedOptimizer(opt, op=hvd.Sum, gradient_predivide_factor=2.0)
    with pytest.raises(ValueError, match="Adasum"):
        hvd.DistributedOptimizer(opt, op=hvd.Adasum)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("variant", ["fp16", "predivide", "sum", "groups", "group_lists"])
def test_optimizer_variants_match_the_reference(variant):
    rank, size = hvd.rank(), hvd.size()
    torch.manual_seed(2)
    model = mlp()
    params = list(model.parameters())
    kwargs = {"fp16": {"compression": hvd.Compression.fp16}, "predivide": {"gradient_predivide_factor": 4.0},
              "sum": {"op": hvd.Sum}, "groups": {"groups": 2},
              "group_lists": {"groups": [[params[0], params[3]], [params[1]]]}}[variant]
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(), **kwargs)
    x, y = batch(rank, seed=3)
    F.cross_entropy(model(x), y).backward()
    opt.synchronize()
    torch.manual_seed(2)
    ref = mlp()
    total = sum(F.cross_entropy(ref(bx), by) for bx, by in (batch(r, seed=3) for r in range(size)))
    (total if variant == "sum" else total / size).backward()
    tol = 2e-3 if variant == "fp16" else 1e-5
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=tol, atol=tol)
        assert p.grad.dtype == torch.float32
    with opt.skip_synchronize():
        opt.step()


@pytest.mark.mpi(min_size=1)
def test_state_dict_scheduler_closure_and_carried_over_state():
    model = torch.nn.Linear(4, 2)
    inner = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model(torch.ones(1, 4)).sum().backward()
    inner.step()  # the wrapped optimizer already has momentum buffers
    opt = hvd.DistributedOptimizer(inner, named_parameters=model.named_parameters())
    assert set(opt.state_dict()["state"]) == {0, 1}
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def closure():
        opt.zero_grad()
        loss = model(torch.randn(3, 4, generator=rng(hvd.rank()))).pow(2).sum()
        loss.backward()
        return loss
    for _ in range(2):
        assert torch.is_tensor(opt.step(closure))
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.125)
    assert same_everywhere(digest(model.state_dict()))


@pytest.mark.mpi(min_size=2)
def test_dynamic_requires_grad():
    gen, disc = torch.nn.Conv2d(1, 4, 1), torch.nn.Conv2d(4, 1, 1)
    hvd.broadcast_parameters(gen.state_dict(), 0)
    hvd.broadcast_parameters(disc.state_dict(), 0)
    gen_opt = hvd.DistributedOptimizer(torch.optim.SGD(gen.parameters(), lr=0.1),
                                       named_parameters=gen.named_parameters())
    disc_opt = hvd.DistributedOptimizer(torch.optim.SGD(disc.parameters(), lr=0.1),
                                        named_parameters=disc.named_parameters())
    inp = torch.rand(1, 1, 8, 8, generator=rng(hvd.rank()))
    for train_gen in (True, False, True):
        for p in gen.parameters():
            p.requires_grad_(train_gen)
        for p in disc.parameters():
            p.requires_grad_(not train_gen)
        gen_opt.zero_grad()
        disc_opt.zero_grad()
        disc(gen(inp)).sum().backward()
        (gen_opt if train_gen else disc_opt).step()
    assert same_everywhere(digest([gen.state_dict(), disc.state_dict()]))


# ---------------------------------------------------------------- broadcasting parameters and optimizer state


@pytest.mark.mpi(min_size=1)
def test_broadcast_parameters_dict_named_and_plain():
    rank, size = hvd.rank(), hvd.size()
    root = size - 1
    for form in ("state_dict", "named_parameters", "parameters"):
        torch.manual_seed(rank)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        model(torch.randn(5, 4))  # running statistics differ by rank too
        torch.manual_seed(root)
        expected = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
        expected(torch.randn(5, 4))
        params = {"state_dict": model.state_dict(), "named_parameters": list(model.named_parameters()),
                  "parameters": list(model.parameters())}[form]
        hvd.broadcast_parameters(params, root_rank=root)
        mine, theirs = model.state_dict(), expected.state_dict()
        keys = mine.keys() if form == "state_dict" else [k for k, _ in model.named_parameters()]
        for k in keys:
            assert torch.equal(mine[k], theirs[k]), (form, k)


def _optimizer(cls, rank, wrap=False):
    """A model and an optimizer of ``cls`` whose hyper-parameters depend on the rank."""
    torch.manual_seed(5)
    if cls is torch.optim.SparseAdam:
        model = torch.nn.Embedding(10, 4, sparse=True)
    elif cls.__name__ == "Muon":
        model = torch.nn.Linear(6, 3, bias=False)
    else:
        model = mlp()
    options = dict(lr=0.01 * (rank + 1), momentum=0.5 + 0.1 * rank, weight_decay=0.1 * (rank + 1), centered=True,
                   betas=(0.8 + 0.01 * rank, 0.9), etas=(0.4, 1.1 + rank), step_sizes=(1e-6, 10 + rank))
    accepted = inspect.signature(cls.__init__).parameters
    opt = cls(model.parameters(), **{k: v for k, v in options.items() if k in accepted})
    if wrap and cls is not torch.optim.LBFGS:
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    return model, opt


def _step(model, opt, rank, steps):
    for k in range(steps):
        def closure(k=k):
            opt.zero_grad()
            if isinstance(model, torch.nn.Embedding):
                loss = model(torch.randint(0, 10, (6,), generator=rng(rank, k))).pow(2).sum()
            else:
                loss = model(torch.randn(4, 6, generator=rng(rank, k))).pow(2).sum()
            loss.backward()
            return loss
        opt.step(closure)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_broadcast_optimizer_state_every_optimizer(cls):
    rank, size = hvd.rank(), hvd.size()
    root = size - 1
    for case in ("all_have_state", "only_root_has_state", "only_others_have_state"):
        wrapped = case == "only_others_have_state" and rank == root  # the root's fresh state, made without talking
        model, opt = _optimizer(cls, rank, wrap=wrapped)
        stepped = {"all_have_state": True, "only_root_has_state": rank == root,
                   "only_others_have_state": rank != root}[case]
        if stepped:
            _step(model, opt, rank, steps=1 + rank)
        if case == "all_have_state" and size > 1:
            assert not same_everywhere(digest(opt.state_dict())), "states should differ before the broadcast"
        params_before = digest(model.state_dict())
        hvd.broadcast_optimizer_state(opt, root_rank=root)
        state = opt.state_dict()
        assert same_everywhere(digest(state)), (cls.__name__, case)
        assert digest(model.state_dict()) == params_before, "broadcast_optimizer_state moved the parameters"
        if cls is not torch.optim.LBFGS:
            assert state["state"], f"{cls.__name__} ({case}): no state after the broadcast"
        _, reference = _optimizer(cls, root)
        for key, value in reference.param_groups[0].items():
            if key != "params":
                assert type(state["param_groups"][0][key]) is type(value)
                assert state["param_groups"][0][key] == value, (cls.__name__, key)
        if not wrapped:
            _step(model, opt, rank, steps=1)  # the received state works with the optimizer


@pytest.mark.mpi(min_size=1)
def test_broadcast_state_with_a_parameter_that_needs_no_gradient():
    class NoGrad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor([1, 3], dtype=torch.int32), requires_grad=False)
            self.b = torch.nn.Parameter(torch.rand(4, generator=rng(hvd.rank())))

        def forward(self, x):
            return torch.index_select(self.b, 0, self.a.long()) * x
    model = NoGrad()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.001, weight_decay=1e-6, momentum=0.9,
                                                   nesterov=True), named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    assert opt.param_groups[0]["params"][0].grad is None
    grad = opt.param_groups[0]["params"][1].grad
    assert torch.equal(hvd.broadcast(grad, root_rank=0), grad)
    assert same_everywhere(digest(model.state_dict()))


@pytest.mark.mpi(min_size=1)
def test_timeline_records_negotiation_and_allreduce(tmp_path_factory):
    import json

    from mpiml.timeline import rank_path
    comm = MPI.COMM_WORLD
    path = comm.bcast(str(tmp_path_factory.mktemp("timeline") / "trace.json") if comm.rank == 0 else None)
    hvd.start_timeline(path, mark_cycles=True)
    hvd.allreduce(torch.ones(3), name="test_allreduce")
    with hvd.timeline().span("my_phase", "user"):
        hvd.broadcast(torch.ones(2), 0, name="b")
    hvd.stop_timeline()
    with open(rank_path(path, comm.rank, comm.size)) as f:
        events = json.load(f)
    names = {e["name"] for e in events}
    assert {"NEGOTIATE_ALLREDUCE", "ALLREDUCE", "NEGOTIATE", "CYCLE_START", "my_phase", "BROADCAST"} <= names
    rows = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert "allreduce.test_allreduce" in rows and "engine" in rows
    assert {e["pid"] for e in events} == {comm.rank}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("cls", [c for c in OPTIMIZERS if c not in (torch.optim.LBFGS, torch.optim.SparseAdam)],
                         ids=lambda c: c.__name__)
def test_every_optimizer_with_parameters_unused_on_some_ranks(cls):
    # Horovod's test_force_allreduce pattern: each rank's loss uses a different head, so every rank has
    # parameters without a gradient; the step must still finish and leave all ranks with the same model.
    rank = hvd.rank()
    bias = cls.__name__ != "Muon"  # Muon takes 2D parameters only
    torch.manual_seed(3 + rank)  # different initial weights everywhere: broadcast_parameters must fix that
    model = torch.nn.ModuleDict({"trunk": torch.nn.Linear(6, 5, bias=bias), "head0": torch.nn.Linear(5, 3, bias=bias),
                                 "head1": torch.nn.Linear(5, 3, bias=bias)})
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    options = dict(lr=0.05, momentum=0.9, weight_decay=0.1, centered=True)
    accepted = inspect.signature(cls.__init__).parameters
    opt = hvd.DistributedOptimizer(cls(model.parameters(), **{k: v for k, v in options.items() if k in accepted}),
                                   named_parameters=model.named_parameters())
    for step in range(2):
        opt.zero_grad()
        x = torch.randn(4, 6, generator=rng(rank, step))
        model[f"head{rank % 2}"](torch.tanh(model["trunk"](x))).pow(2).sum().backward()
        opt.step()
    assert same_everywhere(digest(model.state_dict())), cls.__name__
    assert same_everywhere(digest(opt.state_dict()["state"])), cls.__name__
