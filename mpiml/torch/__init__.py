"""Horovod's PyTorch API on mpiml: change ``import horovod.torch as hvd`` to ``import mpiml.torch as hvd``.

    import mpiml.torch as hvd
    hvd.init()
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    ...
    avg = hvd.allreduce(metric, name="avg_metric")

Same names, signatures, defaults and documented behaviour as
``horovod.torch`` (see docs/from_horovod.md for what is and is not
supported). Operations are matched across ranks by name and run by one
background engine thread per process (``engine.py``), which negotiates
with rank 0 in cycles, fuses small allreduces, and moves the data with
``mpiml.collectives`` (``MPIML_ALGORITHM``, default ring). Tensors must be
CPU tensors.

Layout: ``basics`` (init, ranks, settings), ``ops`` (allreduce family,
handles, join, barrier), ``movement`` (allgather, broadcast, alltoall,
reducescatter, and their grouped forms), ``functions`` (broadcasting parameters, optimizer state
and objects), ``optimizer`` (DistributedOptimizer), ``compression``,
``engine``/``negotiation``/``execute`` (the machinery).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .basics import (
    Adasum,
    Average,
    Max,
    Min,
    ProcessSet,
    Product,
    Sum,
    add_process_set,
    ccl_built,
    cross_rank,
    cross_size,
    cuda_built,
    ddl_built,
    global_process_set,
    gloo_built,
    gloo_enabled,
    init,
    is_homogeneous,
    is_initialized,
    local_rank,
    local_size,
    mpi_built,
    mpi_enabled,
    mpi_threads_supported,
    nccl_built,
    rank,
    remove_process_set,
    rocm_built,
    shutdown,
    size,
    start_timeline,
    stop_timeline,
)
from .compression import Compression
from .functions import allgather_object, broadcast_object, broadcast_optimizer_state, broadcast_parameters
from .movement import (
    allgather,
    allgather_async,
    alltoall,
    alltoall_async,
    broadcast,
    broadcast_,
    broadcast_async,
    broadcast_async_,
    grouped_allgather,
    grouped_allgather_async,
    grouped_reducescatter,
    grouped_reducescatter_async,
    reducescatter,
    reducescatter_async,
    sparse_allreduce_async,
)
from .ops import (
    allreduce,
    allreduce_,
    allreduce_async,
    allreduce_async_,
    barrier,
    grouped_allreduce,
    grouped_allreduce_,
    grouped_allreduce_async,
    grouped_allreduce_async_,
    join,
    poll,
    synchronize,
)
from .optimizer import DistributedOptimizer
from .requests import HorovodInternalError, ReduceOp

if TYPE_CHECKING:
    from ..timeline import Timeline

__all__ = [
    "init", "shutdown", "is_initialized", "size", "rank", "local_size", "local_rank", "cross_size", "cross_rank",
    "allreduce", "allreduce_", "allreduce_async", "allreduce_async_",
    "grouped_allreduce", "grouped_allreduce_", "grouped_allreduce_async", "grouped_allreduce_async_",
    "allgather", "allgather_async", "grouped_allgather", "grouped_allgather_async",
    "broadcast", "broadcast_", "broadcast_async", "broadcast_async_",
    "alltoall", "alltoall_async", "reducescatter", "reducescatter_async",
    "grouped_reducescatter", "grouped_reducescatter_async", "sparse_allreduce_async",
    "poll", "synchronize", "join", "barrier",
    "Average", "Sum", "Adasum", "Min", "Max", "Product", "ReduceOp",
    "broadcast_parameters", "broadcast_optimizer_state", "broadcast_object", "allgather_object",
    "DistributedOptimizer", "Compression", "HorovodInternalError",
    "start_timeline", "stop_timeline", "timeline",
    "mpi_threads_supported", "mpi_enabled", "mpi_built", "gloo_enabled", "gloo_built", "nccl_built", "ddl_built",
    "ccl_built", "cuda_built", "rocm_built", "is_homogeneous",
    "ProcessSet", "global_process_set", "add_process_set", "remove_process_set",
]


def timeline() -> Timeline:
    """This rank's active ``mpiml.timeline.Timeline`` (disabled unless recording), to add your own phases.

    An mpiml extension: ``with hvd.timeline().span("forward", "compute"): ...``
    puts the phase in the same trace as the engine's negotiation and allreduces.
    """
    from . import basics
    return basics.engine().timeline
