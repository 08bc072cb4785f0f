"""How replicas agree: one strategy per file, chosen through this registry.

    from mpiml import strategies
    strategies.TOPOLOGIES                 # every --topology name, for the CLI, docs and tests
    strategies.select("ring", {"zero": True})   # the strategy for a topology and options

``--topology`` names either an exact collective algorithm (``mpi``,
``ring``, ``tree``, ``butterfly``, ``hier``, ``auto``: synchronous SGD over
it, or the strategy whose ``mode_option`` is given: ``--average-every`` for
local SGD, ``--zero`` for sharded optimizer state) or a strategy that needs
no algorithm of its own (``butterfly-mixing``, ``gossip``, ``ps``).

Adding a strategy: write ``mpiml/strategies/<name>.py`` with a subclass of
``Strategy`` (``base.py`` says what it declares and which hooks it may
override) bound to the name ``STRATEGY``, and add the module's name to
``_MODULES`` below. Options of its own go in its ``declares``: the CLI
offers them and ``DistributedOptimizer`` accepts them as keywords. The CLI's choices, its
``--help``, the options table in the README (``scripts/strategy_table.py``),
the tests that go through every (strategy, option) pair and the study
scripts all read this registry.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..collectives import ALGORITHMS
from ..runtime import UserError
from .base import OPTIONS as COMMON_OPTIONS
from .base import PER_RANK, REPLICATED, SHARDED, Option, Strategy, given
from .synchronous import Synchronous

__all__ = ["Strategy", "Option", "OPTIONS", "STRATEGIES", "TOPOLOGIES", "EXACT_TOPOLOGIES", "REPLICATED",
           "PER_RANK", "SHARDED", "select", "strategy_for", "describe"]

# The registry: one line per strategy, naming its module (each module's STRATEGY is its class).
_MODULES = (
    "synchronous",
    "zero",
    "local_sgd",
    "butterfly_mixing",
    "parameter_server",
    "gossip",
)
STRATEGIES: dict[str, type[Strategy]] = {}
for _module in _MODULES:
    _cls = importlib.import_module(f"{__name__}.{_module}").STRATEGY
    STRATEGIES[_cls.name] = _cls
OPTIONS: dict[str, Option] = {**COMMON_OPTIONS, **{o.keyword: o for c in STRATEGIES.values() for o in c.declares}}

EXACT_TOPOLOGIES: tuple[str, ...] = tuple(ALGORITHMS)
TOPOLOGIES: tuple[str, ...] = EXACT_TOPOLOGIES + tuple(t for cls in STRATEGIES.values() for t in cls.topologies)
DEFAULT_ALGORITHM = "ring"  # the exact collective of strategies chosen by a name of their own


def strategy_for(topology: str, options: dict[str, Any] | None = None) -> type[Strategy]:
    """The strategy class that ``topology`` and ``options`` choose (UserError for an unknown topology
    or two mode options at once)."""
    asked = given(options or {})
    if topology in EXACT_TOPOLOGIES:
        modes = [cls for cls in STRATEGIES.values() if cls.mode_option and cls.mode_option in asked]
        if len(modes) > 1:
            flags = " and ".join(OPTIONS[cls.mode_option].flag for cls in modes)  # type: ignore[index]
            raise UserError(f"{flags} choose different strategies ({', '.join(c.name for c in modes)}); give one")
        return modes[0] if modes else Synchronous
    for cls in STRATEGIES.values():
        if topology in cls.topologies:
            return cls
    raise UserError(f"unknown topology {topology!r}; choose from {', '.join(TOPOLOGIES)}")


def select(topology: str, options: dict[str, Any]) -> Strategy:
    """The strategy instance for ``topology`` with ``options`` (``DistributedOptimizer``'s keywords);
    an option given a non-default value that the strategy does not honour is refused (UserError)."""
    cls = strategy_for(topology, options)
    cls.check_options(options)
    algorithm = topology if topology in EXACT_TOPOLOGIES else DEFAULT_ALGORITHM
    return cls(algorithm, options)


def describe() -> list[dict[str, Any]]:
    """One row per strategy: how it is chosen, what it declares, and which options it honours."""
    rows = []
    for cls in STRATEGIES.values():
        chosen = (" ".join(f"--topology {t}" for t in cls.topologies) if cls.topologies else
                  "--topology " + "|".join(EXACT_TOPOLOGIES) +
                  (f" {OPTIONS[cls.mode_option].flag}" if cls.mode_option else ""))
        rows.append({"name": cls.name, "summary": cls.summary, "chosen_by": chosen,
                     "replicas_differ": cls.replicas_differ, "state": cls.state,
                     "options": sorted(cls.options)})
    return rows
