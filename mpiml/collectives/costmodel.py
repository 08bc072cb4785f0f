"""The cost model behind ``mpiml.plan`` and ``auto``: a replay of the algorithms' own schedules.

**What is replayed.** Every mpiml algorithm runs from an explicit schedule
(``collectives._schedule``: per rank, a list of steps that each send one slice
to one peer and/or receive one slice from one peer, executed with up to
``depth`` steps in flight). The planner replays *those same step lists* in a
discrete-event simulation: a rank posts the steps the executor would post,
a message starts when both ends are posted (or at once, up to
``eager_bytes``), occupies the sending host's link and then the receiving
host's link, and a step completes when its messages have; then the rank
spends ``overhead`` plus, for a reduction, ``gamma`` per byte, and posts
what the executor would post next. ``hier`` and the library's own
Allreduce (``mpi``, modelled as MPICH's algorithm: recursive doubling for
small messages, Rabenseifner otherwise, node-aware across hosts) are
composed of such replays plus shared-memory phases.

**The machine** (``Machine``): ``alpha``/``beta``: seconds per message and
per byte on a host's link (each direction; a host's ranks share it);
``alpha_local``/``beta_local``: the same for a message inside a host (one
core copying); ``gamma``: seconds per byte reduced by one core;
``beta_mem``: seconds per byte on a host's memory bus, shared by its ranks
(0: no limit); ``overhead``: seconds per schedule step (mpiml's Python
executor: posting, waiting, bookkeeping); ``call``: seconds per call at mpiml's front door (the agreement
check and dispatch, paid by every algorithm, ``mpi`` too); ``cores``: cores
shared by *all* ranks (the emulated cluster runs every host on one machine;
0 means a core per rank): reductions then queue for a core, and ``overhead``
and ``call`` grow with the ranks per core (``Machine.sharing``). ``python -m mpiml.bench
calibrate-model`` fits them here and saves them beside ``auto``'s table.

**Speed.** With a core per rank and hosts alike, ring and butterfly are
symmetric: rank r + L (ring) or r XOR cL (butterfly, powers of two) does
what rank r does at the same times, so only one host's ranks are replayed
and every message to another host is mapped onto its image (``Fold``). The
tree has no such symmetry and is replayed in full. A message whose replay would
run more than ``REPLAY_BUDGET`` steps is predicted from two smaller ones
(``_predicted``).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from typing import Any

from . import _chunks, butterfly, ring, tree
from ._schedule import FINAL, REDUCE, Schedule, Step

__all__ = ["Machine", "Layout", "allreduce_time", "replay", "PLANNED", "DEFAULT_MACHINE", "model_rows", "PlanError",
           "candidates", "Fold", "rotate", "xor", "replay_or_refuse"]


@dataclass(frozen=True)
class Machine:
    """The cost model's parameters (seconds, bytes); see the module docstring."""

    # Defaults: this project's 2-core VM, fitted by calibrate-model on 2026-12-01 (docs/scaling-model.md):
    # the network from its emulated cluster's 1 Gbit/s links, the rest from 2 ranks on the VM itself.
    alpha: float = 22e-6
    beta: float = 8.42e-9
    alpha_local: float = 2.4e-6
    beta_local: float = 6.2e-11
    gamma: float = 9.6e-11
    beta_mem: float = 0.0
    overhead: float = 13e-6
    call: float = 12e-6
    cores: int = 0
    eager_bytes: int = 64 << 10

    def sharing(self, ranks: int) -> float:
        """How many ranks share a core (at least 1): the factor on per-step and per-call software time,
        which on an oversubscribed machine is mostly waiting to be scheduled."""
        return max(1.0, ranks / self.cores) if self.cores else 1.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Machine:
        known = {f.name for f in fields(cls)}
        bad = [k for k in data if k not in known]
        if bad:
            raise ValueError(f"unknown cost-model parameter(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        return cls(**data)


# Built in (the defaults above); a calibration file's model replaces it.
DEFAULT_MACHINE = Machine()


@dataclass(frozen=True)
class Layout:
    """H hosts with L ranks each, ranks numbered host by host (as mpiexec places them by default)."""

    hosts: int
    per_host: int

    @property
    def size(self) -> int:
        return self.hosts * self.per_host

    def host(self, r: int) -> int:
        return r // self.per_host


# ---------------------------------------------------------------------------------------------- the replay

class Fold:
    """Replay only ``ranks``; a message to any other rank goes to its image among them (symmetric schedules)."""

    def __init__(self, ranks: list[int], image: Callable[[int, int], tuple[int, int]]) -> None:
        self.ranks, self.image = ranks, image


def rotate(layout: Layout) -> Fold | None:
    """Ring: rank r + cL does what rank r does (hosts alike, numbered host by host)."""
    p, L = layout.size, layout.per_host
    if layout.hosts == 1:
        return None

    def image(src: int, dst: int) -> tuple[int, int]:
        shift = (dst // L) * L
        return (src - shift) % p, dst - shift
    return Fold(list(range(L)), image)


def xor(layout: Layout) -> Fold | None:
    """Butterfly with p and L powers of two: rank r XOR cL does what rank r does."""
    p, L = layout.size, layout.per_host
    if layout.hosts == 1 or p & (p - 1) or L & (L - 1):
        return None

    def image(src: int, dst: int) -> tuple[int, int]:
        shift = dst & ~(L - 1)
        return src ^ shift, dst ^ shift
    return Fold(list(range(L)), image)


class _Replay:
    """One discrete-event replay of per-rank schedules on ``layout`` (see the module docstring)."""

    def __init__(self, layout: Layout, m: Machine, itemsize: int) -> None:
        self.layout, self.m, self.itemsize = layout, m, itemsize
        self.outgoing = [0.0] * layout.hosts  # when each host's link is next free, each way
        self.incoming = [0.0] * layout.hosts
        self.bus_free = [0.0] * layout.hosts
        self.cores = [0.0] * m.cores if m.cores else None
        self.heap: list[tuple[float, int]] = []

    def cpu(self, t: float, seconds: float) -> float:
        """When ``seconds`` of CPU work asked for at ``t`` is done (shared cores: the earliest free one)."""
        if self.cores is None or seconds <= 0:
            return t + seconds
        start = max(t, heapq.heappop(self.cores))
        heapq.heappush(self.cores, start + seconds)
        return start + seconds

    def bus(self, h: int, t: float, nbytes: float) -> float:
        if not self.m.beta_mem:
            return t
        self.bus_free[h] = max(self.bus_free[h], t) + nbytes * self.m.beta_mem
        return self.bus_free[h]

    def transfer(self, src: int, dst: int, image_dst: int, nbytes: int, t: float) -> float:
        """When a message of ``nbytes`` that starts at ``t`` has arrived."""
        m, L = self.m, self.layout
        hs, hd = L.host(src), L.host(dst)
        if hs == hd:
            return max(t + m.alpha_local + nbytes * m.beta_local, self.bus(hs, t, 2 * nbytes))
        hi = L.host(image_dst)
        sent = self.link(self.outgoing, hs, t, nbytes, m.beta)
        arrived = self.link(self.incoming, hi, sent[0], nbytes, m.beta)
        return max(sent[1], arrived[1]) + m.alpha

    @staticmethod
    def link(state: list[float], h: int, t: float, nbytes: int, beta: float) -> tuple[float, float]:
        """(start, end) of ``nbytes`` through host h's link in one direction, after what it already carries."""
        start = max(t, state[h])
        state[h] = start + nbytes * beta
        return start, state[h]

    def run(self, schedules: dict[int, Schedule], fold: Fold | None) -> float:
        """Replay ``schedules`` (rank -> its schedule) from time 0; seconds until the last rank is done."""
        m, size = self.m, self.itemsize
        ranks = list(schedules)
        index = {r: i for i, r in enumerate(ranks)}
        hosts = [self.layout.host(r) for r in ranks]
        all_steps = [schedules[r].steps for r in ranks]
        blockers = [schedules[r].blocker for r in ranks]
        depths = [schedules[r].depth for r in ranks]
        k = [0] * len(ranks)
        posted = [0] * len(ranks)
        need = [[0] * len(st) for st in all_steps]
        fin = [[0.0] * len(st) for st in all_steps]
        waiting: list[float | None] = [None] * len(ranks)
        sends: dict[tuple[int, int], deque] = {}
        recvs: dict[tuple[int, int], deque] = {}
        transfer, cpu, bus = self.transfer, self.cpu, self.bus
        push, pop = heapq.heappush, heapq.heappop
        heap = [(0.0, i) for i in range(len(ranks))]
        gamma, eager_bytes, mem = m.gamma, m.eager_bytes, bool(m.beta_mem)
        overhead = m.overhead * m.sharing(self.layout.size)
        end = 0.0

        def done(i: int, j: int, t: float) -> None:
            need[i][j] -= 1
            if t > fin[i][j]:
                fin[i][j] = t
            w = waiting[i]
            if w is not None and k[i] == j and need[i][j] == 0:
                waiting[i] = None
                push(heap, (max(w, fin[i][j]), i))

        while heap:
            t, i = pop(heap)
            steps = all_steps[i]
            count = len(steps)
            kr = k[i]
            if kr < count and posted[i] > kr and need[i][kr] == 0 and fin[i][kr] <= t:  # step kr done: finish it
                s = steps[kr]
                reduced = (s.recv_hi - s.recv_lo) * size if s.mode & REDUCE and s.recv_from >= 0 else 0
                t2 = cpu(t, reduced * gamma) + overhead
                if reduced and mem:
                    t2 = max(t2, bus(hosts[i], t, 3 * reduced))
                k[i] = kr = kr + 1
                if t2 > t:
                    push(heap, (t2, i))
                    continue
            if kr == count:
                if t > end:
                    end = t
                continue
            r = ranks[i]
            blocker, depth, n_posted = blockers[i], depths[i], posted[i]
            need_i = need[i]
            while n_posted < count and (n_posted == kr or (n_posted - kr < depth and blocker[n_posted] < kr)):
                s = steps[n_posted]
                j = n_posted
                sending = s.send_to >= 0 and s.send_hi > s.send_lo
                receiving = s.recv_from >= 0 and s.recv_hi > s.recv_lo
                need_i[j] = sending + receiving
                n_posted += 1
                posted[i] = n_posted
                if sending:
                    nbytes = (s.send_hi - s.send_lo) * size
                    dst = s.send_to
                    key = fold.image(r, dst) if fold is not None and dst not in index else (r, dst)
                    q = recvs.get(key)
                    if q:  # the receive is posted: the message goes now
                        ri, rj = q.popleft()
                        arrive = transfer(r, dst, key[1], nbytes, t)
                        done(ri, rj, arrive)
                        done(i, j, t if nbytes <= eager_bytes else arrive)
                    elif nbytes <= eager_bytes:  # sent at once; received when posted and arrived
                        sends.setdefault(key, deque()).append((transfer(r, dst, key[1], nbytes, t), -1, 0, dst))
                        done(i, j, t)
                    else:
                        sends.setdefault(key, deque()).append((t, i, j, dst))
                if receiving:
                    key = (s.recv_from, r)
                    q = sends.get(key)
                    if q:
                        ts, si, sj, real_dst = q.popleft()
                        if si < 0:
                            done(i, j, max(ts, t))
                        else:
                            arrive = transfer(ranks[si], real_dst, r, (s.recv_hi - s.recv_lo) * size, t)
                            done(si, sj, arrive)
                            done(i, j, arrive)
                    else:
                        recvs.setdefault(key, deque()).append((i, j))
            if need_i[kr] == 0:
                push(heap, (max(t, fin[i][kr]), i))
            else:
                waiting[i] = t
        stuck = [ranks[i] for i in range(len(ranks)) if k[i] < len(all_steps[i])]
        if stuck:
            raise RuntimeError(f"replay deadlocked: ranks {stuck[:8]} never finished (schedules do not match)")
        return end


def replay(layout: Layout, m: Machine, itemsize: int, schedule_of: Callable[[int], Schedule],
           fold: Fold | None = None, ranks: list[int] | None = None) -> float:
    """Seconds until every rank has finished its schedule (``schedule_of(r)``), all starting at 0."""
    if fold is not None and m.cores:
        fold = None  # shared cores couple every rank: no symmetry to exploit
    chosen = fold.ranks if fold is not None else (ranks if ranks is not None else list(range(layout.size)))
    first = schedule_of(chosen[0])
    if len(first) * len(chosen) > REPLAY_BUDGET:
        raise _TooBig(len(first) * len(chosen))
    return _Replay(layout, m, itemsize).run({r: first if r == chosen[0] else schedule_of(r) for r in chosen}, fold)


def replay_or_refuse(layout: Layout, m: Machine, itemsize: int, schedule_of: Callable[[int], Schedule],
                     fold: Fold | None = None, what: str = "schedule") -> float:
    """``replay`` with up to ``MAX_STEPS`` steps (no extrapolation: for patterns whose steps do not shrink
    with the size, as a strategy's exchanges); a ``PlanError`` naming ``what`` beyond that."""
    try:
        return _with_budget(MAX_STEPS, lambda: replay(layout, m, itemsize, schedule_of, fold))
    except _TooBig as big:
        raise PlanError(f"{what} on {layout.hosts} hosts x {layout.per_host} ranks: about {big.args[0]} steps to "
                        f"replay (at most {MAX_STEPS})") from None


class PlanError(ValueError):
    """A layout or size the planner cannot replay."""


class _TooBig(Exception):
    """A replay would run more steps than ``REPLAY_BUDGET`` (the argument: about how many)."""


# Steps one replay may run (about 5 us each here). A larger message is predicted from two replays of smaller
# ones, extrapolated linearly in the size: in a pipelined schedule each further chunk adds the same time once
# the pipeline is full, so T(n) is a straight line there (tests/test_plan.py checks it against full replays).
REPLAY_BUDGET = 150_000
# ... unless the steps do not shrink with the size (many ranks on one host): then up to this many are replayed.
MAX_STEPS = 2_000_000


def _with_budget(budget: int, run: Callable[[], float]) -> float:
    """``run()`` with ``REPLAY_BUDGET`` set to ``budget``; with 0, the steps of its first replay instead
    (how many it would run: the probe that decides between extrapolating and replaying in full)."""
    global REPLAY_BUDGET
    saved, REPLAY_BUDGET = REPLAY_BUDGET, budget
    try:
        return run()
    except _TooBig as big:
        if budget:
            raise
        return big.args[0]
    finally:
        REPLAY_BUDGET = saved


# ---------------------------------------------------------------------------------------- the algorithms

def _remapped(schedule: Schedule, to_real: Callable[[int], int]) -> Schedule:
    """``schedule`` of a sub-communicator with its peers renamed to world ranks."""
    return Schedule([s._replace(send_to=to_real(s.send_to) if s.send_to >= 0 else -1,
                                recv_from=to_real(s.recv_from) if s.recv_from >= 0 else -1)
                     for s in schedule.steps], schedule.depth)


def _binomial(n: int, L: int, i: int, up: bool) -> list[Step]:
    """Binomial reduce to local rank 0 (``up``) or broadcast from it, in local ranks."""
    steps = []
    masks = [1 << b for b in range(max(1, (L - 1).bit_length()))]
    if up:
        for mask in masks:
            if i & mask:
                steps.append(Step(i - mask, 0, n, -1, 0, 0, 0))
                break
            if i + mask < L:
                steps.append(Step(-1, 0, 0, i + mask, 0, n, REDUCE | FINAL))
    else:
        parent = next((mask for mask in masks if i & mask), 0)
        if parent:
            steps.append(Step(-1, 0, 0, i - parent, 0, n, 0))
        for mask in reversed(masks):
            if mask < (parent or 1 << 62) and i + mask < L and not i & mask:
                steps.append(Step(i + mask, 0, n, -1, 0, 0, 0))
    return steps


def _on_each_host(layout: Layout, m: Machine, itemsize: int, steps_of: Callable[[int], list[Step]]) -> float:
    """All hosts run the same intra-host steps at once (local rank i: ``steps_of(i)``, peers in local ranks)."""
    L = layout.per_host
    if L == 1:
        return 0.0
    if m.cores:  # hosts share the cores: replay them all together
        return replay(layout, m, itemsize, lambda r: _remapped(Schedule(steps_of(r % L), 1),
                                                               lambda i, first=r - r % L: first + i))
    return replay(Layout(1, L), m, itemsize, lambda i: Schedule(steps_of(i), 1))


def _ring_folds(n: int, itemsize: int, p: int) -> bool:
    """Whether every rank's ring schedule has the same non-empty slices (segments differ by at most one
    element, but a piece that is empty on one rank and not on another would break the symmetry)."""
    pieces = _chunks.num_pieces(-(-n // p), max(1, ring.CHUNK_BYTES // itemsize))
    return n // p >= pieces


def _ring(n: int, itemsize: int, layout: Layout, m: Machine) -> float:
    p = layout.size
    fold = rotate(layout) if _ring_folds(n, itemsize, p) else None
    return replay(layout, m, itemsize, lambda r: ring.allreduce_schedule(n, itemsize, p, r), fold)


def _butterfly(n: int, itemsize: int, layout: Layout, m: Machine) -> float:
    p = layout.size
    fold = xor(layout) if n % p == 0 else None  # equal blocks: every rank's pieces alike
    return replay(layout, m, itemsize, lambda r: butterfly.allreduce_schedule(n, itemsize, p, r), fold)


def _tree(n: int, itemsize: int, layout: Layout, m: Machine) -> float:
    p = layout.size
    return replay(layout, m, itemsize, lambda r: tree.allreduce_schedule(n, itemsize, p, r))


def _hier(n: int, itemsize: int, layout: Layout, m: Machine) -> float:
    """Shared memory: add L-1 peers' slices (n/L each); ring across hosts per slice; copy the others back."""
    H, L = layout.hosts, layout.per_host
    if L == 1:
        return _ring(n, itemsize, layout, m)
    bounds = _chunks.chunk_bounds(n, L)
    part = (bounds[1] - bounds[0]) * itemsize
    crowd = m.sharing(layout.size)  # ranks per core, where cores are shared: each works that much slower
    reduce_s = (L - 1) * part * m.gamma * crowd
    reduce_s = max(reduce_s, (L + 1) * part * L * m.beta_mem)  # the host's bus: every rank reads L, writes 1
    copy_s = (L - 1) * part * m.beta_local * crowd
    copy_s = max(copy_s, 2 * (L - 1) * part * L * m.beta_mem)
    barriers = 3 * m.alpha_local * max(1, (L - 1).bit_length())
    cross = 0.0
    if H > 1:
        slice_n = bounds[1] - bounds[0]
        fold = rotate(layout) if _ring_folds(slice_n, itemsize, H) else None
        cross = replay(layout, m, itemsize,
                       lambda r: _remapped(ring.allreduce_schedule(slice_n, itemsize, H, layout.host(r)),
                                           lambda h, i=r % L: h * L + i), fold)
    return reduce_s + cross + copy_s + barriers


MPICH_SHORT_BYTES = 2048  # MPICH's MPIR_CVAR_ALLREDUCE_SHORT_MSG_SIZE: recursive doubling up to here
_NO_CHUNKS = 1 << 62


@lru_cache(maxsize=4096)
def _mpich_schedule(n: int, itemsize: int, p: int, r: int) -> Schedule:
    """MPICH's allreduce between p ranks: one Sendrecv per stage, whole halves (no pipelining)."""
    small = MPICH_SHORT_BYTES + 1 if n * itemsize <= MPICH_SHORT_BYTES else 0
    return butterfly._allreduce_schedule(n, itemsize, p, r, _NO_CHUNKS, small, 1)


def _mpi(n: int, itemsize: int, layout: Layout, m: Machine) -> float:
    """The library's Allreduce, modelled as MPICH's: node-aware across hosts with several ranks on each."""
    H, L = layout.hosts, layout.per_host
    m = replace(m, overhead=0.0)  # the library's own loop: no Python per step
    if H == 1 or L == 1:
        p = layout.size
        fold = xor(layout) if n % p == 0 else None
        return replay(layout, m, itemsize, lambda r: _mpich_schedule(n, itemsize, p, r), fold)
    up = _on_each_host(layout, m, itemsize, lambda i: _binomial(n, L, i, True))
    leaders = replay(layout, m, itemsize, lambda r: _remapped(_mpich_schedule(n, itemsize, H, layout.host(r)),
                                                               lambda h: h * L),
                     ranks=[h * L for h in range(H)])
    down = _on_each_host(layout, m, itemsize, lambda i: _binomial(n, L, i, False))
    return up + leaders + down


# The registry: algorithm name -> f(elements, itemsize, layout, machine) -> seconds for one allreduce.
PLANNED: dict[str, Callable[[int, int, Layout, Machine], float]] = {
    "mpi": _mpi,
    "ring": _ring,
    "tree": _tree,
    "butterfly": _butterfly,
    "hier": _hier,
}


def allreduce_time(nbytes: int, algorithm: str, layout: Layout, m: Machine, itemsize: int = 4) -> float:
    """Predicted seconds for one allreduce of ``nbytes`` (``algorithm`` from ``PLANNED``, or ``auto``)."""
    if layout.size == 1 or nbytes <= 0:
        return 0.0
    if algorithm == "auto":
        return min(allreduce_time(nbytes, a, layout, m, itemsize) for a in candidates(layout))
    if algorithm not in PLANNED:
        raise PlanError(f"no cost model for algorithm {algorithm!r}; planned: {', '.join(PLANNED)}")
    return m.call * m.sharing(layout.size) + _predicted(algorithm, max(1, nbytes // itemsize), itemsize, layout, m)


@lru_cache(maxsize=4096)
def _predicted(algorithm: str, n: int, itemsize: int, layout: Layout, m: Machine) -> float:
    try:
        return PLANNED[algorithm](n, itemsize, layout, m)
    except _TooBig as big:
        fits = int(n * REPLAY_BUDGET / big.args[0] * 0.9)
        n2 = 1 << (fits.bit_length() - 1) if fits > 0 else 0  # a power of two: larger sizes share the two replays
        if n2 < 1024 or _with_budget(0, lambda: PLANNED[algorithm](n2, itemsize, layout, m)) > REPLAY_BUDGET:
            # a smaller message has as many steps: the rank count, not the size, makes them; replay them all
            if big.args[0] > MAX_STEPS:
                raise PlanError(f"{algorithm} on {layout.hosts} hosts x {layout.per_host} ranks: about "
                                f"{big.args[0]} schedule steps to replay (at most {MAX_STEPS}); fewer ranks per "
                                f"host, or more hosts, can be planned") from None
            return _with_budget(MAX_STEPS, lambda: PLANNED[algorithm](n, itemsize, layout, m))
        n1 = n2 * 3 // 5
        t2, t1 = _predicted(algorithm, n2, itemsize, layout, m), _predicted(algorithm, n1, itemsize, layout, m)
        return t2 + (n - n2) * (t2 - t1) / (n2 - n1)


def candidates(layout: Layout) -> list[str]:
    """The algorithms worth comparing on ``layout`` (hier only where hosts hold several ranks)."""
    return [a for a in PLANNED if a != "hier" or layout.per_host > 1]


# The sizes auto's table is predicted at (switching halfway between them, geometrically): every 16x, so that
# the first auto call on a large communicator plans in a few seconds.
MODEL_SIZES = [4 << 10, 64 << 10, 1 << 20, 16 << 20, 256 << 20]


def model_rows(layout: Layout, m: Machine, sizes: list[int] | None = None) -> list[list[Any]]:
    """``auto``'s table for a layout from the model: the predicted-fastest algorithm per size."""
    from .auto import table_rows
    sizes = sizes or MODEL_SIZES
    records = [{"size_bytes": s, "algorithm": a, "time_us": allreduce_time(s, a, layout, m) * 1e6, "correct": True}
               for s in sizes for a in candidates(layout)]
    return table_rows(records)
