"""The coordinator: which named requests are ready on every rank, checked, ordered and fused.

Every negotiation cycle each rank sends rank 0 a ``Message``: the requests
submitted since its last message (a ``Meta`` each: name, kind, dtype,
shapes, op, scale factors, root, splits) and whether it has just called
``join()`` or asked to shut down. Rank 0 feeds every rank's message to
``Coordinator.receive`` and calls ``Coordinator.plan``, which returns the
``Response`` list that all ranks then execute in the same order:

* a name is **ready** when every rank that has not joined has submitted
  it; requests are matched by name, never by arrival order, so ranks may
  submit in different orders;
* ready requests are **checked**: kind, dtype, op, scale factors, root and
  shapes must agree (allgather and alltoall: all but the first dimension);
  a mismatch becomes an ``error`` response naming each rank's value;
* ready requests are **ordered** by when rank 0 first heard of them, and
  allreduces (and broadcasts) with the same dtype, op and scale factors
  (root) are **fused** into buckets of at most ``fusion_threshold`` bytes;
* when every rank has joined, a ``join`` response carries the rank that
  joined last; a shutdown request from any rank becomes a ``shutdown``
  response;
* a name that some ranks submitted and others have not is **stalled**:
  after ``stall_seconds`` the coordinator warns, naming the missing ranks,
  and after ``shutdown_seconds`` (Horovod's
  ``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS``; 0, the default, never) it shuts
  every rank down, so the waiting calls fail instead of hanging.

Nothing here touches MPI or tensors, so the rules are unit-tested directly.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Meta", "Message", "Response", "Coordinator", "ITEMSIZE", "FUSABLE"]

ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "uint8": 1, "int8": 1, "int16": 2,
            "int32": 4, "int64": 8, "bool": 1}
FUSABLE = ("allreduce", "broadcast")
_OP_NAMES = {0: "Average", 1: "Sum", 2: "Adasum", 3: "Min", 4: "Max", 5: "Product"}


@dataclass(frozen=True)
class Meta:
    """What one rank asks for under one name (the tensors themselves stay on the rank)."""

    name: str
    kind: str
    dtype: str = ""
    shapes: tuple[tuple[int, ...], ...] = ()
    op: int = 1
    prescale: float = 1.0
    postscale: float = 1.0
    root: int = -1
    splits: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        total = 0
        for shape in self.shapes:
            n = 1
            for d in shape:
                n *= d
            total += n
        return total * ITEMSIZE.get(self.dtype, 8)


@dataclass
class Message:
    """One rank's report for one cycle."""

    requests: list[Meta] = field(default_factory=list)
    joined: bool = False
    shutdown: bool = False
    timeline: bool = False  # this rank is recording a timeline (to merge at shutdown)


@dataclass(frozen=True)
class Response:
    """One thing every rank executes, in list order.

    ``metas`` holds one reference ``Meta`` per name (what a joined rank
    needs to contribute its share). ``extra``: allgather, every rank's
    first dimensions (one tuple per tensor); alltoall, the splits matrix
    (row = sender); join, the rank that joined last; shutdown, whether any
    rank records a timeline (the ranks then merge it, collectively).
    """

    kind: str
    names: tuple[str, ...] = ()
    metas: tuple[Meta, ...] = ()
    error: str = ""
    extra: Any = None


def _ranks(ranks: list[int]) -> str:
    word = "rank" if len(ranks) == 1 else "ranks"
    return f"{word} {','.join(map(str, ranks))}"


def _disagreement(what: str, values: dict[int, Any], show: Callable[[Any], str] = str) -> str | None:
    """None if every rank has the same value, else 'rank 0 has X, ranks 1,2 have Y'."""
    groups: dict[Any, list[int]] = {}
    for rank, value in sorted(values.items()):
        groups.setdefault(value, []).append(rank)
    if len(groups) == 1:
        return None
    parts = [f"{_ranks(rs)} {'has' if len(rs) == 1 else 'have'} {what} {show(v)}" for v, rs in groups.items()]
    return ", ".join(parts)


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _shapes(shapes: tuple[tuple[int, ...], ...]) -> str:
    return _shape(shapes[0]) if len(shapes) == 1 else "(" + ", ".join(_shape(s) for s in shapes) + ")"


