"""``python -m mpiml.plan``: predict collectives and training steps on a cluster you do not have.

    python -m mpiml.plan --hosts 128 --ranks-per-host 8 --link 10gbit --latency 5us \\
        --model-bytes 100M --compute-ms 50

It prints, for each algorithm, the predicted allreduce time of ``--model-bytes`` and, for each strategy
(synchronous SGD over every algorithm, with and without overlap and fp16 on the wire, ZeRO, local SGD,
butterfly mixing, the parameter server), the predicted step time and scaling efficiency (compute / step).

The times come from ``mpiml.collectives.costmodel``: a discrete-event replay of the very schedules the
algorithms run, on a machine described by a few parameters (``Machine``) that ``python -m mpiml.bench
calibrate-model`` fits where it runs and saves beside ``auto``'s table. ``--link`` and ``--latency``
replace the network's; everything else (per-message software cost, reductions, copies inside a host)
comes from the calibrated model, or the built-in one measured on this project's 2-core VM. Each
strategy prices its own step (``Strategy.plan_step``) from the primitives of ``StepCosts``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

from .collectives._schedule import FINAL, REDUCE, Schedule, Step
from .collectives.costmodel import (
    DEFAULT_MACHINE,
    PLANNED,
    Layout,
    Machine,
    PlanError,
    allreduce_time,
    candidates,
    replay_or_refuse,
    rotate,
    xor,
)

__all__ = ["Machine", "Layout", "allreduce_time", "step_costs", "StepCosts", "load_machine", "main", "PlanError",
           "DEFAULT_MACHINE", "PLANNED"]


# ------------------------------------------------------------------------------------------ training steps

class StepCosts:
    """What a strategy's step costs on a layout: the primitives ``Strategy.plan_step`` combines.

    ``compute`` is forward plus backward of one step (seconds), of which ``backward`` is the part
    gradients become ready in (for overlap); ``nbytes`` the model's parameters or gradients."""

    def __init__(self, layout: Layout, m: Machine, nbytes: int, compute: float, backward_fraction: float = 2 / 3,
                 itemsize: int = 4) -> None:
        self.layout, self.m, self.nbytes, self.compute = layout, m, nbytes, compute
        self.backward = compute * backward_fraction
        self.itemsize = itemsize

    def allreduce(self, nbytes: int, algorithm: str) -> float:
        return allreduce_time(nbytes, algorithm, self.layout, self.m, self.itemsize)

    def overlapped(self, algorithm: str, bucket_bytes: int) -> float:
        """Step time when buckets of ``bucket_bytes`` are combined during backward, one after the other."""
        count = max(1, math.ceil(self.nbytes / bucket_bytes))
        each = self.allreduce(math.ceil(self.nbytes / count), algorithm)
        forward = self.compute - self.backward
        t = 0.0
        for i in range(count):
            t = max(t, forward + self.backward * (i + 1) / count) + each
        return max(t, self.compute)

    def exchange(self, nbytes: int, partner: Callable[[int], int | None]) -> float:
        """Every rank swaps ``nbytes`` with ``partner(rank)`` (None: sits out) and averages."""
        layout, n = self.layout, max(1, nbytes // self.itemsize)

        def schedule(r: int) -> Schedule:
            q = partner(r)
            return Schedule([] if q is None else [Step(q, 0, n, q, 0, n, REDUCE | FINAL)], 1)
        return replay_or_refuse(layout, self.m, self.itemsize, schedule, xor(layout), "an exchange")

    def alltoall(self, nbytes: int, reduce: bool) -> float:
        """Every rank sends 1/K of ``nbytes`` to every other (a parameter server's pushes or pulls)."""
        layout, p = self.layout, self.layout.size
        n = max(1, nbytes // self.itemsize // p)

        def schedule(r: int) -> Schedule:
            return Schedule([Step((r + i) % p, 0, n, (r - i) % p, 0, n, REDUCE if reduce else 0)
                             for i in range(1, p)], 2)
        return replay_or_refuse(layout, self.m, self.itemsize, schedule, rotate(layout), "an all-to-all")

    def convert(self, nbytes: int) -> float:
        """Compressing to 16 bits and back: two passes over the buffer at one core's copy speed."""
        return 2 * nbytes * self.m.beta_local


def step_costs(layout: Layout, m: Machine, nbytes: int, compute: float, algorithms: list[str] | None = None,
               ) -> list[dict[str, Any]]:
    """Predicted step time of every strategy (and every exact algorithm for synchronous SGD)."""
    from .strategies import STRATEGIES
    costs = StepCosts(layout, m, nbytes, compute)
    rows = []
    for cls in STRATEGIES.values():
        for label, seconds in cls.plan_step(costs, algorithms or candidates(layout)):
            rows.append({"method": label, "step_s": seconds, "efficiency": compute / seconds if seconds else 1.0})
    return rows


# ----------------------------------------------------------------------------------------------- the CLI

_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def parse_duration(text: str) -> float:
    t = text.strip().lower()
    for unit in sorted(_TIME_UNITS, key=len, reverse=True):
        if t.endswith(unit):
            try:
                value = float(t[: -len(unit)]) * _TIME_UNITS[unit]
            except ValueError:
                break
            if value < 0:
                break
            return value
    raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 5us, 0.2ms)")


def load_machine(path: str | None = None, key: str | None = None) -> tuple[Machine, str]:
    """The calibrated model saved beside ``auto``'s table (``key``: a layout, else any), or the built-in one."""
    from .collectives import auto
    path = path or auto.calibration_path()
    try:
        with open(path) as f:
            models = json.load(f).get("models", {})
    except (OSError, ValueError, AttributeError):
        models = {}
    if isinstance(models, dict) and models:
        name = key if key in models else sorted(models)[0]
        try:
            return Machine.from_json(models[name]), f"{path} ({name})"
        except (TypeError, ValueError):
            pass
    return DEFAULT_MACHINE, "built-in (this project's 2-core VM)"


def _parser() -> argparse.ArgumentParser:
    from .bench import parse_size
    from .cluster import parse_rate
    parser = argparse.ArgumentParser(prog="python -m mpiml.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=1)
    parser.add_argument("--ranks-per-host", type=int, default=1)
    parser.add_argument("--link", type=lambda s: _wrap(parse_rate, s), help="each host's link rate, e.g. 10gbit "
                        "(default: the calibrated model's)")
    parser.add_argument("--latency", type=parse_duration, help="seconds per message between hosts, e.g. 5us")
    parser.add_argument("--model-bytes", type=parse_size, default=parse_size("100M"),
                        help="bytes of gradients combined per step (default 100M)")
    parser.add_argument("--compute-ms", type=float, default=50.0, help="forward + backward per step (default 50)")
    parser.add_argument("--sizes", default="", help="also print allreduce times at these sizes, e.g. 4K,1M,64M")
    parser.add_argument("--algorithms", default=",".join(PLANNED))
    parser.add_argument("--calibration", metavar="PATH", help="calibration file with a model (default: auto's)")
    parser.add_argument("--json", metavar="PATH", help="also write the predictions as JSON")
    return parser


def _wrap(fn: Callable[[str], float], text: str) -> float:
    try:
        return fn(text)
    except Exception as e:  # the cluster module's ClusterError: an argparse error instead
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    from .bench import parse_size
    parser = _parser()
    args = parser.parse_args(argv)
    if args.hosts < 1 or args.ranks_per_host < 1:
        parser.error("--hosts and --ranks-per-host must be >= 1")
    if args.compute_ms < 0:
        parser.error("--compute-ms must be >= 0")
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in algorithms if a not in PLANNED]
    if unknown:
        parser.error(f"unknown algorithm(s) {', '.join(unknown)}; choose from {', '.join(PLANNED)}")
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    layout = Layout(args.hosts, args.ranks_per_host)
    m, source = load_machine(args.calibration, f"{args.hosts}x{args.ranks_per_host}")
    if args.link is not None:
        m = replace(m, beta=8 / args.link)
    if args.latency is not None:
        m = replace(m, alpha=args.latency)
    if layout.per_host == 1 or layout.hosts == 1:
        algorithms = [a for a in algorithms if a != "hier"] or algorithms
    try:
        return _plan(args, layout, m, source, algorithms, sizes)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _plan(args: argparse.Namespace, layout: Layout, m: Machine, source: str, algorithms: list[str],
          sizes: list[int]) -> int:
    from .bench import human
    started = time.perf_counter()
    print(f"# mpiml.plan: {args.hosts} hosts x {args.ranks_per_host} ranks = {layout.size}; link "
          f"{8 / m.beta / 1e9:.3g} Gbit/s, {m.alpha * 1e6:.3g} us per message; model from {source}")
    out: dict[str, Any] = {"layout": asdict(layout), "machine": m.to_json(), "allreduce": [], "steps": []}
    n = args.model_bytes
    bound = 2 * (layout.hosts - 1) / layout.hosts * n * m.beta if layout.hosts > 1 else None
    print(f"\nallreduce of {human(n)}" + (f" (link bound {bound * 1e3:.3f} ms)" if bound else ""))
    print(f"{'algorithm':>10} {'time(ms)':>10} {'busbw(GB/s)':>12}")
    for size in sorted(set(sizes + [n])):
        for a in algorithms:
            t = allreduce_time(size, a, layout, m)
            busbw = size / t * 2 * (layout.size - 1) / layout.size / 1e9 if t > 0 else 0.0
            out["allreduce"].append({"size_bytes": size, "algorithm": a, "time_s": t, "busbw_GBps": busbw})
            if size == n or sizes:
                print(f"{a:>10} {t * 1e3:>10.3f} {busbw:>12.2f}" + (f"   ({human(size)})" if size != n else ""))
    rows = step_costs(layout, m, n, args.compute_ms * 1e-3, algorithms)
    out["steps"] = rows
    print(f"\ntraining step, {args.compute_ms:g} ms of compute, {human(n)} of gradients per step")
    print(f"{'method':>34} {'step(ms)':>10} {'efficiency':>11}")
    for r in rows:
        print(f"{r['method']:>34} {r['step_s'] * 1e3:>10.2f} {r['efficiency']:>11.3f}")
    print(f"\n# planned in {time.perf_counter() - started:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
