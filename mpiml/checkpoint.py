"""Checkpoints that cannot lie: atomic writes, a checksum inside every file, fallback to the last good one.

File layout: the line ``MPIMLCKPT1``, the SHA-256 (hex) of the payload, then
the payload (``torch.save`` of a dict of tensors, numbers and strings).
Writing goes to a temporary file in the same directory, which is flushed,
fsynced and renamed over the final name, and the directory is fsynced, so
a crash leaves either the old set of checkpoints or the new one, never a
torn file under a checkpoint's name.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import re
from typing import Any

import torch

__all__ = ["CheckpointError", "save", "load", "checkpoints", "load_latest"]

MAGIC = b"MPIMLCKPT1\n"
_NAME = re.compile(r"^checkpoint-(\d{9})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or cannot be written; the message says which and why."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(directory: str, step: int, payload: dict[str, Any], keep: int = 0) -> str:
    """Write ``payload`` as ``directory/checkpoint-<step>.pt`` atomically; returns the path.

    ``keep`` > 0 deletes all but the newest ``keep`` checkpoints afterwards.
    Raises CheckpointError (and leaves earlier checkpoints untouched) if the
    directory cannot be created or written, or the disk is full.
    """
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    header = MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n"
    path = os.path.join(directory, f"checkpoint-{step:09d}.pt")
    tmp = os.path.join(directory, f".checkpoint-{step:09d}.pt.tmp-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
    if keep > 0:
        for old in checkpoints(directory)[keep:]:
            try:
                os.unlink(old)
            except OSError:
                pass
    return path


def load(path: str) -> dict[str, Any]:
    """Read and verify one checkpoint; raises CheckpointError if it is unreadable, truncated or corrupted."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None
    if not blob.startswith(MAGIC):
        raise CheckpointError(f"{path} is not an mpiml checkpoint")
    end = blob.find(b"\n", len(MAGIC))
    digest, data = blob[len(MAGIC):end].decode(errors="replace"), blob[end + 1:]
    if end < 0 or hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{path} is damaged (checksum mismatch: truncated or corrupted)")
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:  # a payload that passed the checksum but will not load
        raise CheckpointError(f"{path} cannot be loaded: {e}") from None


def checkpoints(directory: str) -> list[str]:
    """Checkpoint files in ``directory``, newest (highest step) first."""
    found = [p for p in glob.glob(os.path.join(directory, "checkpoint-*.pt")) if _NAME.match(os.path.basename(p))]
    return sorted(found, reverse=True)


def load_latest(directory: str) -> tuple[str | None, dict[str, Any] | None, list[str]]:
    """The newest checkpoint that verifies: (path, payload, warnings about newer ones that did not)."""
    warnings = []
    for path in checkpoints(directory):
        try:
            return path, load(path), warnings
        except CheckpointError as e:
            warnings.append(f"{e}; falling back to an older checkpoint")
    return None, None, warnings