def check(name: str, metas: dict[int, Meta], size: int) -> str | None:
    """Why the ranks' requests under ``name`` cannot run together, or None if they can."""
    kind = metas[min(metas)].kind
    problem = _disagreement("requested", {r: m.kind for r, m in metas.items()})
    if problem:
        return f"Mismatched operations under name '{name}': {problem}."
    problem = _disagreement("data type", {r: m.dtype for r, m in metas.items()}, lambda d: f"torch.{d}")
    if problem:
        return f"Mismatched data types for {kind} '{name}': {problem}."
    problem = _disagreement("a group of", {r: len(m.shapes) for r, m in metas.items()}, lambda n: f"{n} tensors")
    if problem:
        return f"Mismatched group sizes for {kind} '{name}': {problem}."
    if kind in ("allreduce", "reducescatter"):
        problem = _disagreement("op", {r: m.op for r, m in metas.items()}, lambda o: _OP_NAMES.get(o, str(o)))
        problem = problem or _disagreement("prescale_factor", {r: m.prescale for r, m in metas.items()})
        problem = problem or _disagreement("postscale_factor", {r: m.postscale for r, m in metas.items()})
        if problem:
            return f"Mismatched {kind} arguments for '{name}': {problem}."
    if kind == "broadcast":
        problem = _disagreement("root rank", {r: m.root for r, m in metas.items()})
        if problem:
            return f"Mismatched broadcast root ranks for '{name}': {problem}."
        root = metas[min(metas)].root
        if not 0 <= root < size:
            return f"Invalid root rank {root} for broadcast '{name}': there are {size} ranks."
    if kind in ("allgather", "alltoall"):
        trailing = {r: tuple((len(s), s[1:]) for s in m.shapes) for r, m in metas.items()}
        if _disagreement("", trailing):
            problem = _disagreement("shape", {r: m.shapes for r, m in metas.items()}, _shapes)
            return (f"Mismatched {kind} tensor shapes for '{name}': every dimension but the first must agree, "
                    f"but {problem}.")
    else:
        problem = _disagreement("shape", {r: m.shapes for r, m in metas.items()}, _shapes)
        if problem:
            return f"Mismatched {kind} tensor shapes for '{name}': {problem}."
    return None


