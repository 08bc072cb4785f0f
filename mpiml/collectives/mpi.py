"""The MPI library's own collectives: the baseline every algorithm is measured
against, and the oracle the tests compare with.

Reductions use the library's predefined datatype and op where it has them.
MPI has no bfloat16 type (the MPICH 5 and Open MPI 5 wheels both return
MPI_DATATYPE_NULL for it; both have float16); a missing type goes through the
library's Allreduce with a user-defined commutative op over 2-byte words
that does the arithmetic with the same ``Reduction`` the other algorithms use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from mpi4py import MPI

from .. import traffic
from ._buffers import Reduction
from ._chunks import chunk_bounds

__all__ = ["allreduce", "reduce_scatter", "allgather", "broadcast"]
# None runs beside the agreement check (collectives._checked): the library's blocking call cannot watch it,
# and its non-blocking one with a wait on either measured slower than waiting for the check first.
SPECULATIVE: tuple[str, ...] = ()

_PREDEFINED_OPS = {"sum": "SUM", "mean": "SUM", "max": "MAX", "min": "MIN", "prod": "PROD"}
_TYPES = {"float16": "FLOAT16_T", "float32": "FLOAT", "float64": "DOUBLE", "int32": "INT32_T", "int64": "INT64_T",
          "bfloat16": "BFLOAT16_T"}
_user_ops: dict[tuple[str, str], MPI.Op] = {}


_known: dict[tuple[str, str], tuple[MPI.Datatype, MPI.Op]] = {}


def _datatype_and_op(red: Reduction, a: np.ndarray) -> tuple[MPI.Datatype, MPI.Op]:
    found = _known.get((red.op, red.dtype))
    if found is not None:
        return found
    datatype = getattr(MPI, _TYPES[red.dtype], MPI.DATATYPE_NULL)
    if datatype != MPI.DATATYPE_NULL:
        found = _known[(red.op, red.dtype)] = datatype, getattr(MPI, _PREDEFINED_OPS[red.op])
        return found
    # No such type in this MPI (bfloat16 in both wheels): reduce through a
    # user-defined op with our own arithmetic on the raw 16-bit words.
    key = (red.op, red.dtype)
    op = _user_ops.get(key)
    if op is None:
        combine, view_dtype = red.combine, a.dtype

        def user_fn(inbuf: Any, inoutbuf: Any, datatype: MPI.Datatype) -> None:
            combine(np.frombuffer(inoutbuf, dtype=view_dtype), np.frombuffer(inbuf, dtype=view_dtype))

        op = _user_ops[key] = MPI.Op.Create(user_fn, commute=True)
    return MPI.UINT16_T, op


def allreduce(a: np.ndarray, red: Reduction, comm: Any) -> None:
    """``MPI_Allreduce`` in place (then divide for ``mean``)."""
    datatype, op = _datatype_and_op(red, a)
    p = comm.Get_size()
    traffic.add(2 * a.nbytes * (p - 1) / p)  # the cost model's figure: the library's own messages are unseen
    comm.Allreduce(MPI.IN_PLACE, [a, datatype], op)
    red.finalize(a, p)


def reduce_scatter(a: np.ndarray, red: Reduction, comm: Any) -> tuple[int, int]:
    """``MPI_Reduce_scatter`` with counts from ``chunk_bounds``; rank r's segment lands in place."""
    p, r = comm.Get_size(), comm.Get_rank()
    bounds = chunk_bounds(a.size, p)
    counts = [bounds[i + 1] - bounds[i] for i in range(p)]
    datatype, op = _datatype_and_op(red, a)
    out = np.empty(counts[r], dtype=a.dtype)
    comm.Reduce_scatter([a, datatype], [out, datatype], counts, op)
    mine = a[bounds[r]:bounds[r + 1]]
    mine[...] = out
    red.finalize(mine, p)
    return bounds[r], bounds[r + 1]


def allgather(out: np.ndarray, bounds: list[int], comm: Any) -> None:
    """``MPI_Allgatherv`` in place."""
    size = out.itemsize
    counts = [(bounds[i + 1] - bounds[i]) * size for i in range(len(bounds) - 1)]
    displs = [b * size for b in bounds[:-1]]
    comm.Allgatherv(MPI.IN_PLACE, [out.view(np.uint8), (counts, displs), MPI.BYTE])


def broadcast(a: np.ndarray, root: int, comm: Any) -> None:
    """``MPI_Bcast``."""
    comm.Bcast([a.view(np.uint8), MPI.BYTE], root)
