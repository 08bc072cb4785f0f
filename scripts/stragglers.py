"""What does one slow rank do to each strategy? Throughput and time to a target accuracy.

    python scripts/stragglers.py [--ranks 4] [--factors 1,2,4] [--strategies ...] [--target 0.95]
                                 [--epochs 12] [--out out/stragglers] [-- extra mpiml.train flags]

Rank K-1 is slowed with ``--straggler K-1:FACTOR`` (it sleeps FACTOR-1 times
its compute time each step). For each strategy and factor this reports the
median samples/s over epochs 2.. (all ranks' samples), and the training
seconds until test accuracy first reaches the target. Writes
``<out>.json`` and a bar chart ``<out>.png``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from study_common import STRATEGIES, save_json, time_to, train  # noqa: E402

DEFAULT = "ring,butterfly-mixing,local-sgd-H4,ps-S4,ps-async"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--factors", default="1,2,4")
    parser.add_argument("--strategies", default=DEFAULT)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out", default="out/stragglers")
    parser.add_argument("extra", nargs="*", help="flags passed to mpiml.train (after --)")
    args = parser.parse_args()
    factors = [float(f) for f in args.factors.split(",")]
    names = args.strategies.split(",")
    table: dict = {}
    for name in names:
        for factor in factors:
            extra = ["--straggler", f"{args.ranks - 1}:{factor:g}"] if factor > 1 else []
            records = train(args.ranks, STRATEGIES[name] + ["--epochs", str(args.epochs), *args.extra] + extra)
            epochs = [r for r in records if not r.get("final")]
            table[(name, factor)] = {
                "samples_per_sec": statistics.median(r["samples_per_sec"] for r in epochs[1:] or epochs),
                "time_to_target": time_to(records, args.target),
                "final_accuracy": records[-1]["test_accuracy"],
            }
            print(f"# {name} x{factor:g}: {table[(name, factor)]}", flush=True)
    print(f"\n{args.ranks} ranks, rank {args.ranks - 1} slowed by the factor; samples/s (median epoch) / training "
          f"seconds to {100 * args.target:.0f}% test accuracy / final accuracy")
    print("| strategy | " + " | ".join(f"x{f:g}" for f in factors) + " |")
    print("|---|" + "---|" * len(factors))
    for name in names:
        cells = []
        for f in factors:
            row = table[(name, f)]
            ttt = f"{row['time_to_target']:.1f} s" if row["time_to_target"] is not None else "never"
            cells.append(f"{row['samples_per_sec']:.0f} / {ttt} / {100 * row['final_accuracy']:.1f}%")
        print(f"| {name} | " + " | ".join(cells) + " |")
    save_json(args.out + ".json", {"ranks": args.ranks, "target": args.target, "epochs": args.epochs,
                                   "rows": [{"strategy": n, "factor": f, **v} for (n, f), v in table.items()]})
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(factors)
    for i, f in enumerate(factors):
        ax.bar([j + i * width for j in range(len(names))], [table[(n, f)]["samples_per_sec"] for n in names],
               width, label=f"straggler x{f:g}")
    ax.set_xticks([j + width * (len(factors) - 1) / 2 for j in range(len(names))], names, rotation=15)
    ax.set_ylabel("samples/s (all ranks)")
    ax.set_title(f"one slow rank out of {args.ranks}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
