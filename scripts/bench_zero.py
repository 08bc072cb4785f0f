"""ZeRO-1 (``zero=True``) against replicated optimizer state: state bytes, peak RSS and step time per rank.

    .venv/bin/python scripts/bench_zero.py [--ranks 2,3,4] [--steps 3] [--json out/bench_zero.json]

For each K in ``--ranks`` the script launches, one after the other,
``mpiexec -n K python scripts/bench_zero.py --child full``, ``... --child
zero`` and ``... --child full1``: the same model (an MLP 1024-4096-4096-10, 21.0M float32 parameters,
seed 0), Adam (lr 1e-3), ``DistributedOptimizer(topology="ring")`` with
``zero=False`` (``full``: the defaults, 4 MiB gradient buckets), ``zero=True``
(``zero``) or ``zero=False`` with one bucket holding every gradient
(``full1``: ``bucket_bytes`` = the model's bytes), ``--steps`` steps on random data (batch 16
per rank, seeded by rank and step, so both configurations see the same
batches). Each configuration runs in fresh processes because peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``) never decreases.

Per configuration it reports the slowest/largest rank's

* optimizer-state bytes (``mpiml.sharding.state_bytes`` on ``opt.optimizer``
  for ``full``, on ``opt.strategy.shard`` for ``zero``), and for ``zero`` the
  ratio to full/K (the target is <= 1.1);
* peak RSS;
* step time (mean of the steps after the first; one torch thread per rank).
  On a machine with fewer cores than ranks the ranks are oversubscribed and
  the times mean nothing;

and whether the final parameters of ``full`` and ``zero`` are bitwise equal
(sha256 of ``opt.parameter_buffers``, identical on every rank), and those of
``full1`` and ``zero``. ``full1`` is there because synchronous ring allreduces
each 4 MiB bucket on its own: its ring chunks, hence the order in which the
ranks' gradients are summed at each element, differ from those of ZeRO's one
reduce-scatter of the whole buffer, so for K >= 3 (where the order of a
floating-point sum matters) ``full`` and ``zero`` differ in the last bits;
with one bucket they are bitwise equal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

IN, HIDDEN, OUT, BATCH = 1024, 4096, 10, 16


def make_model() -> Any:
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN),
                               torch.nn.ReLU(), torch.nn.Linear(HIDDEN, OUT))


def child(config: str, steps: int, out: str) -> int:
    """One configuration in this MPI job: rank 0 writes every rank's measurements to ``out``."""
    import hashlib
    import resource
    import time

    import torch
    from mpi4py import MPI

    import mpiml
    from mpiml.sharding import state_bytes

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    rank, k = comm.Get_rank(), comm.Get_size()
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = make_model()
    n_params = sum(p.numel() for p in model.parameters())
    kw: dict[str, Any] = {"zero": True} if config == "zero" else {}
    if config == "full1":
        kw["bucket_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = mpiml.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), model, topology="ring",
                                     **kw)
    times = []
    for step in range(steps):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(BATCH, IN, generator=g), torch.randint(0, OUT, (BATCH,), generator=g)
        comm.Barrier()
        started = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - started)
    comm.Barrier()
    held = state_bytes(opt.strategy.shard if config == "zero" else opt.optimizer)
    sha = hashlib.sha256()
    for buf in opt.parameter_buffers:
        sha.update(buf.detach().contiguous().numpy().tobytes())
    mine = {"rank": rank, "state_bytes": held, "rss_start_kib": rss_start,
            "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "step_seconds": times, "sha256": sha.hexdigest()}
    everyone = comm.gather(mine, root=0)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"config": config, "ranks": k, "params": n_params, "steps": steps, "per_rank": everyone}, f)
    return 0


