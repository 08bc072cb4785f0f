"""``python -m mpiml.train``: sharded data-parallel SGD, from the command line to the final model.

    mpiexec -n 4 python -m mpiml.train --topology ring --model mlp --dataset digits --epochs 20

Read top to bottom: parse the command line into a ``Config``; every rank
opens only its shard; rank 0's initial parameters are broadcast; each step
runs forward/backward on the local batch and lets ``DistributedOptimizer``
combine the flat gradient buffer through the chosen topology (or mix
parameters with one partner, for ``butterfly-mixing``); each epoch ends with
test accuracy over all shards (counts summed across ranks), a line on rank
0, a JSON line in ``--metrics``, and a checkpoint in ``--checkpoint-dir``.

Every rank runs the same number of steps per epoch: the largest shard's
``ceil(rows / batch)``; a rank with fewer rows wraps around to the start of
its own epoch order (so it sees a few of its samples twice that epoch).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

from . import checkpoint, mixing, strategies, traffic, watchdog
from .checkpoint import Position
from .compression import COMPRESSORS
from .data import ArraySource, DataError, ShardedData, batch_indices, block, open_source
from .metrics import MetricsLog, Stopwatch
from .models import MODELS, ModelError, build_model, parameter_count
from .optimizer import DEFAULT_BUCKET_BYTES, TOPOLOGIES, DistributedOptimizer
from .params import broadcast_parameters, parameters_sha256
from .runtime import UserError, abort_on_exception, agree, local_size
from .strategies.base import SYNC_BUCKET_BYTES
from .timeline import Timeline, rank_path

__all__ = ["Config", "parse_args", "main", "run"]

FAULTS = ("hang", "kill", "exit", "nan", "corrupt")


@dataclass
class Config:
    topology: str = "ring"
    model: str = "mlp"
    hidden: str = "128"
    dataset: str = "digits"
    data: str | None = None
    samples: int = 10000
    features: int = 32
    classes: int | None = None
    separation: float = 0.5
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_scaling: str = "none"
    warmup_epochs: float = 0.0
    seed: int = 0
    shuffle: str = "local"
    test_fraction: float = 0.2
    metrics: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 0
    resume: bool = False
    restart_if_damaged: bool = False
    threads: int = 1
    progress: bool = True
    overlap: bool | None = None
    bucket_bytes: int | None = None  # None: DistributedOptimizer's default (4 MiB with overlap, 64 MiB without)
    compression: str = "none"
    stall_warning: float = 60.0
    timeout: float = 600.0
    on_nan: str = "abort"
    check_consistency_every: int = 0
    fault: str | None = None
    average_every: int = 0
    straggler: str | None = None
    staleness: str = "0"
    zero: bool = False
    timeline: str | None = None
    strategy_extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # options strategies declare

    def hidden_sizes(self) -> tuple[int, ...]:
        try:
            return tuple(int(h) for h in self.hidden.split(",") if h.strip())
        except ValueError:
            raise UserError(f"--hidden must be comma-separated integers, got {self.hidden!r}") from None

    def validate(self, ranks: int | None = None) -> None:
        """Check the options on their own (and against the job's ``ranks``); the same outcome on every rank."""
        checks = [
            (0 <= self.seed < 2 ** 64, f"--seed must be an integer from 0 to {2 ** 64 - 1}, got {self.seed}"),
            (self.data is None or self.data.strip() != "", "--data needs a path (it was given an empty one)"),
            (self.resume or not self.restart_if_damaged, "--restart-if-damaged only applies with --resume"),
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (self.checkpoint_every >= 0, f"--checkpoint-every must be >= 0, got {self.checkpoint_every}"),
            (self.keep_checkpoints >= 0, f"--keep-checkpoints must be >= 0, got {self.keep_checkpoints}"),
            (self.threads >= 1, f"--threads must be at least 1, got {self.threads}"),
            (self.bucket_bytes is None or self.bucket_bytes >= 1,
             f"--bucket-bytes must be positive, got {self.bucket_bytes}"),
            (self.timeout >= 0, f"--timeout must be >= 0 (0: never), got {self.timeout}"),
            (self.stall_warning >= 0, f"--stall-warning must be >= 0 (0: never), got {self.stall_warning}"),
            (self.check_consistency_every >= 0,
             f"--check-consistency-every must be >= 0, got {self.check_consistency_every}"),
            (not self.resume or self.checkpoint_dir, "--resume needs --checkpoint-dir"),
            (self.classes is None or self.classes >= 2, f"--classes must be at least 2, got {self.classes}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if not self.hidden_sizes() and self.model == "mlp":
            raise UserError("--hidden needs at least one layer size for --model mlp "
                            "(for a model without hidden layers use --model logreg)")
        fault, straggler = self.parsed_fault(), self.parsed_straggler()
        for flag, rank in (("--fault", fault and fault[1]), ("--straggler", straggler and straggler[0])):
            if rank is not None and ranks is not None and rank >= ranks:
                raise UserError(f"{flag}: there is no rank {rank} in a job of {ranks} rank{'s' if ranks > 1 else ''}")
        if self.average_every < 0:
            raise UserError(f"--average-every must be >= 0, got {self.average_every}")
        self.parsed_staleness()
        strategy = self.strategy()
        strategy.check_options(self.strategy_options())
        if self.checkpoint_dir and not strategy.checkpoints:
            raise UserError(f"--checkpoint-dir: the {strategy.name} strategy ({strategy.summary}) keeps its state "
                            f"where checkpoints cannot reach it; checkpoints are not supported with it")

    def parsed_straggler(self) -> tuple[int, float] | None:
        if not self.straggler:
            return None
        rank, _, factor = self.straggler.partition(":")
        try:
            parsed = int(rank), float(factor)
        except ValueError:
            parsed = (-1, 0.0)
        if parsed[0] < 0 or not (1 <= parsed[1] < math.inf):
            raise UserError(f"--straggler must be RANK:FACTOR with FACTOR >= 1 (and finite), got {self.straggler!r}")
        return parsed

    def parsed_staleness(self) -> int | None:
        if self.staleness in ("inf", "none", "None"):
            return None
        try:
            value = int(self.staleness)
        except ValueError:
            value = -1
        if value < 0:
            raise UserError(f"--staleness must be a non-negative integer or 'inf', got {self.staleness!r}")
        return value

    def strategy_options(self) -> dict[str, Any]:
        """The options ``DistributedOptimizer`` gets from this command line (strategies refuse the ones
        they do not honour)."""
        return dict(overlap=self.overlap, bucket_bytes=self.bucket_bytes, compression=self.compression,
                    check_consistency_every=self.check_consistency_every, average_every=self.average_every,
                    staleness=self.parsed_staleness(), zero=self.zero, **self.strategy_extra)

    def strategy(self) -> type[strategies.Strategy]:
        """The strategy this command line chooses (UserError for a combination that chooses none)."""
        return strategies.strategy_for(self.topology, self.strategy_options())

    def parsed_fault(self) -> tuple[str, int, int] | None:
        if not self.fault:
            return None
        parts = self.fault.split(":")
        if len(parts) != 3 or parts[0] not in FAULTS or not all(p.isdigit() for p in parts[1:]):
            raise UserError(f"--fault must be KIND:RANK:STEP with KIND one of {', '.join(FAULTS)} and RANK, STEP "
                            f"non-negative integers, got {self.fault!r}")
        return parts[0], int(parts[1]), int(parts[2])


class _Parser(argparse.ArgumentParser):
    """Usage errors are printed once (by rank 0); every rank exits with status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if MPI.COMM_WORLD.Get_rank() == 0:
            self.print_usage(sys.stderr)
            sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def parse_args(argv: list[str] | None = None) -> Config:
    d = Config()
    p = _Parser(prog="python -m mpiml.train", usage="%(prog)s [options]  (--help lists them)",
                description="Data-parallel training over MPI.")
    p.add_argument("--topology", choices=TOPOLOGIES, default=d.topology, metavar="NAME",
                   help="how replicas are kept in agreement (default %(default)s): "
                        + "; ".join(f"{row['chosen_by']}: {row['summary']}" for row in strategies.describe()))
    p.add_argument("--model", choices=MODELS, default=d.model)
    p.add_argument("--hidden", default=d.hidden, help="MLP hidden layer sizes, comma-separated (default %(default)s)")
    p.add_argument("--dataset", choices=("digits", "synthetic"), default=d.dataset)
    p.add_argument("--data", metavar="PATH", help="a .npz file or a folder of .npy files holding X and y "
                                                  "(overrides --dataset)")
    p.add_argument("--samples", type=int, default=d.samples, help="synthetic: rows (default %(default)s)")
    p.add_argument("--features", type=int, default=d.features, help="synthetic: features (default %(default)s)")
    p.add_argument("--separation", type=float, default=d.separation,
                   help="synthetic: scale of the class centres against unit noise; smaller is harder "
                        "(default %(default)s)")
    p.add_argument("--classes", type=int, default=d.classes,
                   help="synthetic: classes (default 10); --data: number of classes (default: max label + 1)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per rank (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="base learning rate (default %(default)s)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default=d.optimizer)
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--lr-scaling", choices=("none", "linear"), default=d.lr_scaling,
                   help="linear: lr x ranks, reached after --warmup-epochs of linear warm-up")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--shuffle", choices=("local", "global"), default=d.shuffle,
                   help="local: permute each rank's own shard; global: each rank takes its slice of one "
                        "permutation of all rows per epoch")
    p.add_argument("--test-fraction", type=float, default=d.test_fraction)
    p.add_argument("--metrics", metavar="PATH", help="write one JSON line per epoch and a final line")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="checkpoint at the end of every epoch")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="STEPS",
                   help="also checkpoint every STEPS optimizer steps (0: only at epoch ends)")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, metavar="N",
                   help="keep only the newest N checkpoints (0: keep all)")
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint")
    p.add_argument("--restart-if-damaged", action="store_true",
                   help="with --resume: if every checkpoint is damaged, start over instead of refusing (the "
                        "damaged files are kept, renamed *.damaged)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per rank (default %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--overlap", dest="overlap", action="store_true", default=None,
                   help="allreduce gradient buckets on a communication thread during backward (default: when "
                        "the host has a core to spare for it)")
    p.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="combine gradients after backward instead")
    p.add_argument("--bucket-bytes", type=int, default=d.bucket_bytes,
                   help=f"gradient bucket size (default {DEFAULT_BUCKET_BYTES} with overlap, {SYNC_BUCKET_BYTES} "
                        "without: one collective measured faster than several when nothing overlaps)")
    p.add_argument("--compression", choices=tuple(COMPRESSORS), default=d.compression,
                   help="gradients (or exchanged parameters: mixing, gossip, local SGD) on the wire "
                        "(default %(default)s)")
    p.add_argument("--stall-warning", type=float, default=d.stall_warning, metavar="SECONDS",
                   help="rank 0 reports a collective stuck this long, and who has not arrived (0: never)")
    p.add_argument("--timeout", type=float, default=d.timeout, metavar="SECONDS",
                   help="abort the job when a collective is stuck this long (0: never; default %(default)s)")
    p.add_argument("--on-nan", choices=("abort", "skip"), default=d.on_nan,
                   help="a NaN/Inf gradient on any rank aborts (default) or skips that step everywhere")
    p.add_argument("--check-consistency-every", type=int, default=d.check_consistency_every, metavar="STEPS",
                   help="compare parameter fingerprints across ranks every STEPS steps (exact topologies)")
    p.add_argument("--average-every", type=int, default=d.average_every, metavar="H",
                   help="local SGD: step on local gradients, average parameters every H steps through the "
                        "topology (0: average gradients every step, synchronous SGD)")
    p.add_argument("--zero", action="store_true",
                   help="with an exact topology: shard the optimizer state across ranks (ZeRO-1): gradients "
                        "reduce-scattered, each rank steps its shard, parameters allgathered")
    p.add_argument("--staleness", default=d.staleness, metavar="S",
                   help="--topology ps: a worker computes with parameters at most S steps stale; 0 is "
                        "synchronous, 'inf' fully asynchronous (default %(default)s)")
    p.add_argument("--straggler", metavar="RANK:FACTOR",
                   help="slow RANK's computation down by FACTOR (it sleeps FACTOR-1 times its compute time)")
    p.add_argument("--timeline", metavar="PATH", default=os.environ.get("HOROVOD_TIMELINE") or None,
                   help="write a Chrome-trace JSON of every rank's phases (forward, backward, waiting, each "
                        "bucket's allreduce), viewable in Perfetto (default: $HOROVOD_TIMELINE)")
    p.add_argument("--fault", metavar="KIND:RANK:STEP",
                   help="failure testing: at global step STEP, rank RANK hangs, kills itself (SIGKILL), exits, "
                        "gets a NaN loss, or corrupts its parameters (KIND: hang, kill, exit, nan, corrupt)")
    declared = [o for o in strategies.OPTIONS.values() if o.flag and not hasattr(d, o.keyword)]
    for o in declared:  # options a strategy declares itself (its own file is all it takes)
        p.add_argument(o.flag, dest=o.keyword, default=o.default, choices=o.choices, type=o.type,
                       help=f"{o.meaning} (default %(default)s)")
    args = vars(p.parse_args(argv))
    extra = {o.keyword: args.pop(o.keyword) for o in declared}
    return Config(**args, strategy_extra={k: v for k, v in extra.items() if v != strategies.OPTIONS[k].default})


# ---------------------------------------------------------------- setup


def _open_data(cfg: Config, comm: MPI.Comm) -> tuple[ShardedData, tuple[np.ndarray, np.ndarray], int, str]:
    """This rank's shard and test rows, the number of classes and where it comes from, agreed by all ranks.

    A ``--data`` file is checked before training: every sample finite (a rank scans its own block, so
    the whole file is covered once) and the exact range of the labels."""
    k, r = comm.Get_size(), comm.Get_rank()
    ranks_here = local_size()

    def local() -> tuple[ShardedData, tuple[np.ndarray, np.ndarray], int, int]:
        try:
            classes = cfg.classes if cfg.classes is not None else 10
            if cfg.data is None and cfg.dataset == "synthetic":  # its class centres, drawn as float64
                _check_memory(12 * classes * max(cfg.features, 0), ranks_here,
                              f"--dataset synthetic with --classes {classes} and --features {cfg.features}")
            source = open_source(cfg.dataset, cfg.data, cfg.samples, cfg.features, classes, cfg.seed,
                                 cfg.separation)
            shard = ShardedData(source, r, k, cfg.seed, cfg.test_fraction, cfg.shuffle)
            low, high = source.scan(*block(source.n, k, r)) if isinstance(source, ArraySource) else (0, -1)
            test = shard.test_set()
        except DataError as e:
            raise UserError(str(e)) from None
        return shard, test, low, high

    shard, test, low, high = agree(comm, local)
    low, high = comm.allreduce(low, op=MPI.MIN), comm.allreduce(high, op=MPI.MAX)
    train_rows = comm.allgather(len(shard.own_train_rows))
    test_rows = comm.allreduce(len(shard.test_rows))
    source = shard.source
    described = ""
    if source.num_classes is not None:
        if cfg.classes is not None and cfg.classes != source.num_classes:
            raise UserError(f"--classes {cfg.classes}: the {source.name} data set has {source.num_classes} classes "
                            f"(--classes is for --dataset synthetic and --data)")
        classes = source.num_classes
    else:
        if low < 0:
            raise UserError(f"--data {cfg.data}: labels must be >= 0, found {low}")
        classes = cfg.classes if cfg.classes is not None else high + 1
        if high >= classes:
            raise UserError(f"--data {cfg.data}: label {high} is out of range for --classes {classes}")
        if classes < 2:
            raise UserError(f"--data {cfg.data}: need at least 2 classes, the labels only reach {high}")
        described = "" if cfg.classes is not None else f", from the largest label, {high}"
    if min(train_rows) == 0:
        empty = [i for i, n in enumerate(train_rows) if n == 0]
        raise UserError(f"{k} ranks but only {sum(train_rows)} training rows: rank {empty[0]} would get none "
                        f"(use fewer ranks or more data)")
    if test_rows == 0:
        raise UserError(f"no test rows: with --test-fraction {cfg.test_fraction}, none of the {source.n} rows "
                        f"is a test row (raise --test-fraction or use more data)")
    if cfg.batch_size > min(train_rows):
        fewest = train_rows.index(min(train_rows))
        raise UserError(f"--batch-size {cfg.batch_size} is larger than the {min(train_rows)} training rows of "
                        f"rank {fewest}{'' if k == 1 else f' (of {k})'}: use --batch-size {min(train_rows)} or less")
    return shard, test, classes, f"{classes} classes{described}"


def _available_memory() -> int | None:
    """Bytes of memory this host (or this container's memory limit) can still give, None where unknown."""
    sizes = []
    try:
        with open("/proc/meminfo") as f:
            sizes += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                sizes.append(int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        pass
    return min(sizes) if sizes else None


def _check_memory(need: int, ranks_here: int, what: str) -> None:
    """Refuse up front (UserError) what cannot fit: ``need`` bytes per rank, ``ranks_here`` ranks on this host."""
    available = _available_memory()
    if available is not None and need * ranks_here > available:
        share = available // ranks_here
        raise UserError(f"{what} needs about {_bytes(need)} of memory per rank, more than the {_bytes(share)} "
                        f"this host has available for each of its {ranks_here} rank{'s' if ranks_here > 1 else ''}")


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    raise AssertionError("unreachable")


def _check_model_fits(cfg: Config, sample_shape: tuple[int, ...], classes: int, described: str, rows: int,
                      ranks_here: int) -> None:
    """The model, its gradients, optimizer state, activations and this rank's rows must fit in memory."""
    features = math.prod(sample_shape)
    hidden = cfg.hidden_sizes() if cfg.model == "mlp" else ()
    params = parameter_count(cfg.model, sample_shape, classes, hidden)
    copies = 4 + (2 if cfg.optimizer == "adam" else 1 if cfg.momentum > 0 else 0)
    widths = features * 57 + 64 + classes if cfg.model == "cnn" else features + sum(hidden) + classes
    need = 4 * (params * copies + 3 * cfg.batch_size * widths + 2 * rows * features)
    layers = f", --hidden {cfg.hidden}" if cfg.model == "mlp" else ""
    _check_memory(need, ranks_here, f"the model (--model {cfg.model}{layers}; {features} features, {described}) "
                                    f"has {params:,} parameters; with gradients, optimizer state and data it")


def _make_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _lr_at(cfg: Config, step: int, steps_per_epoch: int, ranks: int) -> float:
    """Base lr; with linear scaling lr x ranks, ramped up linearly over the warm-up (Goyal et al., 2017)."""
    target = cfg.lr * (ranks if cfg.lr_scaling == "linear" else 1)
    warmup = cfg.warmup_epochs * steps_per_epoch
    if warmup <= 0 or step >= warmup:
        return target
    return cfg.lr + (target - cfg.lr) * step / warmup


def _fingerprint(cfg: Config, sample_shape: tuple[int, ...], classes: int, model: torch.nn.Module) -> dict[str, Any]:
    return {"model": cfg.model, "hidden": list(cfg.hidden_sizes()) if cfg.model == "mlp" else [],
            "sample_shape": list(sample_shape), "classes": classes, "optimizer": cfg.optimizer,
            "shapes": [list(p.shape) for p in model.parameters()]}


# ---------------------------------------------------------------- evaluation


def _evaluate(model: torch.nn.Module, test: tuple[np.ndarray, np.ndarray], comm: MPI.Comm) -> float:
    """Accuracy over every rank's test rows: correct and total counts summed across ranks."""
    x, y = test
    model.eval()
    correct = 0
    with torch.no_grad():
        for lo in range(0, len(y), 1024):
            logits = model(torch.from_numpy(x[lo:lo + 1024]))
            correct += int((logits.argmax(1).numpy() == y[lo:lo + 1024]).sum())
    model.train()
    counts = np.array([correct, len(y)], dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, counts, op=MPI.SUM)
    return float(counts[0] / counts[1]) if counts[1] else float("nan")


def _evaluate_average(model: torch.nn.Module, dopt: DistributedOptimizer, test: Any, comm: MPI.Comm) -> float:
    """Butterfly mixing: accuracy of the average of the replicas (each rank's own is restored afterwards)."""
    saved = [b.clone() for b in dopt.parameter_buffers]
    mixing.average_replicas(dopt.parameter_buffers, comm)
    accuracy = _evaluate(model, test, comm)
    for b, s in zip(dopt.parameter_buffers, saved):
        b.copy_(s)
    return accuracy


# ---------------------------------------------------------------- the run


def run(cfg: Config) -> int:
    comm = MPI.COMM_WORLD
    cfg.validate(comm.Get_size())
    agree(comm, lambda: _check_host(cfg))
    dog = watchdog.install(watchdog.Watchdog(MPI.COMM_WORLD, cfg.stall_warning, cfg.timeout))
    # Closing the watchdog is collective: only after a clean run. After an exception it stays on, and
    # abort_on_exception either ends every rank together (a UserError all ranks share) or aborts the job.
    result = _train(cfg, dog)
    watchdog.uninstall()
    return result


def _check_host(cfg: Config) -> None:
    """Limits of the host this rank runs on (each rank checks its own; ``run`` agrees on the outcome)."""
    cpus = os.cpu_count() or 1
    if cfg.threads > cpus:
        raise UserError(f"--threads {cfg.threads}: this host has {cpus} CPUs; use at most {cpus}")


@dataclass
class _Run:
    """Everything one training run carries from step to step."""

    cfg: Config
    comm: MPI.Comm
    shard: ShardedData
    test: tuple[np.ndarray, np.ndarray]
    model: torch.nn.Module
    dopt: DistributedOptimizer
    fingerprint: dict[str, Any]
    log: MetricsLog
    dog: watchdog.Watchdog
    pos: Position
    steps0: int = 0
    accuracy: float = float("nan")
    fault: tuple[str, int, int] | None = None
    straggler: tuple[int, float] | None = None
    started: float = 0.0
    timeline: Timeline = dataclasses.field(default_factory=lambda: Timeline(None))
    train_seconds: float = 0.0
    step_seconds: float = 0.0  # this rank's compute time per step in the last epoch (async load balancing)


def _inject(kind: str, loss: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """``--fault``: make this rank fail the way ``kind`` says, for failure testing."""
    import os
    import signal
    if kind == "hang":
        while True:
            time.sleep(3600)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "exit":
        os._exit(1)  # leave without a word, as a crashed process would
    if kind == "nan":
        return loss * float("nan")
    with torch.no_grad():  # corrupt
        next(model.parameters()).view(-1)[0] += 1.0
    return loss


def _setup(cfg: Config, dog: watchdog.Watchdog) -> _Run:
    comm = MPI.COMM_WORLD
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.checkpoint_dir:
        checkpoint.prepare_directory(cfg.checkpoint_dir, comm)
    shard, test, classes, described = _open_data(cfg, comm)
    sample_shape = shard.source.sample_shape
    with watchdog.watch("steps per epoch"):
        steps0 = comm.allreduce(math.ceil(len(shard.own_train_rows) / cfg.batch_size), op=MPI.MAX)
    fault = cfg.parsed_fault()
    if fault is not None and fault[2] >= cfg.epochs * steps0:
        raise UserError(f"--fault {cfg.fault}: step {fault[2]} is past the run's last step, "
                        f"{cfg.epochs * steps0 - 1} ({cfg.epochs} epochs of {steps0} steps)")

    def make() -> torch.nn.Module:
        try:
            _check_model_fits(cfg, sample_shape, classes, described, len(shard.own_train_rows), local_size())
            return build_model(cfg.model, sample_shape, classes, cfg.hidden_sizes())
        except ModelError as e:
            raise UserError(str(e)) from None

    model = agree(comm, make)
    broadcast_parameters(model, root=0, comm=comm)
    dopt = DistributedOptimizer(_make_optimizer(cfg, model), model, topology=cfg.topology, comm=comm,
                                overlap=cfg.overlap, bucket_bytes=cfg.bucket_bytes, compression=cfg.compression,
                                on_nan=cfg.on_nan, check_consistency_every=cfg.check_consistency_every,
                                average_every=cfg.average_every, staleness=cfg.parsed_staleness(), zero=cfg.zero,
                                **cfg.strategy_extra)
    fingerprint = _fingerprint(cfg, sample_shape, classes, model)
    pos = (checkpoint.resume_training(cfg.checkpoint_dir, comm, dopt, fingerprint, cfg.epochs, cfg.restart_if_damaged)
           if cfg.resume else Position())
    log = MetricsLog(cfg.metrics, comm.Get_rank() == 0, append=cfg.resume and pos.global_step > 0)
    if comm.Get_rank() == 0:
        k = comm.Get_size()
        print(f"mpiml.train: {k} rank{'s' if k > 1 else ''}, topology {cfg.topology}, model {cfg.model}, "
              f"data {shard.source.name} ({shard.source.n} rows, {classes} classes), "
              f"batch {cfg.batch_size} per rank", flush=True)
    return _Run(cfg, comm, shard, test, model, dopt, fingerprint, log, dog, pos, steps0, fault=cfg.parsed_fault(),
                straggler=cfg.parsed_straggler())


def _train_epoch(run: _Run, epoch: int) -> None:
    cfg, comm, dopt, pos = run.cfg, run.comm, run.dopt, run.pos
    x, y = run.shard.epoch_data(epoch)
    with watchdog.watch("steps per epoch"):
        steps = comm.allreduce(math.ceil(len(y) / cfg.batch_size), op=MPI.MAX)
    if cfg.parsed_staleness() is None:  # fully asynchronous (only the parameter server takes staleness)
        steps = _asynchronous_share(run, steps)
    batches = batch_indices(len(y), cfg.batch_size, steps)
    first = pos.step_in_epoch if epoch == pos.epoch else 0
    loss_sum = pos.loss_sum if epoch == pos.epoch else 0.0
    comm_before, wait_before, wall = dopt.comm_seconds, dopt.wait_seconds, Stopwatch()
    bar = _progress(cfg, comm.Get_rank() == 0, steps, first, f"epoch {epoch + 1}/{cfg.epochs}")
    with wall:
        for i in range(first, steps):
            run.dog.step = pos.global_step
            for group in dopt.param_groups:
                group["lr"] = _lr_at(cfg, pos.global_step, run.steps0, comm.Get_size())
            xb, yb = torch.from_numpy(x[batches[i]]), torch.from_numpy(y[batches[i]])
            started = time.perf_counter()
            tl = run.timeline
            with tl.span("forward", "compute", step=pos.global_step):
                loss = F.cross_entropy(run.model(xb), yb)
            if run.fault is not None and run.fault[2] == pos.global_step and run.fault[1] == comm.Get_rank():
                loss = _inject(run.fault[0], loss, run.model)
            dopt.zero_grad()
            with tl.span("backward", "compute", step=pos.global_step):
                loss.backward()
            if run.straggler is not None and run.straggler[0] == comm.Get_rank():
                time.sleep((run.straggler[1] - 1) * (time.perf_counter() - started))  # --straggler: slow compute
            with tl.span("step", "optimizer", step=pos.global_step):
                dopt.step()
            loss_sum += float(loss.detach())
            pos.global_step += 1
            if bar is not None:
                bar.update(1)
            if cfg.checkpoint_dir and cfg.checkpoint_every and pos.global_step % cfg.checkpoint_every == 0:
                _save(run, Position(epoch, i + 1, pos.global_step, loss_sum))
    if bar is not None:
        bar.close()
    run.train_seconds += wall.seconds
    run.step_seconds = (wall.seconds - (dopt.wait_seconds - wait_before)) / max(steps - first, 1)
    times = (wall.seconds, dopt.comm_seconds - comm_before, dopt.wait_seconds - wait_before)
    with watchdog.watch("end of epoch"):
        _report_epoch(run, epoch, steps, loss_sum, *times)
        if cfg.checkpoint_dir:
            _save(run, Position(epoch + 1, 0, pos.global_step, 0.0))


def _save(run: _Run, pos: Position) -> None:
    cfg = run.cfg
    checkpoint.save_training(cfg.checkpoint_dir, run.comm, run.dopt, run.fingerprint, dataclasses.asdict(cfg), pos,
                             keep=cfg.keep_checkpoints)


def _asynchronous_share(run: _Run, steps: int) -> int:
    """Fully asynchronous parameter server: the epoch's K x ``steps`` batches are shared out in
    proportion to each rank's measured speed, so fast ranks are not held back by a slow one (a rank
    with more steps than its shard has rows wraps around it)."""
    comm = run.comm
    times = comm.allgather(run.step_seconds)
    if min(times) <= 0:
        return steps  # first epoch: nothing measured yet
    speeds = [1.0 / t for t in times]
    total = steps * comm.Get_size()
    shares = [int(total * v / sum(speeds)) for v in speeds]
    fastest = max(range(len(speeds)), key=speeds.__getitem__)
    shares[fastest] += total - sum(shares)
    return max(1, shares[comm.Get_rank()])


def _report_epoch(run: _Run, epoch: int, steps: int, loss_sum: float, wall: float, comm_time: float,
                  exposed: float) -> None:
    cfg, comm, dopt = run.cfg, run.comm, run.dopt
    k = comm.Get_size()
    mixed = dopt.replicas_differ
    with traffic.uncounted():  # measuring is not training: bytes_sent_per_rank counts the strategy's traffic only
        run.accuracy = _evaluate_average(run.model, dopt, run.test, comm) if mixed else _evaluate(run.model, run.test,
                                                                                                  comm)
    totals = np.array([loss_sum, steps, wall - exposed, comm_time, exposed], dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, totals, op=MPI.SUM)
    record = {
        "epoch": epoch + 1, "train_loss": totals[0] / totals[1], "test_accuracy": run.accuracy,
        "samples_per_sec": totals[1] * cfg.batch_size / max(comm.allreduce(wall, op=MPI.MAX), 1e-12),
        "compute_seconds": totals[2] / k, "comm_seconds": totals[3] / k, "exposed_comm_seconds": totals[4] / k,
        "steps": run.pos.global_step, "lr": dopt.param_groups[0]["lr"],
        "wall_seconds": time.perf_counter() - run.started, "train_seconds": run.train_seconds,
        "bytes_sent_per_rank": comm.allreduce(traffic.sent(), op=MPI.SUM) / k,
    }
    if mixed:
        with traffic.uncounted():
            record["replica_drift"] = mixing.replica_drift(dopt.parameter_buffers, comm)
    if dopt.skipped_steps:
        record["skipped_steps"] = len(dopt.skipped_steps)
    run.log.write(record)
    if comm.Get_rank() == 0:
        drift = f"  drift {record['replica_drift']:.2e}" if mixed else ""
        print(f"epoch {epoch + 1:3d}/{cfg.epochs}  loss {record['train_loss']:.4f}  "
              f"test acc {100 * run.accuracy:6.2f}%  {record['samples_per_sec']:9.0f} samples/s  "
              f"compute {record['compute_seconds']:.2f}s  comm {record['comm_seconds']:.2f}s{drift}", flush=True)


def _finish(run: _Run, started: float) -> None:
    cfg, comm, dopt = run.cfg, run.comm, run.dopt
    dopt.finish()  # the parameter server's last updates land everywhere
    if dopt.replicas_differ:
        if dopt.strategy.average_at_end:  # the reported model is the replicas' average (ps: the servers')
            mixing.average_replicas(dopt.parameter_buffers, comm)
        run.accuracy = _evaluate(run.model, run.test, comm)
    elif run.pos.epoch >= cfg.epochs:  # resumed a finished run: no epoch ran, so evaluate the model it holds
        run.accuracy = _evaluate(run.model, run.test, comm)
    digests = comm.allgather(parameters_sha256(dopt.packed_parameters()))
    final = {"final": True, "test_accuracy": run.accuracy, "params_sha256": digests[0],
             "ranks_consistent": all(d == digests[0] for d in digests), "ranks": comm.Get_size(),
             "topology": cfg.topology, "model": cfg.model, "epochs": cfg.epochs, "steps": run.pos.global_step,
             "wall_seconds": comm.allreduce(time.perf_counter() - started, op=MPI.MAX)}
    run.log.write(final)
    if comm.Get_rank() == 0:
        print(f"final: test accuracy {100 * run.accuracy:.2f}%  params sha256 {digests[0][:16]}  "
              f"ranks consistent: {'yes' if final['ranks_consistent'] else 'NO'}", flush=True)


def _train(cfg: Config, dog: watchdog.Watchdog) -> int:
    started = time.perf_counter()
    run = _setup(cfg, dog)
    run.started = started
    if cfg.timeline:
        run.timeline = _open_timeline(cfg.timeline, run.comm)
        run.dopt.timeline = run.timeline
    for epoch in range(run.pos.epoch, cfg.epochs):
        _train_epoch(run, epoch)
    with watchdog.watch("final"):
        _finish(run, started)
    run.timeline.close(run.comm)
    return 0


def _open_timeline(path: str, comm: MPI.Comm) -> Timeline:
    """``--timeline PATH``, checked on every rank before training: a directory, or a file that cannot be
    created, is a UserError (and no rank keeps a file). Later write failures only warn (see Timeline)."""
    k, r = comm.Get_size(), comm.Get_rank()
    opened: list[Timeline] = []

    def open_here() -> Timeline:
        if r == 0 and os.path.isdir(path):
            raise UserError(f"--timeline {path} is a directory; give a file name, e.g. "
                            f"{os.path.join(path, 'trace.json')}")
        mine = rank_path(path, r, k)
        above = os.path.dirname(os.path.abspath(mine))
        while not os.path.lexists(above) and os.path.dirname(above) != above:
            above = os.path.dirname(above)
        if not os.path.isdir(above):
            raise UserError(f"--timeline {path}: {above} is a file, not a directory")
        try:
            opened.append(Timeline(path, rank=r, size=k))
        except OSError as e:
            raise UserError(f"--timeline {path}: cannot write {e.filename or mine} ({e.strerror or e})") from None
        return opened[0]

    try:
        return agree(comm, open_here)
    except UserError:
        for tl in opened:
            tl.close()
            try:
                os.remove(tl.file_path)
            except OSError:
                pass
        raise


def _progress(cfg: Config, master: bool, total: int, done: int, desc: str) -> Any:
    if not (master and cfg.progress and sys.stderr.isatty()):
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=done, desc=desc, leave=False, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return abort_on_exception(lambda: run(parse_args(argv)), prog="mpiml.train")


if __name__ == "__main__":
    sys.exit(main())
