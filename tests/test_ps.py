"""The parameter server's bookkeeping (``ShardServer``) without MPI, and the one-rank ``ParameterServer``."""

import itertools
import math

import numpy as np
import pytest
import torch
from mpi4py import MPI

from mpiml.ps import ParameterServer, ShardServer


def grad(*values):
    return np.array(values, dtype=np.float32)


def test_synchronous_waits_for_all_workers_then_takes_one_averaged_step():
    s = ShardServer(torch.tensor([1.0, 2.0]), workers=3, staleness=0, momentum=0.9)
    s.push(0, 1, 0.5, grad(1, 0))
    s.push(2, 1, 0.5, grad(5, 3))
    assert not s.pull(0, 1) and s.stats["updates"] == 0  # worker 1 has not pushed clock 1 yet
    assert s.pull(1, 0)  # clock 0 asks for nothing
    s.push(1, 1, 0.5, grad(3, 0))
    assert s.ready() == [(0, 1)] and s.applied == 1 and s.stats["updates"] == 1
    torch.testing.assert_close(s.weights, torch.tensor([1.0 - 0.5 * 3, 2.0 - 0.5 * 1]))
    assert s.stats["max_staleness"] == 0 and s.stats["deferred_pulls"] == 1


def test_synchronous_result_does_not_depend_on_arrival_order():
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(7).astype(np.float32) for _ in range(4)]
    results = set()
    for order in itertools.permutations(range(4)):
        s = ShardServer(torch.zeros(7), workers=4, staleness=0, momentum=0.5, weight_decay=0.1)
        for w in order:
            s.push(w, 1, 0.1, grads[w])
        results.add(s.weights.numpy().tobytes())
    assert len(results) == 1  # summed in rank order, so bitwise reproducible


def test_bounded_staleness_defers_until_the_slowest_worker_catches_up():
    s = ShardServer(torch.zeros(1), workers=2, staleness=1)
    for t in (1, 2):
        s.push(0, t, 1.0, grad(-2))  # applied at once, divided by K = 2
    assert s.stats["updates"] == 2 and s.weights.item() == 2.0
    assert not s.pull(0, 2)  # worker 1 is at clock 0 < 2 - 1
    s.push(1, 1, 1.0, grad(-2))
    assert s.ready() == [(0, 2)] and s.stats["max_staleness"] == 1
    assert s.pull(1, 1) and s.stats["pulls"] == 2


def test_unbounded_answers_at_once_and_records_how_stale():
    s = ShardServer(torch.zeros(1), workers=3, staleness=None)
    for t in range(1, 6):
        s.push(2, t, 1.0, grad(-3))
    assert s.pull(2, 5) and s.stats["max_staleness"] == 5 and s.weights.item() == 5.0


def test_a_finished_worker_releases_pulls_and_later_clocks_average_over_the_rest():
    s = ShardServer(torch.zeros(1), workers=2, staleness=0)
    s.push(0, 1, 1.0, grad(2))
    s.push(1, 1, 1.0, grad(4))
    s.push(0, 2, 1.0, grad(6))
    assert not s.pull(0, 2)
    s.done(1, 1)
    assert s.ready() == [(0, 2)]
    assert s.weights.item() == -(3.0 + 6.0)  # clock 1: mean of two; clock 2: worker 0 alone
    s.done(0, 2)
    assert s.min_clock() == math.inf


def test_async_scales_gradient_and_weight_decay_by_k_like_torch_sgd():
    start = torch.tensor([1.0, -1.0, 0.5])
    s = ShardServer(start, workers=4, staleness=2, momentum=0.9, weight_decay=0.2)
    ref = start.clone()
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=0.2 / 4)
    for t in range(1, 4):
        g = grad(t, -t, 0.5 * t)
        s.push(0, t, 0.1, g)
        ref.grad = torch.from_numpy(g) / 4
        opt.step()
    assert torch.equal(s.weights, ref)  # the same arithmetic, op for op


def test_protocol_violations_are_reported():
    s = ShardServer(torch.zeros(1), workers=2, staleness=0)
    with pytest.raises(RuntimeError, match="out of order"):
        s.push(0, 2, 1.0, grad(1))
    s.push(0, 1, 1.0, grad(1))
    with pytest.raises(RuntimeError, match="finished at clock 0, but 1 of its pushes arrived"):
        s.done(0, 0)


@pytest.mark.parametrize("staleness", [0, 3, None])
def test_one_rank_is_plain_sgd_bitwise(staleness):
    start = torch.randn(10, generator=torch.Generator().manual_seed(1))
    params, ref = start.clone(), start.clone()
    ps = ParameterServer(params, MPI.COMM_SELF, staleness, lr=0.1, momentum=0.9, weight_decay=0.01)
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=0.01)
    for t in range(5):
        g = torch.sin(params * (t + 1))
        lr = 0.1 / (t + 1)
        ps.set_lr(lr)
        ps.push(g)
        ps.pull()
        opt.param_groups[0]["lr"] = lr
        ref.grad = g
        opt.step()
        assert torch.equal(params, ref), f"step {t}"
    ps.finish()
    assert torch.equal(params, ref)
    stats = ps.stats
    assert stats["server_updates"] == 5 and stats["worker_clock"] == 5 and stats["server_max_staleness"] == 0