class Coordinator:
    """Rank 0's bookkeeping: requests seen so far, joined ranks, and the plan for each cycle."""

    def __init__(self, size: int, fusion_threshold: int, stall_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 warn: Callable[[str], None] | None = None, shutdown_seconds: float = 0.0) -> None:
        self.size = size
        self.fusion_threshold = fusion_threshold
        self.stall_seconds = stall_seconds
        self.clock = clock
        self.warn = warn or (lambda text: print(text, file=sys.stderr, flush=True))
        if stall_seconds > 0 and 0 < shutdown_seconds < stall_seconds:  # Horovod's rule too
            self.warn(f"mpiml.torch: HOROVOD_STALL_SHUTDOWN_TIME_SECONDS ({shutdown_seconds:g}) is less than "
                      f"HOROVOD_STALL_CHECK_TIME_SECONDS ({stall_seconds:g}): stalls will not shut the job down")
            shutdown_seconds = 0.0
        self.shutdown_seconds = shutdown_seconds if stall_seconds > 0 else 0.0
        self.shutdown_reason = ""
        self.table: dict[str, dict[int, Meta]] = {}
        self.first_seen: dict[str, float] = {}
        self.warned: set[str] = set()
        self.joined: set[int] = set()
        self.timelines: set[int] = set()
        self.last_joined = -1
        self.shutdown = False

    @property
    def pending(self) -> int:
        """How many names are waiting for some rank."""
        return len(self.table)

    def receive(self, rank: int, message: Message) -> None:
        """Record one rank's message (call in rank order each cycle)."""
        now = self.clock()
        for meta in message.requests:
            entry = self.table.get(meta.name)
            if entry is None:
                entry = self.table[meta.name] = {}
                self.first_seen[meta.name] = now
            entry[rank] = meta
        if message.timeline:
            self.timelines.add(rank)
        else:
            self.timelines.discard(rank)
        if message.joined:
            self.joined.add(rank)
            self.last_joined = rank
        if message.shutdown:
            self.shutdown = True

    def _ready(self) -> list[str]:
        waiting_for = [r for r in range(self.size) if r not in self.joined]
        return [name for name, by_rank in self.table.items() if all(r in by_rank for r in waiting_for)]

    def plan(self) -> list[Response]:
        """The responses of this cycle (empty if nothing is ready anywhere)."""
        if self.shutdown:
            return [Response("shutdown", error=self.shutdown_reason, extra=bool(self.timelines))]
        plan: list[Response] = []
        runnable: list[tuple[str, Meta]] = []
        for name in self._ready():
            metas = self.table.pop(name)
            self.first_seen.pop(name, None)
            self.warned.discard(name)
            error = check(name, metas, self.size)
            kind = metas[min(metas)].kind
            if error is None and self.joined and kind not in ("allreduce", "barrier"):
                error = (f"{kind} '{name}' cannot run: {_ranks(sorted(self.joined))} already called join(), "
                         "and join() supports only allreduce.")
            if error is not None:
                plan.append(Response("error", (name,), (metas[min(metas)],), error=error))
            else:
                runnable.append((name, metas))  # type: ignore[arg-type]
        plan.extend(self._fuse(runnable))
        if self.joined and len(self.joined) == self.size:
            plan.append(Response("join", extra=self.last_joined))
            self.joined.clear()
        self._check_stalls()
        return plan

    def _fuse(self, runnable: list[tuple[str, dict[int, Meta]]]) -> list[Response]:
        """One response per request, except fusable ones that share a bucket key and fit the threshold."""
        slots: list[Any] = []
        open_buckets: dict[tuple[Any, ...], tuple[int, int]] = {}  # key -> (slot index, bytes so far)
        for name, metas in runnable:
            meta = metas[min(metas)]
            if meta.kind not in FUSABLE:
                slots.append(self._single(name, meta, metas))
                continue
            key = (meta.kind, meta.dtype, meta.op, meta.prescale, meta.postscale, meta.root)
            size = meta.nbytes
            bucket = open_buckets.get(key)
            if bucket is not None and bucket[1] + size <= self.fusion_threshold:
                slots[bucket[0]][1].append(name)
                slots[bucket[0]][2].append(meta)
                open_buckets[key] = (bucket[0], bucket[1] + size)
            else:
                open_buckets[key] = (len(slots), size)
                slots.append((meta.kind, [name], [meta]))
        return [s if isinstance(s, Response) else Response(s[0], tuple(s[1]), tuple(s[2])) for s in slots]

    def _single(self, name: str, meta: Meta, metas: dict[int, Meta]) -> Response:
        extra = None
        if meta.kind == "allgather":
            extra = tuple(tuple(metas[r].shapes[i][0] for r in range(self.size)) for i in range(len(meta.shapes)))
        elif meta.kind == "alltoall":
            extra = tuple(metas[r].splits for r in range(self.size))
        return Response(meta.kind, (name,), (meta,), extra=extra)

    def _check_stalls(self) -> None:
        if self.stall_seconds <= 0 or not self.first_seen:
            return
        now = self.clock()
        for name, since in self.first_seen.items():
            waited = now - since
            if waited < self.stall_seconds:
                continue
            missing = _ranks([r for r in range(self.size) if r not in self.table[name] and r not in self.joined])
            if 0 < self.shutdown_seconds < waited and not self.shutdown:
                self.shutdown = True
                self.shutdown_reason = (
                    f"'{name}' waited {waited:.0f} s for {missing}, longer than "
                    f"HOROVOD_STALL_SHUTDOWN_TIME_SECONDS={self.shutdown_seconds:g}: mpiml.torch shut down every "
                    "rank (ranks must submit the same names; a rank may have stopped or called something else)")
                self.warn(f"mpiml.torch: {self.shutdown_reason}")
            if name in self.warned:
                continue
            self.warned.add(name)
            self.warn(f"mpiml.torch: '{name}' has waited {waited:.0f} s for {missing}: one or more "
                      "ranks submitted it and the others have not (a different name, order of calls that create "
                      "automatic names, or a rank that stopped early?)")