def launch(k: int, config: str, steps: int) -> dict[str, Any]:
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = [mpiexec, "-n", str(k), sys.executable, os.path.abspath(__file__), "--child", config,
               "--steps", str(steps), "--out", out]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        with open(out) as f:
            return json.load(f)


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    per = run["per_rank"]
    later = [r["step_seconds"][1:] or r["step_seconds"] for r in per]
    hashes = {r["sha256"] for r in per}
    return {"state_bytes_max": max(r["state_bytes"] for r in per),
            "state_bytes_per_rank": [r["state_bytes"] for r in per],
            "peak_rss_mib_max": max(r["peak_rss_kib"] for r in per) / 1024,
            "peak_rss_mib_per_rank": [round(r["peak_rss_kib"] / 1024, 1) for r in per],
            "step_seconds_max": max(sum(t) / len(t) for t in later),
            "ranks_agree": len(hashes) == 1, "sha256": per[0]["sha256"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="2,3,4", help="comma-separated rank counts K (default 2,3,4)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--child", choices=["full", "zero", "full1"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    if args.child:
        return child(args.child, args.steps, args.out)

    cores = os.cpu_count() or 1
    rows = []
    for k in [int(x) for x in args.ranks.split(",")]:
        runs = {c: launch(k, c, args.steps) for c in ("full", "zero", "full1")}
        params = runs["full"]["params"]
        full, zero, full1 = summarise(runs["full"]), summarise(runs["zero"]), summarise(runs["full1"])
        rows.append({"ranks": k, "full": full, "zero": zero, "full1": full1,
                     "ratio_to_full_over_k": zero["state_bytes_max"] / (full["state_bytes_max"] / k),
                     "bitwise_equal": full["sha256"] == zero["sha256"] and full["ranks_agree"]
                     and zero["ranks_agree"],
                     "bitwise_equal_one_bucket": full1["sha256"] == zero["sha256"] and full1["ranks_agree"]
                     and zero["ranks_agree"], "oversubscribed": k > cores})
        r = rows[-1]
        print(f"K={k}: final parameters sha256: full {full['sha256'][:16]}, zero {zero['sha256'][:16]}, "
              f"full1 {full1['sha256'][:16]}; full vs zero: {'bitwise equal' if r['bitwise_equal'] else 'DIFFER'}"
              f", full1 vs zero: {'bitwise equal' if r['bitwise_equal_one_bucket'] else 'DIFFER'}", flush=True)

    mib = 1024 * 1024
    print()
    print(f"Adam, MLP {IN}-{HIDDEN}-{HIDDEN}-{OUT} ({params / 1e6:.2f}M parameters), topology ring, "
          f"batch {BATCH} per rank, {args.steps} steps; {cores} cores, load average {os.getloadavg()[0]:.1f}")
    print()
    print("| K | state/rank full (MiB) | state/rank zero (MiB) | zero / (full/K) | peak RSS full (MiB) "
          "| peak RSS zero (MiB) | step full (s) | step zero (s) | params full = zero | params full1 = zero |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f, z = r["full"], r["zero"]
        note = " (oversubscribed)" if r["oversubscribed"] else ""
        print(f"| {r['ranks']} | {f['state_bytes_max'] / mib:.1f} | {z['state_bytes_max'] / mib:.1f} "
              f"| {r['ratio_to_full_over_k']:.3f} | {f['peak_rss_mib_max']:.0f} | {z['peak_rss_mib_max']:.0f} "
              f"| {f['step_seconds_max']:.3f}{note} | {z['step_seconds_max']:.3f}{note} "
              f"| {'yes' if r['bitwise_equal'] else 'NO'} | {'yes' if r['bitwise_equal_one_bucket'] else 'NO'} |")
    if any(r["oversubscribed"] for r in rows):
        print(f"\nMore ranks than the {cores} cores: step times are not meaningful.")
    print("Step time: mean of the steps after the first, slowest rank; state and RSS: the largest rank's.")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"model": f"mlp {IN}-{HIDDEN}-{HIDDEN}-{OUT}", "params": params, "optimizer": "adam",
                       "batch": BATCH, "steps": args.steps, "cores": cores, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
