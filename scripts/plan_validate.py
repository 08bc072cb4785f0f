"""How close mpiml.plan's cost model comes to measured allreduces: on the emulated cluster, and on the issue's
16-core one-host figures.

    python scripts/plan_validate.py --calibrate --measure   # as root: fit the models, run the allreduces (~35 min)
    python scripts/plan_validate.py                         # the comparison, from what out/plan holds

``--calibrate`` fits the model in a 2 hosts x 2 ranks emulated cluster per link rate (``python -m
mpiml.bench calibrate-model``: ping-pong across and inside a host, reductions, small allreduces) into
``out/plan/model-RATE.json``. ``--measure`` times every algorithm at 4 KiB .. 16 MiB on every layout and
rate (``scripts/cluster_allreduce.py``, the same runs as docs/cluster.md) into
``out/plan/allreduce-HxL-RATE.json``. The report predicts every measured cell with the model of its rate
(``cores`` set to this machine's core count: every emulated host shares them) and prints, per cell,
measured and predicted time; then the share of cells within the bounds (25% from 1 MiB, 2x below) and
of (size, layout, rate) cells whose fastest algorithm the model names. ``--markdown PATH`` also writes
the tables for docs/scaling-model.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import replace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from mpiml.collectives import costmodel  # noqa: E402
from mpiml.collectives.costmodel import Layout, Machine  # noqa: E402

LAYOUTS = ["2x1", "4x1", "8x1", "2x2", "4x2"]
RATES = ["1gbit", "100mbit"]
SIZES = "4K,64K,256K,1M,4M,16M"
ALGORITHMS = ["mpi", "ring", "tree", "butterfly", "hier"]
BIG = 1 << 20  # from here the bound is 25%, below 2x

# The one-host figures: a 16-core machine, one rank per core, MPICH 5.0.2, MPI_Allreduce busbw in GB/s.
ONE_HOST_BUSBW = {2: [0.58, 3.67, 3.52, 1.69], 4: [0.50, 3.30, 3.33, 1.32], 8: [0.30, 1.40, 1.87, 1.11],
                  16: [0.25, 1.40, 1.91, 0.97]}
ONE_HOST_SIZES = [4 << 10, 256 << 10, 4 << 20, 64 << 20]
# ... and what the issue says of that machine: one core copied at 24 GB/s (read + write), added at 11 GB/s.
ONE_HOST_MACHINE = Machine(alpha=0.0, beta=0.0, alpha_local=3e-6, beta_local=2 / 24e9, gamma=1 / 11e9, beta_mem=0.0,
                           overhead=0.0, call=0.0, cores=0)


def python() -> str:
    return sys.executable


def calibrate(out: str) -> None:
    for rate in RATES:
        path = os.path.join(out, f"model-{rate}.json")
        cmd = [python(), "-m", "mpiml.cluster", "--hosts", "2", "--ranks-per-host", "2", "--link", rate, "--",
               python(), "-m", "mpiml.bench", "calibrate-model", "--output", path]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, stdin=subprocess.DEVNULL)


def measure(out: str) -> None:
    for rate in RATES:
        for layout in LAYOUTS:
            hosts, per_host = layout.split("x")
            path = os.path.join(out, f"allreduce-{layout}-{rate}.json")
            cmd = [python(), "-m", "mpiml.cluster", "--hosts", hosts, "--ranks-per-host", per_host, "--link", rate,
                   "--", python(), os.path.join(HERE, "cluster_allreduce.py"), "--sizes", SIZES, "--algorithms",
                   ",".join(ALGORITHMS), "--no-gloo", "--json", path]
            print("+", " ".join(cmd), flush=True)
            with open(path + ".log", "w") as log:
                subprocess.run(cmd, check=True, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT, timeout=1800)


def load_model(out: str, rate: str) -> Machine | None:
    try:
        with open(os.path.join(out, f"model-{rate}.json")) as f:
            models = json.load(f)["models"]
    except (OSError, KeyError, ValueError):
        return None
    return Machine.from_json(next(iter(models.values())))


def cells(out: str) -> list[dict]:
    """Every measured (layout, rate, size, algorithm) with its prediction."""
    rows = []
    for rate in RATES:
        model = load_model(out, rate)
        if model is None:
            print(f"# no model for {rate} (run --calibrate): skipped")
            continue
        model = replace(model, cores=os.cpu_count() or 1)  # the emulated hosts share this machine's cores
        for layout in LAYOUTS:
            try:
                with open(os.path.join(out, f"allreduce-{layout}-{rate}.json")) as f:
                    measured = json.load(f)["records"]
            except OSError:
                print(f"# no measurements for {layout} at {rate}: skipped")
                continue
            hosts, per_host = (int(x) for x in layout.split("x"))
            shape = Layout(hosts, per_host)
            for r in measured:
                a = r["algorithm"]
                if a not in costmodel.PLANNED or (a == "hier" and per_host == 1):
                    continue
                predicted = costmodel.allreduce_time(r["size_bytes"], a, shape, model)
                rows.append({"layout": layout, "rate": rate, "ranks": shape.size, "size": r["size_bytes"],
                             "algorithm": a, "measured_s": r["time_us"] * 1e-6, "predicted_s": predicted})
    return rows


def human(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def within(row: dict) -> bool:
    ratio = row["predicted_s"] / row["measured_s"]
    return abs(ratio - 1) <= 0.25 if row["size"] >= BIG else 0.5 <= ratio <= 2.0


def summary(rows: list[dict]) -> list[str]:
    lines = []
    big = [r for r in rows if r["size"] >= BIG]
    small = [r for r in rows if r["size"] < BIG]
    if big:
        lines.append(f"- from 1 MiB: {sum(map(within, big))} of {len(big)} predictions within 25% of the measured time")
    if small:
        lines.append(f"- below 1 MiB: {sum(map(within, small))} of {len(small)} within 2x")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["layout"], r["rate"], r["size"]), []).append(r)
    def fastest(g: list[dict], key: str) -> str:
        return min(g, key=lambda r: r[key])["algorithm"]
    agree = sum(1 for g in groups.values() if fastest(g, "measured_s") == fastest(g, "predicted_s"))
    # the model "names the fastest" also when its pick measured within 5% of the fastest (a tie on the machine)
    near = sum(1 for g in groups.values()
               if min(g, key=lambda r: r["predicted_s"])["measured_s"] <= 1.05 * min(r["measured_s"] for r in g))
    if groups:
        lines.append(f"- fastest algorithm named in {agree} of {len(groups)} (size, layout, link) cells; its pick "
                     f"measured within 5% of the fastest in {near} of {len(groups)}")
    for rate in RATES:
        for lo, hi, label in ((BIG, 1 << 62, "from 1 MiB"), (0, BIG, "below 1 MiB")):
            errs = sorted(abs(r["predicted_s"] / r["measured_s"] - 1) for r in rows
                          if r["rate"] == rate and lo <= r["size"] < hi)
            if errs:
                lines.append(f"- {rate}, {label}: median error {errs[len(errs) // 2]:.0%}, worst {errs[-1]:.0%}")
    return lines


def table(rows: list[dict]) -> list[str]:
    lines = []
    for rate in RATES:
        for layout in LAYOUTS:
            here = [r for r in rows if r["rate"] == rate and r["layout"] == layout]
            if not here:
                continue
            algorithms = [a for a in ALGORITHMS if any(r["algorithm"] == a for r in here)]
            lines += ["", f"**{layout} at {rate}** (ms: measured / predicted; * = fastest measured, "
                          "+ = predicted fastest)", "",
                      "| size | " + " | ".join(algorithms) + " |", "|---" * (len(algorithms) + 1) + "|"]
            for size in sorted({r["size"] for r in here}):
                at = {r["algorithm"]: r for r in here if r["size"] == size}
                best_m = min(at.values(), key=lambda r: r["measured_s"])["algorithm"]
                best_p = min(at.values(), key=lambda r: r["predicted_s"])["algorithm"]
                cellv = []
                for a in algorithms:
                    r = at.get(a)
                    if r is None:
                        cellv.append("-")
                        continue
                    mark = ("*" if a == best_m else "") + ("+" if a == best_p else "")
                    flag = "" if within(r) else " (!)"
                    cellv.append(f"{r['measured_s'] * 1e3:.3g} / {r['predicted_s'] * 1e3:.3g}{mark}{flag}")
                lines.append(f"| {human(size)} | " + " | ".join(cellv) + " |")
    return lines


def one_host() -> list[str]:
    """The issue's 16-core figures against the model of that machine (mpi = MPICH's algorithm)."""
    lines = ["", "| K | " + " | ".join(human(s) for s in ONE_HOST_SIZES) + " |", "|---" * 5 + "|"]
    for k, measured in ONE_HOST_BUSBW.items():
        cellv = []
        for size, busbw in zip(ONE_HOST_SIZES, measured):
            t = costmodel.allreduce_time(size, "mpi", Layout(1, k), ONE_HOST_MACHINE)
            predicted = size / t * 2 * (k - 1) / k / 1e9
            cellv.append(f"{busbw:.2f} / {predicted:.2f}")
        lines.append(f"| {k} | " + " | ".join(cellv) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "out", "plan"))
    parser.add_argument("--calibrate", action="store_true", help="fit the model per link rate (root)")
    parser.add_argument("--measure", action="store_true", help="time the allreduces on every layout (root)")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables as markdown")
    parser.add_argument("--json", metavar="PATH", help="also write every cell as JSON")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.calibrate:
        calibrate(args.out)
    if args.measure:
        measure(args.out)
    rows = cells(args.out)
    text = ["## Summary", "", *summary(rows), "", "## Emulated cluster", *table(rows), "",
            "## One host, 16 cores (the issue's figures): MPI_Allreduce busbw in GB/s, measured / predicted",
            *one_host()]
    print("\n".join(text))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(text) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
