"""What the node-aware path saves: ``hier`` on buffers inside the shared window (as DistributedOptimizer's
gradient buckets are) against ``hier`` on ordinary buffers (copied in and out), ``ring`` and ``mpi``.

    mpiexec -n 2 python scripts/bench_hier.py [--sizes 64K,1M,4M,16M,64M] [--json out/bench_hier.json]

Each row is timed in turn (median of 3 rounds, slowest rank), float32 mean.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from mpi4py import MPI

from mpiml import collectives
from mpiml.bench import human, parse_size
from mpiml.collectives import hier

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from study_common import save_json  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64K,1M,4M,16M,64M")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    private = collectives.private_comm(comm)
    rows = []
    for size in (parse_size(s) for s in args.sizes.split(",")):
        n = size // 4
        arena = hier.SharedArena(private, size)
        shared = arena.tensor(torch.float32, 0, n)
        shared.copy_(torch.randn(n))
        plain = torch.randn(n)
        cases = {"hier in window": (shared, "hier"), "hier copied": (plain, "hier"), "ring": (plain, "ring"),
                 "mpi": (plain, "mpi")}
        iters = max(3, min(50, (64 << 20) // size))
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.rounds):
            for name, (buf, algorithm) in cases.items():
                collectives.allreduce(buf, op="mean", algorithm=algorithm)
                comm.Barrier()
                start = time.perf_counter()
                for _ in range(iters):
                    collectives.allreduce(buf, op="mean", algorithm=algorithm)
                times[name].append(comm.allreduce((time.perf_counter() - start) / iters, op=MPI.MAX))
        med = {k: statistics.median(v) for k, v in times.items()}
        p = comm.size
        rows.append({"size_bytes": size, **{f"{k} us": 1e6 * v for k, v in med.items()},
                     **{f"{k} busbw": size / v / 1e9 * 2 * (p - 1) / p for k, v in med.items()}})
        if comm.rank == 0:
            print(f"{human(size):>9}  " + "  ".join(f"{k}: {1e6 * v:8.0f} us ({size / v / 1e9 * 2 * (p - 1) / p:5.2f}"
                                                  f" GB/s)" for k, v in med.items()), flush=True)
    if comm.rank == 0:
        save_json(args.json, {"ranks": comm.size, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
