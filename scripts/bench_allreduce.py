"""Allreduce busbw per size and algorithm, against MPI's own and torch.distributed's gloo, in the same processes.

    mpiexec -n 2 python scripts/bench_allreduce.py [--sizes 4K,64K,1M,4M,16M,64M] [--json out/bench_allreduce.json]
                                                   [--png out/bench_allreduce.png]

Rows are timed in turn within each size (see ``python -m mpiml.bench``); the
``gloo`` row is ``torch.distributed.all_reduce`` on a tensor sharing the same
memory, after ``init_process_group("gloo")`` over TCP on this host.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

from mpi4py import MPI

from mpiml.bench import allreduce_table, format_table, parse_size
from mpiml.collectives import ALGORITHMS


def gloo_allreduce(comm: MPI.Comm):
    import torch
    import torch.distributed as dist
    port = None
    if comm.rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{comm.bcast(port)}", rank=comm.rank,
                            world_size=comm.size)
    return lambda buf: dist.all_reduce(torch.from_numpy(buf))


def plot(records: list[dict], path: str, ranks: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["algorithm"] for r in records):
        rows = [r for r in records if r["algorithm"] == name]
        ax.plot([r["size_bytes"] for r in rows], [r["busbw_GBps"] for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("busbw (GB/s)")
    ax.set_title(f"allreduce, {ranks} ranks, float32 sum")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4K,64K,1M,4M,16M,64M")
    parser.add_argument("--algorithms", default="mpi,ring,tree,butterfly,hier,auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--no-gloo", action="store_true")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--png", metavar="PATH")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    algorithms = [a for a in args.algorithms.split(",") if a in ALGORITHMS]
    extra = {} if args.no_gloo or comm.size == 1 else {"gloo": gloo_allreduce(comm)}
    records = allreduce_table([parse_size(s) for s in args.sizes.split(",")], algorithms, rounds=args.rounds,
                              iters=args.iters, comm=comm, extra=extra)
    by = {(r["size_bytes"], r["algorithm"]): r for r in records}
    for r in records:
        gloo = by.get((r["size_bytes"], "gloo"))
        r["ratio_to_gloo"] = gloo["time_us"] / r["time_us"] if gloo else None
    if comm.rank == 0:
        print(f"# bench_allreduce: {comm.size} ranks; {MPI.Get_library_version().splitlines()[0].strip()}")
        print(format_table(records, ratios=(("x gloo", "ratio_to_gloo"),)))
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump({"ranks": comm.size, "argv": sys.argv, "records": records}, f, indent=1)
        if args.png:
            plot(records, args.png, comm.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
