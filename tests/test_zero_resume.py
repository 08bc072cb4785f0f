"""Sharded optimizer state through checkpoints: resumed at another number of ranks, resharded, training goes on."""

import json
import os
import subprocess
import sys

import pytest

from mpiml import checkpoint
from mpiml.runtime import UserError
from mpiml.train import Config, run

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
FLAGS = ["--topology", "ring", "--zero", "--optimizer", "adam", "--lr", "0.002", "--no-progress"]


def train(ranks, tmp_path, *extra):
    metrics = tmp_path / f"m{ranks}-{len(list(tmp_path.iterdir()))}.jsonl"
    done = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, "-m", "mpiml.train", *FLAGS,
                           "--metrics", str(metrics), *extra], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads(line) for line in metrics.read_text().splitlines()], done.stdout


def test_zero_checkpoint_holds_every_shard_and_resumes_at_another_k(tmp_path):
    ck = tmp_path / "ck"
    first, _ = train(2, tmp_path, "--epochs", "2", "--checkpoint-dir", str(ck))
    payload = checkpoint.load(checkpoint.checkpoints(str(ck))[0])
    checkpoint.check_trainer_payload(payload)
    assert payload["state_layout"] == "sharded" and len(payload["optimizer_shards"]) == 2
    covered = sum(stop - start for s in payload["optimizer_shards"] for _, start, stop in s["shard"]["pieces"])
    assert covered == sum(t.numel() for t in payload["params"])  # every element's state, once
    metrics = tmp_path / "resumed.jsonl"  # at one rank, in this process: the two shards become one
    assert run(Config(topology="ring", zero=True, optimizer="adam", lr=0.002, progress=False, epochs=4,
                      checkpoint_dir=str(ck), resume=True, metrics=str(metrics))) == 0
    resumed = [json.loads(line) for line in metrics.read_text().splitlines()]
    epochs = [r["epoch"] for r in resumed if "epoch" in r]
    assert epochs == [3, 4]
    final = resumed[-1]
    assert final["ranks_consistent"] and final["ranks"] == 1
    assert final["test_accuracy"] >= first[-1]["test_accuracy"] - 0.02  # it went on from there, not from scratch
    assert resumed[0]["train_loss"] < first[0]["train_loss"]


def test_resume_across_the_zero_switch_is_refused(tmp_path):
    ck = tmp_path / "ck"
    assert run(Config(topology="ring", zero=True, optimizer="adam", progress=False, epochs=1,
                      checkpoint_dir=str(ck))) == 0
    with pytest.raises(UserError, match="its optimizer state is sharded, this run keeps it replicated"):
        run(Config(topology="ring", optimizer="adam", progress=False, epochs=2, checkpoint_dir=str(ck), resume=True))
    assert len(checkpoint.checkpoints(str(ck))) == 1  # nothing was written by the refused run
