"""Final test accuracy of ``python -m mpiml.train`` for every topology and rank count, as a table.

    .venv/bin/python scripts/accuracy_table.py [--ranks 1,2,4] [--epochs 20] [--json out/accuracy.json]
                                               [-- extra train flags]

Each cell is one run of ``mpiexec -n K python -m mpiml.train --topology T`` with
the defaults (MLP on digits, batch 32 per rank, lr 0.05, seed 0) plus any
extra flags after ``--``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile


def registered_topologies() -> list[str]:
    """Every ``--topology`` name, from the strategy registry (``mpiml.strategies.TOPOLOGIES``).

    MPI is not initialised in this process: it only launches ``mpiexec``."""
    import mpi4py
    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = False
    from mpiml.strategies import TOPOLOGIES
    return list(TOPOLOGIES)


def run_one(ranks: int, topology: str, epochs: int, extra: list[str]) -> dict:
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.jsonl")
        cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "mpiml.train", "--topology", topology,
               "--epochs", str(epochs), "--metrics", metrics, "--no-progress", *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr}")
        with open(metrics) as f:
            return json.loads(f.read().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--topologies", default=None,
                        help="comma-separated; default: every registered topology (mpiml.strategies.TOPOLOGIES)")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("extra", nargs="*", help="flags passed to mpiml.train (after --)")
    args = parser.parse_args()
    ranks = [int(k) for k in args.ranks.split(",")]
    topologies = args.topologies.split(",") if args.topologies else registered_topologies()
    results = {t: {k: run_one(k, t, args.epochs, args.extra) for k in ranks} for t in topologies}
    print("| topology | " + " | ".join(f"K = {k}" for k in ranks) + " |")
    print("|---|" + "---|" * len(ranks))
    for t in topologies:
        cells = [f"{100 * results[t][k]['test_accuracy']:.2f}%" + ("" if results[t][k]["ranks_consistent"] else " (!)")
                 for k in ranks]
        print(f"| {t} | " + " | ".join(cells) + " |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"epochs": args.epochs, "extra": args.extra, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
