"""Running ``python -m mpiml.train`` jobs for the studies and reading their metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

STRATEGIES: dict[str, list[str]] = {
    "ring": ["--topology", "ring"],
    "tree": ["--topology", "tree"],
    "butterfly": ["--topology", "butterfly"],
    "butterfly-mixing": ["--topology", "butterfly-mixing"],
    "local-sgd-H4": ["--topology", "ring", "--average-every", "4"],
    "local-sgd-H16": ["--topology", "ring", "--average-every", "16"],
    "ps-S0": ["--topology", "ps", "--staleness", "0"],
    "ps-S4": ["--topology", "ps", "--staleness", "4"],
    "ps-async": ["--topology", "ps", "--staleness", "inf"],
}

DATASETS: dict[str, list[str]] = {
    "digits": ["--dataset", "digits"],
    "synthetic": ["--dataset", "synthetic", "--samples", "20000", "--features", "32", "--classes", "10"],
}


def train(ranks: int, args: list[str], timeout: float = 1800) -> list[dict]:
    """Run one job; returns its metrics records (per epoch, then the final one)."""
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.jsonl")
        cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "mpiml.train", "--no-progress", "--metrics", metrics,
               *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        with open(metrics) as f:
            return [json.loads(line) for line in f]


def time_to(records: list[dict], target: float) -> float | None:
    """Training seconds until the first epoch whose test accuracy reaches ``target`` (None: never)."""
    for r in records:
        if not r.get("final") and r["test_accuracy"] >= target:
            return r["train_seconds"]
    return None


def save_json(path: str | None, payload: object) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)
