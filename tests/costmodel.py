"""Bytes each rank sends, per DESIGN.md section 4, in elements (shared by the simulated and MPI cost tests)."""

from mpiml.collectives._chunks import chunk_bounds


def ring_expected(p, n):
    """Rank r sends every segment but its own in the reduce-scatter and all but r+1's in the allgather."""
    b = chunk_bounds(n, p)
    seg = [b[i + 1] - b[i] for i in range(p)]
    return [2 * n - seg[r] - seg[(r + 1) % p] for r in range(p)]


def butterfly_expected(p, n, small):
    """Survivors: 2n(pof2-1)/pof2 (large) or n lg pof2 (small); a folded pair adds n each."""
    pof2 = 1 << (p.bit_length() - 1)
    rem = p - pof2
    core = n * (pof2.bit_length() - 1) if small else 2 * n * (pof2 - 1) / pof2
    return [n if r < 2 * rem and r % 2 == 0 else core + (n if r < 2 * rem else 0) for r in range(p)]


def tree_expected(p, n, chunk_bytes, itemsize=8):
    """Double binary tree: chunk j goes through tree j % 2 (heap slot r, or p-1-r in the mirrored tree).

    In that tree a rank sends the chunk once up (unless it is the root) and
    once to each child (heap slots 2v+1, 2v+2 below p).
    """
    per_chunk = max(1, chunk_bytes // itemsize)
    count = max(1, -(-n // per_chunk))
    bounds = chunk_bounds(n, count)
    sent = [0] * p
    for j in range(count):
        size = bounds[j + 1] - bounds[j]
        for r in range(p):
            v = r if j % 2 == 0 else p - 1 - r
            children = sum(1 for c in (2 * v + 1, 2 * v + 2) if c < p)
            sent[r] += size * ((0 if v == 0 else 1) + children)
    return sent
