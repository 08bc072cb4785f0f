"""Failure behaviour of real jobs (subprocess mpiexec, each under a hard timeout of its own).

Runs under whichever MPI the interpreter's environment holds: MPICH in `make test-unit`, Open MPI in
`make test-openmpi`.
"""

import json
import os
import subprocess
import textwrap

import pytest
from failure_cases import CASES, ROOT, check, kill_a_rank_mid_training, mpiexec, rank_pids, run, train_cmd

from mpiml import checkpoint


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_failure_case(case):
    case_id, args, code, pattern, seconds = case
    done, elapsed = run(train_cmd(3, *args), timeout=seconds + 60)
    assert not check(case_id, done, code, pattern), check(case_id, done, code, pattern)
    assert elapsed < seconds
    assert "Traceback" not in done.stderr or case_id == "crash"


def final_sha(metrics):
    with open(metrics) as f:
        return json.loads(f.read().splitlines()[-1])["params_sha256"]


def test_sigkill_a_rank_then_resume_matches_an_uninterrupted_run(tmp_path):
    result = kill_a_rank_mid_training(str(tmp_path))
    assert result["ranks_seen"] == 3
    assert result["returncode"] != 0
    assert result["seconds"] < 30, result["stderr"][-2000:]
    assert result["left_over"] == []
    metrics = str(tmp_path / "resumed.jsonl")
    done, _ = run(train_cmd(3, *result["args"], "--resume", "--metrics", metrics), timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stdout
    whole = str(tmp_path / "whole.jsonl")
    args = [a.replace("ck-kill", "ck-whole") for a in result["args"]]
    done, _ = run(train_cmd(3, *args, "--metrics", whole), timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert final_sha(metrics) == final_sha(whole)


def test_corrupted_newest_checkpoint_falls_back_with_a_warning(tmp_path):
    ck = str(tmp_path / "ck")
    done, _ = run(train_cmd(2, "--epochs", "2", "--checkpoint-dir", ck))
    assert done.returncode == 0
    newest = checkpoint.checkpoints(ck)[0]
    with open(newest, "r+b") as f:
        f.seek(200)
        f.write(b"garbage")
    done, _ = run(train_cmd(2, "--epochs", "3", "--checkpoint-dir", ck, "--resume"))
    assert done.returncode == 0, done.stderr
    assert "is damaged (checksum mismatch" in done.stderr and "falling back" in done.stderr
    assert "resumed from" in done.stdout and "(epoch 2," in done.stdout


def test_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)], check=True)
    try:
        done, _ = run(train_cmd(2, "--epochs", "20", "--checkpoint-dir", str(mount)))
        assert done.returncode == 2
        assert "cannot write checkpoint" in done.stderr and "No space left on device" in done.stderr
        assert done.stderr.count("cannot write checkpoint") == 1
        kept = checkpoint.checkpoints(str(mount))
        assert kept and checkpoint.load(kept[0])["epoch"] >= 1  # the last good one is intact
        assert not [f for f in os.listdir(mount) if ".tmp-" in f]  # no half-written file left behind
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_rank_that_runs_out_of_batches_early_is_caught_by_the_watchdog(tmp_path):
    script = tmp_path / "uneven.py"
    script.write_text(textwrap.dedent("""
        import torch, mpiml
        mpiml.init(threads=1, stall_warning=1, timeout=4)
        model = torch.nn.Linear(4, 2)
        opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
        for step in range(10 if mpiml.rank() != 1 else 6):  # rank 1 has fewer batches
            opt.zero_grad()
            model(torch.randn(8, 4)).sum().backward()
            opt.step()
        print("rank", mpiml.rank(), "done", flush=True)
    """))
    done, elapsed = run(mpiexec(3) + [os.sys.executable, str(script)], timeout=60)
    assert done.returncode != 0
    assert "gradients step 6 bucket 0" in done.stderr and "for rank 1" in done.stderr
    assert elapsed < 30


def test_no_processes_left_behind():
    assert rank_pids("mpiml.train") == []
    assert ROOT
