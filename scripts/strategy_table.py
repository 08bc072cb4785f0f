"""The README's strategy table, printed from the registry (``mpiml.strategies``): the docs cannot drift.

    .venv/bin/python scripts/strategy_table.py      # markdown on stdout; tests/test_strategy_registry.py
                                                    # checks README.md contains exactly this
"""

from __future__ import annotations

from mpiml import strategies


def table() -> str:
    options = strategies.OPTIONS
    lines = ["| strategy | chosen by | replicas | state in a checkpoint | options it honours (keyword, flag) |",
             "|---|---|---|---|---|"]
    for row in strategies.describe():
        cls = strategies.STRATEGIES[row["name"]]
        honoured = ", ".join(f"`{k}`" + (f" (`{options[k].flag}`)" if options[k].flag else "")
                             for k in options if k in cls.options and k != cls.mode_option)
        replicas = "may differ" if row["replicas_differ"] else "identical"
        state = row["state"] if cls.checkpoints else "not checkpointed"
        chosen = row["chosen_by"].replace("|", "\\|")
        lines.append(f"| {row['name']}: {row['summary']} | `{chosen}` | {replicas} | {state} | {honoured} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
