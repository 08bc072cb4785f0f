"""Training step time: mpiml against PyTorch DDP (gloo), Horovod (if installed) and compute alone.

    mpiexec -n 2 python scripts/bench_training.py [--steps 30] [--rounds 3] [--json out/bench_training.json]

Every method trains the same model (default: the 784-1024-1024-10 MLP, 1.86M
parameters) on the same random batch (64 per rank) in the same processes,
one thread per rank. Methods take turns for ``--rounds`` rounds of
``--steps`` steps; a method's step time is the median step of all its
rounds, the slowest rank's. ``compute`` is the same step with no
communication at all; "exposed comm" is a method's step time minus that.

Methods: ``compute``; ``ddp-gloo`` (torch DistributedDataParallel over gloo,
its defaults: 25 MiB buckets, overlap); ``mpiml-<topology>-sync`` (gradients
combined after backward, in step()); ``mpiml-<topology>`` (buckets
allreduced on a communication thread during backward); ``horovod`` (when
horovod.torch imports; skipped cleanly otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from typing import Any

import torch
from mpi4py import MPI

import mpiml


def make_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                                   torch.nn.ReLU(), torch.nn.Linear(1024, 10))
    if name == "mlp-small":
        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    raise SystemExit(f"unknown model {name}")


def input_size(name: str) -> int:
    return 64 if name == "mlp-small" else 784


class Method:
    def __init__(self, name: str, model: torch.nn.Module, opt: Any) -> None:
        self.name, self.model, self.opt, self.times = name, model, opt, []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad()
        torch.nn.functional.cross_entropy(self.model(x), y).backward()
        self.opt.step()


class AllreduceAlone(Method):
    """The allreduce of a step's gradients and nothing else: one buffer of the model's size, averaged with
    ``topology`` through mpiml.collectives (the same call path as a step's buckets)."""

    def __init__(self, topology: str, numel: int, comm: MPI.Comm) -> None:
        super().__init__(f"allreduce-{topology}", None, None)
        self.topology, self.comm = topology, comm
        self.buffer = torch.randn(numel, generator=torch.Generator().manual_seed(comm.rank))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        mpiml.collectives.allreduce(self.buffer, op="mean", algorithm=self.topology, comm=self.comm)


def init_gloo(comm: MPI.Comm) -> None:
    """torch.distributed over gloo, meeting at ``MASTER_ADDR`` (set by mpiml.cluster on emulated hosts)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = None
        if comm.rank == 0:
            with socket.socket() as s:
                s.bind((addr, 0))
                port = s.getsockname()[1]
        port = comm.bcast(port)
        dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=comm.rank, world_size=comm.size)


def ddp_method(model_name: str, comm: MPI.Comm, hook: str = "none") -> Method:
    """DDP over gloo with its defaults; ``hook="fp16"`` registers torch's fp16 compression comm hook."""
    init_gloo(comm)
    model = torch.nn.parallel.DistributedDataParallel(make_model(model_name))
    if hook == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    return Method("ddp-gloo" + ("-fp16" if hook == "fp16" else ""), model,
                  torch.optim.SGD(model.parameters(), lr=0.01))


def horovod_method(model_name: str) -> Method | None:
    try:
        import horovod.torch as hvd  # noqa: F401
    except ImportError:
        return None
    hvd.init()
    model = make_model(model_name)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                   named_parameters=model.named_parameters())
    return Method("horovod", model, opt)


def build_methods(args: argparse.Namespace, comm: MPI.Comm) -> list[Method]:
    methods = []
    model = make_model(args.model)
    methods.append(Method("compute", model, torch.optim.SGD(model.parameters(), lr=0.01)))
    if comm.size > 1 and not args.no_ddp:
        methods.append(ddp_method(args.model, comm))
        if args.ddp_fp16:
            methods.append(ddp_method(args.model, comm, "fp16"))
    overlaps = {"both": (False, True), "on": (True,), "off": (False,), "default": (None,)}[args.overlap]
    polls = [None, 0.0] if args.spin_too else [None]
    for topology in args.topologies.split(","):
        for compression in args.compression.split(","):
            for overlap in overlaps:
                for poll in polls:
                    model = make_model(args.model)
                    opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), model,
                                                     topology=topology, overlap=overlap,
                                                     bucket_bytes=args.bucket_bytes, compression=compression,
                                                     poll_interval=poll)
                    suffix = {True: "", False: "-sync", None: "-default"}[overlap] + ("-spin" if poll == 0 else "")
                    methods.append(Method(f"mpiml-{topology}" + ("" if compression == "none" else f"-{compression}")
                                          + suffix, model, opt))
    if comm.size > 1:  # what a step's communication costs on its own, for "step <= compute + allreduce + 0.5 ms"
        numel = sum(p.numel() for p in make_model(args.model).parameters())
        methods += [AllreduceAlone(t, numel, comm) for t in args.topologies.split(",")]
    hvd = horovod_method(args.model)
    if hvd is not None:
        methods.append(hvd)
    elif comm.rank == 0:
        print("# horovod: not installed, skipped", flush=True)
    return methods


