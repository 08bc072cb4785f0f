import numpy as np
import pytest
import torch
from simcomm import simulate

from mpiml import mixing


@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_power_of_two_is_the_butterfly(k):
    for step in range(3 * mixing.stages(k)):
        partners = [mixing.partner_for_step(r, k, step) for r in range(k)]
        assert all(p == r ^ (1 << (step % mixing.stages(k))) for r, p in enumerate(partners))


@pytest.mark.parametrize("k", [3, 5, 6, 7, 12])
def test_other_k_pairs_are_symmetric_and_in_range(k):
    sat_out = 0
    for step in range(mixing.stages(k)):
        partners = [mixing.partner_for_step(r, k, step) for r in range(k)]
        for r, p in enumerate(partners):
            if p is not None:
                assert 0 <= p < k and partners[p] == r
        sat_out += partners.count(None)
    assert sat_out > 0  # the rule for K not a power of two: a partner >= K means sitting the stage out


def test_single_rank_never_mixes():
    assert mixing.stages(1) == 0 and mixing.partner_for_step(0, 1, 5) is None


@pytest.mark.parametrize("k", [2, 3, 5, 6, 7, 8])
def test_mixing_preserves_the_mean_and_reaches_consensus(k):
    rng = np.random.default_rng(k)
    start = [rng.standard_normal(50) for _ in range(k)]
    mean = np.mean(start, axis=0)
    bufs = [torch.from_numpy(s.copy()) for s in start]

    def body(comm):
        scratch = []
        history = []
        for step in range(40 * mixing.stages(k)):
            mixing.mix([bufs[comm.rank]], comm, step, scratch)
            history.append(bufs[comm.rank].clone())
        return history

    simulate(k, body)
    final = np.array([b.numpy() for b in bufs])
    np.testing.assert_allclose(final.mean(axis=0), mean, atol=1e-12)
    assert np.abs(final - mean).max() < 1e-6


def test_partners_end_bitwise_equal():
    bufs = [torch.tensor([0.1, 0.7, 1e-8]), torch.tensor([0.3, -0.2, 3.0])]

    def body(comm):
        mixing.mix([bufs[comm.rank]], comm, 0, [])
    simulate(2, body)
    assert bufs[0].numpy().tobytes() == bufs[1].numpy().tobytes()
