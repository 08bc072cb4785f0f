"""Markdown tables from ``scripts/bench_cluster.py``'s summary.json files (the tables in docs/cluster.md).

    python scripts/cluster_report.py out/cluster/summary.json [out/cluster-acc/summary.json ...] [--plots DIR]

Times to a target accuracy are recomputed from the stored curves with ``bench_cluster.TARGETS``, and
``--plots DIR`` redraws every plot into DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_cluster  # noqa: E402


def allreduce_table(run: dict) -> str:
    records = run["allreduce"]["records"]
    names = [n for n in dict.fromkeys(r["algorithm"] for r in records) if n != "MPI_Allreduce"] + ["MPI_Allreduce"]
    by = {(r["size_bytes"], r["algorithm"]): r for r in records}
    lines = ["| size | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for size in sorted({r["size_bytes"] for r in records}):
        cells = []
        for n in names:
            f = by.get((size, n), {}).get("fraction_of_link_bound")
            cells.append(f"{f:.2f}" if f else "-")
        label = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| algorithm | bytes on the links (largest size, all hosts, both directions) | x cost model |")
    lines.append("|---|---|---|")
    for row in run["allreduce"]["link_bytes"]:
        ratio = f"{row['ratio_to_model']:.3f}" if row["ratio_to_model"] else "(library's own messages)"
        lines.append(f"| `{row['algorithm']}` | {row['link_bytes'] / 1e6:.1f} MB | {ratio} |")
    return "\n".join(lines)


def training_table(run: dict) -> str:
    rows = run["training"]["rows"]
    bound = run["gradient_link_bound_ms"]
    step = {r["method"]: r["step_ms"] for r in rows}
    compute, ddp, ddp16 = step["compute"], step["ddp-gloo"], step.get("ddp-gloo-fp16")
    lines = [f"compute alone {compute:.1f} ms; the gradient's link bound {bound:.1f} ms; "
             f"DDP-gloo {ddp:.1f} ms" + (f"; DDP-gloo with its fp16 hook {ddp16:.1f} ms" if ddp16 else ""), "",
             "| method | step (ms) | exposed comm (ms) | x (compute + bound) | x DDP | x DDP fp16 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        t = r["step_ms"]
        lines.append(f"| {r['method']} | {t:.1f} | {t - compute:.1f} | {t / (compute + bound):.2f} | "
                     f"{t / ddp:.2f} | " + (f"{t / ddp16:.2f}" if ddp16 else "-") + " |")
    return "\n".join(lines)


def accuracy_table(run: dict) -> str:
    lines = []
    for dataset, rows in run["accuracy"].items():
        target = bench_cluster.TARGETS[dataset]
        for r in rows:
            r["target"] = target
            r["seconds_to_target"] = next((p["seconds"] for p in r["curve"] if p["accuracy"] >= target), None)
        lines += [f"{dataset} (target {100 * target:.0f}%):", "",
                  "| strategy | rank K-1 slowed | seconds to target | final accuracy | MB sent per rank |",
                  "|---|---|---|---|---|"]
        for r in rows:
            t = r["seconds_to_target"]
            lines.append(f"| {r['strategy']} | {r['straggler']}x | {'never' if t is None else f'{t:.1f}'} | "
                         f"{100 * r['final_accuracy']:.2f}% | {(r['bytes_sent_per_rank'] or 0) / 1e6:.0f} |")
        lines.append("")
    return "\n".join(lines)


def plots(run: dict, out: str) -> None:
    tag = f"{run['hosts']}x{run['ranks_per_host']}-{run['link']}"
    where = f"{run['hosts']} hosts x {run['ranks_per_host']} ranks, {run['link']} links"
    if "allreduce" in run:
        bench_cluster.plot_allreduce(run["allreduce"], os.path.join(out, f"allreduce-{tag}.png"),
                                     f"allreduce, {where}")
    if "training" in run:
        bench_cluster.plot_training(run["training"], os.path.join(out, f"training-{tag}.png"), f"MLP step, {where}",
                                    run["gradient_link_bound_ms"])
    if "accuracy" in run:
        bench_cluster.plot_accuracy(run["accuracy"], os.path.join(out, f"accuracy-{tag}.png"),
                                    f"time to accuracy, {where}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summaries", nargs="+")
    parser.add_argument("--plots", metavar="DIR", help="redraw the plots into DIR")
    args = parser.parse_args()
    for path in args.summaries:
        with open(path) as f:
            summary = json.load(f)
        for run in summary["runs"]:
            if args.plots:
                os.makedirs(args.plots, exist_ok=True)
                plots(run, args.plots)
            head = (f"### {run['hosts']} hosts x {run['ranks_per_host']} ranks, {run['link']} "
                    f"(measured {run['measured_bps'] / 1e6:.0f} Mbit/s)")
            print(head + "\n")
            if "allreduce" in run:
                print("Allreduce, fraction of the link bound:\n\n" + allreduce_table(run) + "\n")
            if "training" in run:
                print("Training step:\n\n" + training_table(run) + "\n")
            if "accuracy" in run:
                print("Time to accuracy:\n\n" + accuracy_table(run) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
