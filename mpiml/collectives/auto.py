"""``algorithm="auto"``: pick the allreduce algorithm per call from the message size and the rank count.

The choice comes from a table: for a rank count K, a list of
``[up_to_bytes, algorithm]`` rows in increasing size (the last row's bound
may be null: everything larger). ``python -m mpiml.bench calibrate``
measures every algorithm at a range of sizes on the machine at hand and
writes the winners to ``$MPIML_CALIBRATION`` (default
``~/.cache/mpiml/calibration.json``); without a file (or without an entry
for this K) the built-in table below, measured on this project's 2-core
machine, is used (for K it has no row for, the nearest K it has).

The table is read by rank 0 and broadcast once per communicator, so every
rank always makes the same choice even if their files differ.

Across hosts the built-in table does not apply: it was measured where
"communication" is a memory copy. On a communicator whose ranks sit on more
than one host, a calibration for that layout (key ``"HxL"``: H hosts, L ranks
on each, written by ``calibrate`` when run on such a layout) is used if there
is one, and otherwise ``network_choice``: the algorithm that moves the fewest
bytes over each host's link (``hier`` with several ranks per host, ``ring``
with one, both at the link bound 2(H-1)/H * n), and the library's own
Allreduce for messages small enough that latency, not the link, decides
(measured on the emulated cluster, docs/cluster.md).

**The cost model fills the gaps.** For a layout without a measured table,
if the calibration file holds a cost model fitted by ``python -m mpiml.bench
calibrate-model`` on the same kind of layout (one host, or several), the
table is *predicted*: ``costmodel.model_rows`` replays every algorithm's
schedule for this layout at 4 KiB .. 256 MiB and keeps the fastest, by the
same rule as a measured table. Only without such a model does ``auto`` fall
back to the nearest rank count's table (one host) or ``network_choice``.
``decide`` says which source a layout gets.
"""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any

import numpy as np
from mpi4py import MPI

from ._buffers import Reduction

__all__ = ["allreduce", "reduce_scatter", "allgather", "broadcast", "choose", "calibration_path", "DEFAULT_TABLE",
           "network_choice", "layout_key", "NETWORK_SMALL_BYTES", "known_choice", "table_rows",
           "CALIBRATION_MARGIN", "MARGIN_BYTES", "decide", "save_entry"]
SPECULATIVE: tuple[str, ...] = ()  # its waits do not watch the agreement check (collectives._checked)

# Measured on this project's 2-core VM (MPICH 5.0.2 wheel) with `python -m mpiml.bench allreduce --algorithms
# mpi,ring,tree,butterfly,hier --rounds 5` twice per rank count, the median of the two, then
# `table_rows` (up to 1 MiB the library's own unless another was 10% faster); 3 and 4 are
# oversubscribed there. See README, "auto".
DEFAULT_TABLE: dict[str, list[list[Any]]] = {
    "2": [[2 << 20, "mpi"], [128 << 20, "tree"], [None, "butterfly"]],
    "3": [[128 << 10, "mpi"], [8 << 20, "hier"], [None, "ring"]],
    "4": [[512 << 10, "mpi"], [8 << 20, "hier"], [None, "tree"]],
}
_keyval: int | None = None
# Up to this size a message over TCP is latency-bound: the library's Allreduce (few messages) wins there.
NETWORK_SMALL_BYTES = 64 << 10
_NO_MPI_TYPE = ("bfloat16",)  # no MPI datatype: the library would reduce through a Python user op


# Up to MARGIN_BYTES, another algorithm replaces the library's own only if it measured at least this much
# faster: there a call is mostly fixed costs, within the noise of a shared machine, and the library's is the
# safe choice ("auto never slower"). Above, the fastest wins: a training step's buffers, fresh each step,
# measured the library's Allreduce much slower in the step than alone (7.45 MB: +3 ms a step against ring).
CALIBRATION_MARGIN = 1.10
MARGIN_BYTES = 1 << 20


