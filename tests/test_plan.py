"""The cost model (mpiml.collectives.costmodel) and python -m mpiml.plan, without MPI.

The replay is checked against closed forms where the algorithms have one (alpha-beta models with one
term switched on at a time), folded replays against full ones, extrapolated predictions against full
replays, and the CLI for its output and its refusals.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from mpiml import plan
from mpiml.collectives import auto, costmodel
from mpiml.collectives._schedule import REDUCE, Schedule, Step
from mpiml.collectives.costmodel import Layout, Machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Only the link costs: alpha per message and beta per byte, nothing else.
LINK = Machine(alpha=0.0, beta=1e-9, alpha_local=0.0, beta_local=0.0, gamma=0.0, beta_mem=0.0, overhead=0.0, call=0.0,
               cores=0, eager_bytes=0)


@pytest.mark.parametrize("hosts", [2, 3, 4, 8])
def test_ring_fills_the_link_bound_of_its_bytes(hosts):
    """One rank per host, bandwidth only: the ring takes 2(p-1)/p n beta plus at most a chunk's pipeline fill."""
    n = 64 << 20
    t = costmodel.allreduce_time(n, "ring", Layout(hosts, 1), LINK)
    bound = 2 * (hosts - 1) / hosts * n * LINK.beta
    assert bound * (1 - 1e-6) <= t <= bound * 1.03  # (segments of uneven length: a few bytes less)


@pytest.mark.parametrize("p", [2, 4, 8, 16])
def test_small_butterfly_is_lg_p_latencies(p):
    """Recursive doubling below SMALL_BYTES: lg p exchanges, each alpha (latency only)."""
    m = replace(LINK, beta=0.0, alpha=1e-5)
    t = costmodel.allreduce_time(1024, "butterfly", Layout(p, 1), m)
    assert t == pytest.approx((p.bit_length() - 1) * 1e-5)


def test_reductions_cost_gamma_per_byte_on_the_critical_path():
    """p = 2, ring, only gamma: each rank reduces half of the vector once."""
    m = replace(LINK, beta=0.0, gamma=1e-9)
    n = 8 << 20
    assert costmodel.allreduce_time(n, "ring", Layout(2, 1), m) == pytest.approx(n / 2 * 1e-9, rel=0.02)


def test_a_hosts_ranks_share_its_link():
    """Flat ring on 2 hosts x 2 ranks sends 1.5x the bytes of one rank per host through each link."""
    n = 32 << 20
    one = costmodel.allreduce_time(n, "ring", Layout(2, 1), LINK)
    two = costmodel.allreduce_time(n, "ring", Layout(2, 2), LINK)
    hier = costmodel.allreduce_time(n, "hier", Layout(2, 2), LINK)
    assert two == pytest.approx(1.5 * one, rel=0.05)
    assert hier < 0.75 * two  # hier sends n per link, the flat ring 1.5 n


@pytest.mark.parametrize("algorithm, layout", [("ring", Layout(8, 2)), ("ring", Layout(5, 3)),
                                               ("butterfly", Layout(8, 2)), ("butterfly", Layout(4, 4))])
@pytest.mark.parametrize("nbytes", [4 << 10, 3 << 20])
def test_folded_replay_equals_the_full_one(algorithm, layout, nbytes):
    module = {"ring": costmodel.ring, "butterfly": costmodel.butterfly}[algorithm]
    fold = {"ring": costmodel.rotate, "butterfly": costmodel.xor}[algorithm](layout)
    assert fold is not None and len(fold.ranks) == layout.per_host
    p, n = layout.size, nbytes // 4
    m = plan.DEFAULT_MACHINE
    full = costmodel.replay(layout, m, 4, lambda r: module.allreduce_schedule(n, 4, p, r))
    folded = costmodel.replay(layout, m, 4, lambda r: module.allreduce_schedule(n, 4, p, r), fold)
    # exact when p divides the vector; otherwise segments differ by an element and the symmetry is approximate
    assert folded == pytest.approx(full, rel=1e-9 if n % p == 0 else 1e-3)


@pytest.mark.parametrize("algorithm, layout, budget", [("tree", Layout(16, 2), 6000), ("butterfly", Layout(6, 2), 2000),
                                                       ("hier", Layout(16, 2), 200)])
