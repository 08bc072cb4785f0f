"""The parameter server on real MPI: synchronous equivalence, the staleness bound, termination, convergence, CPU.

Every test runs its workers to the end, calls ``finish()`` and does all its
collective checks on every rank before asserting anything, so a failing
check fails this test only, instead of leaving ranks waiting or out of step.
"""

import hashlib
import time

import pytest
import torch
from mpi4py import MPI

from mpiml import collectives
from mpiml.ps import ParameterServer

UNBOUNDED = None


def identical_on_all_ranks(comm, t):
    digests = comm.allgather(hashlib.sha256(t.numpy().tobytes()).hexdigest())
    return all(d == digests[0] for d in digests)


# ---------------------------------------------------------------- S = 0 is synchronous SGD


def logreg_grad(params, x, y, d=5, c=3):
    """Flat gradient of softmax regression at flat ``params`` (W: d x c, then b: c)."""
    p = params.detach().clone().requires_grad_(True)
    logits = x @ p[:d * c].view(d, c) + p[d * c:]
    torch.nn.functional.cross_entropy(logits, y).backward()
    return p.grad


def batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)


def warmup_lr(step):
    return 0.2 * min(1.0, (step + 1) / 4)


@pytest.mark.mpi(min_size=1)
def test_zero_staleness_equals_allreduce_averaged_sgd():
    comm = MPI.COMM_WORLD
    start = torch.randn(18, generator=torch.Generator().manual_seed(7))
    steps = 12
    # reference: plain data-parallel SGD, gradients averaged with an allreduce
    ref = start.clone()
    opt = torch.optim.SGD([ref], lr=warmup_lr(0), momentum=0.9, weight_decay=0.01)
    expected = []
    for t in range(steps):
        g = logreg_grad(ref, *batch(comm.rank, t))
        collectives.allreduce(g, op="mean", algorithm="mpi", comm=comm)
        opt.param_groups[0]["lr"] = warmup_lr(t)
        ref.grad = g
        opt.step()
        expected.append(ref.clone())
    # the parameter server with S = 0, lr changed every step
    params = start.clone()
    ps = ParameterServer(params, comm, staleness=0, lr=1.0, momentum=0.9, weight_decay=0.01)
    seen = []
    for t in range(steps):
        ps.set_lr(warmup_lr(t))
        ps.push(logreg_grad(params, *batch(comm.rank, t)))
        ps.pull()
        seen.append(params.clone())
    ps.finish()
    same = identical_on_all_ranks(comm, params)
    for t in range(steps):
        torch.testing.assert_close(seen[t], expected[t], rtol=1e-5, atol=1e-6, msg=f"after step {t + 1}")
    torch.testing.assert_close(params, expected[-1], rtol=1e-5, atol=1e-6)
    assert same
    assert ps.stats["server_updates"] == steps and ps.stats["server_max_staleness"] == 0


def logreg_model(make, flat, d=5, c=3):
    """W (d x c) in group 0 and b (c) in group 1 (another lr), views of ``flat``, under optimizer ``make``."""
    w, b = flat[:d * c].view(d, c), flat[d * c:]
    return make([{"params": [w]}, {"params": [b], "lr": 0.02}]), [w, b]


LOGREG_SPANS, LOGREG_GROUPS = [(0, 0, 15), (0, 15, 18)], [0, 1]
USER_OPTIMIZERS = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adam": lambda groups: torch.optim.Adam(groups, lr=0.05, betas=(0.8, 0.99), weight_decay=0.01),
}


