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
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from mpi4py import MPI

from ._buffers import Reduction

__all__ = ["allreduce", "reduce_scatter", "allgather", "broadcast", "choose", "calibration_path", "DEFAULT_TABLE"]

# Measured with `python -m mpiml.bench calibrate` at 2 ranks (MPICH 5.0.2 wheel, 2-core VM), see README.
DEFAULT_TABLE: dict[str, list[list[Any]]] = {
    "2": [[2 << 20, "mpi"], [8 << 20, "ring"], [32 << 20, "butterfly"], [None, "tree"]],
}
_keyval: int | None = None


def calibration_path() -> str:
    return os.environ.get("MPIML_CALIBRATION") or os.path.join(os.path.expanduser("~"), ".cache", "mpiml",
                                                               "calibration.json")


def _valid(rows: Any) -> bool:
    from . import ALGORITHMS
    return isinstance(rows, list) and bool(rows) and all(
        isinstance(r, list) and len(r) == 2 and (r[0] is None or isinstance(r[0], int))
        and r[1] in ALGORITHMS and r[1] != "auto" for r in rows)


def _load() -> dict[str, list[list[Any]]]:
    table = {k: list(v) for k, v in DEFAULT_TABLE.items()}
    try:
        with open(calibration_path()) as f:
            saved = json.load(f)
        table.update({str(k): v for k, v in saved.get("tables", {}).items() if _valid(v)})
    except (OSError, ValueError, AttributeError):
        pass  # no (usable) calibration file: the built-in table
    return table


def _rows(comm: MPI.Comm) -> list[list[Any]]:
    global _keyval
    if _keyval is None:
        _keyval = MPI.Comm.Create_keyval()
    rows = comm.Get_attr(_keyval)
    if rows is None:
        table = comm.bcast(_load() if comm.Get_rank() == 0 else None, root=0)
        size = comm.Get_size()
        key = str(size) if str(size) in table else min(table, key=lambda k: abs(int(k) - size))
        rows = table[key]
        comm.Set_attr(_keyval, rows)
    return rows


def choose(nbytes: int, comm: MPI.Comm) -> str:
    """The algorithm ``auto`` uses for ``nbytes`` on ``comm``."""
    for bound, algorithm in _rows(comm):
        if bound is None or nbytes <= bound:
            return algorithm
    return _rows(comm)[-1][1]


def allreduce(a: np.ndarray, red: Reduction, comm: Any) -> None:
    from . import ALGORITHMS
    ALGORITHMS[choose(a.nbytes, comm)].allreduce(a, red, comm)


def reduce_scatter(a: np.ndarray, red: Reduction, comm: Any) -> tuple[int, int]:
    from . import ALGORITHMS
    return ALGORITHMS[choose(a.nbytes, comm)].reduce_scatter(a, red, comm)


def allgather(out: np.ndarray, bounds: list[int], comm: Any) -> None:
    from . import ALGORITHMS
    ALGORITHMS[choose(out.nbytes, comm)].allgather(out, bounds, comm)


def broadcast(a: np.ndarray, root: int, comm: Any) -> None:
    from . import ALGORITHMS
    ALGORITHMS[choose(a.nbytes, comm)].broadcast(a, root, comm)
