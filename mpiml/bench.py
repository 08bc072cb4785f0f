"""``python -m mpiml.bench allreduce``: nccl-tests-style timings of every allreduce algorithm.

    mpiexec -n 2 python -m mpiml.bench allreduce --sizes 4K,4M,64M --algorithms mpi,ring --json out.json

For each size, the algorithms take turns (``--rounds`` rounds of ``--iters``
timed calls each, after ``--warmup`` untimed calls), so a noisy neighbour
hurts them alike; the reported time is the median round's mean time per
call, the slowest rank's. algbw = bytes / time; busbw = algbw * 2(p-1)/p
(nccl-tests' convention for allreduce), comparable with link bandwidth.
Every call goes through ``mpiml.collectives.allreduce`` (agreement check
included), the ``mpi`` row too; the ``MPI_Allreduce`` row calls the library
directly, to show what that front door costs. Each algorithm's result is
checked against the ``mpi`` row's once per size (``--no-check`` skips it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np

__all__ = ["main", "parse_size", "allreduce_table"]

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20,
          "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}
DEFAULT_SIZES = "4K,16K,64K,256K,1M,4M,16M,64M,256M"
RAW = "MPI_Allreduce"


def parse_size(text: str) -> int:
    """'4K' -> 4096, '64MiB' -> 67108864, '1000' -> 1000 (bytes)."""
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    if not num or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4K, 64M, 1G)")
    try:
        value = float(num) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4K, 64M, 1G)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"size must be >= 0: {text!r}")
    return int(value)


def human(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def _time_calls(fn: Any, x: np.ndarray, iters: int, comm: Any) -> float:
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(iters):
        fn(x)
    elapsed = (time.perf_counter() - start) / iters
    from mpi4py import MPI
    return comm.allreduce(elapsed, op=MPI.MAX)


def allreduce_table(sizes: list[int], algorithms: list[str], dtype: str = "float32", op: str = "sum",
                    iters: int = 20, warmup: int = 3, rounds: int = 3, check: bool = True,
                    comm: Any = None, raw: bool = True,
                    extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Measure every (size, algorithm); returns one record per pair (the same on every rank).

    ``extra`` adds rows: name -> function allreducing (sum) a numpy array in place, e.g. another
    library's allreduce, timed in turn with the others and checked against the ``mpi`` row.
    """
    from mpi4py import MPI

    from . import collectives

    comm = MPI.COMM_WORLD if comm is None else comm
    p = comm.Get_size()
    itemsize = np.dtype(dtype).itemsize
    rng = np.random.default_rng(comm.Get_rank() + 1)
    records = []
    for size in sizes:
        count = size // itemsize
        # Big messages take long: fewer calls, but never fewer than 2 per round.
        n_iter = max(2, min(iters, int(iters * (16 << 20) / max(size, 1))))
        base = (rng.standard_normal(count) * 0.01).astype(dtype)
        x = np.empty_like(base)
        calls = {a: (lambda buf, a=a: collectives.allreduce(buf, op=op, algorithm=a, comm=comm)) for a in algorithms}
        if raw and op != "mean":
            # The library's Allreduce called directly: what the mpiml front door (agreement check,
            # private communicator, Python dispatch) costs on top shows as the gap to the "mpi" row.
            mpi_op = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD}[op]
            calls[RAW] = lambda buf: comm.Allreduce(MPI.IN_PLACE, buf, mpi_op)
        calls.update(extra or {})
        names = list(calls)
        results: dict[str, list[float]] = {a: [] for a in names}
        checked: dict[str, bool | None] = {a: None for a in names}
        reference = None
        if check:
            reference = base.copy()
            collectives.allreduce(reference, op=op, algorithm="mpi", comm=comm)
        for _ in range(rounds):
            for a in names:
                x[...] = base
                if check and checked[a] is None:
                    calls[a](x)
                    ok = bool(np.allclose(x, reference, rtol=1e-3, atol=1e-5 * p))
                    checked[a] = comm.allreduce(ok, op=MPI.LAND)
                    x[...] = base
                for _ in range(warmup):
                    calls[a](x)
                x[...] = base
                results[a].append(_time_calls(calls[a], x, n_iter, comm))
        mpi_time = statistics.median(results["mpi"]) if "mpi" in results else None
        for a in names:
            t = statistics.median(results[a])
            algbw = size / t / 1e9 if t > 0 else 0.0
            busbw = algbw * 2 * (p - 1) / p
            records.append({
                "size_bytes": size, "count": count, "dtype": dtype, "op": op, "algorithm": a, "ranks": p,
                "time_us": t * 1e6, "algbw_GBps": algbw, "busbw_GBps": busbw,
                "ratio_to_mpi": (mpi_time / t) if mpi_time and t > 0 else None,
                "iters": n_iter, "rounds": rounds, "rounds_us": [r * 1e6 for r in results[a]],
                "correct": checked[a],
            })
    return records


