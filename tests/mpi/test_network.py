"""Across hosts: auto's choice by host layout, and polite waiting (test, then sleep) giving the same results."""

import os

import numpy as np
import pytest
import torch
from conftest import same_on_all_ranks
from mpi4py import MPI

import mpiml
from mpiml import collectives
from mpiml.collectives import auto
from mpiml.collectives._schedule import poll_interval, polling


def fake_hosts(world, hosts):
    """A fresh communicator whose ranks act as ``hosts`` hosts (its layout is computed with the setting)."""
    os.environ["MPIML_FAKE_HOSTS"] = str(hosts)
    try:
        comm = world.Dup()
        collectives.allreduce(np.zeros(1), algorithm="auto", comm=comm)  # auto learns the layout now
    finally:
        del os.environ["MPIML_FAKE_HOSTS"]
    return comm


def auto_against_mpi(comm, rng, n):
    """Random values of every rank allreduced by ``auto``, checked against MPI's own Allreduce; the result."""
    values = rng.standard_normal(n).astype(np.float32)
    x = values.copy()
    collectives.allreduce(x, algorithm="auto", comm=comm)
    want = values.copy()
    comm.Allreduce(MPI.IN_PLACE, want, MPI.SUM)
    assert np.allclose(x, want, rtol=1e-5, atol=1e-6)
    return x


@pytest.mark.mpi(min_size=2)
def test_auto_across_hosts_takes_the_network_rule(world):
    comm = fake_hosts(world, 2)
    private = collectives.private_comm(comm)
    # two equal hosts of several ranks: hier (1/L of the vector per rank crosses); one rank per host, or
    # hosts of unequal sizes (3 ranks): the ring
    expected = "hier" if world.size % 2 == 0 and world.size > 2 else "ring"
    assert auto.choose(64 << 20, private) == expected
    assert auto.choose(4 << 10, private) == "mpi"
    assert auto.choose(4 << 10, private, "bfloat16") != "mpi"  # no MPI type: never the library's user op
    # one host: the calibrated (or built-in) table, never the network rule
    one = collectives.private_comm(world.Dup())
    collectives.allreduce(np.zeros(1), algorithm="auto", comm=one)
    assert auto._choice(one).hosts == 1 and auto._choice(one).rows is not None
    comm.Free()


@pytest.mark.mpi(min_size=2)
def test_auto_across_hosts_predicts_its_table_from_a_calibrated_model(world, rng, tmp_path_factory, monkeypatch):
    """No measured table for the layout, but a model fitted across hosts: auto replays the algorithms for
    this layout and takes the predicted-fastest (the same rows on every rank); results stay exact."""
    from mpiml.collectives import costmodel
    machine = costmodel.Machine(alpha=30e-6, beta=8 / 10e9)  # a 10 Gbit/s network
    path = world.bcast(str(tmp_path_factory.mktemp("model") / "cal.json") if world.rank == 0 else None)
    if world.rank == 0:
        import json
        with open(path, "w") as f:
            json.dump({"tables": {}, "models": {"2x1": machine.to_json()}}, f)
    world.Barrier()
    monkeypatch.setenv("MPIML_CALIBRATION", path)
    comm = fake_hosts(world, 2)
    known = auto._choice(collectives.private_comm(comm))
    if world.size % 2 == 0:
        assert known.source == "model"
        assert known.rows == costmodel.model_rows(costmodel.Layout(2, world.size // 2), machine)
    else:  # hosts of unequal sizes: no layout to replay, the network rule
        assert known.source == "network" and known.rows is None
    assert same_on_all_ranks(comm, repr(known.rows).encode())
    for n in (1000, 700001):
        auto_against_mpi(comm, rng, n)
    comm.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("n", [1001, 300001])
def test_auto_across_hosts_matches_mpi(world, rng, n):
    comm = fake_hosts(world, 2)
    x = auto_against_mpi(comm, rng, n)
    assert same_on_all_ranks(comm, x.tobytes())
    comm.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["ring", "tree", "butterfly", "hier"])
def test_polite_waiting_gives_bitwise_the_same_result(world, rng, algorithm):
    values = rng.standard_normal(200003).astype(np.float32)
    spun, polite = values.copy(), values.copy()
    collectives.allreduce(spun, algorithm=algorithm)
    assert poll_interval() == 0.0 or os.environ.get("MPIML_POLL_US")
    with polling(20e-6):
        assert poll_interval() > 0
        collectives.allreduce(polite, algorithm=algorithm)
    assert spun.tobytes() == polite.tobytes()


@pytest.mark.mpi(min_size=2)
def test_optimizer_across_hosts_waits_politely(world):
    os.environ["MPIML_FAKE_HOSTS"] = "2"
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(50, 3)
        opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, topology="ring")
    finally:
        del os.environ["MPIML_FAKE_HOSTS"]
    from mpiml.strategies.synchronous import spare_core as _spare_core
    assert opt.hosts == 2 and opt.strategy.poll > 0
    local = collectives.hier.topology(collectives.private_comm(opt.strategy.comm)).local_size
    assert opt.strategy.engine.overlap == _spare_core(local)  # overlap by default only with a core to spare
    g = torch.Generator().manual_seed(world.rank)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 50, generator=g)).sum().backward()
        opt.step()
    assert same_on_all_ranks(world, opt.parameter_buffers[0].numpy().tobytes())
    opt.strategy.engine.close()


@pytest.mark.mpi(min_size=2)
def test_poll_interval_is_the_users_choice_and_checked(world):
    model = torch.nn.Linear(5, 2)
    opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, poll_interval=0.0)
    assert opt.strategy.poll == 0.0 and opt.hosts == 1
    with pytest.raises(mpiml.UserError, match="poll_interval"):
        mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, poll_interval=-1)
