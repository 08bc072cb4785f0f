"""A Slurm allocation's hosts and slots, read from the ``SLURM_*`` variables (no MPI, no Slurm commands).

    expand_hostlist("node[01-03,07],gpu5")      # ['node01', 'node02', 'node03', 'node07', 'gpu5']
    expand_tasks_per_node("2(x3),1")            # [2, 2, 2, 1]
    allocation(os.environ)                      # [('node01', 2), ('node02', 2), ...] or None outside a job

Slurm writes host lists compressed: commas outside brackets separate
entries, and an entry's bracket groups hold numbers and ranges
(``[01-03,07]``) whose zero-padding is kept, as the width of the range's
first number. An entry with several groups (``rack[1-2]-n[3-4]``) stands
for every combination, the first group varying slowest, as ``scontrol show
hostnames`` prints them. Per-node counts are written ``count(xrepeats)``.

``allocation`` reads the variables the MPI launchers read inside a job:
Hydra (MPICH's ``mpiexec``) and Open MPI's PRRTE take the node list from
``SLURM_NODELIST`` and the slots from ``SLURM_TASKS_PER_NODE``, the two that
srun rewrites together for a job step; without tasks per node, the job's
CPUs (``SLURM_JOB_CPUS_PER_NODE``, divided by ``SLURM_CPUS_PER_TASK``) are
the slots, with the job's node list, as Open MPI's older ORTE did. Horovod's
``horovodrun`` reads none of them (its users turn ``scontrol show
hostnames`` into ``-H`` by hand); ``python -m mpiml.run`` given neither
``-H`` nor ``--hostfile`` uses ``allocation`` instead.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping

__all__ = ["expand_hostlist", "expand_tasks_per_node", "allocation", "MAX_HOSTS"]

# More hosts than any allocation has: a typo such as node[1-10000000000] is refused instead of filling memory.
MAX_HOSTS = 1 << 20

_NUMBER_RANGE = re.compile(r"([0-9]+)(?:-([0-9]+))?")
_COUNT = re.compile(r"([0-9]+)(?:\(x([0-9]+)\))?")


def _bad(text: str, why: str) -> ValueError:
    return ValueError(f"bad Slurm hostlist {text!r}: {why}")


def _top_level_entries(text: str) -> list[str]:
    """``text`` cut at the commas outside brackets; ValueError for nested or unbalanced brackets."""
    entries, start, depth = [], 0, 0
    for i, c in enumerate(text):
        if c == "[":
            if depth:
                raise _bad(text, f"nested '[' at position {i}")
            depth = 1
        elif c == "]":
            if not depth:
                raise _bad(text, f"']' without '[' at position {i}")
            depth = 0
        elif c == "," and not depth:
            entries.append(text[start:i])
            start = i + 1
    if depth:
        raise _bad(text, "'[' is never closed")
    entries.append(text[start:])
    return entries


def _expand_group(text: str, group: str) -> list[str]:
    """The numbers a bracket group's contents (``01-03,07``) stand for, each padded as its range's first one."""
    numbers: list[str] = []
    for item in group.split(","):
        match = _NUMBER_RANGE.fullmatch(item)
        if not match:
            raise _bad(text, f"[{group}] holds {item!r}; expected a number or a range such as 01-03")
        lo, hi = match.group(1), match.group(2)
        if hi is None:
            numbers.append(lo)
            continue
        if int(hi) < int(lo):
            raise _bad(text, f"range {item!r} runs backwards")
        if len(numbers) + int(hi) - int(lo) + 1 > MAX_HOSTS:
            raise _bad(text, f"[{group}] has more than {MAX_HOSTS} numbers")
        numbers.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return numbers


def expand_hostlist(text: str) -> list[str]:
    """Every host name in Slurm's compressed list ``text``, in order (``scontrol show hostnames``).

    ``"node[01-03,07],gpu5"`` gives ``node01 node02 node03 node07 gpu5``, and
    ``"rack[1-2]-n[3-4]"`` gives ``rack1-n3 rack1-n4 rack2-n3 rack2-n4``.
    ValueError naming ``text`` for an empty list or entry, unbalanced or
    nested brackets, a group that is not numbers and ranges, a range that
    runs backwards, white space inside, or more than ``MAX_HOSTS`` hosts.
    """
    stripped = text.strip()
    if not stripped:
        raise _bad(text, "no hosts")
    if re.search(r"\s", stripped):
        raise _bad(text, "white space inside a host list")
    hosts: list[str] = []
    for entry in _top_level_entries(stripped):
        if not entry:
            raise _bad(text, "an empty entry (two commas in a row, or one at an end)")
        # Odd pieces are bracket contents, even pieces the literal text between them.
        pieces = re.split(r"\[([^\]]*)\]", entry)
        choices: list[list[str]] = []
        for i, piece in enumerate(pieces):
            if i % 2:
                if not piece:
                    raise _bad(text, f"empty brackets in {entry!r}")
                choices.append(_expand_group(text, piece))
            else:
                choices.append([piece])
        count = 1
        for options in choices:
            count *= len(options)
        if len(hosts) + count > MAX_HOSTS:
            raise _bad(text, f"more than {MAX_HOSTS} hosts")
        hosts.extend("".join(parts) for parts in itertools.product(*choices))
    return hosts


def expand_tasks_per_node(text: str) -> list[int]:
    """One count per node from Slurm's ``SLURM_TASKS_PER_NODE`` / ``SLURM_JOB_CPUS_PER_NODE`` syntax.

    ``"2(x3),1"`` gives ``[2, 2, 2, 1]``. Counts may be 0; repeats are at
    least 1. ValueError naming ``text`` for anything else.
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError(f"bad Slurm per-node counts {text!r}: empty")
    counts: list[int] = []
    for item in stripped.split(","):
        match = _COUNT.fullmatch(item)
        if not match:
            raise ValueError(f"bad Slurm per-node counts {text!r}: {item!r} is not N or N(xM)")
        repeats = int(match.group(2) or 1)
        if repeats < 1:
            raise ValueError(f"bad Slurm per-node counts {text!r}: {item!r} repeats a count 0 times")
        if len(counts) + repeats > MAX_HOSTS:
            raise ValueError(f"bad Slurm per-node counts {text!r}: more than {MAX_HOSTS} nodes")
        counts.extend([int(match.group(1))] * repeats)
    return counts


