"""The failure cases of ``python -m mpiml.train``: what we do to a job, what the user must see, how fast.

Shared by tests/test_failures.py (which asserts them) and scripts/failure_table.py (which times them for
the README).
"""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time

BIN = os.path.dirname(sys.executable)
MPIEXEC = os.path.join(BIN, "mpiexec")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def is_open_mpi() -> bool:
    out = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True).stdout
    return "Open MPI" in out or "OpenRTE" in out or "prte" in out.lower()


def mpiexec(ranks: int) -> list[str]:
    return [MPIEXEC] + (["--oversubscribe"] if is_open_mpi() else []) + ["-n", str(ranks)]


def train_cmd(ranks: int, *args: str) -> list[str]:
    return mpiexec(ranks) + [sys.executable, "-m", "mpiml.train", "--no-progress", *args]


def run(cmd: list[str], timeout: float = 120, **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kwargs)
    return done, time.monotonic() - start


def final_metrics(path) -> dict:
    """The final line of a ``--metrics`` file (accuracy, params_sha256, ranks, ...)."""
    with open(path) as f:
        return json.loads(f.read().splitlines()[-1])


def run_from(cmd, marker, timeout=120):
    """Run a job; return (return code, stdout, stderr, seconds from the first output line containing ``marker``
    to the end of the job). Times are taken from an event, not from the launch: startup on a loaded machine
    varies by tens of seconds."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen, lines = [], {"out": [], "err": []}

    def read(stream, key):
        for line in stream:
            lines[key].append(line)
            if marker in line and not seen:
                seen.append(time.monotonic())
    readers = [threading.Thread(target=read, args=(proc.stdout, "out")),
               threading.Thread(target=read, args=(proc.stderr, "err"))]
    for t in readers:
        t.start()
    try:
        proc.wait(timeout=timeout)
    finally:
        ended = time.monotonic()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the job (nothing, normally)
        except ProcessLookupError:
            pass
        for t in readers:
            t.join()
    return proc.returncode, "".join(lines["out"]), "".join(lines["err"]), ended - seen[0] if seen else None


def rank_pids(marker: str, program: bytes = b"mpiml.train") -> list[int]:
    """PIDs of the Python rank processes whose command line contains ``marker`` (not mpiexec, not proxies)
    and ``program`` (as an argument of its own)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if (argv and argv[0].endswith(b"python") and any(marker.encode() in a for a in argv) and program in argv
                and b"mpiml.run" not in argv):  # (not a launcher whose command line names the program)
            pids.append(int(entry))
    return sorted(pids)


