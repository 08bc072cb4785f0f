"""What mpiml.plan's model predicts up to 1,024 ranks: the figures and tables of docs/scaling-model.md.

    python scripts/plan_scaling.py --out docs/img/plan --json out/plan/scaling.json

The machine: this project's calibrated model (``--calibration``, default: auto's file, else the built-in
one) with the network replaced by ``--link`` and ``--latency`` (default 10 Gbit/s, 5 us: a commodity
cluster). Three studies:

1. **Crossovers**: one rank per host, K = 2 .. 1024, messages 4 KiB .. 1 GiB: the predicted-fastest of
   mpi, ring, tree and butterfly per cell, and busbw against K at four sizes.
2. **hier at 8 ranks per host**: 1 .. 128 hosts of 8 ranks, 64 MiB: hier against the flat ring, the
   library's node-aware Allreduce and butterfly.
3. **When compression pays**: synchronous SGD on a 100 MB model with 50 ms of compute, K = 64 (8 hosts x
   8), link rates 1 .. 400 Gbit/s: the step with fp16 on the wire against without, for ring and hier.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mpiml import plan  # noqa: E402
from mpiml.collectives.costmodel import Layout, allreduce_time  # noqa: E402

KS = [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
SIZES = [4 << 10 << (2 * i) for i in range(10)]  # 4 KiB .. 1 GiB
FLAT = ["mpi", "ring", "tree", "butterfly"]
RATES_GBIT = [1, 10, 25, 100, 400]


def human(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n // scale} {unit}"
    return f"{n} B"


def busbw(size: int, seconds: float, k: int) -> float:
    return size / seconds * 2 * (k - 1) / k / 1e9


def crossovers(m: plan.Machine) -> dict:
    times = {}
    for k in KS:
        for size in SIZES:
            for a in FLAT:
                times[f"{k},{size},{a}"] = allreduce_time(size, a, Layout(k, 1), m)
        print(f"# crossovers: K = {k} done", flush=True)
    return times


def hier_study(m: plan.Machine, size: int = 64 << 20) -> dict:
    out = {}
    for hosts in [1, 2, 4, 8, 16, 32, 64, 128]:
        for a in ["hier", "ring", "mpi", "butterfly"]:
            out[f"{hosts},{a}"] = allreduce_time(size, a, Layout(hosts, 8), m)
    return out


def compression_study(m: plan.Machine, nbytes: int = 100_000_000, compute: float = 0.05) -> dict:
    out = {}
    layout = Layout(8, 8)
    for rate in RATES_GBIT:
        machine = replace(m, beta=8 / (rate * 1e9))
        costs = plan.StepCosts(layout, machine, nbytes, compute)
        for a in ["ring", "hier"]:
            out[f"{rate},{a}"] = compute + costs.allreduce(nbytes, a)
            out[f"{rate},{a},fp16"] = compute + costs.convert(nbytes) + costs.allreduce(nbytes // 2, a)
    return out


def tables(data: dict) -> str:
    t = data["crossovers"]
    lines = ["Fastest predicted algorithm, one rank per host (rows K, columns message size):", "",
             "| K | " + " | ".join(human(s) for s in SIZES) + " |", "|---" * (len(SIZES) + 1) + "|"]
    for k in KS:
        lines.append(f"| {k} | " + " | ".join(min(FLAT, key=lambda a: t[f"{k},{s},{a}"]) for s in SIZES) + " |")
    lines += ["", "Predicted busbw (GB/s) at 64 MiB, one rank per host:", "",
              "| K | " + " | ".join(FLAT) + " |", "|---" * (len(FLAT) + 1) + "|"]
    for k in KS:
        lines.append(f"| {k} | " + " | ".join(f"{busbw(64 << 20, t[f'{k},{64 << 20},{a}'], k):.2f}" for a in FLAT)
                     + " |")
    h = data["hier"]
    lines += ["", "64 MiB at 8 ranks per host, predicted ms (busbw GB/s):", "",
              "| hosts | K | hier | ring | mpi | butterfly |", "|---|---|---|---|---|---|"]
    for hosts in [1, 2, 4, 8, 16, 32, 64, 128]:
        k = hosts * 8
        lines.append(f"| {hosts} | {k} | " + " | ".join(
            f"{h[f'{hosts},{a}'] * 1e3:.1f} ({busbw(64 << 20, h[f'{hosts},{a}'], k):.2f})"
            for a in ["hier", "ring", "mpi", "butterfly"]) + " |")
    c = data["compression"]
    lines += ["", "Synchronous SGD step, 100 MB of gradients, 50 ms compute, 8 hosts x 8 ranks, predicted ms:", "",
              "| link | ring | ring fp16 | hier | hier fp16 | fp16 pays? |", "|---|---|---|---|---|---|"]
    for rate in RATES_GBIT:
        best, best16 = min(c[f"{rate},ring"], c[f"{rate},hier"]), min(c[f"{rate},ring,fp16"], c[f"{rate},hier,fp16"])
        lines.append(f"| {rate} Gbit/s | {c[f'{rate},ring'] * 1e3:.1f} | {c[f'{rate},ring,fp16'] * 1e3:.1f} | "
                     f"{c[f'{rate},hier'] * 1e3:.1f} | {c[f'{rate},hier,fp16'] * 1e3:.1f} | "
                     f"{'yes' if best16 < best else 'no'} ({best16 / best:.2f}x) |")
    return "\n".join(lines)


def plots(data: dict, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out, exist_ok=True)
    t = data["crossovers"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = {"mpi": "tab:gray", "ring": "tab:blue", "tree": "tab:green", "butterfly": "tab:orange"}
    for i, k in enumerate(KS):
        for j, s in enumerate(SIZES):
            a = min(FLAT, key=lambda a: t[f"{k},{s},{a}"])
            ax.add_patch(plt.Rectangle((j, i), 1, 1, color=colors[a]))
            ax.text(j + 0.5, i + 0.5, a[:4], ha="center", va="center", fontsize=7)
    ax.set_xlim(0, len(SIZES))
    ax.set_ylim(0, len(KS))
    ax.set_xticks([j + 0.5 for j in range(len(SIZES))], [human(s) for s in SIZES], rotation=45)
    ax.set_yticks([i + 0.5 for i in range(len(KS))], [str(k) for k in KS])
    ax.set_xlabel("message")
    ax.set_ylabel("K (one rank per host)")
    ax.set_title(f"predicted fastest allreduce ({data['machine_label']})")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "crossover.png"), dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6), sharey=False)
    for ax, s in zip(axes, [64 << 10, 1 << 20, 16 << 20, 256 << 20]):
        for a in FLAT:
            ax.plot(KS, [busbw(s, t[f"{k},{s},{a}"], k) for k in KS], marker="o", label=a, color=colors[a])
        ax.set_xscale("log", base=2)
        ax.set_title(human(s))
        ax.set_xlabel("K")
    axes[0].set_ylabel("predicted busbw (GB/s)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "busbw-vs-k.png"), dpi=110)
    plt.close(fig)
    h = data["hier"]
    fig, ax = plt.subplots(figsize=(6, 4))
    hosts = [1, 2, 4, 8, 16, 32, 64, 128]
    for a in ["hier", "ring", "mpi", "butterfly"]:
        ax.plot([x * 8 for x in hosts], [busbw(64 << 20, h[f"{x},{a}"], x * 8) for x in hosts], marker="o", label=a)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (8 ranks per host)")
    ax.set_ylabel("predicted busbw (GB/s), 64 MiB")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "hier.png"), dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration", metavar="PATH")
    parser.add_argument("--link", default="10gbit")
    parser.add_argument("--latency", default="5us")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "img", "plan"))
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args()
    from mpiml.cluster import parse_rate
    m, source = plan.load_machine(args.calibration)
    m = replace(m, beta=8 / parse_rate(args.link), alpha=plan.parse_duration(args.latency), cores=0)
    started = time.perf_counter()
    data = {"machine": m.to_json(), "source": source,
            "machine_label": f"{args.link}, {args.latency}; the rest from {source.split(' (')[0]}",
            "crossovers": crossovers(m), "hier": hier_study(m), "compression": compression_study(m)}
    data["seconds"] = time.perf_counter() - started
    print(tables(data))
    print(f"\n# {len(data['crossovers']) + len(data['hier']) + len(data['compression'])} predictions in "
          f"{data['seconds']:.0f} s; machine: {m}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    if not args.no_plots:
        plots(data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
