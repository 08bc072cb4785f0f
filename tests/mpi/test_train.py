"""End-to-end training under mpiexec: accuracy, identical replicas, determinism, resume, bad input."""

import json
import os

import pytest
from mpi4py import MPI

from mpiml import checkpoint
from mpiml.runtime import UserError
from mpiml.train import Config, run

EXACT = ["mpi", "ring", "tree", "butterfly"]
OPEN_MPI = "Open MPI" in MPI.Get_library_version()


def train(tmp, name, **overrides):
    """Run ``python -m mpiml.train`` in-process; returns the final metrics record."""
    metrics = os.path.join(str(tmp), f"{name}.jsonl")
    cfg = Config(metrics=metrics, progress=False, **overrides)
    assert run(cfg) == 0
    MPI.COMM_WORLD.Barrier()
    with open(metrics) as f:
        lines = [json.loads(line) for line in f]
    assert [r["epoch"] for r in lines[:-1]] == list(range(1, cfg.epochs + 1))
    for r in lines[:-1]:
        assert {"train_loss", "test_accuracy", "samples_per_sec", "compute_seconds", "comm_seconds"} <= set(r)
    assert lines[-1]["final"] is True
    return lines[-1]


_LONG_RUNS = {}  # topology -> final record of a 20-epoch run; the same on every rank


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """``long_run(topology)``: the final record of a 20-epoch run, trained once per module (the accuracy tests
    below share the ring run instead of training it twice)."""
    comm = MPI.COMM_WORLD
    tmp = comm.bcast(str(tmp_path_factory.mktemp("long")) if comm.rank == 0 else None)

    def get(topology):
        if topology not in _LONG_RUNS:
            _LONG_RUNS[topology] = train(tmp, topology, topology=topology, epochs=20)
        return _LONG_RUNS[topology]
    return get


@pytest.mark.slow
@pytest.mark.mpi(min_size=1)
# The exact topologies' results are checked against the library's Allreduce under either MPI (test_allreduce,
# test_optimizer); how well the trainer learns does not depend on which MPI carried the bytes.
@pytest.mark.skipif(OPEN_MPI, reason="accuracy is not specific to the MPI implementation: tested under MPICH")
def test_exact_topologies_reach_95_percent_and_agree(long_run):
    finals = {t: long_run(t) for t in EXACT}
    accuracies = [f["test_accuracy"] for f in finals.values()]
    assert min(accuracies) >= 0.95, finals
    assert max(accuracies) - min(accuracies) <= 0.01, accuracies
    assert all(f["ranks_consistent"] for f in finals.values()), finals


@pytest.mark.slow
@pytest.mark.mpi(min_size=1)
# Mixing is mpiml's own point-to-point exchange; its accuracy does not depend on the MPI library, whose
# point-to-point messages under Open MPI are exercised by the shorter butterfly-mixing runs below.
@pytest.mark.skipif(OPEN_MPI, reason="accuracy is not specific to the MPI implementation: tested under MPICH")
def test_butterfly_mixing_close_to_ring(long_run):
    ring = long_run("ring")
    mixed = long_run("butterfly-mixing")
    assert abs(mixed["test_accuracy"] - ring["test_accuracy"]) <= 0.02
    assert mixed["ranks_consistent"]  # the final model is the replicas' average, the same everywhere


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("topology", ["ring", "butterfly-mixing"])
def test_same_seed_same_parameters(mpi_tmp_path, topology):
    a = train(mpi_tmp_path, "a", topology=topology, epochs=2, seed=3)
    b = train(mpi_tmp_path, "b", topology=topology, epochs=2, seed=3)
    c = train(mpi_tmp_path, "c", topology=topology, epochs=2, seed=4)
    assert a["params_sha256"] == b["params_sha256"] != c["params_sha256"]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("topology, shuffle, h", [("ring", "local", 0), ("butterfly", "global", 0),
                                                  ("butterfly-mixing", "local", 0), ("tree", "local", 4)])
