"""Every strategy through the registry: options honoured or refused, ZeRO against ring, gossip, compression."""

import pytest
import torch
from mpi4py import MPI

import mpiml
from mpiml import strategies
from mpiml.sharding import state_bytes
from mpiml.strategies import gossip

pytestmark = pytest.mark.slow  # not in the oversubscribed 8-rank subset: 1 to 4 ranks cover every strategy

# A non-default value for every option the registry knows (the test below fails for an option added
# without one here).
EXAMPLES = {"overlap": False, "bucket_bytes": 1024, "compression": "fp16", "backward_passes_per_step": 2,
            "poll_interval": 1e-4, "check_consistency_every": 5, "average_every": 2, "zero": True, "staleness": 2,
            "gossip_graph": "ring"}


def model_and_data(seed, groups=False, width=16):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(9, width), torch.nn.Tanh(), torch.nn.Linear(width, 4))
    g = torch.Generator().manual_seed(seed)
    return model, torch.randn(12, 9, generator=g), torch.randint(0, 4, (12,), generator=g)


def topology_of(cls):
    return cls.topologies[0] if cls.topologies else "ring"


def build(cls, extra, model=None):
    model = model if model is not None else model_and_data(0)[0]
    options = dict(extra)
    if cls.mode_option:
        options.setdefault(cls.mode_option, EXAMPLES[cls.mode_option])
    return mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                      topology=topology_of(cls), **options)


def close(opt):
    opt.finish()
    opt.close()


@pytest.mark.mpi(min_size=1)
def test_every_option_has_an_example():
    assert set(EXAMPLES) == set(strategies.OPTIONS)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("name", list(strategies.STRATEGIES))
@pytest.mark.parametrize("option", list(strategies.OPTIONS))
def test_every_strategy_option_pair_is_honoured_or_refused(name, option):
    cls = strategies.STRATEGIES[name]
    others = [c for c in strategies.STRATEGIES.values() if c.mode_option and c is not cls]
    if option in cls.options or option == cls.mode_option:
        opt = build(cls, {option: EXAMPLES[option]})
        assert opt.strategy.name == name and opt.strategy.settings[option] == EXAMPLES[option]
        close(opt)
    elif any(option == c.mode_option for c in others) and not cls.topologies:
        chosen = next(c for c in others if c.mode_option == option)
        if cls.mode_option is None:  # an exact topology plus a mode option chooses that strategy instead
            opt = build(cls, {option: EXAMPLES[option]})
            assert opt.strategy.name == chosen.name
            close(opt)
        else:
            with pytest.raises(mpiml.UserError, match="choose different strategies"):  # e.g. --zero --average-every
                build(cls, {option: EXAMPLES[option]})
    else:
        flag = strategies.OPTIONS[option].flag
        with pytest.raises(mpiml.UserError, match=rf"^{option} \({flag}.*\) does not apply to the {name} strategy"):
            build(cls, {option: EXAMPLES[option]})


@pytest.mark.mpi(min_size=1)
def test_unknown_topology_and_option_are_refused():
    model = model_and_data(0)[0]
    with pytest.raises(mpiml.UserError, match="unknown topology 'rong'; choose from mpi, ring"):
        mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, topology="rong")
    with pytest.raises(mpiml.UserError, match="unknown option gossip_grpah"):
        mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, topology="gossip",
                                   gossip_grpah="ring")


def train(opt, model, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def make_optimizer(kind, model):
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    if kind == "adam":
        return torch.optim.Adam([{"params": first}, {"params": second, "lr": 3e-3}], lr=1e-2, weight_decay=1e-3)
    return torch.optim.SGD([{"params": first}, {"params": second, "lr": 0.05}], lr=0.1, momentum=0.9,
                           weight_decay=1e-3)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_zero_ends_bitwise_equal_to_synchronous_ring(kind):
    comm = MPI.COMM_WORLD
    results = {}
    for zero in (False, True):
        model, x, y = model_and_data(1000 + comm.rank)
        opt = mpiml.DistributedOptimizer(make_optimizer(kind, model), model, topology="ring", zero=zero)
        mpiml.broadcast_parameters(model, root=0)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)  # schedulers reach the shards
        for _ in range(3):
            train(opt, model, x, y, 2)
            sched.step()
        results[zero] = [b.clone() for b in opt.parameter_buffers]
        if zero:
            full = sum(p.numel() for p in model.parameters()) * 4 * (2 if kind == "adam" else 1)
            mine = state_bytes(opt.strategy.shard)
            assert mine <= 1.1 * full / comm.size + 64 * 4, (mine, full)  # + per-tensor step counters
            assert comm.allreduce(mine) >= full  # and nothing is missing
        close(opt)
    for a, b in zip(results[False], results[True]):
        assert torch.equal(a, b)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("topology", ["tree", "butterfly", "mpi"])
