"""DistributedOptimizer and the broadcast helpers, as a user's own script would use them."""

import os

import numpy as np
import pytest
import torch
from mpi4py import MPI

import mpiml
import mpiml.guards
import mpiml.mixing


def model_and_data(seed):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    g = torch.Generator().manual_seed(seed)
    return model, torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("topology", mpiml.EXACT_TOPOLOGIES)
def test_gradients_are_averaged_exactly_like_one_big_batch(topology):
    comm = MPI.COMM_WORLD
    model, x, y = model_and_data(seed=100 + comm.rank)
    opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, topology=topology)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.synchronize()
    # reference: every rank's batch, concatenated, through one model (mean loss = mean of per-rank means)
    ref, _, _ = model_and_data(0)
    batches = [model_and_data(100 + r)[1:] for r in range(comm.size)]
    loss = sum(torch.nn.functional.cross_entropy(ref(bx), by) for bx, by in batches) / comm.size
    loss.backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    with opt.skip_synchronize():
        opt.step()


@pytest.mark.mpi(min_size=1)
def test_backward_passes_accumulate_and_unused_parameters_count_as_zero():
    comm = MPI.COMM_WORLD
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(3, 1, bias=False), "b": torch.nn.Linear(3, 1, bias=False)})
    opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model, topology="ring",
                                     backward_passes_per_step=2)
    x = torch.ones(1, 3) * (comm.rank + 1)
    used = "a" if comm.rank % 2 == 0 else "b"  # each rank leaves one layer without a gradient
    for _ in range(2):
        model[used](x).sum().backward()
    opt.synchronize()
    for name in ("a", "b"):
        users = [r for r in range(comm.size) if ("a" if r % 2 == 0 else "b") == name]
        expect = sum(2 * (r + 1) for r in users) / comm.size
        assert torch.allclose(model[name].weight.grad, torch.full((1, 3), float(expect)))


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_as_torch_and_scheduler_works(set_to_none):
    """zero_grad() sets .grad to None (backward then hands over fresh tensors), zero_grad(False) zeroes it in
    place; either way, after step() .grad is the combined gradient, in the flat buffer when there is one
    (K > 1; one rank needs none)."""
    comm = MPI.COMM_WORLD
    model, x, y = model_and_data(1)
    opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    buffers = [b.data_ptr() for b in opt.gradient_buffers]
    assert len(buffers) == (1 if comm.size > 1 else 0)
    for step in range(2):
        opt.zero_grad(set_to_none=set_to_none)
        if set_to_none or step:  # (before the first backward, one rank has no gradient to zero, as torch)
            assert all((p.grad is None) == set_to_none for p in model.parameters())
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    if comm.size > 1:
        assert [b.data_ptr() for b in opt.gradient_buffers] == buffers
        end = buffers[0] + opt.gradient_buffers[0].numel() * 4
        assert all(buffers[0] <= p.grad.data_ptr() < end for p in model.parameters())
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.125)
    digests = MPI.COMM_WORLD.allgather(mpiml.parameters_sha256(model.parameters()))
    assert len(set(digests)) == 1


@pytest.mark.mpi(min_size=1)
def test_broadcast_parameters_and_optimizer_state():
    comm = MPI.COMM_WORLD
    torch.manual_seed(comm.rank)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01 * (comm.rank + 1))
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    mpiml.broadcast_parameters(model, root=0)
    mpiml.broadcast_optimizer_state(opt, root=0)
    states = comm.allgather((mpiml.parameters_sha256(model.parameters()), opt.param_groups[0]["lr"],
                             [s["exp_avg"].sum().item() for s in opt.state.values()]))
    assert all(s == states[0] for s in states)


@pytest.mark.mpi(min_size=2)
def test_models_that_differ_are_refused_everywhere():
    comm = MPI.COMM_WORLD
    model = torch.nn.Linear(4, 2 + (comm.rank == 1))
    with pytest.raises(mpiml.UserError, match="differ in parameter shapes"):
        mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)