def test_resume_after_a_checkpoint_matches_an_uninterrupted_run(mpi_tmp_path, topology, shuffle, h):
    ck = os.path.join(str(mpi_tmp_path), f"ck-{topology}-{h}")
    settings = dict(topology=topology, shuffle=shuffle, epochs=3, checkpoint_dir=ck, checkpoint_every=5,
                    average_every=h)
    whole = train(mpi_tmp_path, "whole", **settings)
    comm = MPI.COMM_WORLD
    if comm.rank == 0:  # "stop" right after an early mid-epoch checkpoint: drop everything written later
        kept = checkpoint.checkpoints(ck)[-1]
        assert kept.endswith("checkpoint-000000005.pt")
        for path in checkpoint.checkpoints(ck)[:-1]:
            os.unlink(path)
    comm.Barrier()
    resumed = train(mpi_tmp_path, "resumed", resume=True, **settings)
    assert resumed["params_sha256"] == whole["params_sha256"]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("overrides, message", [
    (dict(data="/nonexistent/data.npz"), "no such file"),
    (dict(batch_size=0), "--batch-size must be at least 1"),
    (dict(model="cnn", dataset="synthetic", features=5), "image-shaped"),
    (dict(resume=True), "--resume needs --checkpoint-dir"),
    (dict(straggler="1:0.5"), "--straggler must be RANK:FACTOR"),
    (dict(average_every=2, topology="butterfly-mixing"),
     r"average_every \(--average-every.*\) does not apply to the butterfly-mixing strategy"),
    (dict(topology="ps", staleness="-1"), "--staleness must be"),
    (dict(topology="ps", compression="fp16"), r"compression \(--compression.*\) does not apply to the ps strategy"),
    (dict(topology="ps", checkpoint_dir="ck"), "checkpoints are not supported"),
    (dict(zero=True, average_every=2), "--zero and --average-every choose different strategies"),
])
def test_bad_input_is_reported_on_every_rank(mpi_tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        run(Config(progress=False, epochs=1, **overrides))


@pytest.mark.mpi(min_size=2)
def test_more_ranks_than_training_rows():
    with pytest.raises(UserError, match="ranks but only"):
        run(Config(progress=False, epochs=1, dataset="synthetic", samples=MPI.COMM_WORLD.size - 1))


@pytest.mark.mpi(min_size=1)
def test_checkpoint_from_another_model_is_refused(mpi_tmp_path):
    ck = os.path.join(str(mpi_tmp_path), "ck-other")
    train(mpi_tmp_path, "mlp", epochs=1, checkpoint_dir=ck)
    with pytest.raises(UserError, match="different model"):
        run(Config(progress=False, epochs=2, checkpoint_dir=ck, resume=True, model="logreg"))


@pytest.mark.mpi(min_size=1)
def test_parameter_server_synchronous_matches_ring(mpi_tmp_path):
    ring = train(mpi_tmp_path, "ring", topology="ring", epochs=3, momentum=0.0)
    ps = train(mpi_tmp_path, "ps0", topology="ps", staleness="0", epochs=3, momentum=0.0)
    assert abs(ps["test_accuracy"] - ring["test_accuracy"]) <= 0.01
    assert ps["ranks_consistent"]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("staleness", ["2", "inf"])
def test_parameter_server_stale_trains_and_ends_identical(mpi_tmp_path, staleness):
    final = train(mpi_tmp_path, f"ps{staleness}", topology="ps", staleness=staleness, epochs=4,
                  straggler="0:2" if MPI.COMM_WORLD.size > 1 else None)
    # Updates land in whatever order the (oversubscribed) workers reach the servers, so the final model varies
    # from run to run: unbounded staleness gave 81.8% once at 8 ranks; staleness 2 at 4 ranks gave 88.2-90.6%
    # in six quiet runs and 84.7% once under make test's load. Far above chance (10%) either way.
    assert final["test_accuracy"] > (0.7 if staleness == "inf" else 0.8) and final["ranks_consistent"]
