"""Issue 15's restart target: kill a random rank three times in one job under ``--max-restarts 3``; the job must
finish with the same ``params_sha256`` as an uninterrupted run.

    .venv/bin/python scripts/restart_check.py --kills 3

Both runs are ``mpiml.train --epochs 6 --batch-size 4 --checkpoint-every 50`` at 3 ranks (tests/failure_cases.py
``kill_ranks_under_restarts``). Prints each restart line of the launcher, the two digests and the wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from failure_cases import kill_ranks_under_restarts, run, train_cmd  # noqa: E402


def final_sha(path: str) -> str:
    with open(path) as f:
        return json.loads(f.read().splitlines()[-1])["params_sha256"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
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
