"""Process-wide MPI state: init, rank and size, and errors that every rank must see.

How a job ends when something goes wrong on some ranks:

- ``UserError`` (bad input, agreed by every rank through ``agree`` or a
  broadcast): rank 0 prints one ``error:`` line and every rank exits with
  status 2. If the other ranks do not end with it within
  ``ENDING_GRACE_SECONDS`` (an error raised on one rank alone), the job is
  aborted instead, so nobody waits in a collective for a rank that left.
- Any other exception on any rank (and, after ``init()``, an uncaught one in
  a user script): that rank prints its traceback and aborts the whole job
  at once (``abort``).
- ``abort`` flushes every stream and waits ``ABORT_GRACE_SECONDS`` before
  ``MPI_Abort``: the launcher kills every process as soon as one aborts, and
  output still on its way through the launcher's pipes is lost otherwise.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any, NoReturn, TypeVar

from mpi4py import MPI

__all__ = ["init", "is_initialized", "rank", "size", "local_rank", "local_size", "world", "UserError",
           "agree", "topology", "abort_on_exception", "abort", "ABORT_GRACE_SECONDS", "ENDING_GRACE_SECONDS"]

T = TypeVar("T")
ABORT_GRACE_SECONDS = 1.0  # for the launcher to forward what was printed before the abort kills everyone
ENDING_GRACE_SECONDS = 10.0  # for every rank to reach the end after an error that should be everyone's


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
    if MPI.COMM_WORLD.Get_size() > 1 and sys.excepthook is sys.__excepthook__:
        sys.excepthook = _abort_on_uncaught  # the other ranks would wait for this one in their next collective


def _abort_on_uncaught(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    r = MPI.COMM_WORLD.Get_rank()
    text = "".join(traceback.format_exception(kind, value, tb))
    abort(1, f"[rank {r}] {text}mpiml: uncaught {kind.__name__} on rank {r}; aborting the job")


def _flush_everything() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    try:  # C stdio buffers too (the MPI library's and extensions' own prints)
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass
    for fd in (1, 2):
        try:
            os.fsync(fd)  # a file: on disk; a pipe or terminal refuses (EINVAL), which is fine
        except OSError:
            pass


def abort(code: int, message: str | None = None, comm: MPI.Comm | None = None) -> NoReturn:
    """End the whole job with ``code``: print ``message`` (stderr), flush, give the launcher
    ABORT_GRACE_SECONDS to deliver it, then ``MPI_Abort``; ``os._exit`` if that does not end this process."""
    if message:
        try:
            sys.stderr.write(message if message.endswith("\n") else message + "\n")
        except (OSError, ValueError):
            pass
    _flush_everything()
    time.sleep(ABORT_GRACE_SECONDS)
    _flush_everything()
    leave = threading.Timer(10.0, os._exit, args=(code,))  # a launcher out of reach must not keep us
    leave.daemon = True
    leave.start()
    (comm or MPI.COMM_WORLD).Abort(code)
    os._exit(code)


def is_initialized() -> bool:
    return MPI.Is_initialized() and not MPI.Is_finalized()


def world() -> MPI.Intracomm:
    return MPI.COMM_WORLD


def rank() -> int:
    return MPI.COMM_WORLD.Get_rank()


def size() -> int:
    return MPI.COMM_WORLD.Get_size()


def topology(comm: MPI.Comm | None = None) -> Any:
    """How ``comm``'s ranks (default COMM_WORLD) sit on hosts: ``mpiml.collectives.hier.topology`` of
    ``comm``'s private duplicate, the one layout that hier, auto and DistributedOptimizer use.

    Made once per communicator and cached on it. The first call is collective over ``comm``: every
    rank of ``comm`` must make it (later calls only read the cache). Nothing but ``comm`` (and the
    communicators derived from it and cached on it) is touched. Fields: ``local`` / ``local_size``
    (this rank among its host's ranks), ``cross`` (the communicator of the ranks with this local
    rank, one per host), ``hosts``, ``uniform`` (every host holds the same number of ranks)."""
    from .collectives import hier, private_comm
    return hier.topology(private_comm(comm))


def local_rank(comm: MPI.Comm | None = None) -> int:
    """This rank's index among the ranks of ``comm`` (default COMM_WORLD) on its host.

    Collective over ``comm`` the first time (see ``topology``)."""
    return int(topology(comm).local)


def local_size(comm: MPI.Comm | None = None) -> int:
    """How many ranks of ``comm`` (default COMM_WORLD) share this host.

    Collective over ``comm`` the first time (see ``topology``)."""
    return int(topology(comm).local_size)


def agree(comm: MPI.Comm, fn: Callable[[], T], errors: tuple[type[BaseException], ...] = (UserError,),
          raise_as: Callable[[str], BaseException] = UserError) -> T:
    """Run ``fn`` on every rank; if it raised one of ``errors`` anywhere, raise ``raise_as`` (UserError) everywhere.

    The message lists each distinct problem once with the ranks that hit it,
    so a bad file named on the command line is reported once, not K times,
    and ranks whose part went fine do not wait forever for the others.
    A problem every rank shares is reported without ranks. The exception
    raised carries ``ranks``, the ranks that had a problem (in order).
    Collective over ``comm``: every rank must call it.
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
            message = next(iter(by_message))
        else:
            message = "; ".join(f"{msg} (rank{'s' if len(rs) > 1 else ''} {','.join(map(str, rs))})"
                                for msg, rs in by_message.items())
        error = raise_as(message)
        try:
            error.ranks = [r for r, p in enumerate(problems) if p is not None]  # type: ignore[attr-defined]
        except AttributeError:  # an exception class with __slots__
            pass
        raise error
    return result


def abort_on_exception(fn: Callable[[], int], prog: str = "mpiml") -> int:
    """Run a program's main: a UserError ends it with exit code 2, the message printed once (rank 0).

    Any other exception on any rank prints its traceback (that rank only)
    and aborts the whole job, so the other ranks do not hang in their next
    collective. A UserError that the other ranks do not share (they do not
    end within ENDING_GRACE_SECONDS) also aborts the job, after printing it.
    """
    comm = MPI.COMM_WORLD
    r = comm.Get_rank()
    try:
        return fn()
    except UserError as e:
        if r == 0:
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        if not _ending_together():
            abort(2, (f"{prog}: error on rank {r}: {e}\n" if r != 0 else "") +
                  f"{prog}: rank {r}: the other ranks did not end with this error within "
                  f"{ENDING_GRACE_SECONDS:g} s; aborting the job")
        return 2
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - anything else must bring every rank down
        abort(1, f"[rank {r}] {traceback.format_exc()}{prog}: {type(e).__name__} on rank {r}; aborting the job")


def _ending_together() -> bool:
    """Whether every rank reaches the end (closing the watchdog, collectively) within ENDING_GRACE_SECONDS."""
    from . import watchdog
    if watchdog.active() is None:
        return True
    return watchdog.uninstall(grace=ENDING_GRACE_SECONDS)