def measure(methods: list[Method], x: torch.Tensor, y: torch.Tensor, steps: int, rounds: int, warmup: int,
            comm: MPI.Comm) -> None:
    for _ in range(rounds):
        for m in methods:
            for _ in range(warmup):
                m.step(x, y)
            comm.Barrier()
            for _ in range(steps):
                start = time.perf_counter()
                m.step(x, y)
                m.times.append(time.perf_counter() - start)


def report(methods: list[Method], batch: int, comm: MPI.Comm) -> list[dict[str, Any]]:
    rows = []
    medians = {m.name: comm.allreduce(statistics.median(m.times), op=MPI.MAX) for m in methods}
    compute, ddp = medians["compute"], medians.get("ddp-gloo")
    for m in methods:
        t = medians[m.name]
        rows.append({"method": m.name, "ranks": comm.size, "step_ms": 1e3 * t,
                     "samples_per_sec": batch * comm.size / t, "exposed_comm_ms": 1e3 * (t - compute),
                     "ratio_to_ddp": t / ddp if ddp else None})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mlp", choices=["mlp", "mlp-small"])
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--topologies", default="ring,butterfly")
    parser.add_argument("--bucket-bytes", type=int, default=None,
                        help="default: DistributedOptimizer's (4 MiB with overlap, 64 MiB without)")
    parser.add_argument("--compression", default="none",
                        help="comma-separated list of none, fp16, bf16 (each topology is run with each)")
    parser.add_argument("--overlap", default="both", choices=["both", "on", "off", "default"],
                        help="run each mpiml method with and/or without overlap (default: both; "
                             "'default' lets DistributedOptimizer decide)")
    parser.add_argument("--no-ddp", action="store_true")
    parser.add_argument("--spin-too", action="store_true",
                        help="also each mpiml method with poll_interval=0 (busy-polling waits), suffix -spin")
    parser.add_argument("--ddp-fp16", action="store_true", help="also DDP with torch's fp16 compression hook")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    g = torch.Generator().manual_seed(comm.rank)
    x = torch.randn(args.batch, input_size(args.model), generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    methods = build_methods(args, comm)
    measure(methods, x, y, args.steps, args.rounds, args.warmup, comm)
    rows = report(methods, args.batch, comm)
    if comm.rank == 0:
        print(f"# bench_training: {comm.size} ranks, model {args.model}, batch {args.batch}/rank, "
              f"{args.rounds} rounds x {args.steps} steps (median step, slowest rank); "
              f"{MPI.Get_library_version().splitlines()[0].strip()}; torch {torch.__version__}")
        print(f"{'method':>22} {'step(ms)':>9} {'samples/s':>10} {'exposed comm(ms)':>17} {'x DDP':>7}")
        for r in rows:
            ratio = f"{r['ratio_to_ddp']:.2f}" if r["ratio_to_ddp"] else "-"
            print(f"{r['method']:>22} {r['step_ms']:9.2f} {r['samples_per_sec']:10.0f} {r['exposed_comm_ms']:17.2f} "
                  f"{ratio:>7}")
        by_name = {r["method"]: r for r in rows}
        for r in rows:
            alone = by_name.get("allreduce-" + r["method"].removeprefix("mpiml-").split("-")[0])
            if r["method"].startswith("mpiml-") and alone is not None:
                gap = r["step_ms"] - by_name["compute"]["step_ms"] - alone["step_ms"]
                print(f"# {r['method']}: step - compute - allreduce alone = {gap:+.2f} ms")
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({"meta": {"host": platform.node(), "argv": sys.argv, "ranks": comm.size}, "rows": rows},
                          f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
