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
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .runtime import UserError, agree
from .strategies.base import PER_RANK, REPLICATED, SHARDED

__all__ = ["CheckpointError", "save", "load", "checkpoints", "load_latest", "newest_good", "set_aside",
           "check_directory", "remove_stale_temporaries", "check_trainer_payload", "Position", "prepare_directory",
           "save_training", "resume_training"]

MAGIC = b"MPIMLCKPT1\n"
_NAME = re.compile(r"^checkpoint-(\d{9})\.pt$")
_TEMPORARY = re.compile(r"^\.checkpoint-\d{9}\.pt\.tmp-(\d+)$")


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


def newest_good(directory: str, check: Callable[[dict[str, Any]], None] | None = None
                ) -> tuple[str | None, dict[str, Any] | None, list[tuple[str, str]]]:
    """The newest checkpoint that verifies and passes ``check`` (which raises CheckpointError for a payload
    it cannot use): (path, payload, [(path, why) for each newer one that did not]); (None, None, [...]) if
    none did."""
    damaged = []
    for path in checkpoints(directory):
        try:
            payload = load(path)
        except CheckpointError as e:
            damaged.append((path, str(e)))
            continue
        try:
            if check is not None:
                check(payload)
        except CheckpointError as e:
            damaged.append((path, f"{path} is not usable ({e})"))
            continue
        return path, payload, damaged
    return None, None, damaged


def check_trainer_payload(payload: Any) -> None:
    """Raise CheckpointError unless ``payload`` has the shape of ``python -m mpiml.train``'s checkpoints
    (format 1): every key, positions that are non-negative integers, one parameter list per replica that
    matches the fingerprint's shapes, optimizer state dicts, and a torch RNG state torch accepts."""
    if not isinstance(payload, dict):
        raise CheckpointError("the payload is not a dict")
    if payload.get("format") != 1:
        raise CheckpointError(f"unknown checkpoint format {payload.get('format')!r}")
    missing = [k for k in _TRAINER_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"it has no {', '.join(repr(k) for k in missing)}")
    for key in ("ranks", "epoch", "step_in_epoch", "global_step", "mixing_step"):
        value = payload[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "ranks" else 0):
            raise CheckpointError(f"its {key!r} is {value!r}, not a {'positive' if key == 'ranks' else 'non-negative'}"
                                  f" integer")
    ranks, fingerprint = payload["ranks"], payload["fingerprint"]
    sums = payload["loss_sums"]
    if not (isinstance(sums, list) and len(sums) == ranks and all(isinstance(v, (int, float)) for v in sums)):
        raise CheckpointError(f"its 'loss_sums' is not a list of {ranks} numbers")
    if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("shapes"), list):
        raise CheckpointError("its fingerprint has no parameter shapes")
    try:
        numel = sum(math.prod(int(n) for n in shape) for shape in fingerprint["shapes"])
    except (TypeError, ValueError):
        numel = 0
    if numel <= 0:
        raise CheckpointError("its fingerprint lists no parameters")
    replicas = [payload["params"]] if payload["replicas"] is None else payload["replicas"]
    states = [payload["optimizer"]] if payload["replicas"] is None else payload["replica_optimizers"]
    if _layout(payload) == SHARDED:
        shards = payload.get("optimizer_shards")
        if not (isinstance(shards, list) and len(shards) == ranks and all(
                isinstance(st, dict) and {"param_groups", "shard"} <= set(st) for st in shards)):
            raise CheckpointError(f"its sharded optimizer state is not {ranks} shards")
        states = [{"state": {}, "param_groups": shards[0]["param_groups"]}]
    if payload["replicas"] is not None and (not isinstance(replicas, list) or len(replicas) != ranks):
        raise CheckpointError(f"it should hold {ranks} replicas")
    for params in replicas:  # flat buffers, one per dtype, holding every parameter of the model
        if not (isinstance(params, list) and params
                and all(isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 1 for t in params)
                and sum(t.numel() for t in params) == numel):
            raise CheckpointError(f"its parameters are not the {numel} values its model has")
    if not (isinstance(states, list) and len(states) == len(replicas)
            and all(isinstance(st, dict) and {"state", "param_groups"} <= set(st) for st in states)):
        raise CheckpointError("its optimizer state is missing or malformed")
    rng, before = payload["torch_rng"], torch.get_rng_state()
    try:
        torch.set_rng_state(rng)
    except (TypeError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"its random number generator state is not valid ({e})") from None
    finally:
        torch.set_rng_state(before)


_TRAINER_KEYS = ("fingerprint", "config", "ranks", "topology", "epoch", "step_in_epoch", "global_step",
                 "mixing_step", "loss_sums", "params", "optimizer", "replicas", "replica_optimizers", "torch_rng")


def _layout(payload: dict[str, Any]) -> str:
    """Where the checkpoint's state lives (checkpoints written before strategies declared it: from its keys)."""
    return payload.get("state_layout") or (PER_RANK if payload.get("replicas") is not None else REPLICATED)


