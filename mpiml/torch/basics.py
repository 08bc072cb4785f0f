"""Process-wide state of mpiml.torch: ``init``/``shutdown``, ranks and sizes, settings, the timeline switch.

Settings are read by ``init()`` from the environment, under Horovod's
names where Horovod has one:

=================================  ==========================================================
``HOROVOD_FUSION_THRESHOLD``       bytes per fused allreduce/broadcast (default 128 MiB; 0: no fusion)
``HOROVOD_CYCLE_TIME``             milliseconds between negotiation cycles while busy (default 1)
``HOROVOD_TIMELINE``               write a Chrome trace of every rank's phases to this path
``HOROVOD_TIMELINE_MARK_CYCLES``   1: mark each negotiation cycle in the trace
``HOROVOD_STALL_CHECK_TIME_SECONDS``  warn when a name waits this long for some ranks (default 60)
``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS``  shut every rank down when a name waits this long (default 0: never)
``HOROVOD_STALL_CHECK_DISABLE``    1: no stall warnings (and no stall shutdown)
``MPIML_ALGORITHM``                mpiml.collectives algorithm: ring (default), tree, butterfly, mpi
=================================  ==========================================================

A value ``init()`` cannot use (``HOROVOD_CYCLE_TIME=inf``, a negative
number, an unknown algorithm) ends the job as a bad command line does:
every rank exits with status 2 and rank 0 prints one
``mpiml.torch: error: ...`` line (agreed through ``mpiml.runtime.agree``:
it names the ranks with the problem unless all had it), instead of each
rank printing a traceback.

``local_rank``/``local_size``/``cross_rank``/``cross_size``/``is_homogeneous``
read ``mpiml.runtime.topology`` of the communicator ``init`` was given
(computed there, on every rank, and cached on that communicator; the same
layout mpiml's collectives use), so they never communicate afterwards.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Any

from mpi4py import MPI

from .. import runtime
from ..run import check_algorithm, setting_value
from .engine import Engine
from .requests import HorovodInternalError, ReduceOp

__all__ = ["init", "shutdown", "is_initialized", "size", "rank", "local_size", "local_rank", "cross_size",
           "cross_rank", "engine", "start_timeline", "stop_timeline", "mpi_threads_supported", "mpi_enabled",
           "mpi_built", "gloo_enabled", "gloo_built", "nccl_built", "ddl_built", "ccl_built", "cuda_built",
           "rocm_built", "is_homogeneous", "ProcessSet", "global_process_set", "add_process_set",
           "remove_process_set", "check_process_set", "HorovodInternalError", "ReduceOp", "Average", "Sum",
           "Adasum", "Min", "Max", "Product", "settings"]

Average, Sum, Adasum, Min, Max, Product = (ReduceOp.Average, ReduceOp.Sum, ReduceOp.Adasum, ReduceOp.Min,
                                           ReduceOp.Max, ReduceOp.Product)
DEFAULT_FUSION_THRESHOLD = 128 * 1024 * 1024
NOT_INITIALIZED = "Horovod has not been initialized; use hvd.init()."


class _State:
    def __init__(self, comm: MPI.Intracomm, engine: Engine, topology: Any) -> None:
        self.comm = comm
        self.engine = engine
        self.topology = topology  # runtime.topology(comm): cached on comm, shared with mpiml, not freed here


_state: _State | None = None
_atexit_registered = False


def _env_number(name: str, default: float) -> Any:
    text = os.environ.get(name)
    if text is None or text.strip() == "":
        return default
    return setting_value(name, text)


def settings() -> dict[str, Any]:
    """The engine settings ``init()`` would use now (from the environment); ValueError naming a bad variable."""
    algorithm = os.environ.get("MPIML_ALGORITHM", "ring").strip() or "ring"
    try:
        check_algorithm(algorithm)
    except ValueError as e:
        raise ValueError(f"MPIML_ALGORITHM: {e}") from None
    stall = _env_number("HOROVOD_STALL_CHECK_TIME_SECONDS", 60.0)
    if os.environ.get("HOROVOD_STALL_CHECK_DISABLE", "0") not in ("", "0"):
        stall = 0.0
    return {
        "algorithm": algorithm,
        "cycle_time": _env_number("HOROVOD_CYCLE_TIME", 1.0) / 1000.0,
        "fusion_threshold": _env_number("HOROVOD_FUSION_THRESHOLD", DEFAULT_FUSION_THRESHOLD),
        "stall_seconds": stall,
        "stall_shutdown_seconds": _env_number("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", 0.0),
        "timeline_path": os.environ.get("HOROVOD_TIMELINE") or None,
        "mark_cycles": os.environ.get("HOROVOD_TIMELINE_MARK_CYCLES", "0") not in ("", "0"),
    }


def _agreed_settings(comm: MPI.Intracomm) -> dict[str, Any]:
    """``settings()``, or SystemExit(2) on every rank if any rank's environment is unusable (one line printed).

    Agreed through ``mpiml.runtime.agree`` (collective: no rank goes on to start an engine the others
    will not); rank 0 prints the one message, which names the ranks unless all of them had it."""
    try:
        return runtime.agree(comm, settings, errors=(ValueError,))
    except runtime.UserError as e:
        if comm.Get_rank() == 0:
            print(f"mpiml.torch: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def init(comm: MPI.Intracomm | list[int] | None = None, process_sets: Any = None) -> None:
    """Start mpiml.torch on ``comm`` (default COMM_WORLD; or a list of world ranks); idempotent.

    Starts this process's engine thread. Every rank of ``comm`` must call
    it. ``process_sets`` other than None are not supported.
    """
    global _state, _atexit_registered
    if _state is not None and not _state.engine.stopped:
        return
    if _state is not None:  # stopped by a peer's shutdown: start afresh
        shutdown()
    if process_sets not in (None, [], ()):
        raise ValueError("process sets are not supported by mpiml.torch; use an MPI communicator (init(comm=...))")
    if not MPI.Is_initialized():
        MPI.Init_thread(MPI.THREAD_MULTIPLE)
    if isinstance(comm, (list, tuple)):
        comm = _comm_of_ranks(list(comm))
    comm = MPI.COMM_WORLD if comm is None else comm
    if not isinstance(comm, MPI.Intracomm):
        raise ValueError(f"init(comm=...) takes an mpi4py intracommunicator or a list of ranks, got {comm!r}")
    if MPI.Query_thread() < MPI.THREAD_SERIALIZED:
        raise RuntimeError("mpiml.torch needs MPI initialised with at least MPI_THREAD_SERIALIZED "
                           "(mpi4py's default is THREAD_MULTIPLE)")
    config = _agreed_settings(comm)
    topology = runtime.topology(comm)  # collective on comm, so here, where every rank is; cached for later
    _state = _State(comm, Engine(comm, **config), topology)
    if not _atexit_registered:
        atexit.register(_shutdown_at_exit)
        _atexit_registered = True


def _comm_of_ranks(ranks: list[int]) -> MPI.Intracomm:
    world = MPI.COMM_WORLD
    if sorted(set(ranks)) != sorted(ranks) or any(not 0 <= r < world.Get_size() for r in ranks):
        raise ValueError(f"init(comm={ranks}): ranks must be distinct world ranks below {world.Get_size()}")
    if world.Get_rank() not in ranks:
        raise ValueError(f"init(comm={ranks}): this process (world rank {world.Get_rank()}) is not in the list")
    group = world.Get_group().Incl(ranks)
    try:
        return world.Create_group(group)
    finally:
        group.Free()


def _shutdown_at_exit() -> None:
    if _state is not None and not _state.engine.stopped and MPI.Is_initialized() and not MPI.Is_finalized():
        shutdown()


def shutdown() -> None:
    """Stop the engine on every rank (agreed, so all stop in the same cycle); pending ops fail."""
    global _state
    state, _state = _state, None
    if state is None:
        return
    state.engine.shutdown()


def is_initialized() -> bool:
    return _state is not None and not _state.engine.stopped


def _get() -> _State:
    if _state is None:
        raise ValueError(NOT_INITIALIZED)
    return _state


def engine() -> Engine:
    """This process's engine (ValueError before ``init()``)."""
    return _get().engine