def _first(environ: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    """The first of ``names`` set to something other than white space, and its value."""
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return None


def allocation(environ: Mapping[str, str]) -> list[tuple[str, int]] | None:
    """The hosts of the Slurm job ``environ`` (e.g. ``os.environ``) runs in, each with its slots, in order.

    None outside a job (neither ``SLURM_JOB_ID`` nor ``SLURM_JOBID`` set).
    Inside one, the slots are ``SLURM_TASKS_PER_NODE``, paired with
    ``SLURM_NODELIST`` (else ``SLURM_JOB_NODELIST``) as Hydra and Open MPI
    pair them; without it, ``SLURM_JOB_CPUS_PER_NODE`` divided by
    ``SLURM_CPUS_PER_TASK`` (default 1), paired with ``SLURM_JOB_NODELIST``
    (else ``SLURM_NODELIST``). Hosts left with no slot are left out.

    ValueError naming the variable when one is missing, malformed, or counts
    a different number of nodes than the node list, or when no host has a
    slot.
    """
    if _first(environ, "SLURM_JOB_ID", "SLURM_JOBID") is None:
        return None
    tasks = _first(environ, "SLURM_TASKS_PER_NODE")
    if tasks is not None:
        nodes = _first(environ, "SLURM_NODELIST", "SLURM_JOB_NODELIST")
        per_task = 1
        counts = tasks
    else:
        counts = _first(environ, "SLURM_JOB_CPUS_PER_NODE")
        if counts is None:
            raise ValueError("inside a Slurm job (SLURM_JOB_ID is set) but neither SLURM_TASKS_PER_NODE nor "
                             "SLURM_JOB_CPUS_PER_NODE says how many slots each node has")
        nodes = _first(environ, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        per_task_text = environ.get("SLURM_CPUS_PER_TASK", "").strip() or "1"
        if not re.fullmatch(r"[0-9]+", per_task_text) or int(per_task_text) < 1:
            raise ValueError(f"SLURM_CPUS_PER_TASK={per_task_text!r}: expected a whole number >= 1")
        per_task = int(per_task_text)
    if nodes is None:
        raise ValueError("inside a Slurm job (SLURM_JOB_ID is set) but neither SLURM_JOB_NODELIST nor "
                         "SLURM_NODELIST lists its nodes")
    nodes_name, nodes_text = nodes
    counts_name, counts_text = counts
    try:
        hosts = expand_hostlist(nodes_text)
    except ValueError as e:
        raise ValueError(f"{nodes_name}: {e}") from None
    try:
        slots = expand_tasks_per_node(counts_text)
    except ValueError as e:
        raise ValueError(f"{counts_name}: {e}") from None
    if len(slots) != len(hosts):
        raise ValueError(f"{counts_name}={counts_text!r} gives {len(slots)} node(s) but "
                         f"{nodes_name}={nodes_text!r} lists {len(hosts)}")
    result = [(host, n // per_task) for host, n in zip(hosts, slots) if n // per_task > 0]
    if not result:
        raise ValueError(f"{counts_name}={counts_text!r} leaves no slot on any node of {nodes_name}={nodes_text!r}"
                         + (f" (SLURM_CPUS_PER_TASK={per_task})" if per_task > 1 else ""))
    return result
