"""Process-wide MPI state: init, rank and size, and errors that every rank must see."""

from __future__ import annotations

import atexit
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from mpi4py import MPI

__all__ = ["init", "is_initialized", "rank", "size", "local_rank", "local_size", "world", "UserError",
           "agree", "abort_on_exception"]

T = TypeVar("T")
_local: MPI.Comm | None = None


class UserError(ValueError):
    """Bad input from the user; the message names the problem (no traceback needed)."""


def init(threads: int | None = None, stall_warning: float = 60.0, timeout: float = 600.0) -> None:
    """Initialise MPI if needed (mpi4py does it on import) and start the stall watchdog; idempotent.

    ``threads``: if given, ``torch.set_num_threads(threads)``; with one rank
    per core, 1 is right, and it is what ``python -m mpiml.train`` uses.
    ``stall_warning`` / ``timeout`` (seconds, 0: never): rank 0 reports an
    mpiml collective stuck that long and which ranks have not arrived; after
    ``timeout`` the job is aborted (see ``mpiml.watchdog``). Collective:
    every rank must call it.
    """
    if not MPI.Is_initialized():
        MPI.Init_thread(MPI.THREAD_MULTIPLE)
    if threads is not None:
        import torch
        torch.set_num_threads(threads)
    from . import watchdog
    if watchdog.active() is None and (stall_warning > 0 or timeout > 0):
        watchdog.install(watchdog.Watchdog(MPI.COMM_WORLD, stall_warning, timeout))
        atexit.register(watchdog.uninstall)  # before mpi4py finalizes MPI (atexit runs last-in, first-out)


def is_initialized() -> bool:
    return MPI.Is_initialized() and not MPI.Is_finalized()


def world() -> MPI.Intracomm:
    return MPI.COMM_WORLD


def rank() -> int:
    return MPI.COMM_WORLD.Get_rank()


def size() -> int:
    return MPI.COMM_WORLD.Get_size()


def _local_comm() -> MPI.Comm:
    global _local
    if _local is None:
        _local = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED, key=MPI.COMM_WORLD.Get_rank())
    return _local


def local_rank() -> int:
    """This rank's index among the ranks on its host."""
    return _local_comm().Get_rank()


def local_size() -> int:
    """How many ranks share this host."""
    return _local_comm().Get_size()


def agree(comm: MPI.Comm, fn: Callable[[], T], errors: tuple[type[BaseException], ...] = (UserError,)) -> T:
    """Run ``fn`` on every rank; if it raised one of ``errors`` anywhere, raise UserError everywhere.

    The message lists each distinct problem once with the ranks that hit it,
    so a bad file named on the command line is reported once, not K times,
    and ranks whose part went fine do not wait forever for the others.
    """
    result: Any = None
    problem = None
    try:
        result = fn()
    except errors as e:
        problem = str(e)
    problems = comm.allgather(problem)
    if any(p is not None for p in problems):
        by_message: dict[str, list[int]] = {}
        for r, p in enumerate(problems):
            if p is not None:
                by_message.setdefault(p, []).append(r)
        if len(by_message) == 1 and len(next(iter(by_message.values()))) == comm.Get_size():
            raise UserError(next(iter(by_message)))
        lines = [f"{msg} (rank{'s' if len(rs) > 1 else ''} {','.join(map(str, rs))})" for msg, rs in by_message.items()]
        raise UserError("; ".join(lines))
    return result


def abort_on_exception(fn: Callable[[], int], prog: str = "mpiml") -> int:
    """Run a program's main: a UserError ends it with exit code 2, the message printed once (rank 0).

    Any other exception on any rank prints its traceback (that rank only)
    and aborts the whole job, so the other ranks do not hang in their next
    collective.
    """
    comm = MPI.COMM_WORLD
    try:
        return fn()
    except UserError as e:
        if comm.Get_rank() == 0:
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 - anything else must bring every rank down
        sys.stderr.write(f"[rank {comm.Get_rank()}] " + traceback.format_exc())
        sys.stderr.flush()
        comm.Abort(1)
        return 1
