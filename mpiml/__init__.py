"""mpiml: data-parallel training for PyTorch over MPI, with swappable topologies."""

from __future__ import annotations

from . import collectives

__all__ = ["collectives", "__version__"]
__version__ = "0.1.0"