def table_rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    """``auto``'s table from measurements: the fastest correct algorithm per size (the library's own unless
    another beat it by ``CALIBRATION_MARGIN``), switching halfway between measured sizes (geometric)."""
    sizes = sorted({r["size_bytes"] for r in records})
    winners = []
    for size in sizes:
        rows = [r for r in records if r["size_bytes"] == size and r["correct"] is not False]
        best = min(rows, key=lambda r: r["time_us"])
        library = next((r for r in rows if r["algorithm"] == "mpi"), None)
        if library is not None and size <= MARGIN_BYTES and best["time_us"] * CALIBRATION_MARGIN > library["time_us"]:
            best = library
        winners.append(best["algorithm"])
    table: list[list[Any]] = []
    for i, (size, winner) in enumerate(zip(sizes, winners)):
        bound = int((size * sizes[i + 1]) ** 0.5) if i + 1 < len(sizes) else None
        if table and table[-1][1] == winner:
            table[-1][0] = bound
        else:
            table.append([bound, winner])
    return table


def network_choice(nbytes: int, hosts: int, per_host: int, dtype: str = "float32") -> str:
    """``auto``'s choice across hosts when no calibration for the layout exists (see the module docstring)."""
    if nbytes <= NETWORK_SMALL_BYTES and dtype not in _NO_MPI_TYPE:
        return "mpi"
    return "hier" if per_host > 1 else "ring"


def layout_key(hosts: int, per_host: int, size: int) -> str:
    """The calibration table's key for a layout: ``"K"`` on one host, ``"HxL"`` across hosts."""
    return str(size) if hosts <= 1 else f"{hosts}x{per_host}"


def calibration_path() -> str:
    return os.environ.get("MPIML_CALIBRATION") or os.path.join(os.path.expanduser("~"), ".cache", "mpiml",
                                                               "calibration.json")