@pytest.mark.mpi(min_size=1)
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # opt never steps
@pytest.mark.parametrize("name", list(USER_OPTIMIZERS))
def test_zero_staleness_runs_the_users_optimizer_bitwise_like_data_parallel_training(name):
    """S = 0 with the user's optimizer, two groups and an lr scheduler: every rank's parameters after every
    step equal, bit for bit, torch's optimizer stepping the whole model on the gradients averaged in rank
    order (each rank computes that reference itself from every rank's random batch)."""
    comm, steps = MPI.COMM_WORLD, 10
    start = torch.randn(18, generator=torch.Generator().manual_seed(8))
    make = USER_OPTIMIZERS[name]
    ref = start.clone()
    ref_opt, ref_params = logreg_model(make, ref)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda t: min(1.0, (t + 1) / 4))
    expected = []
    for t in range(steps):
        g = logreg_grad(ref, *batch(0, t))
        for r in range(1, comm.size):
            g += logreg_grad(ref, *batch(r, t))
        g /= comm.size
        ref_params[0].grad, ref_params[1].grad = g[:15].view(5, 3), g[15:]
        ref_opt.step()
        ref_sched.step()
        expected.append(ref.clone())
    params = start.clone()
    opt, _ = logreg_model(make, params)  # the workers' optimizer: the servers step copies of it
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 4))
    ps = ParameterServer(params, comm, 0, opt, LOGREG_SPANS, LOGREG_GROUPS)
    seen = []
    for t in range(steps):
        ps.push(logreg_grad(params, *batch(comm.rank, t)))
        ps.pull()
        sched.step()  # the next push carries the new lrs
        seen.append(params.clone())
    ps.finish()
    same = identical_on_all_ranks(comm, params)
    differ = [t + 1 for t in range(steps) if not torch.equal(seen[t], expected[t])]
    assert not differ, f"rank {comm.rank} differs from the reference after steps {differ}"
    assert torch.equal(params, expected[-1])
    assert same
    assert ps.stats["server_updates"] == steps


def least_squares(comm, seed, d=8):
    """(truth, x, y, zero params): this rank's 64 rows of a least-squares problem all ranks share."""
    truth = torch.randn(d, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, d, generator=g)
    return truth, x, x @ truth + 0.01 * torch.randn(64, generator=g), torch.zeros(d)


def train_least_squares(ps, comm, x, y, params, steps):
    """``steps`` push/pull rounds of 16 rows at an uneven pace, then finish; whether all ranks end identical."""
    for t in range(steps):
        rows = torch.arange(16 * t, 16 * t + 16) % 64
        xb, yb = x[rows], y[rows]
        if comm.rank == 0 and t % 10 == 0:
            time.sleep(0.005)  # an uneven pace, so some gradients really are stale
        ps.push(2 * xb.T @ (xb @ params - yb) / len(rows))
        ps.pull()
    ps.finish()
    return identical_on_all_ranks(comm, params)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("staleness", [2, UNBOUNDED])
def test_adam_trains_with_stale_gradients_and_ends_identical(staleness):
    comm = MPI.COMM_WORLD
    _, x, y, params = least_squares(comm, seed=200 + comm.rank)
    opt = torch.optim.Adam([params], lr=0.05 / comm.size)  # each push moves about a full Adam step

    def loss():
        return comm.allreduce(float(((x @ params - y) ** 2).mean())) / comm.size

    before = loss()
    same = train_least_squares(ParameterServer(params, comm, staleness, opt), comm, x, y, params, steps=100)
    after = loss()
    assert after < 0.01 * before, f"mean squared error {before:.3f} -> {after:.4f} (S = {staleness})"
    assert same


# ---------------------------------------------------------------- the staleness bound, measured in the parameters


def slot_run(comm, staleness, steps, slow_rank=None, slow_seconds=0.0):
    """Worker w's push at clock j adds exactly 1 (S > 0) to slot (w, j) only, so params show every update seen.

    Returns (params after finish, stats, list of violations, largest lag seen),
    where the lag of a pull at clock t is t minus the fewest leading updates
    of any worker that has more to push: the bound promises lag <= S.
    """
    k, w, most = comm.size, comm.rank, max(steps)
    params = torch.zeros(k * most)
    ps = ParameterServer(params, comm, staleness, lr=1.0)
    problems, worst = [], 0
    for t in range(1, steps[w] + 1):
        if w == slow_rank:
            time.sleep(slow_seconds)
        grad = torch.zeros(k * most)
        grad[w * most + t - 1] = -float(k)  # the server divides by K (or averages K of them): +1 at lr 1
        ps.push(grad)
        ps.pull()
        present = params.view(k, most) != 0
        lead = [int(present[u].long().cumprod(0).sum()) for u in range(k)]
        lag = max([t - lead[u] for u in range(k) if lead[u] < steps[u]], default=0)
        worst = max(worst, lag)
        if staleness is not None and lag > staleness:
            problems.append(f"rank {w} at clock {t} computes with {lead} leading updates (lag {lag})")
        if not present[w, :t].all() or present[w, t:].any():
            problems.append(f"rank {w} at clock {t} does not see exactly its own {t} updates")
        if staleness == 0 and present[:, t:].any():
            problems.append(f"rank {w} at clock {t} sees an update from a later clock with S = 0")
    ps.finish()
    return params, ps.stats, problems, worst