def test_zero_over_other_algorithms_keeps_replicas_identical_and_close_to_synchronous(topology):
    comm = MPI.COMM_WORLD
    results = {}
    for zero in (False, True):
        model, x, y = model_and_data(2000 + comm.rank)
        opt = mpiml.DistributedOptimizer(make_optimizer("adam", model), model, topology=topology, zero=zero)
        train(opt, model, x, y, 4)
        results[zero] = torch.cat([b.clone() for b in opt.parameter_buffers])
        digests = comm.allgather(results[zero].numpy().tobytes())
        assert all(d == digests[0] for d in digests)
        close(opt)
    torch.testing.assert_close(results[True], results[False], rtol=1e-4, atol=1e-5)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("graph", ["exponential", "ring"])
def test_gossip_keeps_the_replicas_mean_and_draws_them_together(graph):
    comm = MPI.COMM_WORLD
    model, x, y = model_and_data(0)
    with torch.no_grad():  # different replicas on every rank, with the learning rate at 0: pure mixing
        g = torch.Generator().manual_seed(31 + comm.rank)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, topology="gossip",
                                     gossip_graph=graph)
    flat = opt.parameter_buffers[0]
    mean0 = flat.double().clone()
    comm.Allreduce(MPI.IN_PLACE, mean0.numpy(), op=MPI.SUM)
    drift0 = mpiml.mixing.replica_drift(opt.parameter_buffers, comm)
    train(opt, model, x, y, 6)
    mean = flat.double().clone()
    comm.Allreduce(MPI.IN_PLACE, mean.numpy(), op=MPI.SUM)
    torch.testing.assert_close(mean, mean0, rtol=1e-5, atol=1e-5)  # doubly stochastic: the mean stays
    drift = mpiml.mixing.replica_drift(opt.parameter_buffers, comm)
    assert drift < 0.5 * drift0 if comm.size > 2 or graph == "ring" else drift < 1e-6


@pytest.mark.mpi(min_size=2)
def test_local_sgd_with_compression_ends_each_period_identical_and_near_the_exact_average():
    comm = MPI.COMM_WORLD
    ends = {}
    for compression in ("none", "fp16"):
        model, x, y = model_and_data(300 + comm.rank)
        opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model,
                                         topology="ring", average_every=3, compression=compression)
        train(opt, model, x, y, 6)
        ends[compression] = opt.parameter_buffers[0].clone()
        digests = comm.allgather(ends[compression].numpy().tobytes())
        assert all(d == digests[0] for d in digests)
        close(opt)
    torch.testing.assert_close(ends["fp16"], ends["none"], rtol=0, atol=2e-3)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("topology", ["butterfly-mixing", "gossip"])
def test_compressed_parameter_exchange_sends_half_the_bytes_and_stays_close(topology):
    comm = MPI.COMM_WORLD
    ends, sent = {}, {}
    for compression in ("none", "fp16"):
        model, x, y = model_and_data(500 + comm.rank)
        opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, topology=topology,
                                         compression=compression)
        before = mpiml.traffic.sent()
        train(opt, model, x, y, 4)
        sent[compression] = mpiml.traffic.sent() - before
        ends[compression] = opt.parameter_buffers[0].clone()
        close(opt)
    n = opt.parameter_buffers[0].numel()  # the flat buffer is what travels (its alignment padding too)
    if topology == "butterfly-mixing":  # a rank whose partner would be K or more sits the stage out
        exchanges = sum(mpiml.mixing.partner_for_step(comm.rank, comm.size, t) is not None for t in range(4))
    else:
        exchanges = sum(len(gossip.peers("exponential", comm.rank, comm.size, t)) for t in range(4))
    assert sent["none"] - sent["fp16"] == exchanges * n * 2  # 4 bytes an element, 2 with fp16
    torch.testing.assert_close(ends["fp16"], ends["none"], rtol=0, atol=5e-3)


@pytest.mark.mpi(min_size=2)
def test_non_finite_gradient_is_caught_with_every_strategy_that_agrees():
    comm = MPI.COMM_WORLD
    for cls in strategies.STRATEGIES.values():
        if cls.nan_scope != "all":
            continue
        model, x, y = model_and_data(0)
        opt = build(cls, {}, model)
        opt.on_nan = "skip"
        before = [b.clone() for b in opt.parameter_buffers]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        (loss * (float("nan") if comm.rank == comm.size - 1 else 1.0)).backward()
        opt.step()
        assert opt.skipped_steps == [(0, [comm.size - 1])], cls.name
        for a, b in zip(before, opt.parameter_buffers):
            assert torch.equal(a, b), cls.name
        close(opt)