@pytest.mark.parametrize("kwargs, error, message", [
    ({"staleness": -1}, ValueError, "staleness must be >= 0"),
    ({"staleness": 1.0}, TypeError, "staleness must be an int or None"),
    ({"lr": -0.1}, ValueError, "lr must be finite and >= 0"),
    ({"lr": "0.1"}, TypeError, "lr must be a number"),
    ({"weight_decay": float("inf")}, ValueError, "weight_decay must be finite"),
    ({"params": torch.zeros(3, dtype=torch.float16)}, TypeError, "float32 or float64"),
    ({"params": [0.0, 1.0]}, TypeError, "got list"),
    ({"params": torch.zeros(4)[::2]}, ValueError, "contiguous"),
    ({"comm": "world"}, TypeError, "intracommunicator"),
])
def test_bad_arguments(kwargs, error, message):
    args = {"params": torch.zeros(3), "comm": MPI.COMM_SELF, "staleness": 0, "lr": 0.1} | kwargs
    with pytest.raises(error, match=message):
        ParameterServer(**args)


def test_bad_pushes_and_use_after_finish():
    ps = ParameterServer(torch.zeros(3), MPI.COMM_SELF, None, lr=0.1)
    with pytest.raises(ValueError, match="grads has 4 elements, params 3"):
        ps.push(torch.zeros(4))
    with pytest.raises(TypeError, match="dtype torch.float32, got torch.int32 on cpu"):
        ps.push(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="grads must be a torch.Tensor"):
        ps.push(np.zeros(3, dtype=np.float32))
    assert ps.clock == 0  # nothing was sent
    ps.finish()
    with pytest.raises(RuntimeError, match="finish\\(\\) was already called"):
        ps.push(torch.zeros(3))


def test_a_thread_level_below_multiple_is_refused(monkeypatch):
    class TwoRanks(MPI.Intracomm):
        def Get_size(self):
            return 2

    monkeypatch.setattr(MPI, "Query_thread", lambda: MPI.THREAD_SERIALIZED)
    with pytest.raises(RuntimeError, match="not MPI_THREAD_MULTIPLE"):
        ParameterServer(torch.zeros(3), TwoRanks(MPI.COMM_SELF), 0, lr=0.1)


# ---------------------------------------------------------------- the user's torch optimizer on the shards


def two_group_model(make, flat):
    """W (4 x 3) in group 0 and b (5) in group 1, as views of ``flat`` (17 elements), under ``make``."""
    w, b = flat[:12].view(4, 3), flat[12:]
    return make([{"params": [w]}, {"params": [b], "lr": 0.03}]), [w, b]


SPANS, GROUP_OF = [(0, 0, 12), (0, 12, 17)], [0, 1]
OPTIMIZERS = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
    "adam": lambda groups: torch.optim.Adam(groups, lr=0.01, betas=(0.8, 0.99), weight_decay=0.02),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1),
    "rmsprop": lambda groups: torch.optim.RMSprop(groups, lr=0.01, momentum=0.5, centered=True),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_synchronous_shards_step_the_users_optimizer_bitwise_like_the_whole_model(name):
    """Three servers' shards (cutting W and b) after S = 0 steps: torch's optimizer on the mean gradient."""
    k, n, steps = 3, 17, 6
    rng = np.random.default_rng(5)
    start = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    ref = start.clone()
    ref_opt, ref_params = two_group_model(OPTIMIZERS[name], ref)
    user_opt, _ = two_group_model(OPTIMIZERS[name], start.clone())  # the workers' optimizer: never stepped
    bounds = [0, 5, 13, 17]  # shard 0 inside W, shard 1 across W and b, shard 2 inside b
    servers = [ShardServer(start[bounds[s]:bounds[s + 1]], k, 0, optimizer=user_opt, spans=SPANS,
                           group_of=GROUP_OF, lo=bounds[s]) for s in range(k)]
    for t in range(1, steps + 1):
        grads = [rng.standard_normal(n).astype(np.float32) for _ in range(k)]
        lrs = [0.1 / t, 0.05 * t]  # a schedule, per group
        for server, s in zip(servers, range(k)):
            for w in reversed(range(k)):  # arrival order does not matter
                server.push(w, t, lrs, grads[w][bounds[s]:bounds[s + 1]])
        mean = torch.from_numpy(grads[0]).clone()
        for g in grads[1:]:
            mean += torch.from_numpy(g)
        mean /= k
        for group, lr in zip(ref_opt.param_groups, lrs):
            group["lr"] = lr
        ref_params[0].grad, ref_params[1].grad = mean[:12].view(4, 3), mean[12:]
        ref_opt.step()
        assert torch.equal(torch.cat([s.weights for s in servers]), ref), f"step {t}"
    assert [s.stats["updates"] for s in servers] == [steps] * k