@pytest.mark.mpi(min_size=1)
def test_butterfly_mixing_steps_locally_then_averages_with_a_partner():
    comm = MPI.COMM_WORLD
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(float(comm.rank))
    opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model,
                                     topology="butterfly-mixing")
    model(torch.ones(1, 2)).sum().backward()
    opt.step()  # lr 0: only the mixing changes the weights
    partner = mpiml.mixing.partner_for_step(comm.rank, comm.size, 0)
    expect = comm.rank if partner is None else (comm.rank + partner) / 2
    assert np.allclose(model.weight.detach().numpy(), expect)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("topology", ["ring", "hier", "auto", "tree"])
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("bucket_bytes", [64, 1 << 22])
def test_buckets_and_overlap_give_the_same_average(topology, overlap, bucket_bytes):
    comm = MPI.COMM_WORLD
    model, x, y = model_and_data(seed=100 + comm.rank)
    opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, topology=topology,
                                     overlap=overlap, bucket_bytes=bucket_bytes)
    if bucket_bytes == 64 and comm.size > 1:
        assert len(opt.buckets) >= 4  # small buckets: one or more per parameter
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.synchronize()
    ref, _, _ = model_and_data(0)
    loss = sum(torch.nn.functional.cross_entropy(ref(bx), by) for bx, by in
               [model_and_data(100 + r)[1:] for r in range(comm.size)]) / comm.size
    loss.backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    digests = comm.allgather(mpiml.parameters_sha256(p.grad for p in model.parameters()))
    assert len(set(digests)) == 1


@pytest.mark.mpi(min_size=2)
def test_overlap_starts_buckets_during_backward():
    """With small buckets the last layer's bucket is reduced before backward reaches the first layer."""
    comm = MPI.COMM_WORLD
    model, x, y = model_and_data(seed=comm.rank)
    opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, bucket_bytes=64,
                                     overlap=True)
    first_layer = model[0].weight
    seen = []
    first_layer.register_post_accumulate_grad_hook(lambda p: seen.append([b.launched for b in opt.buckets]))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert seen and seen[0][0]  # bucket 0 (the last layer's gradients) was already launched
    assert all(not b.launched for b in opt.buckets)  # re-armed for the next step


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("compression", ["fp16", "bf16"])
def test_compression_is_close_to_exact(compression):
    comm = MPI.COMM_WORLD
    model, x, y = model_and_data(seed=100 + comm.rank)
    exact, _, _ = model_and_data(0)
    opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, compression=compression)
    ref = mpiml.DistributedOptimizer(torch.optim.SGD(exact.parameters(), lr=0.1), exact)
    for m, o in ((model, opt), (exact, ref)):
        torch.nn.functional.cross_entropy(m(x), y).backward()
        o.synchronize()
    tolerance = 1e-2 if compression == "bf16" else 2e-3
    for p, q in zip(model.parameters(), exact.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=tolerance, atol=tolerance * q.grad.abs().max().item())
    digests = comm.allgather(mpiml.parameters_sha256(p.grad for p in model.parameters()))
    assert len(set(digests)) == 1


@pytest.mark.mpi(min_size=2)
def test_many_overlapped_steps_keep_replicas_identical():
    """Hundreds of steps with many small buckets: a race between the communication thread and the next
    step (a bucket seen as done before it was reduced) would leave the replicas different."""
    comm = MPI.COMM_WORLD
    model, x, y = model_and_data(seed=comm.rank)
    opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), model,
                                     bucket_bytes=64, overlap=True)
    # More ranks than cores shuffle the threads' timing by themselves (and each step costs 10x): fewer steps.
    steps = 400 if comm.size <= (os.cpu_count() or 1) else 100
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    digests = comm.allgather(mpiml.parameters_sha256(model.parameters()))
    assert len(set(digests)) == 1


def poisoned_step(opt, model, x, y, poison):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    if poison:
        loss = loss * float("nan")
    loss.backward()
    opt.step()


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("topology", ["ring", "butterfly-mixing"])
def test_nan_gradient_aborts_naming_rank_and_step(topology):
    comm = MPI.COMM_WORLD
    model, x, y = model_and_data(seed=comm.rank)
    opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, topology=topology)
    before = [p.detach().clone() for p in model.parameters()]
    poisoned_step(opt, model, x, y, poison=False)
    after_first = [p.detach().clone() for p in model.parameters()]
    bad = comm.size - 1
    with pytest.raises(mpiml.guards.NonFiniteGradient, match=f"at step 1 on rank {bad}; aborting"):
        poisoned_step(opt, model, x, y, poison=comm.rank == bad)
    for p, q in zip(model.parameters(), after_first):  # nothing non-finite reached any rank's parameters
        assert torch.equal(p.detach(), q)
    assert any(not torch.equal(p, q) for p, q in zip(before, after_first))


