"""Every point-to-point algorithm, on simulated ranks (tests/simcomm.py): any p, exact results, cost model.

The simulator is stricter than MPI (rendezvous sends, copies at match time),
so these catch deadlocks and buffer races that real MPI might hide, at rank
counts a 2-core machine cannot launch.
"""

import numpy as np
import pytest
from costmodel import butterfly_expected, ring_expected, tree_expected
from simcomm import simulate

from mpiml.collectives import butterfly, ring, tree
from mpiml.collectives._buffers import reduction
from mpiml.collectives._chunks import chunk_bounds

ALGOS = {"ring": ring, "tree": tree, "butterfly": butterfly}
RANKS = [1, 2, 3, 4, 5, 6, 7, 8, 12, 16]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 24 bytes, so even short vectors are pipelined through many steps."""
    for m in ALGOS.values():
        monkeypatch.setattr(m, "CHUNK_BYTES", 24)
    monkeypatch.setattr(butterfly, "SMALL_BYTES", 200)


def _inputs(p, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(-9, 10, n).astype(dtype) for _ in range(p)]


def _allreduce_all(algo, xs, op="sum"):
    red = reduction(op, xs[0].dtype.name)
    outs = [x.copy() for x in xs]

    def body(comm):
        ALGOS[algo].allreduce(outs[comm.rank], red, comm)
    _, world = simulate(len(xs), body)
    return outs, world


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("p", RANKS)
@pytest.mark.parametrize("n", [1, 2, 5, 17, 100, 1001])
def test_allreduce_exact_any_p(small_chunks, algo, p, n):
    xs = _inputs(p, n, np.int64, seed=p * 1000 + n)
    outs, _ = _allreduce_all(algo, xs)
    expect = np.sum(xs, axis=0)
    for r in range(p):
        np.testing.assert_array_equal(outs[r], expect, err_msg=f"{algo} p={p} n={n} rank {r}")


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("op", ["mean", "max", "min", "prod"])
def test_allreduce_ops(small_chunks, algo, op):
    p, n = 6, 77
    rng = np.random.default_rng(1)
    xs = [rng.choice([-2.0, -1.0, 1.0, 2.0, 0.5], n) for _ in range(p)]
    outs, _ = _allreduce_all(algo, xs, op)
    fn = {"mean": np.sum, "max": np.max, "min": np.min, "prod": np.prod}[op]
    expect = fn(xs, axis=0) / (p if op == "mean" else 1)
    for r in range(p):
        np.testing.assert_array_equal(outs[r], expect)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("p", [3, 5, 8])
def test_allreduce_bitwise_identical_on_random_floats(small_chunks, algo, p):
    rng = np.random.default_rng(p)
    xs = [rng.standard_normal(301).astype(np.float32) for _ in range(p)]
    outs, _ = _allreduce_all(algo, xs)
    for r in range(1, p):
        assert outs[r].tobytes() == outs[0].tobytes()
    np.testing.assert_allclose(outs[0], np.sum(np.array(xs, dtype=np.float64), axis=0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("p", [1, 2, 3, 5, 8, 13])
@pytest.mark.parametrize("n", [1, 4, 29, 500])
def test_reduce_scatter_any_p(small_chunks, algo, p, n):
    xs = _inputs(p, n, np.int32, seed=n + p)
    red = reduction("sum", "int32")
    outs = [x.copy() for x in xs]

    def body(comm):
        return ALGOS[algo].reduce_scatter(outs[comm.rank], red, comm)
    segs, _ = simulate(p, body)
    expect, bounds = np.sum(xs, axis=0), chunk_bounds(n, p)
    for r in range(p):
        assert segs[r] == (bounds[r], bounds[r + 1])
        np.testing.assert_array_equal(outs[r][bounds[r]:bounds[r + 1]], expect[bounds[r]:bounds[r + 1]])


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("p", [1, 2, 3, 5, 8, 13])
def test_allgather_variable_lengths(small_chunks, algo, p):
    lengths = [(3 * r + 1) % 7 for r in range(p)]  # some ranks contribute nothing
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    full = np.arange(bounds[-1], dtype=np.float64) * 1.5
    outs = []
    for r in range(p):
        out = np.full(bounds[-1], np.nan)
        out[bounds[r]:bounds[r + 1]] = full[bounds[r]:bounds[r + 1]]
        outs.append(out)

    def body(comm):
        ALGOS[algo].allgather(outs[comm.rank], bounds, comm)
    simulate(p, body)
    for r in range(p):
        np.testing.assert_array_equal(outs[r], full)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("p", [1, 2, 3, 6, 9])
def test_broadcast_any_root(small_chunks, algo, p):
    n = 55
    for root in {0, p - 1, p // 2}:
        outs = [np.full(n, -1, dtype=np.int64) for _ in range(p)]
        outs[root][:] = np.arange(n)

        def body(comm):
            ALGOS[algo].broadcast(outs[comm.rank], root, comm)
        simulate(p, body)
        for r in range(p):
            np.testing.assert_array_equal(outs[r], np.arange(n))


# ---------------------------------------------------------------- cost model (DESIGN.md section 4)

def _sent_elements(algo, p, n, chunk_bytes=800, small_bytes=None, monkeypatch=None):
    monkeypatch.setattr(ALGOS[algo], "CHUNK_BYTES", chunk_bytes)
    if small_bytes is not None:
        monkeypatch.setattr(butterfly, "SMALL_BYTES", small_bytes)
    xs = _inputs(p, n, np.float64)
    _, world = _allreduce_all(algo, xs)
    return [b // 8 for b in world.bytes_sent], [m // 8 for m in world.largest_message]


@pytest.mark.parametrize("p", [2, 3, 4, 5, 7, 8, 16])
@pytest.mark.parametrize("n", [1000, 4099])
def test_cost_ring(monkeypatch, p, n):
    sent, largest = _sent_elements("ring", p, n, monkeypatch=monkeypatch)
    assert sent == ring_expected(p, n)
    for r in range(p):
        assert abs(sent[r] - 2 * n * (p - 1) / p) <= 2
    assert max(largest) <= 100  # pipelined: no message bigger than a chunk (800 bytes)


@pytest.mark.parametrize("p", [2, 3, 4, 5, 6, 8, 16])
@pytest.mark.parametrize("n", [1000, 4099])
def test_cost_butterfly_large(monkeypatch, p, n):
    sent, largest = _sent_elements("butterfly", p, n, small_bytes=1, monkeypatch=monkeypatch)
    for r, (got, want) in enumerate(zip(sent, butterfly_expected(p, n, small=False))):
        assert abs(got - want) <= 2 * p.bit_length(), f"rank {r}: sent {got}, cost model {want}"
    assert max(largest) <= 100


@pytest.mark.parametrize("p", [2, 3, 4, 5, 8, 16])
def test_cost_butterfly_small_is_recursive_doubling(monkeypatch, p):
    n = 64
    sent, _ = _sent_elements("butterfly", p, n, small_bytes=10**9, monkeypatch=monkeypatch)
    assert sent == butterfly_expected(p, n, small=True)


@pytest.mark.parametrize("p", [2, 3, 4, 5, 7, 8, 16])
@pytest.mark.parametrize("n", [1000, 4099])
def test_cost_tree(monkeypatch, p, n):
    sent, largest = _sent_elements("tree", p, n, monkeypatch=monkeypatch)
    assert sent == tree_expected(p, n, 800)
    assert max(sent) <= 2 * n + 2 * 100  # double binary tree: at most 2n, up to one chunk of rounding per tree
    assert max(largest) <= 100


def test_cost_model_catches_a_naive_algorithm():
    """The check above must fail for the naive 'send everything to everyone' allreduce."""
    p, n = 4, 1000
    xs = _inputs(p, n, np.float64)

    def naive(comm):
        x = xs[comm.rank]
        reqs = [comm.Isend([x], dst) for dst in range(p) if dst != comm.rank]
        bufs = {src: np.empty_like(x) for src in range(p) if src != comm.rank}
        reqs += [comm.Irecv([bufs[src]], src) for src in bufs]
        for q in reqs:
            q.Wait()
    _, world = simulate(p, naive)
    sent = [b // 8 for b in world.bytes_sent]
    assert sent != ring_expected(p, n)
    assert all(abs(s - 2 * n * (p - 1) / p) > 2 for s in sent)
