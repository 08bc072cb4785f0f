"""mpiml.timeline: the Chrome-trace writer, its merge, and mpiml.torch's HOROVOD_TIMELINE end to end."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from mpiml.timeline import Timeline, main, merge, rank_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")


def load(path):
    with open(path) as f:
        return json.load(f)


def test_rank_paths():
    assert rank_path("t.json", 0, 1) == "t.json"
    assert rank_path("out/t.json", 3, 4) == "out/t.rank3.json"
    assert rank_path("trace", 1, 2) == "trace.rank1.json"
    assert rank_path("t-{rank}.json", 2, 4) == "t-2.json"


def test_disabled_timeline_is_a_cheap_no_op(tmp_path):
    tl = Timeline(None)
    assert not tl.enabled and tl.now_us() == 0.0
    with tl.span("x", "y", bytes=1):
        tl.begin("a")
        tl.end("a")
        tl.instant("i")
        tl.counter("c", v=1)
    assert tl.close() is None and repr(tl) == "Timeline(None)"
    off = Timeline(tmp_path / "never.json", enabled=False)
    off.instant("x")
    assert not (tmp_path / "never.json").exists()
    start = time.perf_counter()
    for _ in range(100_000):
        with tl.span("step", "compute"):
            pass
    assert (time.perf_counter() - start) / 100_000 < 5e-6  # well under a microsecond or two per span


def test_events_rows_and_valid_json(tmp_path):
    path = tmp_path / "t.json"
    with Timeline(path, rank=0, process_name="trainer") as tl:
        with tl.span("forward", "compute", batch=3):
            time.sleep(0.002)
        tl.begin("backward", "compute")
        tl.end("backward", "compute")
        tl.instant("CYCLE_START", "cycle", row="engine")
        start = tl.now_us()
        tl.complete("ALLREDUCE", "allreduce", start, 12.5, row="allreduce.w", bytes=40)
        tl.counter("bytes in flight", value=40)
        worker = threading.Thread(target=lambda: tl.instant("from a thread"), name="worker")
        worker.start()
        worker.join()
    events = load(path)
    by_name = {e["name"]: e for e in events}
    assert by_name["forward"]["ph"] == "X" and by_name["forward"]["dur"] >= 2000
    assert by_name["forward"]["args"] == {"batch": 3}
    assert [e["ph"] for e in events if e["name"] == "backward"] == ["B", "E"]
    assert by_name["ALLREDUCE"]["dur"] == 12.5 and by_name["ALLREDUCE"]["args"]["bytes"] == 40
    rows = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert {"engine", "allreduce.w", "worker"} <= set(rows.values())
    assert rows[by_name["CYCLE_START"]["tid"]] == "engine"
    assert by_name["process_name"]["args"] == {"name": "trainer"}
    assert {e["pid"] for e in events} == {0}
    timestamps = [e["ts"] for e in events if "ts" in e]
    assert abs(timestamps[0] / 1e6 - time.time()) < 60  # microseconds since the epoch


def test_merge_tolerates_an_unfinished_trace_and_the_cli(tmp_path):
    done = Timeline(tmp_path / "a.json", rank=0)
    done.instant("finished")
    done.close()
    crashed = Timeline(tmp_path / "b.json", rank=1)
    crashed.instant("crashed")
    crashed.flush()  # never closed: no closing bracket, as after a crash
    with pytest.raises(json.JSONDecodeError):
        load(tmp_path / "b.json")
    merge(tmp_path / "m.json", [tmp_path / "a.json", tmp_path / "b.json"])
    events = load(tmp_path / "m.json")
    assert {"finished", "crashed"} <= {e["name"] for e in events} and {e["pid"] for e in events} == {0, 1}
    assert main(["merge", str(tmp_path / "n.json"), str(tmp_path / "a.json")]) == 0
    assert main(["merge", str(tmp_path / "n.json"), str(tmp_path / "missing.json")]) == 2


def test_close_with_a_single_rank_communicator_keeps_the_file(tmp_path):
    class One:
        def Get_size(self):
            return 1
    tl = Timeline(tmp_path / "t.json")
    tl.instant("x")
    assert tl.close(One()) == str(tmp_path / "t.json") and load(tmp_path / "t.json")
    assert tl.close() is None  # closing twice is harmless


SCRIPT = """
import torch
import mpiml.torch as hvd
hvd.init()
for i in range(3):
    hvd.allreduce(torch.ones(4) * hvd.rank(), name=f"w{i}")
hvd.broadcast(torch.ones(2), 0)
"""


@pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="needs the MPICH wheel's mpiexec")
def test_horovod_timeline_env_merges_every_rank_into_one_file(tmp_path):
    path = tmp_path / "trace.json"
    env = dict(os.environ, HOROVOD_TIMELINE=str(path), HOROVOD_TIMELINE_MARK_CYCLES="1", OMP_NUM_THREADS="1")
    out = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", SCRIPT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    events = load(path)
    assert {e["pid"] for e in events} == {0, 1}
    names = {e["name"] for e in events}
    assert {"NEGOTIATE_ALLREDUCE", "ALLREDUCE", "MEMCPY_IN_FUSION_BUFFER", "NEGOTIATE", "CYCLE_START",
            "NEGOTIATE_BROADCAST", "BROADCAST", "WAIT"} <= names
    rows = {e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert {"allreduce.w0", "allreduce.w2", "engine", "MainThread"} <= rows
    assert sorted(os.listdir(tmp_path)) == ["trace.json"]  # the per-rank files were merged and removed


class _Rank0Of2:
    """Rank 0 of a two-rank communicator whose rank 1 records nothing."""

    def Get_size(self):
        return 2

    def Get_rank(self):
        return 0

    def gather(self, value, root=0):
        return [value, None]

    def bcast(self, value, root=0):
        return value


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_stops_tracing_with_a_warning(capsys):
    tl = Timeline("/dev/full")  # every write fails with ENOSPC
    for i in range(2000):  # more than the file's buffer holds
        with tl.span("forward", "compute", step=i):
            pass
    tl.flush()
    assert tl.close() == "/dev/full" and tl.failed and not tl.enabled
    err = capsys.readouterr().err
    assert err.count("warning: timeline /dev/full:") == 1 and "tracing stopped" in err


def test_merge_failure_leaves_no_temporary_file(tmp_path):
    (tmp_path / "a.json").write_text("[\n]\n")
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError):
        merge(tmp_path / "out", [tmp_path / "a.json"])
    assert sorted(os.listdir(tmp_path)) == ["a.json", "out"]


def test_close_warns_and_keeps_rank_files_when_the_merged_trace_cannot_be_written(tmp_path, capsys):
    (tmp_path / "trace").mkdir()  # the merged trace's path is a directory
    tl = Timeline(tmp_path / "trace", rank=0, size=2)
    tl.instant("x")
    assert tl.close(_Rank0Of2()) is None
    assert "cannot write the merged trace" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["trace", "trace.rank0.json"]
    assert load(tmp_path / "trace.rank0.json")[-1]["name"] == "trace_end"
