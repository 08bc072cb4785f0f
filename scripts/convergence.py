"""Does K-way training converge like 1-way? Test accuracy against steps, training time and bytes sent.

    python scripts/convergence.py [--ranks 1,2,4,8] [--datasets digits,synthetic] [--strategies ...]
                                  [--epochs 20] [--out out/convergence] [-- extra mpiml.train flags]

For every strategy x K x data set this runs one ``mpiml.train`` job (MLP,
batch 32 per rank, seed 0) and records its per-epoch metrics. Prints a table
of final test accuracy (and the gap to K = 1), writes ``<out>.json`` and
``<out>.csv``, and draws ``<out>-<dataset>.png``: one row per K, accuracy
against optimizer steps, training seconds, and bytes sent per rank. K above
the number of cores is oversubscribed: fine for accuracy, meaningless for
time.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from study_common import DATASETS, STRATEGIES, save_json, train  # noqa: E402


def plot(results: dict, dataset: str, ranks: list[int], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(ranks), 3, figsize=(14, 3.2 * len(ranks)), squeeze=False)
    for row, k in enumerate(ranks):
        for name, by_k in results[dataset].items():
            epochs = [r for r in by_k.get(str(k), []) if not r.get("final")]
            if not epochs:
                continue
            acc = [100 * r["test_accuracy"] for r in epochs]
            for col, key in enumerate(("steps", "train_seconds", "bytes_sent_per_rank")):
                axes[row][col].plot([r[key] for r in epochs], acc, marker=".", label=name)
        for col, label in enumerate(("optimizer steps", "training seconds", "bytes sent per rank")):
            ax = axes[row][col]
            ax.set_xlabel(label)
            ax.set_ylabel(f"test accuracy % (K = {k})")
            ax.grid(True, alpha=0.3)
            if col == 2:
                ax.set_xscale("symlog")
        axes[row][0].legend(fontsize=7)
    fig.suptitle(f"convergence on {dataset}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,2,4,8")
    parser.add_argument("--datasets", default="digits,synthetic")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default="out/convergence")
    parser.add_argument("extra", nargs="*")
    args = parser.parse_args()
    ranks = [int(k) for k in args.ranks.split(",")]
    results: dict = {}
    for dataset in args.datasets.split(","):
        results[dataset] = {}
        for name in args.strategies.split(","):
            results[dataset][name] = {}
            for k in ranks:
                job = STRATEGIES[name] + DATASETS[dataset] + ["--epochs", str(args.epochs), *args.extra]
                results[dataset][name][str(k)] = train(k, job)
                print(f"# {dataset} {name} K={k}: {100 * results[dataset][name][str(k)][-1]['test_accuracy']:.2f}%",
                      flush=True)
    rows = []
    for dataset, by_name in results.items():
        print(f"\n{dataset}: final test accuracy % after {args.epochs} epochs (gap to K = {ranks[0]} of the same "
              "strategy in parentheses)")
        print("| strategy | " + " | ".join(f"K = {k}" for k in ranks) + " |")
        print("|---|" + "---|" * len(ranks))
        for name, by_k in by_name.items():
            base = by_k[str(ranks[0])][-1]["test_accuracy"]
            cells = []
            for k in ranks:
                acc = by_k[str(k)][-1]["test_accuracy"]
                cells.append(f"{100 * acc:.2f}" + (f" ({100 * (acc - base):+.2f})" if k != ranks[0] else ""))
                for r in by_k[str(k)]:
                    if not r.get("final"):
                        rows.append({"dataset": dataset, "strategy": name, "ranks": k, **{
                            key: r[key] for key in ("epoch", "steps", "train_seconds", "bytes_sent_per_rank",
                                                    "test_accuracy", "train_loss")}})
            print(f"| {name} | " + " | ".join(cells) + " |")
        plot(results, dataset, ranks, f"{args.out}-{dataset}.png")
    save_json(args.out + ".json", {"epochs": args.epochs, "extra": args.extra, "results": results})
    with open(args.out + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