@pytest.mark.mpi(min_size=1)
def test_nan_gradient_skip_continues():
    comm = MPI.COMM_WORLD
    model, x, y = model_and_data(seed=comm.rank)
    opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, on_nan="skip")
    poisoned_step(opt, model, x, y, poison=comm.rank == 0)
    assert opt.skipped_steps == [(0, [0])]
    poisoned_step(opt, model, x, y, poison=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(set(comm.allgather(mpiml.parameters_sha256(model.parameters())))) == 1


@pytest.mark.mpi(min_size=2)
@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("set_to_none", [True, False])
def test_finite_gradients_whose_average_overflows_are_caught_too(set_to_none):
    """The combined gradients are checked (identical on every rank): finite ones whose sum overflows float32
    are not applied either, and the message says no rank's own gradient was to blame."""
    model = torch.nn.Linear(3, 1, bias=False)
    opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1e-40), model, on_nan="skip")
    before = model.weight.detach().clone()
    opt.zero_grad(set_to_none=set_to_none)
    (model(torch.ones(1, 3)) * 3e38).sum().backward()  # finite on every rank: 3e38 each, the sum is not
    assert torch.isfinite(model.weight.grad).all()
    opt.step()
    assert opt.skipped_steps == [(0, [])]
    assert torch.equal(model.weight.detach(), before)
    assert "sum overflowed" in mpiml.guards.non_finite_message([], 0, "step skipped")
    opt.param_groups[0]["lr"] = 0.1
    opt.zero_grad(set_to_none=set_to_none)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()  # an ordinary step goes through
    assert opt.skipped_steps == [(0, [])] and not torch.equal(model.weight.detach(), before)


@pytest.mark.mpi(min_size=2)
def test_consistency_check_names_the_diverged_rank():
    comm = MPI.COMM_WORLD
    model, x, y = model_and_data(seed=comm.rank)
    opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                     check_consistency_every=2)
    poisoned_step(opt, model, x, y, poison=False)
    if comm.rank == 1:
        with torch.no_grad():
            model[0].bias[0] += 1e-3  # a silent corruption on one rank
    with pytest.raises(mpiml.guards.ReplicasDiverged, match=r"replicas diverged by step 1: .*rank 1 holds"):
        poisoned_step(opt, model, x, y, poison=False)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_local_sgd_with_h_1_is_synchronous_sgd_up_to_rounding(momentum):
    comm = MPI.COMM_WORLD
    models = []
    for average_every in (0, 1):
        model, x, y = model_and_data(seed=comm.rank)
        opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum,
                                                         weight_decay=1e-3), model, average_every=average_every)
        for _ in range(5):
            poisoned_step(opt, model, x, y, poison=False)
        models.append(model)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.mpi(min_size=2)
def test_local_sgd_replicas_differ_between_averagings_and_agree_after():
    comm = MPI.COMM_WORLD
    model, x, y = model_and_data(seed=comm.rank)
    opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, average_every=3)
    digests = []
    for _ in range(3):
        poisoned_step(opt, model, x, y, poison=False)
        digests.append(len(set(comm.allgather(mpiml.parameters_sha256(model.parameters())))))
    assert digests == [comm.size, comm.size, 1]  # local steps drift apart; the third step averages


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("overlap", [False, True])
def test_large_gradients_reduced_where_they_lie_train_like_the_flat_buffer(monkeypatch, overlap):
    """With overlap, parameters of at least ALONE_BYTES are combined where backward left their (fresh)
    gradient; without, everything goes through one bucket. The replicas stay identical and the run matches
    one where every gradient is copied into the flat buffer."""
    import mpiml.strategies.synchronous as sync
    alone = sync.ALONE_BYTES
    assert alone is not None
    comm = MPI.COMM_WORLD
    g = torch.Generator().manual_seed(100 + comm.rank)
    batches = [(torch.randn(4, 600, generator=g), torch.randint(0, 7, (4,), generator=g)) for _ in range(4)]

    def run(alone_bytes, zero_grad_to_none):
        monkeypatch.setattr(sync, "ALONE_BYTES", alone_bytes)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(600, 500), torch.nn.ReLU(), torch.nn.Linear(500, 7))
        opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model,
                                         overlap=overlap)
        for x, y in batches:
            opt.zero_grad(set_to_none=zero_grad_to_none)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        if comm.size > 1 and not overlap:
            assert not opt.strategy.engine.in_place and len(opt.buckets) == 1
        if comm.size > 1 and alone_bytes is not None and overlap:
            assert opt.strategy.engine.in_place == {0}  # the 600x500 weight (1.2 MB)
            buffer = opt.gradient_buffers[0]
            inside = buffer.data_ptr() <= model[0].weight.grad.data_ptr() < buffer.data_ptr() + buffer.nbytes
            assert inside != zero_grad_to_none  # a fresh gradient stayed where backward left it
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        opt.close()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), grads

    flat, flat_grads = run(None, True)
    for to_none in (True, False):
        lying, lying_grads = run(alone, to_none)
        # p = 2 sums each element once either way; more ranks may pair chunks differently (last bits)
        exact = comm.size <= 2
        torch.testing.assert_close(lying, flat, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-7)
        torch.testing.assert_close(lying_grads, flat_grads, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-7)
        digests = comm.allgather(mpiml.parameters_sha256([lying]))
        assert len(set(digests)) == 1
