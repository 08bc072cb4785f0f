"""How a failing rank ends the job (issue 11, #11): its message is written and flushed, and the launcher is
given time to deliver it, before MPI_Abort kills every process."""

import pytest

from mpiml import runtime


class Recorder:
    def __init__(self, events):
        self.events = events

    def write(self, text):
        self.events.append(("write", text))

    def flush(self):
        self.events.append(("flush",))


class FakeComm:
    def __init__(self, events):
        self.events = events

    def Abort(self, code):  # noqa: N802 - MPI's name
        self.events.append(("abort", code))


class Timer:
    def __init__(self, *args, **kwargs):
        self.daemon = False

    def start(self):
        pass


def test_abort_flushes_and_waits_before_mpi_abort(monkeypatch):
    events = []
    monkeypatch.setattr(runtime.sys, "stderr", Recorder(events))
    monkeypatch.setattr(runtime.sys, "stdout", Recorder(events))
    monkeypatch.setattr(runtime.time, "sleep", lambda s: events.append(("sleep", s)))
    monkeypatch.setattr(runtime.threading, "Timer", Timer)

    def exit_(code):
        raise SystemExit(code)
    monkeypatch.setattr(runtime.os, "_exit", exit_)
    with pytest.raises(SystemExit):
        runtime.abort(7, "the real error", comm=FakeComm(events))
    kinds = [e[0] for e in events]
    assert events[0] == ("write", "the real error\n")
    assert kinds.index("sleep") > kinds.index("flush")
    assert events[kinds.index("sleep")][1] >= 0.5
    assert kinds[-1] == "abort" and events[-1] == ("abort", 7)
    assert kinds[-2] == "flush"  # flushed again after the wait, right before the abort


def test_unexpected_exception_prints_rank_and_traceback_then_aborts(monkeypatch):
    seen = {}
    monkeypatch.setattr(runtime, "abort", lambda code, message=None, comm=None: seen.update(code=code, text=message))

    def main():
        raise IsADirectoryError(21, "Is a directory", "/some/dir")
    runtime.abort_on_exception(main, prog="prog")
    assert seen["code"] == 1
    assert seen["text"].startswith("[rank 0] Traceback")
    assert "IsADirectoryError: [Errno 21] Is a directory: '/some/dir'" in seen["text"]
    assert seen["text"].rstrip().endswith("prog: IsADirectoryError on rank 0; aborting the job")