def expected_slots(k, steps, staleness):
    """Final slot values: 1 each, except S = 0 averages a clock over the workers that reached it."""
    most = max(steps)
    out = torch.zeros(k, most)
    for u in range(k):
        for j in range(steps[u]):
            out[u, j] = 1.0 if staleness != 0 else k / sum(1 for v in range(k) if steps[v] > j)
    return out.view(-1)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("staleness", [0, 2, UNBOUNDED])
@pytest.mark.parametrize("slow", [False, True], ids=["even", "one-slow"])
def test_staleness_bound_is_never_exceeded(staleness, slow):
    comm = MPI.COMM_WORLD
    steps = [8] * comm.size
    slow_rank = comm.size - 1 if slow else None
    params, stats, problems, worst = slot_run(comm, staleness, steps, slow_rank, slow_seconds=0.03)
    same = identical_on_all_ranks(comm, params)
    pushes = comm.allreduce(stats["server_pushes"])
    worst_anywhere = comm.allreduce(max(worst, stats["server_max_staleness"]), op=MPI.MAX)
    assert not problems, problems[:3]
    if staleness is not None:
        assert stats["server_max_staleness"] <= staleness
    torch.testing.assert_close(params, expected_slots(comm.size, steps, staleness), rtol=0, atol=0)
    assert same
    assert pushes == comm.size * sum(steps)  # every push reached every server
    if slow and staleness is None and comm.size > 1:
        assert worst_anywhere > 2, "the slowed worker should let the others run ahead when S is unbounded"


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("staleness", [0, 2, UNBOUNDED])
def test_uneven_step_counts_and_a_sleeping_worker_finish_cleanly(staleness):
    comm = MPI.COMM_WORLD
    steps = [3 + 2 * r for r in range(comm.size)]  # rank 0 stops first; the last rank runs longest
    params, stats, problems, _ = slot_run(comm, staleness, steps, slow_rank=0, slow_seconds=0.03)
    same = identical_on_all_ranks(comm, params)
    pushes = comm.allreduce(stats["server_pushes"])
    assert not problems, problems[:3]
    torch.testing.assert_close(params, expected_slots(comm.size, steps, staleness), rtol=0, atol=0)
    assert same
    assert pushes == comm.size * sum(steps)
    assert stats["worker_clock"] == steps[comm.rank]


@pytest.mark.mpi(min_size=1)
def test_float64_and_fewer_parameters_than_ranks():
    comm = MPI.COMM_WORLD
    params = torch.tensor([1.0, -2.0], dtype=torch.float64)  # shards of 1 or 0 elements
    ps = ParameterServer(params, comm, staleness=0, lr=0.5)
    for t in range(3):
        ps.push(torch.tensor([comm.rank + t, 1.0], dtype=torch.float64))
        ps.pull()
    ps.finish()
    same = identical_on_all_ranks(comm, params)
    mean_rank = (comm.size - 1) / 2
    expect = torch.tensor([1.0 - 0.5 * (3 * mean_rank + 3), -2.0 - 1.5], dtype=torch.float64)
    torch.testing.assert_close(params, expect)
    assert same


# ---------------------------------------------------------------- convergence with stale gradients


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("staleness", [4, UNBOUNDED])
def test_least_squares_converges_with_stale_gradients(staleness):
    comm = MPI.COMM_WORLD
    truth, x, y, params = least_squares(comm, seed=100 + comm.rank)
    ps = ParameterServer(params, comm, staleness, lr=0.05, momentum=0.5)
    same = train_least_squares(ps, comm, x, y, params, steps=80)
    error = float((params - truth).norm() / truth.norm())
    assert error < 0.05, f"relative error {error:.3f} after 80 steps (S = {staleness})"
    assert same


# ---------------------------------------------------------------- cost: no core burnt while waiting


