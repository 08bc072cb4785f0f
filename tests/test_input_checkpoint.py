"""Checkpoint directories and checkpoints that cannot be used: found at start, named, never overwritten."""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mpiml import checkpoint
from mpiml.checkpoint import CheckpointError
from mpiml.runtime import UserError
from mpiml.train import Config, run

FIRST = "checkpoint-000000046.pt"  # digits, one rank, batch 32: 46 steps per epoch


# ---------------------------------------------------------------- the directory


def test_a_file_as_checkpoint_dir(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(CheckpointError, match=r"--checkpoint-dir .*/f is a file, not a directory$"):
        checkpoint.check_directory(str(tmp_path / "f"))
    with pytest.raises(CheckpointError, match=r"--checkpoint-dir .*/f/sub/ck is under .*/f, which is a file, not a "):
        checkpoint.check_directory(str(tmp_path / "f" / "sub" / "ck"))


def test_a_read_only_checkpoint_dir(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(checkpoint, "open", read_only, raising=False)
    with pytest.raises(CheckpointError, match=r"--checkpoint-dir .*: cannot write there \(Read-only file system\)"):
        checkpoint.check_directory(str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_a_directory_without_write_permission(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    with pytest.raises(CheckpointError, match="cannot write there"):
        checkpoint.check_directory(str(tmp_path / "ro"))


def test_check_directory_creates_it_and_leaves_nothing(tmp_path):
    checkpoint.check_directory(str(tmp_path / "a" / "b"))
    assert os.listdir(tmp_path / "a" / "b") == []


@pytest.mark.parametrize("where, message", [("file", "is a file, not a directory"),
                                            ("under", "which is a file, not a directory")])
def test_training_refuses_a_bad_checkpoint_dir_before_the_first_epoch(tmp_path, capsys, where, message):
    (tmp_path / "f").write_text("")
    ck = tmp_path / "f" if where == "file" else tmp_path / "f" / "ck"
    with pytest.raises(UserError, match=message):
        run(Config(progress=False, epochs=1, checkpoint_dir=str(ck)))
    assert "epoch" not in capsys.readouterr().out


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    names = [f".checkpoint-000000005.pt.tmp-{dead}", f".checkpoint-000000006.pt.tmp-{os.getpid()}",
             f".checkpoint-000000007.pt.tmp-{alive}", "checkpoint-000000004.pt", "notes.txt"]
    for name in names:
        (tmp_path / name).write_text("x")
    removed = checkpoint.remove_stale_temporaries(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == sorted(names[:2])
    assert sorted(os.listdir(tmp_path)) == sorted(names[2:])


def test_training_removes_stale_temporaries_at_start(tmp_path, capfd):
    ck = tmp_path / "ck"
    ck.mkdir()
    stale = ck / f".checkpoint-000000046.pt.tmp-{dead_pid()}"
    stale.write_bytes(b"half a checkpoint")
    assert run(Config(progress=False, epochs=1, checkpoint_dir=str(ck))) == 0
    assert sorted(os.listdir(ck)) == [FIRST]
    assert f"note: removed {stale}" in capfd.readouterr().err


# ---------------------------------------------------------------- damaged and malformed checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch run's checkpoint directory and final metrics line."""
    tmp = tmp_path_factory.mktemp("trained")
    metrics = tmp / "m.jsonl"
    assert run(Config(progress=False, epochs=1, checkpoint_dir=str(tmp / "ck"), metrics=str(metrics))) == 0
    return tmp / "ck", json.loads(metrics.read_text().splitlines()[-1])


def copy_of(trained, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(trained[0], ck)
    return ck


def damage(path):
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0xFF
    path.write_bytes(bytes(blob))
    return bytes(blob)


def test_resume_refuses_when_every_checkpoint_is_damaged(trained, tmp_path, capsys):
    ck = copy_of(trained, tmp_path)
    blob = damage(ck / FIRST)
    with pytest.raises(UserError, match=rf"--resume: every checkpoint in {ck} is damaged: {ck / FIRST} is damaged "
                                        r"\(checksum mismatch.*add --restart-if-damaged"):
        run(Config(progress=False, epochs=2, checkpoint_dir=str(ck), resume=True))
    assert os.listdir(ck) == [FIRST] and (ck / FIRST).read_bytes() == blob  # untouched
    assert "epoch" not in capsys.readouterr().out


def test_restart_if_damaged_starts_over_and_keeps_the_damaged_file(trained, tmp_path, capsys):
    ck = copy_of(trained, tmp_path)
    blob = damage(ck / FIRST)
    assert run(Config(progress=False, epochs=1, checkpoint_dir=str(ck), resume=True, restart_if_damaged=True)) == 0
    assert sorted(os.listdir(ck)) == [FIRST, FIRST + ".damaged"]
    assert (ck / (FIRST + ".damaged")).read_bytes() == blob
    checkpoint.load(str(ck / FIRST))  # a good one, written anew
    captured = capsys.readouterr()
    assert "no usable checkpoint" in captured.out and "epoch   1/1" in captured.out
    assert f"starting over (--restart-if-damaged); the damaged file is kept as {ck / FIRST}.damaged" in captured.err


def test_a_damaged_newest_checkpoint_is_set_aside_not_overwritten(trained, tmp_path, capfd):
    ck = copy_of(trained, tmp_path)
    older = ck / "checkpoint-000000010.pt"
    shutil.copy(ck / FIRST, older)  # an older good one to fall back to (same content, that is fine here)
    blob = damage(ck / FIRST)
    assert run(Config(progress=False, epochs=2, checkpoint_dir=str(ck), resume=True)) == 0
    assert (ck / (FIRST + ".damaged")).read_bytes() == blob
    assert "falling back to an older checkpoint; the damaged file is kept as" in capfd.readouterr().err


def rewrite(ck, change):
    payload = checkpoint.load(str(ck / FIRST))
    change(payload)
    os.unlink(ck / FIRST)
    checkpoint.save(str(ck), 46, payload)  # checksum-valid, content bad


@pytest.mark.parametrize("change, message", [
    (lambda p: p.pop("epoch"), r"has no 'epoch'"),
    (lambda p: p.update(epoch=-1), r"its 'epoch' is -1, not a non-negative integer"),
    (lambda p: p.update(torch_rng=torch.zeros(3, dtype=torch.uint8)), r"random number generator state is not valid"),
    (lambda p: p.update(params=[]), r"its parameters are not the \d+ values its model has"),
    (lambda p: p.update(params=[torch.zeros(0)]), r"its parameters are not the \d+ values its model has"),
    (lambda p: p.update(optimizer={}), r"its optimizer state is missing or malformed"),
])
def test_checksum_valid_but_malformed_checkpoints_are_not_used(trained, tmp_path, change, message):
    ck = copy_of(trained, tmp_path)
    rewrite(ck, change)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.check_trainer_payload(checkpoint.load(str(ck / FIRST)))
    with pytest.raises(UserError, match=rf"every checkpoint in .* is damaged: {ck / FIRST} is not usable \(.*"
                                        + message):
        run(Config(progress=False, epochs=2, checkpoint_dir=str(ck), resume=True))


def test_the_trainers_own_checkpoints_pass_the_check(trained):
    checkpoint.check_trainer_payload(checkpoint.load(str(trained[0] / FIRST)))


# ---------------------------------------------------------------- a run that already finished


def test_resuming_a_finished_run_reports_its_accuracy(trained, tmp_path, capsys):
    ck = copy_of(trained, tmp_path)
    metrics = tmp_path / "m.jsonl"
    assert run(Config(progress=False, epochs=1, checkpoint_dir=str(ck), resume=True, metrics=str(metrics))) == 0
    out = capsys.readouterr().out
    assert "nothing to train" in out and "nan" not in out
    final = json.loads(metrics.read_text().splitlines()[-1])
    assert final["test_accuracy"] == trained[1]["test_accuracy"] > 0.5
    assert final["params_sha256"] == trained[1]["params_sha256"]
    assert "nan" not in metrics.read_text().lower()