def kill_a_rank_mid_training(tmp: str, ranks: int = 3) -> dict:
    """SIGKILL one rank once checkpoints exist; the job must end everywhere, then resume must finish it.

    Checkpoint 100 is written in the first epoch (about 120 steps of batch 4 per rank at 3 ranks); of the job's
    6 epochs more than 600 steps are still to run when the rank is killed (over a second unloaded, at about 2 ms
    a step; far more on a loaded machine) against the poll's 50 ms."""
    ck = os.path.join(tmp, "ck-kill")
    args = ["--epochs", "6", "--batch-size", "4", "--checkpoint-dir", ck, "--checkpoint-every", "50"]
    proc = subprocess.Popen(train_cmd(ranks, *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(ck, "checkpoint-000000100.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    pids = rank_pids(ck)
    victim = pids[-1] if pids else None
    killed_at = time.monotonic()
    if victim:
        os.kill(victim, signal.SIGKILL)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    ended = time.monotonic() - killed_at
    time.sleep(0.5)
    return {"returncode": proc.returncode, "seconds": ended, "stderr": err, "stdout": out,
            "left_over": rank_pids(ck), "ranks_seen": len(pids), "checkpoint_dir": ck, "args": args}


def kill_ranks_under_restarts(tmp: str, kills: int, ranks: int = 3, seed: int = 0) -> dict:
    """``python -m mpiml.run --max-restarts kills`` training as ``kill_a_rank_mid_training`` does; SIGKILL a rank
    chosen at random ``kills`` times, each time once the attempt has written a checkpoint 150 steps past the
    last kill's (so every attempt makes progress). Returns the launcher's exit status, stderr and the
    metrics file."""
    import random
    pick = random.Random(seed)
    ck, metrics = os.path.join(tmp, "ck-restarts"), os.path.join(tmp, "restarts.jsonl")
    args = ["--epochs", "6", "--batch-size", "4", "--checkpoint-dir", ck, "--checkpoint-every", "50"]
    launcher = [sys.executable, "-m", "mpiml.run", "-np", str(ranks), "--max-restarts", str(kills)]
    if is_open_mpi():
        launcher.append("--oversubscribe")
    cmd = launcher + [sys.executable, "-m", "mpiml.train", "--no-progress", "--metrics", metrics, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = []
    for k in range(kills):
        step = 100 + 150 * k
        deadline = time.monotonic() + 120
        while not os.path.exists(os.path.join(ck, f"checkpoint-{step:09d}.pt")) and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = rank_pids(ck)
        while len(pids) < ranks and time.monotonic() < deadline:  # the attempt's ranks are all up
            time.sleep(0.05)
            pids = rank_pids(ck)
        if not pids:
            break
        victim = pick.choice(pids)
        os.kill(victim, signal.SIGKILL)
        killed.append(victim)
        while victim in rank_pids(ck) and time.monotonic() < deadline:
            time.sleep(0.05)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return {"returncode": proc.returncode, "stderr": err, "stdout": out, "killed": killed, "metrics": metrics,
            "args": args}


def lose_a_host_under_min_np(tmp: str, epochs: int = 12, timeout: int = 5) -> dict:
    """``mpiml.run -H h1,h2,h3 --min-np 2`` training on three emulated hosts (root: network namespaces); host 3's
    link is brought down once epoch 2 is reported. Returns the launcher's exit status, its output (UCX's lines
    left out), the host names, the metrics file, and the seconds from the cut to the resume and to the end."""
    from netns import Hosts
    log, metrics = os.path.join(tmp, "job.log"), os.path.join(tmp, "lost-host.jsonl")
    train_args = ["--no-progress", "--epochs", str(epochs), "--checkpoint-dir", os.path.join(tmp, "ck-lost"),
                  "--stall-warning", "2", "--timeout", str(timeout), "--metrics", metrics]

    def output() -> str:
        with open(log, errors="replace") as f:
            return "".join(line for line in f if "UCX" not in line)

    with Hosts(3) as hosts, open(log, "w") as sink:
        cmd = [sys.executable, "-m", "mpiml.run", "-H", ",".join(hosts.names), "--min-np", "2", "--start-timeout",
               str(timeout), "--mpi-args", shlex.join(hosts.hydra_options()), sys.executable, "-m", "mpiml.train",
               *train_args]
        job = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                               start_new_session=True)

        def give_up(why: str) -> AssertionError:
            try:
                os.killpg(job.pid, signal.SIGKILL)  # the launcher and the mpiexec it started
            except ProcessLookupError:  # every one of them has ended already
                pass
            job.wait()
            return AssertionError(why + "\n" + output()[-3000:])
        deadline = time.monotonic() + 60
        while f"epoch   2/{epochs}" not in output() and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.2)
        if job.poll() is not None or time.monotonic() >= deadline:
            raise give_up("the job did not reach epoch 2:")
        hosts.cut(3)
        cut = time.monotonic()
        resumed = None
        while job.poll() is None and time.monotonic() < cut + 150:
            if resumed is None and "resumed from" in output():
                resumed = time.monotonic() - cut
            time.sleep(0.2)
        if job.poll() is None:
            raise give_up("the job did not end within 150 s of the cut:")
        ended = time.monotonic() - cut
    return {"returncode": job.returncode, "output": output(), "hosts": hosts.names, "metrics": metrics,
            "resumed_s": resumed, "ended_s": ended, "timeout": timeout}


CASES = [
    # id, extra args to mpiml.train, expected exit code (None: any non-zero), stderr pattern, seconds allowed
    ("hang", ["--epochs", "2", "--fault", "hang:1:5", "--stall-warning", "1", "--timeout", "4"], None,
     r"stall: collective #\d+ \(gradients step 5 bucket 0, step 5\) has waited \d+ s for rank 1", 30),
    ("crash", ["--epochs", "2", "--fault", "exit:1:5"], None, r"", 30),
    ("nan", ["--epochs", "2", "--fault", "nan:1:5"], 2,
     r"error: non-finite gradient \(NaN or Inf\) at step 5 on rank 1; aborting", 30),
    ("diverged", ["--epochs", "2", "--fault", "corrupt:2:5", "--check-consistency-every", "1"], 2,
     r"error: replicas diverged by step 5: ranks 0,1 hold parameters with CRC [0-9a-f]+; rank 2 holds", 30),
    ("bad data", ["--data", "/nonexistent/x.npz"], 2, r"error: --data /nonexistent/x.npz: no such file", 30),
]


def check(case_id: str, done: subprocess.CompletedProcess, expected_code, pattern: str) -> list[str]:
    problems = []
    if done.returncode == 0 or (expected_code is not None and done.returncode != expected_code):
        problems.append(f"{case_id}: exit status {done.returncode}, expected {expected_code or 'non-zero'}")
    if pattern and not re.search(pattern, done.stderr + done.stdout):
        problems.append(f"{case_id}: output does not match {pattern!r}:\n{done.stderr[-2000:]}")
    return problems