def test_extrapolated_prediction_matches_the_full_replay(monkeypatch, algorithm, layout, budget):
    n = 48 << 20
    costmodel._predicted.cache_clear()
    full = costmodel.allreduce_time(n, algorithm, layout, plan.DEFAULT_MACHINE)
    costmodel._predicted.cache_clear()
    monkeypatch.setattr(costmodel, "REPLAY_BUDGET", budget)
    with pytest.raises(costmodel._TooBig):  # really extrapolated
        costmodel.PLANNED[algorithm](n // 4, 4, layout, plan.DEFAULT_MACHINE)
    extrapolated = costmodel.allreduce_time(n, algorithm, layout, plan.DEFAULT_MACHINE)
    costmodel._predicted.cache_clear()
    assert extrapolated == pytest.approx(full, rel=0.03)


def test_mismatched_schedules_are_reported_not_hung():
    def schedule(r):
        return Schedule([Step(-1, 0, 0, 1 - r, 0, 8, REDUCE)], 1)  # both only receive
    with pytest.raises(RuntimeError, match="deadlocked"):
        costmodel.replay(Layout(2, 1), plan.DEFAULT_MACHINE, 4, schedule)


def test_shared_cores_slow_down_reductions():
    """Eight ranks on two shared cores reduce four times slower than with a core each."""
    m = replace(LINK, beta=0.0, gamma=1e-9)
    n = 8 << 20
    own = costmodel.allreduce_time(n, "butterfly", Layout(8, 1), m)
    shared = costmodel.allreduce_time(n, "butterfly", Layout(8, 1), replace(m, cores=2))
    assert shared == pytest.approx(4 * own, rel=0.1)


def test_machine_json_round_trip_and_unknown_keys():
    m = replace(plan.DEFAULT_MACHINE, alpha=1e-6)
    assert Machine.from_json(json.loads(json.dumps(m.to_json()))) == m
    with pytest.raises(ValueError, match="bandwidth"):
        Machine.from_json({"bandwidth": 1})


def test_every_planned_strategy_prices_its_step():
    costs = plan.StepCosts(Layout(8, 1), plan.DEFAULT_MACHINE, 16 << 20, 0.02)
    rows = {r["method"]: r["step_s"] for r in plan.step_costs(Layout(8, 1), plan.DEFAULT_MACHINE, 16 << 20, 0.02)}
    for method in ("sync ring", "sync ring overlap", "sync ring fp16", "zero ring", "local-sgd H=4 ring",
                   "butterfly-mixing", "ps"):
        assert rows[method] > costs.compute, method
    assert rows["local-sgd H=16 ring"] < rows["local-sgd H=4 ring"] < rows["sync ring"]
    assert rows["sync ring"] == pytest.approx(0.02 + costs.allreduce(16 << 20, "ring"))


def test_plan_cli_prints_every_algorithm_and_strategy():
    out = subprocess.run([sys.executable, "-m", "mpiml.plan", "--hosts", "16", "--ranks-per-host", "4", "--link",
                          "10gbit", "--latency", "5us", "--model-bytes", "25M", "--compute-ms", "30"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("mpi", "ring", "tree", "butterfly", "hier", "sync ring overlap", "local-sgd H=4 ring", "ps",
                 "butterfly-mixing", "10 Gbit/s", "5 us per message"):
        assert name in out.stdout, name


@pytest.mark.parametrize("args, message", [
    (["--link", "10gbps"], "rate"),
    (["--latency", "fast"], "duration"),
    (["--hosts", "0"], "--hosts"),
    (["--model-bytes", "lots"], "size"),
    (["--algorithms", "ring,star"], "star"),
    (["--compute-ms", "-1"], "--compute-ms"),
])
def test_plan_cli_refuses_bad_input(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        plan.main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_plan_cli_names_a_layout_too_large_to_replay(capsys, monkeypatch):
    monkeypatch.setattr(costmodel, "REPLAY_BUDGET", 1000)
    monkeypatch.setattr(costmodel, "MAX_STEPS", 2000)
    costmodel._predicted.cache_clear()
    assert plan.main(["--hosts", "1", "--ranks-per-host", "64", "--algorithms", "ring", "--model-bytes", "1M"]) == 2
    costmodel._predicted.cache_clear()
    err = capsys.readouterr().err
    assert err.startswith("error: ring on 1 hosts x 64 ranks") and "Traceback" not in err


def _calibration(tmp_path, monkeypatch, content):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(content))
    monkeypatch.setenv("MPIML_CALIBRATION", str(path))
    return path


def test_auto_predicts_a_table_from_a_model_of_the_same_kind(tmp_path, monkeypatch):
    network = replace(plan.DEFAULT_MACHINE, alpha=50e-6, beta=8 / 1e9).to_json()
    _calibration(tmp_path, monkeypatch, {"tables": {"2x1": [[None, "tree"]]}, "models": {"2x1": network}})
    assert auto.decide(2, 1, 2) == ([[None, "tree"]], "table")  # measured beats predicted
    rows, source = auto.decide(4, 2, 8)
    assert source == "model"
    assert rows == costmodel.model_rows(Layout(4, 2), Machine.from_json(network))
    assert rows[-1][1] == "hier"  # several ranks per host, big messages: the bytes over the links decide
    # a one-host layout is not predicted from a network model
    assert auto.decide(1, 8, 8)[1] == "nearest"


def test_auto_without_a_model_falls_back_as_before(tmp_path, monkeypatch):
    _calibration(tmp_path, monkeypatch, {"tables": {}})
    assert auto.decide(4, 2, 8) == (None, "network")
    assert auto.decide(1, 8, 8) == (auto.DEFAULT_TABLE["4"], "nearest")
    _calibration(tmp_path, monkeypatch, {"models": {"2": {"alpha": "x", "nonsense": 1}}})
    assert auto.decide(1, 8, 8)[1] == "nearest"  # an unusable model is ignored