def format_table(records: list[dict[str, Any]], ratios: tuple[tuple[str, str], ...] = ()) -> str:
    """The nccl-tests-style table; ``ratios``: extra (header, record key) columns of speed ratios."""
    lines = [f"{'size':>10} {'count':>11} {'algorithm':>13} {'time(us)':>10} {'algbw(GB/s)':>12} "
             f"{'busbw(GB/s)':>12} {'x mpi':>7} {'check':>6}" + "".join(f" {h:>7}" for h, _ in ratios)]
    last = None
    for r in records:
        if last is not None and r["size_bytes"] != last:
            lines.append("")
        last = r["size_bytes"]
        ratio = f"{r['ratio_to_mpi']:.2f}" if r["ratio_to_mpi"] is not None else "-"
        check = {None: "-", True: "ok", False: "WRONG"}[r["correct"]]
        more = "".join(f" {r[key]:>7.2f}" if r.get(key) is not None else f" {'-':>7}" for _, key in ratios)
        lines.append(f"{human(r['size_bytes']):>10} {r['count']:>11} {r['algorithm']:>13} {r['time_us']:>10.1f} "
                     f"{r['algbw_GBps']:>12.2f} {r['busbw_GBps']:>12.2f} {ratio:>7} {check:>6}{more}")
    return "\n".join(lines)


def calibration_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    """``auto``'s table from measurements (``mpiml.collectives.auto.table_rows``)."""
    from .collectives import auto
    return auto.table_rows(records)