@pytest.mark.mpi(min_size=2)
def test_idle_server_and_waiting_workers_do_not_spin():
    comm = MPI.COMM_WORLD
    params = torch.zeros(1000)
    ps = ParameterServer(params, comm, staleness=0, lr=0.1)
    cpu, wall = time.process_time(), time.perf_counter()
    if comm.rank == 0:
        time.sleep(0.4)  # everyone else waits in pull for rank 0's push
    ps.push(torch.ones(1000))
    ps.pull()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    ps.finish()
    stats = ps.stats
    assert stats["server_cpu_seconds"] < 0.1 * stats["server_wall_seconds"], stats
    assert wall > 0.3 and cpu < 0.15 * wall, f"rank {comm.rank}: {cpu:.3f}s CPU in {wall:.3f}s (both threads)"
    torch.testing.assert_close(params, torch.full((1000,), -0.1))


# ---------------------------------------------------------------- bad arguments


@pytest.mark.mpi(min_size=1)
def test_bad_arguments_are_refused_on_every_rank():
    comm = MPI.COMM_WORLD
    with pytest.raises(ValueError, match="staleness must be >= 0"):
        ParameterServer(torch.zeros(4), comm, -1, lr=0.1)
    with pytest.raises(TypeError, match="staleness must be an int or None"):
        ParameterServer(torch.zeros(4), comm, True, lr=0.1)
    with pytest.raises(TypeError, match="float32 or float64"):
        ParameterServer(torch.zeros(4, dtype=torch.int64), comm, 0, lr=0.1)
    with pytest.raises(ValueError, match="flat"):
        ParameterServer(torch.zeros(2, 2), comm, 0, lr=0.1)
    with pytest.raises(ValueError, match="momentum must be finite and >= 0"):
        ParameterServer(torch.zeros(4), comm, 0, lr=0.1, momentum=-0.5)
    with pytest.raises(TypeError, match="intracommunicator"):
        ParameterServer(torch.zeros(4), None, 0, lr=0.1)
    last = comm.rank == comm.size - 1  # one rank's mistake stops every rank, none is left waiting
    with pytest.raises(ValueError, match="lr must be finite" if last else f"rank {comm.size - 1} passed bad"):
        ParameterServer(torch.zeros(4), comm, 0, lr=float("nan") if last else 0.1)
    if comm.size > 1:
        with pytest.raises(ValueError, match="parameter count"):
            ParameterServer(torch.zeros(4 + (comm.rank == 1)), comm, 0, lr=0.1)
        with pytest.raises(ValueError, match="staleness"):
            ParameterServer(torch.zeros(4), comm, comm.rank, lr=0.1)
        with pytest.raises(ValueError, match="initial parameters"):
            ParameterServer(torch.full((4,), float(comm.rank)), comm, 0, lr=0.1)
        with pytest.raises(ValueError, match="hyper-parameters except lr"):
            betas = (0.9, 0.9 + comm.rank / 100)
            ParameterServer(torch.zeros(4), comm, 0, torch.optim.Adam([torch.zeros(4)], betas=betas))
        with pytest.raises(ValueError, match="in optimizer \\(Adam on rank 0, AdamW on rank 1\\)"):
            cls = torch.optim.AdamW if comm.rank else torch.optim.Adam
            ParameterServer(torch.zeros(4), comm, 0, cls([torch.zeros(4)]))
        with pytest.raises(ValueError, match="parameter layout"):
            ParameterServer(torch.zeros(4), comm, 0, torch.optim.SGD([torch.zeros(4)]), [(0, 0, 3 + (comm.rank > 0))])
    # the optimizers may differ from rank to rank in lr only (each push carries it)
    sgd = torch.optim.SGD([torch.zeros(4)], lr=0.1 * (1 + comm.rank), weight_decay=0.5)
    ParameterServer(torch.zeros(4), comm, 0, sgd, group_of=[0]).finish()
    ps = ParameterServer(torch.zeros(6), comm, 1, lr=0.1)
    with pytest.raises(ValueError, match="grads has 5 elements"):
        ps.push(torch.zeros(5))
    with pytest.raises(TypeError, match="dtype"):
        ps.push(torch.zeros(6, dtype=torch.float64))
    with pytest.raises(ValueError, match="lr must be finite and >= 0"):
        ps.set_lr(-1.0)
    ps.push(torch.zeros(6))
    ps.pull()
    ps.finish()
    with pytest.raises(RuntimeError, match="already called"):
        ps.pull()
