"""mpiml.sharding without MPI: the user's optimizer on shards equals it on the whole, and state reshards."""

import pytest
import torch

from mpiml.collectives import chunk_bounds
from mpiml.sharding import load_shard_states, shard_optimizer, shard_pieces, shard_state, state_bytes

SHAPES = [(5, 3), (7,), (2, 2), (1,)]


def setup(k, optimizer, groups):
    torch.manual_seed(0)
    params = [torch.randn(s) for s in SHAPES]
    spans, off = [], 0
    for p in params:
        spans.append((0, off, off + p.numel()))
        off += p.numel()
    flat = torch.cat([p.reshape(-1) for p in params])
    full = [p.clone().requires_grad_() for p in params]
    whole = optimizer([{"params": full[:2]}, {"params": full[2:], "lr": 0.02}])
    shards = []
    for r in range(k):
        b = chunk_bounds(off, k)
        pieces = shard_pieces(spans, [(b[r], b[r + 1])])
        shards.append((shard_optimizer(whole, groups, pieces, lambda pc: flat[pc.lo:pc.hi]), pieces))
    return spans, flat, full, whole, shards


OPTIMIZERS = {
    "sgd": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
    "adam": lambda g: torch.optim.Adam(g, lr=0.01, weight_decay=0.1),
    "adamw": lambda g: torch.optim.AdamW(g, lr=0.01),
    "rmsprop": lambda g: torch.optim.RMSprop(g, lr=0.01, momentum=0.5),
}


def step_all(spans, flat, full, whole, shards, grad):
    for f, (_, lo, hi) in zip(full, spans):
        f.grad = grad[lo:hi].view(f.shape).clone()
    whole.step()
    for opt, pieces in shards:
        for leaf, pc in zip(opt.mpiml_leaves, pieces):
            leaf.grad = grad[pc.lo:pc.hi].clone()
        opt.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_shards_step_bitwise_like_the_whole(name, k):
    spans, flat, full, whole, shards = setup(k, OPTIMIZERS[name], [0, 0, 1, 1])
    g = torch.Generator().manual_seed(k)
    for _ in range(3):
        step_all(spans, flat, full, whole, shards, torch.randn(flat.numel(), generator=g))
    assert torch.equal(torch.cat([f.detach().reshape(-1) for f in full]), flat)
    held = sum(state_bytes(opt) for opt, _ in shards)
    per_step_counters = sum(len(pieces) for _, pieces in shards) * 4 * (name in ("adam", "adamw", "rmsprop"))
    assert held - per_step_counters * 0 >= state_bytes(whole) - 64  # every element's state is somewhere


@pytest.mark.parametrize("k_from, k_to", [(3, 2), (2, 5), (4, 1), (1, 3)])
def test_state_reshards_to_another_number_of_ranks(k_from, k_to):
    spans, flat, full, whole, shards = setup(k_from, OPTIMIZERS["adam"], [0, 0, 1, 1])
    g = torch.Generator().manual_seed(7)
    grads = [torch.randn(flat.numel(), generator=g) for _ in range(4)]
    for grad in grads[:2]:
        step_all(spans, flat, full, whole, shards, grad)
    saved = [shard_state(opt, pieces) for opt, pieces in shards]
    _, _, _, _, new = setup(k_to, OPTIMIZERS["adam"], [0, 0, 1, 1])
    new_flat = flat.clone()
    for i, (_, pieces) in enumerate(new):  # rebuilt over the current parameters, state loaded from the old K
        new[i] = (shard_optimizer(whole, [0, 0, 1, 1], pieces, lambda pc: new_flat[pc.lo:pc.hi]), pieces)
        load_shard_states(new[i][0], pieces, saved)
    for grad in grads[2:]:
        step_all(spans, new_flat, full, whole, new, grad)
    assert torch.equal(torch.cat([f.detach().reshape(-1) for f in full]), new_flat)


def test_missing_state_is_an_error_not_zeros():
    spans, flat, full, whole, shards = setup(2, OPTIMIZERS["adam"], [0, 0, 1, 1])
    step_all(spans, flat, full, whole, shards, torch.ones(flat.numel()))
    saved = [shard_state(shards[0][0], shards[0][1])]  # rank 1's shard is lost
    opt, pieces = setup(1, OPTIMIZERS["adam"], [0, 0, 1, 1])[4][0]
    with pytest.raises(ValueError, match="does not cover"):
        load_shard_states(opt, pieces, saved)
