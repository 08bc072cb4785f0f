import os

import pytest
import torch

from mpiml import checkpoint
from mpiml.checkpoint import CheckpointError


def payload(v):
    return {"step": v, "params": [torch.full((3,), float(v))], "name": "x"}


def test_roundtrip_and_names(tmp_path):
    path = checkpoint.save(str(tmp_path), 7, payload(7))
    assert os.path.basename(path) == "checkpoint-000000007.pt"
    loaded = checkpoint.load(path)
    assert loaded["step"] == 7 and torch.equal(loaded["params"][0], torch.full((3,), 7.0))
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []  # no temporary file left


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_damaged_newest_falls_back(tmp_path, damage):
    checkpoint.save(str(tmp_path), 1, payload(1))
    newest = checkpoint.save(str(tmp_path), 2, payload(2))
    blob = open(newest, "rb").read()
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip":
        blob = blob[:-10] + bytes([blob[-10] ^ 0xFF]) + blob[-9:]
    else:
        blob = b"not a checkpoint"
    open(newest, "wb").write(blob)
    with pytest.raises(CheckpointError, match="damaged|not an mpiml checkpoint"):
        checkpoint.load(newest)
    path, loaded, warnings = checkpoint.load_latest(str(tmp_path))
    assert loaded["step"] == 1 and path.endswith("checkpoint-000000001.pt")
    assert len(warnings) == 1 and "falling back" in warnings[0]


def test_keep_newest(tmp_path):
    for s in range(5):
        checkpoint.save(str(tmp_path), s, payload(s), keep=2)
    assert [os.path.basename(p) for p in checkpoint.checkpoints(str(tmp_path))] == [
        "checkpoint-000000004.pt", "checkpoint-000000003.pt"]


def test_unwritable_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file")
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        checkpoint.save(str(blocker / "sub"), 1, payload(1))


def test_empty_directory(tmp_path):
    assert checkpoint.load_latest(str(tmp_path)) == (None, None, [])
