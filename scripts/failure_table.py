"""Time every failure case of tests/test_failures.py (and the cut link of tests/test_multihost.py, as root)
and print the README's table: what was done, what the user sees, exit status, seconds until the job ended.

    python scripts/failure_table.py [--no-network]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
sys.path.insert(0, TESTS)
from failure_cases import CASES, ROOT, kill_a_rank_mid_training, run, train_cmd  # noqa: E402

WHAT = {
    "hang": "rank 1 stops forever at step 5 (`--fault hang:1:5 --stall-warning 1 --timeout 4`)",
    "crash": "rank 1 exits at step 5 without a word (`--fault exit:1:5`)",
    "nan": "rank 1's loss becomes NaN at step 5 (`--fault nan:1:5`)",
    "diverged": "rank 2's parameters are corrupted at step 5 (`--fault corrupt:2:5 --check-consistency-every 1`)",
    "bad data": "`--data` names a missing file",
}


def first_line(text: str, pattern: str | None = None) -> str:
    for line in text.splitlines():
        if "UCX" in line or line.startswith(("epoch", "mpiml.train: 3 ranks")) or not line.strip():
            continue
        if pattern is None or re.search(pattern, line):
            return line.strip()[:220]
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-network", action="store_true", help="skip the network-namespace case")
    args = parser.parse_args()
    rows = []
    for case_id, extra, _, pattern, _ in CASES:
        done, seconds = run(train_cmd(3, *extra), timeout=180)
        seen = first_line(done.stderr + done.stdout, pattern or r"BAD TERMINATION|Killed|exit")
        rows.append((WHAT[case_id], seen, done.returncode, seconds))
    with tempfile.TemporaryDirectory() as tmp:
        k = kill_a_rank_mid_training(tmp)
        seen = first_line(k["stderr"] + k["stdout"], r"BAD TERMINATION|KILLED|Killed|signal 9")
        rows.append(("one rank SIGKILLed from outside mid-training (then `--resume` finishes the run with the "
                     "uninterrupted run's params_sha256: tests/test_failures.py)", seen, k["returncode"], k["seconds"]))
    if not args.no_network and os.geteuid() == 0:
        from netns import Hosts
        with Hosts(3) as hosts, tempfile.NamedTemporaryFile("w+") as log:
            cmd = hosts.mpiexec() + ["-n", "3", sys.executable, "-m", "mpiml.train", "--no-progress", "--epochs",
                                     "500", "--stall-warning", "3", "--timeout", "10"]
            job = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
            while "epoch   2/500" not in open(log.name).read():
                time.sleep(0.2)
            hosts.cut(3)
            cut = time.monotonic()
            job.wait(timeout=120)
            seconds = time.monotonic() - cut
            text = open(log.name).read()
        rows.append(("3 hosts (network namespaces, TCP); host 3's link brought down mid-run "
                     "(`--stall-warning 3 --timeout 10`)", first_line(text, r"watchdog: stall") + " ... " +
                     first_line(text, r"aborting the job")[:120], job.returncode, seconds))
    print("| what happened | what the user sees | exit status | seconds until the job ended |")
    print("|---|---|---|---|")
    for what, seen, code, seconds in rows:
        print(f"| {what} | `{seen}` | {code} | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
