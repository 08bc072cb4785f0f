"""The strategy interface: what a way of keeping replicas in agreement declares and does.

A strategy is one class in one file, registered by one line in
``mpiml/strategies/__init__.py``. ``DistributedOptimizer`` owns the flat
buffers (every parameter and gradient a view into one buffer per dtype), the
guards (non-finite gradients, replica fingerprints) and the timing; it asks
its strategy at four points of every step::

    strategy.prepare(opt)      # once, before the buffers exist: where gradient buffers live (or None)
    strategy.attach(opt)       # once, after: communicators, buckets, shard optimizers, servers
    ok = strategy.synchronize(opt)  # before the step: combine gradients; returns "my own gradients are finite"
    strategy.apply(opt)        # the update itself (default: the wrapped optimizer's step())
    strategy.after_step(opt)   # after the update: exchange parameters (mixing, local SGD, gossip)
    strategy.finish(opt)       # collective, once at the end

What it declares, as data (class attributes), drives the trainer, the
checkpoints, the CLI, the docs tables and the tests:

- ``options``: the ``DistributedOptimizer`` options it honours. Any other
  option given a non-default value is refused with a message naming the
  option and the strategy (``check_options``).
- ``replicas_differ``: whether ranks may hold different parameters between
  steps (then the trainer reports the replicas' average, and checkpoints
  hold one model per rank).
- ``state``: where the model and optimizer state live: ``REPLICATED`` (one
  model, identical everywhere: a checkpoint holds rank 0's and can be
  resumed at any K), ``PER_RANK`` (one model and optimizer state per rank:
  resumed at the same K only) or ``SHARDED`` (one model, optimizer state cut
  across ranks: a checkpoint holds every rank's shard and is resharded for a
  new K).
- ``nan_scope``: ``"all"`` (ranks agree, collectively, whether any gradient
  is non-finite, and all skip or abort together) or ``"local"`` (each rank
  decides alone: asynchronous strategies, where a collective would undo the
  asynchrony).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from ..runtime import UserError

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from ..guards import Combined
    from ..optimizer import DistributedOptimizer

__all__ = ["Strategy", "Option", "OPTIONS", "REPLICATED", "PER_RANK", "SHARDED", "given", "DEFAULT_BUCKET_BYTES",
           "SYNC_BUCKET_BYTES"]

REPLICATED, PER_RANK, SHARDED = "replicated", "per-rank", "sharded"
DEFAULT_BUCKET_BYTES = 4 << 20  # gradient buckets while overlapping with backward
SYNC_BUCKET_BYTES = 64 << 20  # ... and without overlap, where one collective measured faster than several


class Option(NamedTuple):
    """A ``DistributedOptimizer`` keyword, its command-line flag ("" where there is none) and its default
    (the value that means "not asked for": any other value is a request the strategy must honour or
    refuse). A strategy may declare options of its own (``Strategy.declares``): the CLI then offers
    ``flag`` with ``choices``/``type``."""

    keyword: str
    flag: str
    default: Any
    meaning: str
    choices: tuple[Any, ...] | None = None
    type: Any = None


OPTIONS: dict[str, Option] = {o.keyword: o for o in (
    Option("overlap", "--overlap/--no-overlap", None, "allreduce gradient buckets during backward"),
    Option("bucket_bytes", "--bucket-bytes", None, "gradient bucket size (default: 4 MiB with overlap, 64 MiB "
                                                   "without)"),
    Option("compression", "--compression", "none", "fp16/bf16 on the wire"),
    Option("backward_passes_per_step", "", 1, "accumulate gradients locally"),
    Option("poll_interval", "", None, "how waits for the network wait"),
    Option("check_consistency_every", "--check-consistency-every", 0, "compare replicas' fingerprints"),
    Option("average_every", "--average-every", 0, "local SGD: average parameters every H steps"),
    Option("zero", "--zero", False, "shard the optimizer state (ZeRO-1)"),
    Option("staleness", "--staleness", 0, "parameter server: bound on staleness"),
)}


def given(options: dict[str, Any]) -> dict[str, Any]:
    """The options whose value differs from their default: what the caller asked for."""
    table = _all_options()
    return {k: v for k, v in options.items() if k in table and v != table[k].default}


class Strategy:
    """Base class: synchronous defaults (no gradient communication, the wrapped optimizer steps)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    topologies: ClassVar[tuple[str, ...]] = ()  # --topology names that choose it directly
    mode_option: ClassVar[str | None] = None  # or: an exact topology plus this option chooses it
    options: ClassVar[frozenset[str]] = frozenset()
    replicas_differ: ClassVar[bool] = False
    state: ClassVar[str] = REPLICATED
    nan_scope: ClassVar[str] = "all"
    checkpoints: ClassVar[bool] = True  # whether a training run with it can be checkpointed
    declares: ClassVar[tuple[Option, ...]] = ()  # options of its own, beyond OPTIONS

    @classmethod
    def plan_step(cls, costs: Any, algorithms: list[str]) -> list[tuple[str, float]]:
        """Predicted seconds per training step, as ``(label, seconds)`` rows, for ``mpiml.plan``.

        ``costs`` is a ``mpiml.plan.StepCosts``: ``costs.compute`` (forward + backward), ``costs.nbytes``
        (the model's gradients), and primitives priced on the planned cluster: ``allreduce(nbytes,
        algorithm)``, ``overlapped(algorithm, bucket_bytes)``, ``exchange(nbytes, partner)``, ``alltoall(nbytes,
        reduce)`` and ``convert(nbytes)``. ``algorithms``: the exact algorithms being compared. A strategy
        that returns no rows is left out of the plan."""
        return []

    def __init__(self, algorithm: str, settings: dict[str, Any]) -> None:
        self.algorithm = algorithm  # the exact collective this strategy uses wherever it needs one
        self.settings = {k: settings.get(k, o.default) for k, o in _all_options().items()}

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Refuse (UserError) every option given a non-default value that this strategy does not honour."""
        for key in given(options):
            if key not in cls.options:
                o = _all_options()[key]
                applies = ", ".join(sorted(n for n in _registry() if key in _registry()[n].options)) or "none"
                flag = f"{o.flag}, " if o.flag else ""
                raise UserError(f"{o.keyword} ({flag}{o.meaning}) does not apply to the {cls.name} strategy "
                                f"({cls.summary}); it applies to: {applies}")

    @property
    def average_at_end(self) -> bool:
        """Whether the model reported at the end is the exact average of the replicas."""
        return self.replicas_differ

    # -- the step
    def prepare(self, opt: DistributedOptimizer) -> Callable[[torch.dtype, int], torch.Tensor] | None:
        """Before the flat buffers exist: an allocator for the gradient buffers, or None for plain memory."""
        return None

    def attach(self, opt: DistributedOptimizer) -> None:
        """After the flat buffers exist: set up communicators, buckets, shard optimizers, servers."""

    def synchronize(self, opt: DistributedOptimizer) -> bool | Combined | None:
        """Combine gradients before the update; return whether this rank's own gradients were finite
        (None: not checked, the optimizer checks the gradient buffers itself), or what a check of the
        combined gradients found (``guards.Combined``: no vote needed when they are finite)."""
        return None

    def apply(self, opt: DistributedOptimizer) -> None:
        """The update: by default the wrapped optimizer's step on the (combined) gradients."""
        opt.optimizer.step()

    def after_step(self, opt: DistributedOptimizer) -> None:
        """After the update: exchange parameters (strategies whose replicas differ)."""

    def finish(self, opt: DistributedOptimizer) -> None:
        """Collective, at the end of training."""

    def close(self) -> None:
        """Release threads and hooks (tests and short-lived optimizers)."""

    def apply_wait(self, start: float, end: float) -> float:
        """Of ``apply``'s time (``start`` to ``end``, perf_counter), the seconds spent waiting for others."""
        return 0.0

    @property
    def comm_seconds(self) -> float | None:
        """Seconds communicating, overlapped with compute or not; None: the strategy only communicates
        while the optimizer waits for it (``synchronize``, ``apply_wait``, ``after_step``), which it times."""
        return None

    # -- what a checkpoint holds
    def optimizer_state(self, opt: DistributedOptimizer) -> dict[str, Any]:
        """This rank's optimizer state for a checkpoint."""
        return opt.optimizer.state_dict()

    def load_optimizer_state(self, opt: DistributedOptimizer, saved: list[dict[str, Any]]) -> None:
        """Restore from the states a checkpoint holds: one (REPLICATED), this rank's (PER_RANK), or
        every saved rank's (SHARDED, whatever K was then)."""
        opt.optimizer.load_state_dict(saved[0])

    @property
    def hooks_attach_gradients(self) -> bool:
        """Whether backward's hooks put gradients into the flat buffer (otherwise the optimizer does)."""
        return False

    def flat_gradients(self, opt: DistributedOptimizer) -> bool:
        """Whether gradients must live in flat buffers (called before ``prepare``). Without them, ``.grad``
        stays whatever autograd made, as in plain PyTorch: for a strategy that has nothing to send."""
        return True

    # -- observability
    @property
    def buckets(self) -> list[Any]:
        return []

    def set_timeline(self, timeline: Any) -> None:
        """A ``mpiml.timeline.Timeline`` for the strategy's own spans."""


def _registry() -> dict[str, type[Strategy]]:
    from . import STRATEGIES
    return STRATEGIES


def _all_options() -> dict[str, Option]:
    from . import OPTIONS as everything
    return everything
