"""The strategy registry without MPI: what drives the CLI, docs and tests is consistent."""

import subprocess
import sys

import pytest

from mpiml import strategies
from mpiml.strategies import gossip


def test_topologies_are_unique_and_every_strategy_is_reachable():
    assert len(set(strategies.TOPOLOGIES)) == len(strategies.TOPOLOGIES)
    for name, cls in strategies.STRATEGIES.items():
        assert cls.topologies or cls.mode_option or name == "sync", name
        assert cls.options <= set(strategies.OPTIONS), name
        assert cls.state in (strategies.REPLICATED, strategies.PER_RANK, strategies.SHARDED)


@pytest.mark.parametrize("graph", gossip.GRAPHS)
@pytest.mark.parametrize("size", range(2, 10))
def test_gossip_graphs_are_doubly_stochastic(graph, size):
    """Every rank receives from exactly the ranks that send to it, as many as it sends to."""
    for step in range(6):
        sent = sorted((r, to) for r in range(size) for to, _ in gossip.peers(graph, r, size, step))
        received = sorted((frm, r) for r in range(size) for _, frm in gossip.peers(graph, r, size, step))
        assert sent == received  # every message has a receiver expecting it, and no rank talks to itself
        assert all(a != b for a, b in sent)
        assert len(set(sent)) == len(sent)
        counts = {r: len(gossip.peers(graph, r, size, step)) for r in range(size)}
        assert len(set(counts.values())) == 1  # equal weights everywhere: doubly stochastic


def test_the_readme_table_is_the_registry():
    table = subprocess.run([sys.executable, "scripts/strategy_table.py"], capture_output=True, text=True, check=True)
    with open("README.md") as f:
        assert table.stdout.strip() in f.read(), "README's strategy table differs: rerun scripts/strategy_table.py"


def test_cli_offers_every_topology_and_declared_option():
    from mpiml.train import parse_args
    for t in strategies.TOPOLOGIES:
        assert parse_args(["--topology", t]).topology == t
    assert parse_args(["--topology", "gossip", "--gossip-graph", "ring"]).strategy_extra == {"gossip_graph": "ring"}