def save_entry(section: str, key: str, value: Any, notes_section: str, notes: dict[str, Any] | None = None,
               path: str | None = None) -> str:
    """Store ``value`` as ``section[key]`` of the calibration file (``calibration_path()`` unless ``path``),
    and where and when it was measured (plus ``notes``) as ``notes_section[key]``; the rest of the file is
    kept. Returns the file's path."""
    path = path or calibration_path()
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        saved = {}
    if not isinstance(saved, dict):
        saved = {}
    saved.setdefault(section, {})[key] = value
    saved.setdefault(notes_section, {})[key] = {"host": platform.node(), "time": time.strftime("%Y-%m-%d %H:%M"),
                                                **(notes or {})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(saved, f, indent=1)
    return path


def _valid(rows: Any) -> bool:
    from . import ALGORITHMS
    return isinstance(rows, list) and bool(rows) and all(
        isinstance(r, list) and len(r) == 2 and (r[0] is None or isinstance(r[0], int))
        and r[1] in ALGORITHMS and r[1] != "auto" for r in rows)


def _load() -> tuple[dict[str, list[list[Any]]], dict[str, Any]]:
    """The tables (built-in, then the calibration file's) and the file's cost models (``calibrate-model``)."""
    table = {k: list(v) for k, v in DEFAULT_TABLE.items()}
    models: dict[str, Any] = {}
    try:
        with open(calibration_path()) as f:
            saved = json.load(f)
        table.update({str(k): v for k, v in saved.get("tables", {}).items() if _valid(v)})
        models = {str(k): v for k, v in saved.get("models", {}).items() if isinstance(v, dict)}
    except (OSError, ValueError, AttributeError):
        pass  # no (usable) calibration file: the built-in table
    return table, models


def decide(hosts: int, per_host: int, size: int, uniform: bool = True) -> tuple[list[list[Any]] | None, str]:
    """``auto``'s rows for a layout, and where they come from: ``"table"`` (measured for this layout),
    ``"model"`` (predicted by ``costmodel`` from a model calibrated with the same kind of layout: on one
    host, or across hosts), ``"nearest"`` (the table of the nearest rank count on one host) or
    ``"network"`` (None: ``network_choice``)."""
    table, models = _load()
    key = layout_key(hosts, per_host, size)
    if key in table:
        return table[key], "table"
    across = [k for k in sorted(models) if ("x" in k) == (hosts > 1)]
    if across and (uniform or hosts == 1):
        from . import costmodel
        try:
            machine = costmodel.Machine.from_json(models[across[0]])
            layout = costmodel.Layout(hosts, per_host) if hosts > 1 else costmodel.Layout(1, size)
            return costmodel.model_rows(layout, machine), "model"
        except (TypeError, ValueError):
            pass  # an unusable model: as if there were none
    if hosts > 1:
        return None, "network"
    single = [k for k in table if "x" not in k]
    return table[min(single, key=lambda k: abs(int(k) - size))], "nearest"


class _Choice:
    """What ``auto`` knows about one communicator: its table rows, or the host layout for network_choice."""

    def __init__(self, comm: MPI.Comm) -> None:
        from . import hier
        size = comm.Get_size()
        topo = hier.topology(comm) if size > 1 else None
        self.hosts = topo.hosts if topo is not None else 1
        self.per_host = topo.local_size if topo is not None and topo.uniform else 1
        uniform = topo is None or topo.uniform
        # rank 0 decides (a model's prediction takes a moment), every rank makes the same choices
        decided = decide(self.hosts, self.per_host, size, uniform) if comm.Get_rank() == 0 else None
        self.rows: list[list[Any]] | None
        self.rows, self.source = comm.bcast(decided, root=0)
        self.chosen: dict[tuple[int, str], str] = {}  # (bytes, dtype) -> algorithm, looked up before


def _choice(comm: MPI.Comm) -> _Choice:
    global _keyval
    if _keyval is None:
        _keyval = MPI.Comm.Create_keyval()
    known = comm.Get_attr(_keyval)
    if known is None:
        known = _Choice(comm)
        comm.Set_attr(_keyval, known)
    return known


def choose(nbytes: int, comm: MPI.Comm, dtype: str = "float32") -> str:
    """The algorithm ``auto`` uses for ``nbytes`` of ``dtype`` on ``comm`` (collective on its first call)."""
    known = _choice(comm)
    key = (nbytes, dtype)
    found = known.chosen.get(key)
    if found is None:
        found = known.chosen[key] = _look_up(known, nbytes, dtype)
        if len(known.chosen) > 4096:
            known.chosen.clear()
    return found


def _look_up(known: _Choice, nbytes: int, dtype: str) -> str:
    if known.rows is None:
        return network_choice(nbytes, known.hosts, known.per_host, dtype)
    for bound, algorithm in known.rows:
        if bound is None or nbytes <= bound:
            return algorithm
    return known.rows[-1][1]


def known_choice(nbytes: int, comm: MPI.Comm, dtype: str = "float32") -> str | None:
    """``choose``'s answer if it needs no collective (the table for ``comm`` is known already), else None."""
    if _keyval is None or comm.Get_attr(_keyval) is None:
        return None
    return choose(nbytes, comm, dtype)


def _algorithms() -> dict[str, Any]:
    global _registry
    if _registry is None:
        from . import ALGORITHMS  # (the registry imports this module: looked up once, not on every call)
        _registry = ALGORITHMS
    return _registry


_registry: dict[str, Any] | None = None


def allreduce(a: np.ndarray, red: Reduction, comm: Any) -> None:
    _algorithms()[choose(a.nbytes, comm, red.dtype)].allreduce(a, red, comm)


def reduce_scatter(a: np.ndarray, red: Reduction, comm: Any) -> tuple[int, int]:
    return _algorithms()[choose(a.nbytes, comm)].reduce_scatter(a, red, comm)


def allgather(out: np.ndarray, bounds: list[int], comm: Any) -> None:
    _algorithms()[choose(out.nbytes, comm)].allgather(out, bounds, comm)


def broadcast(a: np.ndarray, root: int, comm: Any) -> None:
    _algorithms()[choose(a.nbytes, comm)].broadcast(a, root, comm)