def save_calibration(records: list[dict[str, Any]], ranks: int | str, path: str | None) -> str:
    """Save ``auto``'s table under ``ranks``: a rank count on one host, or ``"HxL"`` across hosts."""
    from .collectives import auto

    rows = calibration_rows(records)
    path = auto.save_entry("tables", str(ranks), rows, "measured", path=path)
    print(f"# auto's table for {ranks} ranks, saved to {path}: {rows}")
    return path


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    from .collectives import ALGORITHMS, DTYPES, OPS

    parser = argparse.ArgumentParser(prog="python -m mpiml.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ar = sub.add_parser("allreduce", help="time allreduce for every algorithm and size")
    ar.add_argument("--sizes", default=DEFAULT_SIZES,
                    help=f"comma-separated message sizes in bytes, with K/M/G suffixes (default {DEFAULT_SIZES})")
    ar.add_argument("--algorithms", default=",".join(ALGORITHMS),
                    help=f"comma-separated, from {', '.join(ALGORITHMS)} (default: all)")
    ar.add_argument("--dtype", default="float32", choices=[d for d in DTYPES if d != "bfloat16"])
    ar.add_argument("--op", default="sum", choices=OPS)
    ar.add_argument("--iters", type=int, default=20, help="timed calls per round, fewer for big sizes (default 20)")
    ar.add_argument("--warmup", type=int, default=3, help="untimed calls before each round (default 3)")
    ar.add_argument("--rounds", type=int, default=3, help="rounds per algorithm, interleaved; median reported")
    ar.add_argument("--no-check", dest="check", action="store_false", help="skip the correctness check")
    ar.add_argument("--no-raw", dest="raw", action="store_false",
                    help=f"leave out the {RAW} row (the library called directly, without mpiml's front door)")
    ar.add_argument("--json", metavar="PATH", help="also write the records as JSON to PATH")
    cal = sub.add_parser("calibrate", help="measure every algorithm and save the fastest per size for 'auto'")
    cal.add_argument("--sizes", default=DEFAULT_SIZES, help=f"sizes to measure (default {DEFAULT_SIZES})")
    cal.add_argument("--algorithms", default=",".join(a for a in ALGORITHMS if a != "auto"))
    cal.add_argument("--iters", type=int, default=20)
    cal.add_argument("--warmup", type=int, default=3)
    cal.add_argument("--rounds", type=int, default=3)
    cal.add_argument("--output", metavar="PATH", help="calibration file (default $MPIML_CALIBRATION or "
                                                      "~/.cache/mpiml/calibration.json)")
    cal.set_defaults(dtype="float32", op="sum", check=True, raw=False, json=None)
    fit = sub.add_parser("calibrate-model", help="fit mpiml.plan's cost model here and save it beside auto's table")
    fit.add_argument("--output", metavar="PATH", help="calibration file (default $MPIML_CALIBRATION or "
                                                      "~/.cache/mpiml/calibration.json)")
    fit.set_defaults(sizes="", algorithms="", iters=1, rounds=1, warmup=0)
    args = parser.parse_args(argv)
    try:
        args.sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    args.algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in args.algorithms if a not in ALGORITHMS or (args.command == "calibrate" and a == "auto")]
    if unknown:
        parser.error(f"unknown algorithm(s) {', '.join(unknown)}; choose from {', '.join(ALGORITHMS)}")
    for name in ("iters", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if args.command == "calibrate-model":
        return _calibrate_model(comm, args.output)
    if comm.Get_rank() == 0:
        print(f"# mpiml.bench allreduce: {comm.Get_size()} ranks, dtype {args.dtype}, op {args.op}, "
              f"{args.rounds} rounds x up to {args.iters} calls (median round; slowest rank)")
        print(f"# {MPI.Get_library_version().splitlines()[0].strip()}; host {platform.node()}; "
              f"python {platform.python_version()}")
        sys.stdout.flush()
    records = allreduce_table(args.sizes, args.algorithms, args.dtype, args.op, args.iters, args.warmup,
                              args.rounds, args.check, comm, args.raw)
    key = None
    if args.command == "calibrate":  # collective: the table's key is the host layout ("K" or "HxL")
        from .collectives import auto, hier, private_comm
        topo = hier.topology(private_comm(comm)) if comm.Get_size() > 1 else None
        key = auto.layout_key(topo.hosts, topo.local_size, comm.Get_size()) if topo else "1"
    if comm.Get_rank() == 0:
        print(format_table(records))
        if key is not None:
            save_calibration(records, key, args.output)
        if args.json:
            meta = {"ranks": comm.Get_size(), "mpi_library": MPI.Get_library_version().splitlines()[0].strip(),
                    "host": platform.node(), "command": " ".join(sys.argv)}
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "records": records}, f, indent=1)
    wrong = [r for r in records if r["correct"] is False]
    return 1 if wrong else 0


def _calibrate_model(comm: Any, output: str | None) -> int:
    from . import calibrate
    from .collectives import auto

    if comm.Get_size() < 2:
        print("error: calibrate-model needs at least 2 ranks: run it under mpiexec -n 2 (or more)", file=sys.stderr)
        return 2
    machine, layout, notes = calibrate.fit_machine(comm)
    if comm.Get_rank() == 0:
        key = auto.layout_key(layout.hosts, layout.per_host, comm.Get_size())
        path = calibrate.save_model(machine, key, notes, output)
        print(f"# mpiml.plan's model for {key} ({layout.hosts} hosts x {layout.per_host} ranks), saved to {path}:")
        for name, value in machine.to_json().items():
            print(f"{name:>12} = {value:.4g}" if isinstance(value, float) else f"{name:>12} = {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
