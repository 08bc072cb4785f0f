"""mpiml: data-parallel training for PyTorch over MPI, with swappable topologies.

    import mpiml
    mpiml.init()
    opt = mpiml.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, topology="ring")
    mpiml.broadcast_parameters(model, root=0)
    mpiml.broadcast_optimizer_state(opt, root=0)
"""

from __future__ import annotations

from . import collectives
from .optimizer import EXACT_TOPOLOGIES, TOPOLOGIES, DistributedOptimizer
from .params import broadcast_optimizer_state, broadcast_parameters, parameters_sha256
from .runtime import UserError, init, is_initialized, local_rank, local_size, rank, size

__all__ = ["collectives", "init", "is_initialized", "rank", "size", "local_rank", "local_size",
           "DistributedOptimizer", "broadcast_parameters", "broadcast_optimizer_state", "parameters_sha256",
           "TOPOLOGIES", "EXACT_TOPOLOGIES", "UserError", "__version__"]
__version__ = "0.1.0"
