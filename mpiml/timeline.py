"""Chrome-trace timelines: what each rank was doing, and when, viewable in Perfetto or chrome://tracing.

    from mpiml.timeline import Timeline
    tl = Timeline("trace.json", rank=comm.rank, size=comm.size)   # Timeline(None): disabled, every call a no-op
    with tl.span("forward", "compute"):
        loss = model(x)
    tl.begin("backward", "compute"); loss.backward(); tl.end("backward", "compute")
    with tl.span("allreduce bucket 0", "comm", bytes=4 * n):
        ...
    tl.instant("epoch end", "train", epoch=3)
    tl.close(comm)          # collective: rank 0 merges every rank's events into "trace.json"

Each rank streams its own events to its own file as they happen (one JSON
object per line inside a JSON array), so a crashed run still leaves
readable traces: Chrome and Perfetto accept an array without its closing
bracket. With ``size == 1`` (or a path containing ``{rank}``) that file is
the path given; otherwise rank r writes ``<stem>.rank<r><suffix>``, and
``close(comm)`` gathers all ranks' events to rank 0, writes them to the
path given (one process row per rank) and removes the per-rank files.
``merge()`` (and ``python -m mpiml.timeline merge OUT IN...``) does the same
for files left behind.

Events are Chrome's "complete" (``X``), begin/end (``B``/``E``), instant
(``i``) and counter (``C``) events. ``ts`` is microseconds since the Unix
epoch (from a monotonic clock anchored once to wall time), so ranks on one
host line up. Rows (Chrome "threads") are named: by default the calling
thread, or any string passed as ``row=`` (e.g. one row per tensor).

Disabled timelines cost one attribute check per call; ``span()`` then
returns a shared no-op context manager, so instrumented code can stay in
place: ``Timeline(None)`` or ``Timeline(path, enabled=False)``.

To wire into a training loop (e.g. ``python -m mpiml.train --timeline PATH``):
create ``Timeline(PATH, rank=r, size=K)`` (or ``Timeline(None)`` when the
flag is absent), wrap forward, backward, the wait for gradients and each
bucket's allreduce in ``span()`` (args such as ``bytes=`` and ``bucket=``
show up when the event is clicked), and call ``close(comm)`` on every rank
at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

__all__ = ["Timeline", "rank_path", "merge", "main"]

_NULL_SPAN: AbstractContextManager[None] = nullcontext()


def rank_path(path: str | os.PathLike[str], rank: int, size: int) -> str:
    """The file rank ``rank`` of ``size`` streams to: ``path`` itself when alone, else ``<stem>.rank<r><suffix>``."""
    path = os.fspath(path)
    if "{rank}" in path:
        return path.format(rank=rank)
    if size <= 1:
        return path
    stem, suffix = os.path.splitext(path)
    return f"{stem}.rank{rank}{suffix or '.json'}"


class _Span:
    """Context manager for one complete ("X") event; records its start on entry."""

    __slots__ = ("timeline", "name", "category", "row", "args", "start")

    def __init__(self, timeline: Timeline, name: str, category: str, row: str | None, args: dict[str, Any]) -> None:
        self.timeline, self.name, self.category, self.row, self.args = timeline, name, category, row, args
        self.start = 0.0

    def __enter__(self) -> _Span:
        self.start = self.timeline.now_us()
        return self

    def __exit__(self, *exc: object) -> None:
        tl = self.timeline
        tl.complete(self.name, self.category, self.start, tl.now_us() - self.start, row=self.row, **self.args)


class Timeline:
    """One process's trace events, streamed to a Chrome-trace JSON file."""

    def __init__(self, path: str | os.PathLike[str] | None, *, rank: int = 0, size: int = 1,
                 process_name: str | None = None, enabled: bool = True) -> None:
        self.enabled = bool(enabled and path is not None)
        self.path = os.fspath(path) if path is not None else None
        self.rank, self.size = rank, size
        self.file_path = rank_path(self.path, rank, size) if self.path is not None else None
        self._lock = threading.Lock()
        self._rows: dict[Any, int] = {}
        self._file = None
        self.failed = False  # a write failed (full disk, ...): tracing stopped on this rank, the program goes on
        if not self.enabled:
            return
        self._wall0 = time.time_ns() / 1000.0
        self._perf0 = time.perf_counter_ns()
        directory = os.path.dirname(os.path.abspath(self.file_path))
        os.makedirs(directory, exist_ok=True)
        self._file = open(self.file_path, "w", encoding="utf-8")  # noqa: SIM115 - lives until close()
        self._file.write("[\n")
        self._meta("process_name", None, name=process_name or f"rank {rank}")
        self._meta("process_sort_index", None, sort_index=rank)

    # ------------------------------------------------------------ clock and rows
    def now_us(self) -> float:
        """Microseconds since the epoch on this timeline's clock (0.0 when disabled)."""
        if not self.enabled:
            return 0.0
        return self._wall0 + (time.perf_counter_ns() - self._perf0) / 1000.0

    def _tid(self, row: str | None) -> int:
        key: Any = row if row is not None else threading.get_ident()
        tid = self._rows.get(key)
        if tid is None:
            tid = self._rows[key] = len(self._rows) + 1
            label = row if row is not None else threading.current_thread().name
            self._write({"name": "thread_name", "ph": "M", "pid": self.rank, "tid": tid, "args": {"name": label}})
            self._write({"name": "thread_sort_index", "ph": "M", "pid": self.rank, "tid": tid,
                         "args": {"sort_index": tid}})
        return tid

    def _meta(self, kind: str, tid: int | None, **args: Any) -> None:
        event = {"name": kind, "ph": "M", "pid": self.rank, "args": args}
        if tid is not None:
            event["tid"] = tid
        self._write(event)

    def _write(self, event: dict[str, Any]) -> None:
        if self._file is not None:
            try:
                self._file.write(json.dumps(event, separators=(",", ":"), default=str) + ",\n")
            except OSError as e:
                self._fail(e)

    def _fail(self, error: OSError) -> None:
        """A write failed: stop tracing on this rank and say so once; a trace must never end the program."""
        f, self._file = self._file, None
        self.enabled, self.failed = False, True
        print(f"warning: timeline {self.file_path}: {error.strerror or error}; tracing stopped on rank "
              f"{self.rank} (the program goes on)", file=sys.stderr, flush=True)
        if f is not None:
            try:
                f.close()
            except OSError:
                pass

    def _event(self, ph: str, name: str, category: str, row: str | None, args: dict[str, Any],
               ts: float | None = None, **extra: Any) -> None:
        with self._lock:
            if self._file is None:
                return
            event = {"name": name, "cat": category, "ph": ph, "ts": round(self.now_us() if ts is None else ts, 3),
                     "pid": self.rank, "tid": self._tid(row)}
            event.update(extra)
            if args:
                event["args"] = args
            self._write(event)

    # ------------------------------------------------------------ events
    def begin(self, name: str, category: str = "", *, row: str | None = None, **args: Any) -> None:
        """Open a phase on ``row`` (default: the calling thread's row); close it with ``end()``."""
        if self.enabled:
            self._event("B", name, category, row, args)

    def end(self, name: str | None = None, category: str = "", *, row: str | None = None, **args: Any) -> None:
        """Close the innermost open phase on ``row``."""
        if self.enabled:
            self._event("E", name or "", category, row, args)

    def span(self, name: str, category: str = "", *, row: str | None = None,
             **args: Any) -> AbstractContextManager[Any]:
        """``with tl.span(name, category, **args):`` records one complete event around the block."""
        if not self.enabled:
            return _NULL_SPAN
        return _Span(self, name, category, row, args)

    def complete(self, name: str, category: str, start_us: float, duration_us: float, *, row: str | None = None,
                 **args: Any) -> None:
        """A phase measured elsewhere: ``start_us`` from ``now_us()``, lasting ``duration_us``."""
        if self.enabled:
            self._event("X", name, category, row, args, ts=start_us, dur=round(max(duration_us, 0.0), 3))

    def instant(self, name: str, category: str = "", *, row: str | None = None, **args: Any) -> None:
        """A moment (a tick on the row), e.g. ``CYCLE_START``."""
        if self.enabled:
            self._event("i", name, category, row, args, s="t")

    def counter(self, name: str, **values: float) -> None:
        """A counter track (e.g. bytes in flight); each keyword is one series."""
        if self.enabled:
            self._event("C", name, "counter", None, values)

    # ------------------------------------------------------------ closing
    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.flush()
                except OSError as e:
                    self._fail(e)

    def close(self, comm: Any = None) -> str | None:
        """Finish this rank's file; returns the finished trace's path (on rank 0 when merging), else None.

        With an mpi4py communicator of more than one rank this is collective
        (every rank calls it, enabled or not): rank 0 writes the events of
        every enabled rank to ``path`` and the per-rank files are removed
        (they are kept if the merged file cannot be written). Closing twice is
        harmless. A failed write (a full disk) prints a warning and never
        raises: a trace must not take a training run down.
        """
        was_enabled = self.enabled or self.failed
        with self._lock:
            if self._file is not None:
                try:
                    self._file.write(json.dumps({"name": "trace_end", "ph": "i", "s": "p", "pid": self.rank,
                                                 "tid": 0, "ts": round(self.now_us(), 3)}) + "\n]\n")
                    self._file.close()
                except OSError as e:
                    self._fail(e)
                self._file = None
            self.enabled = False
        if comm is None or comm.Get_size() == 1:
            return self.file_path if was_enabled else None
        merging = was_enabled and self.file_path != self.path
        payload = None
        if merging:
            try:
                with open(self.file_path, encoding="utf-8") as f:
                    payload = (self.path, f.read())
            except (OSError, UnicodeDecodeError):
                payload = None
        everyone = comm.gather(payload, root=0)
        merged = None
        if comm.Get_rank() == 0:
            parts = [p for p in everyone if p is not None]
            if parts:
                try:
                    _write_merged(parts[0][0], [text for _, text in parts])
                    merged = parts[0][0]
                except OSError as e:
                    print(f"warning: timeline {parts[0][0]}: cannot write the merged trace "
                          f"({e.strerror or e}); each rank's trace is kept in its own file", file=sys.stderr,
                          flush=True)
            elif was_enabled:
                merged = self.file_path
        wrote = comm.bcast(merged is not None, root=0)
        if merging and wrote:
            try:
                os.remove(self.file_path)
            except OSError:
                pass
        return merged if comm.Get_rank() == 0 else None

    def __enter__(self) -> Timeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Timeline({self.file_path!r})" if self.enabled else "Timeline(None)"


def _events(text: str) -> Iterator[str]:
    """The event lines of one streamed trace (tolerates a missing closing bracket)."""
    for line in text.splitlines():
        line = line.strip().rstrip(",")
        if line and line not in ("[", "]"):
            yield line


def _write_merged(out: str, texts: list[str]) -> None:
    """Write ``out`` atomically (a temporary file renamed over it); on failure nothing is left behind."""
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("[\n")
            f.write(",\n".join(line for text in texts for line in _events(text)))
            f.write("\n]\n")
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def merge(out: str | os.PathLike[str], inputs: list[str | os.PathLike[str]]) -> None:
    """Write the events of several traces (e.g. one per rank) into one file ``out``."""
    texts = []
    for path in inputs:
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    _write_merged(os.fspath(out), texts)


def main(argv: list[str] | None = None) -> int:
    """``python -m mpiml.timeline merge OUT IN...``: merge per-rank traces into one file."""
    parser = argparse.ArgumentParser(prog="python -m mpiml.timeline", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge traces into one file")
    m.add_argument("out")
    m.add_argument("inputs", nargs="+")
    args = parser.parse_args(argv)
    try:
        merge(args.out, args.inputs)
    except OSError as e:
        print(f"python -m mpiml.timeline: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
