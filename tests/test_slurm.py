"""mpiml.slurm without Slurm: host lists, per-node counts and allocations from SLURM_* variables.

The expected expansions of well-formed host lists are what ``scontrol show
hostnames`` (Slurm 22.05) printed for the same text.
"""

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

# mpiml.slurm imports only the standard library (test_imports), but the package's __init__ imports torch
# (2 s): the file is loaded alone, which keeps these tests well under a second.
SOURCE = Path(__file__).parents[1] / "mpiml" / "slurm.py"
_spec = importlib.util.spec_from_file_location("_mpiml_slurm", SOURCE)
slurm = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = slurm
_spec.loader.exec_module(slurm)
MAX_HOSTS, allocation = slurm.MAX_HOSTS, slurm.allocation
expand_hostlist, expand_tasks_per_node = slurm.expand_hostlist, slurm.expand_tasks_per_node


@pytest.mark.parametrize("text, hosts", [
    ("vm", ["vm"]),
    ("node[01-03,07],gpu5,rack[1-2]-n[3-4]",
     ["node01", "node02", "node03", "node07", "gpu5", "rack1-n3", "rack1-n4", "rack2-n3", "rack2-n4"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("n[1-010]", [f"n{i}" for i in range(1, 11)]),
    ("x[001-3]", ["x001", "x002", "x003"]),
    ("n[0010-12]", ["n0010", "n0011", "n0012"]),
    ("a[1-2][3-4]", ["a13", "a14", "a23", "a24"]),
    ("a[1-2]b[3-4]c", ["a1b3c", "a1b4c", "a2b3c", "a2b4c"]),
    ("a[1-2],b", ["a1", "a2", "b"]),
    ("n[5]", ["n5"]),
    ("[1-2]", ["1", "2"]),
    ("host-1.example.org,host_2", ["host-1.example.org", "host_2"]),
    ("  n[1-2]\n", ["n1", "n2"]),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text, why", [
    ("", "no hosts"),
    ("   ", "no hosts"),
    ("n[1-3", "never closed"),
    ("n1]", "without '['"),
    ("n[[1]]", "nested"),
    ("n[]", "empty brackets"),
    ("a,,b", "empty entry"),
    ("a,", "empty entry"),
    (",a", "empty entry"),
    ("n[3-1]", "backwards"),
    ("n[a]", "'a'"),
    ("n[1-2-3]", "'1-2-3'"),
    ("n[1,,2]", "''"),
    ("n[-1]", "'-1'"),
    ("n[1 -2]", "white space"),
    ("a b", "white space"),
    ("n[0-99999999999]", "more than"),
    ("a[0-1023]b[0-1023]c[0-1]", "more than"),
])
def test_expand_hostlist_refuses(text, why):
    with pytest.raises(ValueError, match="hostlist") as e:
        expand_hostlist(text)
    assert repr(text) in str(e.value)
    assert why in str(e.value)


def test_host_limit(monkeypatch):
    assert MAX_HOSTS == 1 << 20
    monkeypatch.setattr(slurm, "MAX_HOSTS", 6)
    assert len(expand_hostlist("n[1-6]")) == 6
    assert len(expand_hostlist("a[1-3]b[1-2]")) == 6
    assert len(expand_hostlist("a[1-3],b[1-3]")) == 6
    for text in ("n[1-7]", "n[1-4,6-8]", "a[1-3]b[1-3]", "a[1-3],b[1-4]"):
        with pytest.raises(ValueError, match="more than 6"):
            expand_hostlist(text)
    assert expand_tasks_per_node("1(x6)") == [1] * 6
    with pytest.raises(ValueError, match="more than 6"):
        expand_tasks_per_node("1(x5),2(x2)")


@pytest.mark.parametrize("text, counts", [
    ("2", [2]),
    ("2(x3),1", [2, 2, 2, 1]),
    ("1(x4)", [1, 1, 1, 1]),
    ("72(x2),36", [72, 72, 36]),
    ("4,0,3", [4, 0, 3]),
    (" 2(x2) ", [2, 2]),
])
def test_expand_tasks_per_node(text, counts):
    assert expand_tasks_per_node(text) == counts


@pytest.mark.parametrize("text", ["", "x", "2(x0)", "2(3)", "2x3", "2(x3", "-1", "2,,1", "2,", "1.5", "2 (x2)",
                                  "(x2)", "٣"])
def test_expand_tasks_per_node_refuses(text):
    with pytest.raises(ValueError, match="per-node counts") as e:
        expand_tasks_per_node(text)
    assert repr(text) in str(e.value)


def test_outside_a_job():
    assert allocation({}) is None
    assert allocation({"SLURM_NODELIST": "n1", "SLURM_TASKS_PER_NODE": "2"}) is None
    assert allocation({"SLURM_JOB_ID": " ", "SLURM_NODELIST": "n1", "SLURM_TASKS_PER_NODE": "2"}) is None


def test_batch_script_environment():
    # What sbatch -n 2 set on the one-node cluster of make test-slurm.
    env = {"SLURM_JOB_ID": "7", "SLURM_JOBID": "7", "SLURM_JOB_NODELIST": "vm", "SLURM_NODELIST": "vm",
           "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_CPUS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NTASKS": "2"}
    assert allocation(env) == [("vm", 2)]


def test_tasks_per_node_over_several_nodes():
    env = {"SLURM_JOBID": "12", "SLURM_JOB_NODELIST": "node[01-03,07]", "SLURM_TASKS_PER_NODE": "2(x3),1",
           "SLURM_JOB_CPUS_PER_NODE": "8(x4)"}
    assert allocation(env) == [("node01", 2), ("node02", 2), ("node03", 2), ("node07", 1)]


def test_tasks_pair_with_slurm_nodelist():
    # Inside a job step srun rewrites SLURM_NODELIST and SLURM_TASKS_PER_NODE together (the step's nodes);
    # SLURM_JOB_NODELIST stays the job's. Hydra and Open MPI read the pair.
    env = {"SLURM_JOB_ID": "3", "SLURM_JOB_NODELIST": "n[1-4]", "SLURM_NODELIST": "n[2-3]",
           "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_JOB_CPUS_PER_NODE": "4(x4)"}
    assert allocation(env) == [("n2", 1), ("n3", 1)]


def test_cpus_per_node_without_tasks_per_node():
    env = {"SLURM_JOB_ID": "3", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NODELIST": "n1",
           "SLURM_JOB_CPUS_PER_NODE": "4,2"}
    assert allocation(env) == [("n1", 4), ("n2", 2)]
    assert allocation({**env, "SLURM_CPUS_PER_TASK": "2"}) == [("n1", 2), ("n2", 1)]
    # A node with fewer CPUs than one task needs gets no slot.
    assert allocation({**env, "SLURM_CPUS_PER_TASK": "3"}) == [("n1", 1)]


def test_node_list_fallbacks():
    assert allocation({"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "a,b", "SLURM_TASKS_PER_NODE": "1(x2)"}) == \
        [("a", 1), ("b", 1)]
    assert allocation({"SLURM_JOB_ID": "1", "SLURM_NODELIST": "a,b", "SLURM_JOB_CPUS_PER_NODE": "3(x2)"}) == \
        [("a", 3), ("b", 3)]


def test_hosts_without_slots_are_left_out():
    env = {"SLURM_JOB_ID": "1", "SLURM_NODELIST": "a,b,c", "SLURM_TASKS_PER_NODE": "2,0,1"}
    assert allocation(env) == [("a", 2), ("c", 1)]


@pytest.mark.parametrize("env, names", [
    ({"SLURM_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "2(x2)"}, ["SLURM_TASKS_PER_NODE", "SLURM_NODELIST"]),
    ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "1(x3)"},
     ["SLURM_TASKS_PER_NODE", "SLURM_JOB_NODELIST"]),
    ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_CPUS_PER_NODE": "4"},
     ["SLURM_JOB_CPUS_PER_NODE", "SLURM_JOB_NODELIST"]),
    ({"SLURM_NODELIST": "n[1-", "SLURM_TASKS_PER_NODE": "2"}, ["SLURM_NODELIST"]),
    ({"SLURM_NODELIST": "n1", "SLURM_TASKS_PER_NODE": "2(x)"}, ["SLURM_TASKS_PER_NODE"]),
    ({"SLURM_NODELIST": "n1", "SLURM_JOB_CPUS_PER_NODE": "many"}, ["SLURM_JOB_CPUS_PER_NODE"]),
    ({"SLURM_NODELIST": "n1"}, ["SLURM_TASKS_PER_NODE", "SLURM_JOB_CPUS_PER_NODE"]),
    ({"SLURM_TASKS_PER_NODE": "2"}, ["SLURM_JOB_NODELIST", "SLURM_NODELIST"]),
    ({"SLURM_NODELIST": "n1", "SLURM_JOB_CPUS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "0"}, ["SLURM_CPUS_PER_TASK"]),
    ({"SLURM_NODELIST": "n1", "SLURM_JOB_CPUS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "two"},
     ["SLURM_CPUS_PER_TASK"]),
    ({"SLURM_NODELIST": "n1", "SLURM_JOB_CPUS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "4"},
     ["SLURM_JOB_CPUS_PER_NODE", "SLURM_CPUS_PER_TASK=4"]),
    ({"SLURM_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "0(x2)"}, ["SLURM_TASKS_PER_NODE", "no slot"]),
])
def test_inconsistent_or_missing_variables(env, names):
    with pytest.raises(ValueError) as e:
        allocation({"SLURM_JOB_ID": "9", **env})
    for name in names:
        assert name in str(e.value)


def test_imports():
    # mpiml.run calls allocation() before any rank starts: no MPI, no torch, nothing beyond the standard library.
    modules = set()
    for node in ast.walk(ast.parse(SOURCE.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            modules.add("." if node.level else node.module.split(".")[0])
    assert modules <= {"__future__", "collections", "itertools", "re"}
