"""The user's torch optimizer, stepping only a shard of the parameters (ZeRO, the parameter server).

    pieces = shard_pieces(spans, shards)        # where this rank's shard cuts each parameter
    opt = shard_optimizer(inner, group_of, pieces, param_view, grad_view)
    opt.step()                                  # updates only the shard, in place
    saved = shard_state(opt, pieces)            # this rank's part of the optimizer state
    load_shard_states(opt, pieces, [saved_0, saved_1, ...])  # from any number of old shards

A parameter's elements live in a flat buffer (``spans[i] = (buffer, lo,
hi)``); a shard is a range of each buffer. Each piece is the part of one
parameter inside this rank's shard, as a 1-D view, and the shard optimizer is
a new instance of the wrapped optimizer's own class, built with the same
parameter groups' hyper-parameters (learning rate, momentum, betas, weight
decay...), whose parameters are those pieces. Element-wise optimizers (SGD,
Adam, AdamW, RMSprop, Adagrad...) then compute on each element exactly what
the full optimizer would: the same operations on the same values, so the
results are bitwise equal. Optimizers that look across elements (LBFGS, or
norms per tensor such as LAMB) would not be, and are not element-wise.

The wrapped optimizer's ``param_groups`` stay the source of the
hyper-parameters: ``sync_hyperparameters`` copies them (an lr scheduler's
changes) into the shard optimizer before each step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

__all__ = ["Piece", "shard_pieces", "shard_optimizer", "sync_hyperparameters", "shard_state", "load_shard_states",
           "state_bytes"]


class Piece(NamedTuple):
    """Parameter ``param``'s elements ``[start, stop)`` (counted in the flattened parameter), which sit at
    ``[lo, hi)`` of flat buffer ``buffer``."""

    param: int
    buffer: int
    lo: int
    hi: int
    start: int
    stop: int


def shard_pieces(spans: Sequence[tuple[int, int, int]], shards: Sequence[tuple[int, int]]) -> list[Piece]:
    """Every parameter's part inside the shard, in parameter order: ``spans[i] = (buffer, lo, hi)``,
    ``shards[b] = (lo, hi)`` of buffer b. Parameters outside the shard have no piece."""
    out = []
    for i, (b, lo, hi) in enumerate(spans):
        a, z = max(lo, shards[b][0]), min(hi, shards[b][1])
        if a < z:
            out.append(Piece(i, b, a, z, a - lo, z - lo))
    return out


def _constructor_options(cls: type, defaults: dict[str, Any]) -> dict[str, Any]:
    accepted = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return dict(defaults)
    return {k: v for k, v in defaults.items() if k in accepted}


def shard_optimizer(inner: torch.optim.Optimizer, group_of: Sequence[int], pieces: Sequence[Piece],
                    param_view: Callable[[Piece], torch.Tensor],
                    grad_view: Callable[[Piece], torch.Tensor] | None = None) -> torch.optim.Optimizer:
    """A new optimizer of ``type(inner)``, with ``inner``'s groups' hyper-parameters, over the pieces.

    ``group_of[i]``: the index of parameter i's group in ``inner.param_groups``. ``param_view(piece)``
    is the 1-D tensor the piece's parameters live in (updated in place), ``grad_view(piece)`` where its
    gradient is found (attached as ``.grad``; None: set ``.grad`` yourself before stepping)."""
    groups: list[dict[str, Any]] = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in inner.param_groups]
    leaves = []
    for piece in pieces:
        leaf = param_view(piece).detach()
        if grad_view is not None:
            leaf.grad = grad_view(piece)
        groups[group_of[piece.param]]["params"].append(leaf)
        leaves.append(leaf)
    cls = type(inner)
    try:
        shard = cls(groups, **_constructor_options(cls, inner.defaults))
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot build a {cls.__name__} over a shard of the parameters: {e}") from None
    shard.mpiml_leaves = leaves  # piece j's tensor, whatever group it went to
    return shard


def sync_hyperparameters(inner: torch.optim.Optimizer, shard: torch.optim.Optimizer) -> None:
    """Copy every hyper-parameter of ``inner``'s groups (as schedulers left them) into ``shard``'s."""
    for full, part in zip(inner.param_groups, shard.param_groups, strict=True):
        for k, v in full.items():
            if k != "params":
                part[k] = v


def _leaves(shard: torch.optim.Optimizer, pieces: Sequence[Piece]) -> list[torch.Tensor]:
    leaves = getattr(shard, "mpiml_leaves", None)
    if leaves is None or len(leaves) != len(pieces):
        raise ValueError("not a shard optimizer of these pieces (build it with mpiml.sharding.shard_optimizer)")
    return leaves


def shard_state(shard: torch.optim.Optimizer, pieces: Sequence[Piece]) -> dict[str, Any]:
    """This rank's part of the optimizer state, with where each piece sits (for ``load_shard_states``)."""
    per_piece = []
    for leaf in _leaves(shard, pieces):
        st = shard.state.get(leaf) or {}
        per_piece.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()})
    return {"pieces": [(pc.param, pc.start, pc.stop) for pc in pieces], "state": per_piece}


def load_shard_states(shard: torch.optim.Optimizer, pieces: Sequence[Piece], saved: Sequence[dict[str, Any]]) -> None:
    """Give this rank's pieces their optimizer state from shards saved by any number of ranks.

    Per-element state (1-D, one value per element)
    is assembled from whichever saved pieces cover each element; other state (Adam's step count, a
    0-d tensor or a number) is taken from any saved piece of the same parameter. Raises ValueError if
    the saved shards do not cover a piece."""
    covering: dict[int, list[tuple[int, int, dict[str, Any]]]] = {}
    for s in saved:
        for (param, start, stop), st in zip(s["pieces"], s["state"], strict=True):
            covering.setdefault(param, []).append((start, stop, st))
    stepped = any(st for s in saved for st in s["state"])  # before the first step there is no state at all
    for piece, tensor in zip(pieces, _leaves(shard, pieces), strict=True):
        old = [c for c in covering.get(piece.param, []) if c[0] < piece.stop and c[1] > piece.start and c[2]]
        if not old:
            if stepped:
                raise ValueError(f"the saved optimizer state does not cover parameter {piece.param}'s elements "
                                 f"{piece.start}..{piece.stop}")
            continue
        state: dict[str, Any] = {}
        for key, value in old[0][2].items():
            if torch.is_tensor(value) and value.dim() == 1:
                part = torch.empty(piece.stop - piece.start, dtype=value.dtype)
                covered = 0
                for start, stop, st in old:
                    a, z = max(start, piece.start), min(stop, piece.stop)
                    part[a - piece.start:z - piece.start] = st[key][a - start:z - start]
                    covered += z - a
                if covered != piece.stop - piece.start:
                    raise ValueError(f"the saved optimizer state does not cover parameter {piece.param}'s elements "
                                     f"{piece.start}..{piece.stop} (only {covered} of them)")
                state[key] = part
            else:
                state[key] = value.clone() if torch.is_tensor(value) else value
        shard.state[tensor] = state


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in ``optimizer``'s per-parameter state tensors (momentum, Adam's moments...)."""
    return sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
               if torch.is_tensor(v))
