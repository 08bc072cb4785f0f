"""Throughput and scaling efficiency of data-parallel training for K = 1, 2, 4, 8, 16 ranks.

    python scripts/bench_scaling.py [--ranks 1,2,4,8,16] [--topology ring] [--json out/bench_scaling.json]
                                    [--png out/bench_scaling.png]

For each K this runs ``mpiexec -n K python scripts/bench_training.py`` (same
model, 64 samples per rank) and reports, in samples per second:
``compute`` (the K ranks skipping communication: what this machine can do
at all), ``mpiml`` (the chosen topology, overlapped), ``ddp-gloo`` (unless
``--no-ddp``), and two efficiencies: mpiml / (K x one rank's compute), the
classic scaling efficiency, and mpiml / compute at the same K, which
separates the cost of communication from the machine's own limits (memory
bandwidth, cores). K above the core count is skipped unless
``--oversubscribe`` (then numbers mean little).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def run_k(k: int, args: argparse.Namespace) -> dict[str, float]:
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "t.json")
        cmd = [mpiexec, "-n", str(k), sys.executable, os.path.join(HERE, "bench_training.py"), "--topologies",
               args.topology, "--steps", str(args.steps), "--rounds", str(args.rounds), "--json", out]
        if args.no_ddp:
            cmd.append("--no-ddp")
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        with open(out) as f:
            rows = json.load(f)["rows"]
    return {r["method"]: r["samples_per_sec"] for r in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,2,4,8,16")
    parser.add_argument("--topology", default="ring")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-ddp", action="store_true")
    parser.add_argument("--oversubscribe", action="store_true", help="also run K above the core count")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--png", metavar="PATH")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    ranks = [k for k in map(int, args.ranks.split(",")) if k <= cores or args.oversubscribe]
    skipped = [k for k in map(int, args.ranks.split(",")) if k not in ranks]
    results = {k: run_k(k, args) for k in ranks}
    base = results[ranks[0]]["compute"] / ranks[0]
    mine = f"mpiml-{args.topology}"
    print(f"# bench_scaling: {cores} cores, topology {args.topology}, MLP 784-1024-1024-10, batch 64/rank"
          + (f"; skipped K = {', '.join(map(str, skipped))} (more ranks than cores)" if skipped else ""))
    print(f"{'K':>3} {'compute/s':>10} {'mpiml/s':>10} {'ddp/s':>10} {'eff vs K x 1':>13} {'mpiml/compute':>14}")
    table = []
    for k in ranks:
        r = results[k]
        row = {"ranks": k, "compute": r["compute"], "mpiml": r[mine], "ddp": r.get("ddp-gloo"),
               "efficiency": r[mine] / (k * base), "fraction_of_compute": r[mine] / r["compute"]}
        table.append(row)
        ddp = f"{row['ddp']:10.0f}" if row["ddp"] else f"{'-':>10}"
        print(f"{k:>3} {row['compute']:10.0f} {row['mpiml']:10.0f} {ddp} {row['efficiency']:13.2f} "
              f"{row['fraction_of_compute']:14.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"cores": cores, "topology": args.topology, "rows": table}, f, indent=1)
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        ks = [r["ranks"] for r in table]
        for key, label in (("compute", "compute only"), ("mpiml", f"mpiml {args.topology}"), ("ddp", "DDP gloo")):
            if all(r[key] for r in table):
                ax.plot(ks, [r[key] for r in table], marker="o", label=label)
        ax.plot(ks, [k * base for k in ks], linestyle=":", color="grey", label="K x one rank")
        ax.set_xlabel("ranks K")
        ax.set_ylabel("samples/s")
        ax.legend()
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
