"""Splitting index ranges into parts; pure integer arithmetic, no MPI.

Every rank computes the same bounds from the same numbers, which is what lets
two ranks agree on message sizes without ever telling each other.
"""

from __future__ import annotations

__all__ = ["chunk_bounds", "pieces", "num_pieces"]


def chunk_bounds(n: int, parts: int) -> list[int]:
    """Offsets ``[o_0 = 0, o_1, ..., o_parts = n]`` splitting ``n`` items into ``parts``.

    Part ``i`` is ``range(o_i, o_{i+1})``. Sizes differ by at most one and the
    remainder of ``n / parts`` goes to the first parts (as in baidu-allreduce),
    so part ``i`` has ``n // parts + (i < n % parts)`` items. Parts may be empty
    when ``n < parts``.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    base, extra = divmod(n, parts)
    bounds = [0] * (parts + 1)
    for i in range(parts):
        bounds[i + 1] = bounds[i] + base + (1 if i < extra else 0)
    return bounds


def num_pieces(length: int, piece: int) -> int:
    """How many pieces of at most ``piece`` items cover ``length`` items (at least 1)."""
    if piece < 1:
        raise ValueError(f"piece must be >= 1, got {piece}")
    return max(1, -(-length // piece))


def pieces(lo: int, hi: int, count: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` cut into ``count`` consecutive ``(start, stop)`` pairs (see chunk_bounds)."""
    bounds = chunk_bounds(hi - lo, count)
    return [(lo + bounds[i], lo + bounds[i + 1]) for i in range(count)]
