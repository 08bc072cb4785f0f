"""Sweep the pipelining knobs of ring, tree and butterfly and print busbw for each setting.

    mpiexec -n 2 python scripts/tune_chunks.py [--algorithm ring] [--sizes 1M,4M,64M] [--chunks 64K,128K,256K,512K]
                                               [--depths 2,4] [--windows 1,4,16]

The module constants it varies (``CHUNK_BYTES``, ``DEPTH``, ring's
``WINDOW``) are the defaults the algorithms ship with; this is how they were
chosen (README, "Tuning"). Settings take turns within each round; the median
of the rounds is printed, the slowest rank's.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

from mpiml import collectives
from mpiml.bench import human, parse_size
from mpiml.collectives import butterfly, ring, tree

MODULES = {"ring": ring, "tree": tree, "butterfly": butterfly}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithm", default="ring", choices=list(MODULES))
    parser.add_argument("--sizes", default="1M,4M,64M")
    parser.add_argument("--chunks", default="64K,128K,256K,512K,1M")
    parser.add_argument("--depths", default="2,3,4")
    parser.add_argument("--windows", default="1,4,16", help="ring only")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    comm, module = MPI.COMM_WORLD, MODULES[args.algorithm]
    windows = [int(w) for w in args.windows.split(",")] if args.algorithm == "ring" else [None]
    settings = list(itertools.product([parse_size(c) for c in args.chunks.split(",")],
                                      [int(d) for d in args.depths.split(",")], windows))
    p = comm.Get_size()
    for size in (parse_size(s) for s in args.sizes.split(",")):
        x = np.random.default_rng(comm.rank).standard_normal(size // 4).astype(np.float32)
        iters = max(2, min(20, (64 << 20) // size))
        times: dict[tuple, list[float]] = {s: [] for s in settings}
        for _ in range(args.rounds):
            for chunk, depth, window in settings:
                module.CHUNK_BYTES, module.DEPTH = chunk, depth
                if window is not None:
                    module.WINDOW = window
                collectives.allreduce(x, algorithm=args.algorithm)
                comm.Barrier()
                start = time.perf_counter()
                for _ in range(iters):
                    collectives.allreduce(x, algorithm=args.algorithm)
                t = comm.allreduce((time.perf_counter() - start) / iters, op=MPI.MAX)
                times[(chunk, depth, window)].append(t)
        if comm.rank == 0:
            print(f"# {args.algorithm}, {p} ranks, {human(size)}: busbw GB/s per (chunk, depth, window)")
            ranked = sorted(settings, key=lambda s: statistics.median(times[s]))
            for s in ranked:
                busbw = size / statistics.median(times[s]) / 1e9 * 2 * (p - 1) / max(p, 1)
                print(f"  chunk {human(s[0]):>8}  depth {s[1]}  window {s[2] if s[2] else '-':>3}  {busbw:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
