"""Issue 15's restart targets.

    .venv/bin/python scripts/restart_check.py --kills 3      # --max-restarts 3, a random rank killed three times
    .venv/bin/python scripts/restart_check.py --lose-host    # --min-np 2 on 3 emulated hosts, one link cut (root)

``--kills``: both runs are ``mpiml.train --epochs 6 --batch-size 4 --checkpoint-every 50`` at 3 ranks
(tests/failure_cases.py ``kill_ranks_under_restarts``); the restarted one must end with the uninterrupted run's
``params_sha256``. Prints each restart line of the launcher, the two digests and the wall times.

``--lose-host``: ``mpiml.train --epochs 12`` on three network-namespace hosts under ``mpiml.run --min-np 2``;
host 3's link is cut after epoch 2 (``lose_a_host_under_min_np``). Prints the launcher's lines, the seconds from
the cut to the resume and to the end, and the accuracy against an uninterrupted 3-rank run (target: 0.5 points).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from failure_cases import (  # noqa: E402
    final_metrics,
    kill_ranks_under_restarts,
    lose_a_host_under_min_np,
    run,
    train_cmd,
)


def final_sha(path: str) -> str:
    return final_metrics(path)["params_sha256"]


def lose_host() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        lost = lose_a_host_under_min_np(tmp)
        for line in lost["output"].splitlines():
            if line.startswith(("mpiml.run:", "mpiml watchdog: rank 0", "resumed from")):
                print(line)
        whole = os.path.join(tmp, "whole.jsonl")
        done, whole_s = run(train_cmd(3, "--epochs", "12", "--metrics", whole), timeout=600)
        if lost["returncode"] != 0 or done.returncode != 0:
            print(f"failed: launcher exit status {lost['returncode']}, uninterrupted run {done.returncode}")
            return 1
        shrunk, uninterrupted = final_metrics(lost["metrics"]), final_metrics(whole)
        gap = 100 * (shrunk["test_accuracy"] - uninterrupted["test_accuracy"])
        print(f"cut -> resumed on {shrunk['ranks']} ranks: {lost['resumed_s']:.1f} s; cut -> end: "
              f"{lost['ended_s']:.1f} s; uninterrupted run (3 ranks, one machine): {whole_s:.1f} s\n"
              f"test accuracy {100 * shrunk['test_accuracy']:.2f}% against {100 * uninterrupted['test_accuracy']:.2f}%"
              f" uninterrupted ({gap:+.2f} points)")
        return 0 if abs(gap) <= 0.5 and lost["ended_s"] < 120 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lose-host", action="store_true", help="the --min-np target instead (root)")
    args = parser.parse_args()
    if args.lose_host:
        return lose_host()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        restarted = kill_ranks_under_restarts(tmp, args.kills, seed=args.seed)
        restarted_s = time.monotonic() - start
        for line in restarted["stderr"].splitlines():
            if line.startswith("mpiml.run:"):
                print(line)
        whole = os.path.join(tmp, "whole.jsonl")
        start = time.monotonic()
        wargs = [a.replace("ck-restarts", "ck-whole") for a in restarted["args"]]
        done, _ = run(train_cmd(3, *wargs, "--metrics", whole), timeout=600)
        whole_s = time.monotonic() - start
        ok = restarted["returncode"] == 0 and done.returncode == 0
        same = ok and final_sha(restarted["metrics"]) == final_sha(whole)
        print(f"killed {len(restarted['killed'])} ranks; launcher exit status {restarted['returncode']} "
              f"({restarted_s:.0f} s); uninterrupted run {whole_s:.0f} s")
        if ok:
            print(f"params_sha256 restarted {final_sha(restarted['metrics'])}\n"
                  f"params_sha256 uninterrupted {final_sha(whole)}\nsame: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
