"""Timers and the JSON-lines metrics log."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

__all__ = ["Stopwatch", "MetricsLog"]


class Stopwatch:
    """Accumulates wall time spent inside ``with watch:`` blocks."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds += time.perf_counter() - self._start


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Infinity
    return value


class MetricsLog:
    """Appends one JSON object per line to ``path`` (only where ``enabled``, i.e. on rank 0)."""

    def __init__(self, path: str | None, enabled: bool, append: bool = False) -> None:
        self.path = path if enabled else None
        if self.path:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            if not append:
                open(self.path, "w").close()

    def write(self, record: dict[str, Any]) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
