"""Training across "hosts" (network namespaces, real TCP between them): hier with two ranks on each of two, the
parameter server across three, and a host lost mid-run under ``mpiml.run --min-np``. (That training across the
hosts moves the gradients over the links and ends bitwise as on one machine: tests/test_cluster.py.)

Needs root and iproute2 (CI has both). MPICH only: its Hydra launcher takes a stand-in for ssh
(a stand-in for ssh written by mpiml.cluster); see README, Failures, for Open MPI.
"""

import os
import subprocess
import sys

from failure_cases import final_metrics, lose_a_host_under_min_np, train_cmd
from netns import Hosts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(hosts, ranks, args, spec=None, timeout=180):
    cmd = hosts.mpiexec(spec) + ["-n", str(ranks), sys.executable, "-m", "mpiml.train", "--no-progress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_hier_with_two_ranks_on_each_of_two_hosts(tmp_path):
    with Hosts(2) as hosts:
        spec = ",".join(f"{name}:2" for name in hosts.names)
        done = train(hosts, 4, ["--epochs", "2", "--topology", "hier", "--metrics", str(tmp_path / "h.jsonl")],
                     spec=spec)
    assert done.returncode == 0, done.stderr[-3000:]
    assert final_metrics(tmp_path / "h.jsonl")["ranks_consistent"]


def test_a_lost_host_is_dropped_and_training_finishes_on_the_others(tmp_path):
    """Cut one host's link mid-run under ``mpiml.run --min-np 2``: every rank's watchdog ends the job with a clear
    message, the launcher finds the host that no longer answers, and the job resumes on the other two from its
    newest checkpoint, reaching the accuracy of an uninterrupted run (issue 15)."""
    lost = lose_a_host_under_min_np(str(tmp_path))
    out, names = lost["output"], lost["hosts"]
    assert lost["returncode"] == 0, out[-3000:]
    assert "mpiml watchdog: stall:" in out and "has not completed after" in out and "aborting the job" in out
    assert (f"host(s) {names[2]} did not answer the launcher within {lost['timeout']} s and are dropped; "
            f"continuing on 2 host(s) ({names[0]}, {names[1]}) with 2 process(es) (--min-np 2)") in out
    assert "ended with exit status 0 on 2 host(s)" in out and "resumed from" in out
    assert lost["ended_s"] < 120, f"{lost['ended_s']:.0f} s from the cut to the end"
    whole = subprocess.run(train_cmd(3, "--epochs", "12", "--metrics", str(tmp_path / "whole.jsonl")),
                           capture_output=True, text=True, timeout=180, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert whole.returncode == 0, whole.stderr[-3000:]
    shrunk, uninterrupted = final_metrics(lost["metrics"]), final_metrics(tmp_path / "whole.jsonl")
    assert shrunk["ranks"] == 2 and shrunk["ranks_consistent"]
    assert abs(shrunk["test_accuracy"] - uninterrupted["test_accuracy"]) <= 0.005, (shrunk, uninterrupted)


def test_parameter_server_across_hosts(tmp_path):
    with Hosts(3) as hosts:
        done = train(hosts, 3, ["--epochs", "2", "--topology", "ps", "--staleness", "inf",
                                "--metrics", str(tmp_path / "ps.jsonl")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert final_metrics(tmp_path / "ps.jsonl")["ranks_consistent"]