def test_synchronous_lr_is_the_mean_of_the_pushes_per_group():
    user_opt, _ = two_group_model(lambda g: torch.optim.SGD(g, lr=1.0), torch.zeros(17))
    s = ShardServer(torch.zeros(17), workers=2, staleness=0, optimizer=user_opt, spans=SPANS, group_of=GROUP_OF)
    s.push(0, 1, [0.1, 1.0], np.ones(17, np.float32))
    s.push(1, 1, [0.3, 3.0], np.ones(17, np.float32))
    assert torch.equal(s.weights, torch.cat([torch.full((12,), -0.2), torch.full((5,), -2.0)]))
    with pytest.raises(RuntimeError, match="carries 1 learning rates for 2 parameter groups"):
        s.push(0, 2, [0.1], np.ones(17, np.float32))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_async_push_is_one_step_on_the_gradient_and_weight_decay_over_k(name):
    k, n = 4, 17
    rng = np.random.default_rng(6)
    start = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    user_opt, _ = two_group_model(OPTIMIZERS[name], start.clone())
    s = ShardServer(start, k, 2, optimizer=user_opt, spans=SPANS, group_of=GROUP_OF)
    ref = start.clone()
    ref_opt, ref_params = two_group_model(OPTIMIZERS[name], ref)
    for group in ref_opt.param_groups:
        group["weight_decay"] /= k
    for t in range(1, 5):
        g = rng.standard_normal(n).astype(np.float32)
        s.push(t % k, 1 + (t - 1) // k, [0.02 * t, 0.01], g)
        for group, lr in zip(ref_opt.param_groups, [0.02 * t, 0.01]):
            group["lr"] = lr
        scaled = torch.from_numpy(g) / k
        ref_params[0].grad, ref_params[1].grad = scaled[:12].view(4, 3), scaled[12:]
        ref_opt.step()
        assert torch.equal(s.weights, ref), f"push {t}"


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # opt never steps
@pytest.mark.parametrize("staleness", [0, 3, None])
def test_one_rank_with_adam_and_a_scheduler_is_plain_adam_bitwise(staleness):
    start = torch.randn(17, generator=torch.Generator().manual_seed(2))
    params, ref = start.clone(), start.clone()
    opt, _ = two_group_model(OPTIMIZERS["adam"], params)
    ref_opt, ref_params = two_group_model(OPTIMIZERS["adam"], ref)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda t: min(1.0, (t + 1) / 3)) for o in (opt, ref_opt)]
    ps = ParameterServer(params, MPI.COMM_SELF, staleness, opt, spans=SPANS, group_of=GROUP_OF)
    for t in range(6):
        g = torch.sin(params * (t + 1))
        ps.push(g)
        ps.pull()
        ref_params[0].grad, ref_params[1].grad = g[:12].view(4, 3), g[12:]
        ref_opt.step()
        for sched in schedules:
            sched.step()  # the lr changes between pushes and takes effect at the next
        assert torch.equal(params, ref), f"step {t}"
    ps.set_lr(0.7)  # set_lr: every group's, or one each
    assert [g["lr"] for g in opt.param_groups] == [0.7, 0.7]
    ps.set_lrs([0.5, 0.0])
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.0]
    ps.push(torch.ones(17))
    ps.pull()
    assert torch.equal(params[12:], ref[12:]) and not torch.equal(params[:12], ref[:12])  # lr 0: b stays
    ps.finish()
    assert ps.stats["server_updates"] == 7


@pytest.mark.parametrize("kwargs, error, message", [
    ({"lr": 0.1}, TypeError, "pass either the optimizer or them"),
    ({"spans": [(0, 0, 12), (0, 12, 18)]}, ValueError, "span \\(0, 12, 18\\) is not a range"),
    ({"spans": [(0, 0, 13), (0, 12, 17)]}, ValueError, "disjoint"),
    ({"group_of": [0, 2]}, ValueError, "group index 2 out of range"),
    ({"group_of": [0]}, ValueError, "1 group indices for 2 parameters"),
    ({"optimizer": "adam"}, TypeError, "must be a torch.optim.Optimizer"),
    ({"optimizer": torch.optim.LBFGS([torch.zeros(1)])}, ValueError, "not an element-wise optimizer"),
])
def test_bad_optimizer_arguments(kwargs, error, message):
    opt, _ = two_group_model(OPTIMIZERS["adam"], torch.zeros(17))
    args = {"params": torch.zeros(17), "comm": MPI.COMM_SELF, "staleness": 0, "optimizer": opt, "spans": SPANS,
            "group_of": GROUP_OF} | kwargs
    with pytest.raises(error, match=message):
        ParameterServer(**args)


def test_bad_learning_rates_are_refused_before_anything_is_sent():
    opt, _ = two_group_model(OPTIMIZERS["sgd"], torch.zeros(17))
    ps = ParameterServer(torch.zeros(17), MPI.COMM_SELF, 0, opt, SPANS, GROUP_OF)
    with pytest.raises(ValueError, match="3 learning rates for 2 parameter groups"):
        ps.set_lr([0.1, 0.1, 0.1])
    opt.param_groups[1]["lr"] = float("nan")  # e.g. a broken scheduler
    with pytest.raises(ValueError, match="lr must be finite"):
        ps.push(torch.zeros(17))
    assert ps.clock == 0
    ps.finish()
