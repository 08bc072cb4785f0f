"""The command line as users run it: one process without mpiexec, and mpiexec jobs fed bad input.

Every job runs under a hard timeout of its own, so a hang fails the test instead of blocking CI.
"""

import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from mpiml.train import Config, main, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
MPIEXEC = os.path.join(BIN, "mpiexec")


def launch(args, ranks=None, timeout=120):
    cmd = ([MPIEXEC, "-n", str(ranks)] if ranks else []) + [sys.executable] + args
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_single_process_without_mpiexec(tmp_path):
    metrics = tmp_path / "m.jsonl"
    out = launch(["-m", "mpiml.train", "--epochs", "2", "--metrics", str(metrics)])
    assert out.returncode == 0, out.stderr
    assert "final: test accuracy" in out.stdout
    final = json.loads(metrics.read_text().splitlines()[-1])
    assert final["final"] and final["ranks"] == 1 and final["ranks_consistent"]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 5)).astype(np.float32)
    np.savez(tmp / "labels_9.npz", X=x, y=rng.integers(0, 9, 100))
    np.savez(tmp / "rows.npz", X=x, y=rng.integers(0, 3, 99))
    np.savez_compressed(tmp / "zipped.npz", X=x, y=rng.integers(0, 3, 100))
    (tmp / "text.npz").write_text("not numpy")
    bad = x.copy()
    bad[77, 3] = np.nan  # in the last rank's block: only that rank finds it
    np.savez(tmp / "nan.npz", X=bad, y=rng.integers(0, 3, 100))
    with zipfile.ZipFile(tmp / "short.npz", "w") as z:  # X.npy's header promises more rows than it holds
        z.writestr("X.npy", _npy(x, (1000, 5)))
        z.writestr("y.npy", _npy(np.zeros(1000, np.int64)))
    return tmp


def _npy(array, shape=None):
    buf = io.BytesIO()
    header = np.lib.format.header_data_from_array_1_0(array)
    header["shape"] = shape or array.shape
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + array.tobytes()


# Refused while the command line is read, the same way on every rank before any rank reads data: checked in this
# process. How a job of several ranks ends with one such message is what the cases below check at 2 ranks.
@pytest.mark.parametrize("args, message", [
    (["--topology", "rign"], "invalid choice: 'rign'"),
    (["--model", "resnet"], "invalid choice: 'resnet'"),
    (["--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--resume"], "--resume needs --checkpoint-dir"),
    (["--seed", "-1"], "--seed must be an integer from 0 to"),
])
def test_bad_arguments_are_refused_with_one_message(capsys, args, message):
    try:
        code = main(["--epochs", "1", "--no-progress", *args])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.count(message) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("args, message", [
    (["--topology", "rign"], "invalid choice: 'rign'"),
    (["--data", "{tmp}/missing.npz"], "no such file or directory"),
    (["--data", "{tmp}/text.npz"], "not a valid .npz"),
    (["--data", "{tmp}/rows.npz"], "X has 100 rows but y has 99"),
    (["--data", "{tmp}/zipped.npz"], "compressed and cannot be memory-mapped"),
    (["--data", "{tmp}/labels_9.npz", "--classes", "4"], "out of range for --classes 4"),
    (["--dataset", "synthetic", "--samples", "1"], "2 ranks but only"),
    (["--seed", "-1"], "--seed must be an integer from 0 to"),
    (["--fault", "hang:2:5"], "--fault: there is no rank 2 in a job of 2 ranks"),
    (["--data", "{tmp}/nan.npz"], "nan.npz: X row 77 holds NaN or Inf"),
    (["--data", "{tmp}/short.npz"], "short.npz: member X.npy is damaged"),
    (["--timeline", "{tmp}"], "is a directory; give a file name"),
])
def test_bad_input_ends_every_rank_with_one_message(data_files, args, message):
    args = [a.replace("{tmp}", str(data_files)) for a in args]
    out = launch(["-m", "mpiml.train", "--epochs", "1"] + args, ranks=2, timeout=60)
    assert out.returncode == 2
    assert out.stderr.count(message) == 1, out.stderr  # once (rank 0), not once per rank
    assert "Traceback" not in out.stderr


def test_checkpoint_from_another_model(tmp_path):
    ck = str(tmp_path / "ck")
    # Written in this process (one rank; the model check comes before any check of the number of ranks): what
    # is tested is how the mpiexec job below refuses it.
    assert run(Config(progress=False, epochs=1, checkpoint_dir=ck)) == 0
    out = launch(["-m", "mpiml.train", "--epochs", "2", "--checkpoint-dir", ck, "--resume", "--model", "logreg"],
                 ranks=2, timeout=60)
    assert out.returncode == 2 and out.stderr.count("written for a different model") == 1


def test_user_script_example():
    out = launch(["scripts/examples/plain_torch_with_mpiml.py"], ranks=2)
    assert out.returncode == 0, out.stderr
    accuracy = float(out.stdout.split("test accuracy ")[1].split()[0])
    assert accuracy > 0.9


def test_timeline_has_every_ranks_phases(tmp_path):
    path = tmp_path / "trace.json"
    out = launch(["-m", "mpiml.train", "--epochs", "1", "--timeline", str(path)], ranks=2)
    assert out.returncode == 0, out.stderr
    events = json.loads(path.read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {(e.get("pid"), e.get("name")) for e in events}
    for rank_pid in {e["pid"] for e in events if e.get("name") == "forward"}:
        for phase in ("forward", "backward", "wait for gradients", "allreduce bucket 0"):
            assert (rank_pid, phase) in names
    assert len({e["pid"] for e in events if e.get("name") == "forward"}) == 2