def load_latest(directory: str) -> tuple[str | None, dict[str, Any] | None, list[str]]:
    """The newest checkpoint that verifies: (path, payload, warnings about newer ones that did not)."""
    path, payload, damaged = newest_good(directory)
    return path, payload, [f"{why}; falling back to an older checkpoint" for _, why in damaged]


def set_aside(path: str) -> str:
    """Rename a damaged checkpoint to ``<path>.damaged`` (``.damaged.1``, ... if taken), so that it is
    neither read again nor overwritten by a new checkpoint of the same step; returns the new name."""
    target, n = f"{path}.damaged", 0
    while os.path.lexists(target):
        n += 1
        target = f"{path}.damaged.{n}"
    os.rename(path, target)
    return target


def check_directory(directory: str) -> None:
    """Make sure checkpoints can be written to ``directory`` (creating it if needed); raises CheckpointError
    saying what is in the way: a file, a file above it, no permission, a read-only file system."""
    head = os.path.abspath(directory)
    while not os.path.lexists(head) and os.path.dirname(head) != head:
        head = os.path.dirname(head)
    if os.path.lexists(head) and not os.path.isdir(head):
        where = "is a file" if head == os.path.abspath(directory) else f"is under {head}, which is a file"
        raise CheckpointError(f"--checkpoint-dir {directory} {where}, not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".checkpoint-probe-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise CheckpointError(f"--checkpoint-dir {directory}: cannot write there ({e.strerror or e})") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CheckpointError(f"--checkpoint-dir {directory}: cannot write there (permission denied)")


def remove_stale_temporaries(directory: str) -> list[str]:
    """Delete the ``.checkpoint-*.pt.tmp-PID`` files that a writer killed mid-write left in ``directory``.

    Call it before this process writes any checkpoint: a temporary file is stale when its PID is no running
    process or is this process itself (an earlier process that had the same PID). Files of a live process
    are kept: another job may be writing there. Returns the removed paths."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = _TEMPORARY.match(name)
        if not match:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _alive(pid):
            continue
        try:
            os.unlink(os.path.join(directory, name))
            removed.append(os.path.join(directory, name))
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process; a PID no process can have
        return False
    except PermissionError:  # another user's process
        return True
    return True


# ---------------------------------------------------------------- the trainer's checkpoints


@dataclass
class Position:
    """Where training stands: the epoch, the step within it, the global step, the epoch's loss so far."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    loss_sum: float = 0.0


def prepare_directory(directory: str, comm: Any) -> None:
    """Rank 0 writes the checkpoints: before any training it makes sure it can, and deletes the temporary
    files a killed earlier writer left behind (UserError on every rank if it cannot)."""
    problem = None
    if comm.Get_rank() == 0:
        try:
            check_directory(directory)
            for path in remove_stale_temporaries(directory):
                print(f"note: removed {path}, a checkpoint that an earlier run never finished writing",
                      file=sys.stderr, flush=True)
        except CheckpointError as e:
            problem = str(e)
    problem = comm.bcast(problem, root=0)
    if problem:
        raise UserError(problem)


def save_training(directory: str, comm: Any, dopt: Any, fingerprint: dict[str, Any], config: dict[str, Any],
                  pos: Position, keep: int = 0) -> None:
    """Collective: write one checkpoint of a training run, holding what the strategy's ``state`` says.

    REPLICATED: rank 0's parameters and optimizer state (identical everywhere). PER_RANK: rank 0
    gathers every rank's parameters and optimizer state. SHARDED: rank 0's parameters and every rank's
    optimizer-state shard, with the elements each covers (resharded on resume at another K)."""
    layout = dopt.strategy.state
    per_rank = layout == PER_RANK
    params = dopt.packed_parameters() if per_rank or comm.Get_rank() == 0 else None
    state = dopt.checkpoint_state() if layout != REPLICATED or comm.Get_rank() == 0 else None
    everyone = comm.gather((params if per_rank else None, state if layout != REPLICATED else None, pos.loss_sum),
                           root=0)
    error = None
    if comm.Get_rank() == 0:
        payload = {
            "format": 1, "fingerprint": fingerprint, "config": config, "ranks": comm.Get_size(),
            "topology": config.get("topology"), "strategy": dopt.strategy.name, "state_layout": layout,
            "epoch": pos.epoch, "step_in_epoch": pos.step_in_epoch, "global_step": pos.global_step,
            "mixing_step": dopt.step_count, "loss_sums": [e[2] for e in everyone],
            "params": None if per_rank else params, "optimizer": state if layout == REPLICATED else None,
            "replicas": [e[0] for e in everyone] if per_rank else None,
            "replica_optimizers": [e[1] for e in everyone] if per_rank else None,
            "optimizer_shards": [e[1] for e in everyone] if layout == SHARDED else None,
            "torch_rng": torch.get_rng_state(),
        }
        try:
            save(directory, pos.global_step, payload, keep=keep)
        except CheckpointError as e:
            error = str(e)
    error = comm.bcast(error, root=0)
    if error:
        raise UserError(error)


def _incompatible(payload: dict[str, Any], fingerprint: dict[str, Any], layout: str, k: int) -> str | None:
    if payload.get("format") != 1:
        return "unknown checkpoint format"
    saved = payload["fingerprint"]
    for key in ("model", "hidden", "sample_shape", "classes", "optimizer", "shapes"):
        if saved.get(key) != fingerprint[key]:
            return (f"it was written for a different model ({key}: checkpoint {saved.get(key)}, "
                    f"this run {fingerprint[key]})")
    was_replicas, replicas_now = _layout(payload) == PER_RANK, layout == PER_RANK
    if was_replicas != replicas_now:
        return (f"it was written with {'one replica per rank' if was_replicas else 'one shared model'} "
                f"(--topology {payload['topology']}); this run keeps "
                f"{'one replica per rank' if replicas_now else 'one shared model'}")
    if replicas_now and payload["ranks"] != k:
        return (f"it holds {payload['ranks']} replicas (butterfly mixing, gossip or local SGD); resume with "
                f"{payload['ranks']} ranks (this run has {k})")
    return None


def _find(directory: str, fingerprint: dict[str, Any], layout: str, k: int,
          restart_if_damaged: bool) -> tuple[str, Any, Any]:
    """Rank 0: ("ok", path, payload) of the newest usable checkpoint ((None, None) for none), or ("error",
    message, None). Damaged ones are renamed *.damaged (never overwritten); if every one is damaged the run
    is refused unless ``restart_if_damaged``."""
    path, payload, damaged = newest_good(directory, check_trainer_payload)
    if payload is None and damaged and not restart_if_damaged:
        return ("error", f"--resume: every checkpoint in {directory} is damaged: "
                         f"{'; '.join(why for _, why in damaged)}. Nothing was changed; to start over, add "
                         f"--restart-if-damaged (the damaged files are then kept, renamed *.damaged)", None)
    problem = _incompatible(payload, fingerprint, layout, k) if payload is not None else None
    if problem:
        return ("error", f"cannot resume from {path}: {problem}", None)
    then = "falling back to an older checkpoint" if payload is not None else "starting over (--restart-if-damaged)"
    for bad, why in damaged:
        try:
            kept = f"the damaged file is kept as {set_aside(bad)}"
        except OSError as e:
            kept = f"the damaged file could not be renamed ({e.strerror or e})"
        print(f"warning: {why}; {then}; {kept}", file=sys.stderr, flush=True)
    if payload is None:
        print(f"no {'usable ' if damaged else ''}checkpoint in {directory}; starting from scratch", flush=True)
    return ("ok", path, payload)


def resume_training(directory: str, comm: Any, dopt: Any, fingerprint: dict[str, Any], epochs: int,
                    restart_if_damaged: bool = False) -> Position:
    """Collective: load the newest good checkpoint (rank 0 reads, everyone receives) and restore this rank
    from it, as the strategy keeps its state; returns where to continue (a fresh Position if none)."""
    k, r = comm.Get_size(), comm.Get_rank()
    layout = dopt.strategy.state
    found = _find(directory, fingerprint, layout, k, restart_if_damaged) if r == 0 else None
    status, path, payload = comm.bcast(found, root=0)
    if status == "error":
        raise UserError(path)
    if payload is None:
        return Position()
    saved_layout = _layout(payload)
    params = payload["replicas"][r] if saved_layout == PER_RANK else payload["params"]
    if saved_layout == PER_RANK:
        states = [payload["replica_optimizers"][r]]
    elif saved_layout == SHARDED:
        states = payload["optimizer_shards"]
    else:
        states = [payload["optimizer"]]

    def restore() -> None:
        try:
            if (saved_layout == SHARDED) != (layout == SHARDED):
                raise ValueError(f"its optimizer state is {saved_layout}, this run keeps it {layout} "
                                 f"(--zero {'on' if layout == SHARDED else 'off'})")
            dopt.load_packed_parameters(params)
            dopt.load_checkpoint_state(states)
            torch.set_rng_state(payload["torch_rng"])
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
            raise UserError(f"cannot resume from {path}: {e}") from None

    agree(comm, restore)
    dopt.step_count = payload["mixing_step"]
    pos = Position(payload["epoch"], payload["step_in_epoch"], payload["global_step"])
    sums = payload["loss_sums"]
    if payload["ranks"] == k:
        pos.loss_sum = sums[r]
    else:  # one shared model only: the same position in samples seen, new shards and order (see README)
        pos.step_in_epoch = pos.step_in_epoch * payload["ranks"] // k
        pos.loss_sum = sum(sums) / k
    if r == 0 and pos.epoch >= epochs:
        print(f"resumed from {path}: it has finished {pos.epoch} epoch{'s' if pos.epoch != 1 else ''} (--epochs "
              f"{epochs}), so there is nothing to train; evaluating it", flush=True)
    elif r == 0:
        print(f"resumed from {path} (epoch {pos.epoch + 1}, step {pos.global_step})", flush=True)
    return pos