def size() -> int:
    return _get().comm.Get_size()


def rank() -> int:
    return _get().comm.Get_rank()


def local_size() -> int:
    """Ranks on this host (of the communicator ``init`` was given; ``mpiml.runtime.topology``)."""
    return int(_get().topology.local_size)


def local_rank() -> int:
    """This rank's index among the ranks on its host."""
    return int(_get().topology.local)


def cross_size() -> int:
    """Ranks with this rank's local rank, one per host (the number of hosts, when they hold equal counts)."""
    return int(_get().topology.cross.Get_size())


def cross_rank() -> int:
    """This rank's index among the ranks with its local rank (its host's index, when hosts hold equal counts)."""
    return int(_get().topology.cross.Get_rank())


def is_homogeneous() -> bool:
    """Whether every host runs the same number of ranks (known since ``init``: no communication)."""
    return bool(_get().topology.uniform)


def start_timeline(file_path: str, mark_cycles: bool = False) -> None:
    """Record this rank's engine phases to a Chrome trace (rank r > 0 writes ``<stem>.rank<r><suffix>``)."""
    engine().set_timeline(file_path, mark_cycles)


def stop_timeline() -> None:
    """Stop recording and close this rank's trace file."""
    engine().set_timeline(None)


def mpi_threads_supported() -> bool:
    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


def mpi_enabled() -> bool:
    return True


def mpi_built() -> bool:
    return True


def gloo_enabled() -> bool:
    return False


def gloo_built() -> bool:
    return False


def nccl_built() -> int:
    return 0


def ddl_built() -> bool:
    return False


def ccl_built() -> bool:
    return False


def cuda_built() -> bool:
    return False


def rocm_built() -> bool:
    return False


class ProcessSet:
    """Horovod's process sets, reduced to the one mpiml.torch supports: all ranks."""

    process_set_id = 0

    def size(self) -> int:
        return size()

    def rank(self) -> int:
        return rank()

    def included(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "ProcessSet(global)"


global_process_set = ProcessSet()


def check_process_set(process_set: Any) -> None:
    if process_set is not None and process_set is not global_process_set:
        raise ValueError("process sets other than hvd.global_process_set are not supported by mpiml.torch")


def add_process_set(process_set: Any) -> ProcessSet:
    raise ValueError("process sets are not supported by mpiml.torch; init(comm=...) takes a sub-communicator")


def remove_process_set(process_set: Any) -> bool:
    raise ValueError("process sets are not supported by mpiml.torch")
