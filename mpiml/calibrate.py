"""``python -m mpiml.bench calibrate-model``: fit ``mpiml.plan``'s cost model on the machine at hand.

    mpiexec -n 2 python -m mpiml.bench calibrate-model              # one host
    python -m mpiml.cluster --hosts 2 --link 1gbit -- python -m mpiml.bench calibrate-model

What is measured, and what each gives (all ranks take part; rank 0 fits and saves):

- **ping-pong** between rank 0 and the first rank of another host (if any) and between rank 0 and a rank
  of its own host (if any), raw ``Send``/``Recv``: one-way time t(m) = alpha + m beta, with alpha the
  time of an 8-byte message and beta the slope between the two largest sizes (``alpha``/``beta`` across
  hosts, ``alpha_local``/``beta_local`` inside one);
- **reductions**: ``gamma`` is the time per byte of mpiml's own reduction (``Reduction.combine``) of
  256 KiB chunks into a 16 MiB buffer, one rank alone; the same with every rank of a host at once
  gives ``beta_mem`` (the host's memory bus), or 0 where that was not measurably slower;
- **allreduce runs**: ``call``, the front door's cost per call (agreement check, dispatch), is what a
  4 KiB ``mpi`` allreduce through ``mpiml.collectives.allreduce`` takes beyond its replay;
  ``overhead``, the CPU time mpiml's executor spends per schedule step beyond the message itself, is
  fitted from small ring and butterfly allreduces: (measured - replayed with no overhead) / steps, the
  median over sizes and algorithms. Where the job has more ranks on this physical machine than it has
  cores (the emulated cluster), both are divided by the ranks per core: the model multiplies them back
  for a layout as crowded (``Machine.sharing``), and predicts a real cluster from the uncrowded values.

The fitted ``Machine`` is saved in the calibration file, beside ``auto``'s tables (``models``, keyed
by layout like the tables), where ``python -m mpiml.plan`` and ``auto`` find it.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import replace
from typing import Any

import numpy as np
from mpi4py import MPI

from . import plan
from .collectives import allreduce, auto, hier, private_comm
from .collectives._buffers import reduction
from .collectives._schedule import polling
from .strategies.synchronous import NETWORK_POLL_SECONDS

__all__ = ["fit_machine", "save_model", "ping_pong"]

PING_SIZES = (8, 4 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20)
OVERHEAD_SIZES = (4 << 10, 16 << 10, 64 << 10)


def ping_pong(comm: MPI.Comm, a: int, b: int, sizes: tuple[int, ...] = PING_SIZES, seconds: float = 0.2,
              ) -> dict[int, float]:
    """One-way seconds per message size between ranks ``a`` and ``b`` (median of rounds; collective)."""
    me = comm.Get_rank()
    times: dict[int, float] = {}
    for size in sizes:
        buf = np.zeros(max(1, size), dtype=np.uint8)
        reps = 3
        samples = []
        for round_ in range(5):
            comm.Barrier()
            if me in (a, b):
                other = b if me == a else a
                start = time.perf_counter()
                for _ in range(reps):
                    if me == a:
                        comm.Send(buf, other, 3)
                        comm.Recv(buf, other, 3)
                    else:
                        comm.Recv(buf, other, 3)
                        comm.Send(buf, other, 3)
                samples.append((time.perf_counter() - start) / reps / 2)
            # more repetitions for quick messages, agreed by a and b (so both loop as often)
            took = comm.bcast(samples[-1] if samples else 0.0, root=a)
            if round_ == 0:
                reps = max(1, min(1000, int(seconds / 5 / max(took * 2, 1e-7))))
        times[size] = statistics.median(samples[1:]) if samples else 0.0
    return {s: comm.bcast(t, root=a) for s, t in times.items()}


def _line(times: dict[int, float]) -> tuple[float, float]:
    """(alpha, beta) of t(m) = alpha + m beta: the smallest message, the slope of the two largest."""
    sizes = sorted(times)
    big, bigger = sizes[-2], sizes[-1]
    beta = max(1e-13, (times[bigger] - times[big]) / (bigger - big))
    return times[sizes[0]], beta


def _reduce_rate(dtype: str = "float32", nbytes: int = 16 << 20, chunk: int = 256 << 10) -> float:
    """Seconds per byte of mpiml's reduction: 256 KiB chunks added into a buffer, as the executor does."""
    red = reduction("sum", dtype)
    a = np.ones(nbytes // 4, dtype=dtype)
    temp = np.ones(chunk // 4, dtype=dtype)
    step = temp.size
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for lo in range(0, a.size, step):
            red.combine(a[lo:lo + step], temp)
        best = min(best, time.perf_counter() - start)
    return best / nbytes


def fit_machine(comm: MPI.Comm | None = None) -> tuple[plan.Machine, plan.Layout, dict[str, Any]]:
    """Measure and fit the cost model (collective); every rank gets the same answer."""
    comm = MPI.COMM_WORLD if comm is None else comm
    data = private_comm(comm).Dup()
    try:
        return _fit(data, comm)
    finally:
        data.Free()


def _fit(data: MPI.Comm, comm: MPI.Comm) -> tuple[plan.Machine, plan.Layout, dict[str, Any]]:
    p = data.Get_size()
    if p < 2:
        raise ValueError("calibrate-model needs at least 2 ranks (run it under mpiexec -n 2 or more)")
    topo = hier.topology(private_comm(comm))
    hosts = topo.hosts
    per_host = topo.local_size if topo.uniform else 1
    host_of = data.allgather(platform.node())
    machine = _machine_id()
    same_machine = data.allgather(machine).count(machine)  # ranks on this physical machine
    m = plan.DEFAULT_MACHINE
    notes: dict[str, Any] = {"hosts": hosts, "per_host": per_host, "ranks": p}
    remote = next((r for r in range(p) if host_of[r] != host_of[0]), None)
    local = next((r for r in range(1, p) if host_of[r] == host_of[0]), None)
    if remote is not None:
        t = ping_pong(data, 0, remote)
        alpha, beta = _line(t)
        m = replace(m, alpha=alpha, beta=beta)
        notes["ping_pong_remote_s"] = {str(k): v for k, v in t.items()}
    if local is not None:
        t = ping_pong(data, 0, local)
        alpha, beta = _line(t)
        m = replace(m, alpha_local=alpha, beta_local=beta)
        notes["ping_pong_local_s"] = {str(k): v for k, v in t.items()}
    # reductions: rank 0 alone, then every rank at once
    data.Barrier()
    alone = _reduce_rate() if data.Get_rank() == 0 else 0.0
    alone = data.bcast(alone, root=0)
    data.Barrier()
    together = data.allreduce(_reduce_rate(), op=MPI.MAX)
    shared = sum(1 for h in host_of if h == host_of[0])
    beta_mem = together / (3 * shared) if together > 1.15 * alone and shared > 1 else 0.0
    m = replace(m, gamma=alone, beta_mem=beta_mem)
    notes.update(reduce_alone_s_per_byte=alone, reduce_together_s_per_byte=together)
    layout = plan.Layout(hosts, per_host) if topo.uniform else plan.Layout(1, p)
    # the front door's cost per call: the library's own Allreduce of 4 KiB through it, less its replay
    # (waiting as DistributedOptimizer waits: across hosts it tests and sleeps instead of spinning)
    poll = NETWORK_POLL_SECONDS if hosts > 1 else 0.0
    x = np.random.default_rng(data.Get_rank()).standard_normal(1024).astype(np.float32)
    bare = replace(m, overhead=0.0, call=0.0)
    took = _time_allreduce(x, "mpi", comm, poll)
    m = replace(m, call=max(0.0, took - plan.allreduce_time(4096, "mpi", layout, bare)))
    # the executor's overhead per step, from small allreduces
    zero = replace(m, overhead=0.0)
    residuals = []
    for size in OVERHEAD_SIZES:
        x = np.random.default_rng(data.Get_rank()).standard_normal(size // 4).astype(np.float32)
        for algorithm in ("ring", "butterfly"):
            measured = _time_allreduce(x, algorithm, comm, poll)
            predicted = plan.allreduce_time(size, algorithm, layout, zero)
            steps = _steps(algorithm, size // 4, p)
            residuals.append(max(0.0, (measured - predicted) / steps))
    # On a machine with more ranks than cores (an emulated cluster, an oversubscribed host) software time
    # is mostly waiting to be scheduled: saved per rank with a core of its own (plan scales it back).
    crowd = max(1.0, same_machine / (os.cpu_count() or 1))
    m = replace(m, overhead=statistics.median(residuals) / crowd, call=m.call / crowd)
    notes.update(overhead_residuals_s=residuals, ranks_per_core=crowd)
    m = data.bcast(m, root=0)
    return m, layout, notes


def _machine_id() -> str:
    """This physical machine, also inside the emulated cluster's namespaces (they share the kernel)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return platform.node()


def _steps(algorithm: str, n: int, p: int) -> int:
    from .collectives import butterfly, ring
    module = {"ring": ring, "butterfly": butterfly}[algorithm]
    return max(len(module.allreduce_schedule(n, 4, p, r)) for r in range(p))


def _time_allreduce(x: np.ndarray, algorithm: str, comm: MPI.Comm, poll: float) -> float:
    with polling(poll):
        return _timed(x, algorithm, comm)


def _timed(x: np.ndarray, algorithm: str, comm: MPI.Comm) -> float:
    buf = x.copy()  # (max, not sum: the same buffer reduced again and again stays finite)
    for _ in range(5):
        allreduce(buf, op="max", algorithm=algorithm, comm=comm)
    samples = []
    for _ in range(5):
        comm.Barrier()
        reps = 50
        start = time.perf_counter()
        for _ in range(reps):
            allreduce(buf, op="max", algorithm=algorithm, comm=comm)
        samples.append(comm.allreduce((time.perf_counter() - start) / reps, op=MPI.MAX))
    return statistics.median(samples)


def save_model(m: plan.Machine, key: str, notes: dict[str, Any], path: str | None = None) -> str:
    """Store ``m`` under ``models[key]`` in the calibration file (``auto``'s, unless ``path``)."""
    return auto.save_entry("models", key, m.to_json(), "model_notes", notes, path)
