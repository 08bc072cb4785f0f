"""Horovod's ``DistributedOptimizer``: gradients allreduced as soon as backward produces them.

    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    loss.backward()      # each gradient's allreduce starts from a hook the moment it is accumulated
    optimizer.step()     # waits for all of them (synchronize()), then steps

As in Horovod, the returned object is an instance of a class made on the
fly from the wrapped optimizer's class, so ``isinstance(opt, torch.optim.SGD)``
holds and ``state_dict()``, schedulers and the like work unchanged (the
wrapped optimizer's state, if any, is carried over). Allreduces are named
after the parameters, so they are matched by name across ranks, whatever
order the hooks fire in. A parameter that received no gradient on some
rank (a branch not taken there) is allreduced from ``synchronize()`` with
zeros, so the ranks that did compute it are not left waiting.

``step(closure)`` evaluates the closure first, then synchronizes, then
steps (Horovod synchronizes before evaluating it, so the closure's own
gradients would be applied unaveraged).

``backward_passes_per_step=N`` accumulates N backward passes locally
before each allreduce; ``gradient_predivide_factor=f`` (with ``op=Average``)
scales by 1/f before the sum and f/size after it; ``groups`` (an int, or
lists of parameters) allreduces parameters together as
``grouped_allreduce``; ``compression=Compression.fp16`` sends float16,
scaled by 1/size (and 1/f) *before* the cast, as
``mpiml.compression.reduce_compressed`` does for ``mpiml.DistributedOptimizer``,
so an average whose float16 sum would overflow still fits.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..compression import Prepared
from . import basics
from .basics import Average, global_process_set
from .compression import Compression, Compressor
from .functions import broadcast_object
from .movement import sparse_allreduce_async
from .ops import (
    allreduce_async_,
    compressed_sum,
    finish_compressed,
    grouped_allreduce_async_,
    prepare_compressed,
    resolve_op,
    synchronize,
)
from .requests import ReduceOp

__all__ = ["DistributedOptimizer"]


def _split_list(items: list[Any], n: int) -> list[list[Any]]:
    """``items`` cut into ``n`` consecutive, nearly equal parts."""
    d, r = divmod(len(items), n)
    return [items[i * d + min(i, r):(i + 1) * d + min(i + 1, r)] for i in range(n)]


class _DistributedOptimizer(torch.optim.Optimizer):
    """Methods copied into the class made for each wrapped optimizer (hence ``super(self.__class__, self)``)."""

    _mpiml_distributed = True

    def __init__(self, params: Any, named_parameters: Any, compression: type[Compressor],
                 backward_passes_per_step: int = 1, op: ReduceOp = Average, gradient_predivide_factor: float = 1.0,
                 groups: Any = None, sparse_as_dense: bool = False) -> None:
        super(self.__class__, self).__init__(params)
        self._compression = compression
        if named_parameters is not None:
            named_parameters = list(named_parameters)
        else:
            named_parameters = [(f"allreduce.noname.{i}.{j}", v) for i, group in enumerate(self.param_groups)
                                for j, v in enumerate(group["params"])]
        if any(not isinstance(p, tuple) for p in named_parameters):
            raise ValueError("named_parameters should be a sequence of tuples (name, parameter), usually produced "
                             "by model.named_parameters().")
        names = [k for k, _ in named_parameters]
        dups = sorted({k for k in names if names.count(k) > 1})
        if dups:
            raise ValueError(f"Parameter names in named_parameters must be unique. Found duplicates: {', '.join(dups)}")
        all_ids = {id(v) for group in self.param_groups for v in group["params"]}
        unnamed = all_ids - {id(v) for _, v in named_parameters}
        if unnamed:
            raise ValueError("named_parameters was specified, but one or more model parameters were not named. "
                             f"Python object ids: {', '.join(map(str, sorted(unnamed)))}")
        self._parameter_names = {v: k for k, v in named_parameters}
        self.backward_passes_per_step = backward_passes_per_step
        self._allreduce_delay = {v: backward_passes_per_step for _, v in named_parameters}
        self.op = op
        self.gradient_predivide_factor = gradient_predivide_factor
        self.sparse_as_dense = sparse_as_dense
        self._handles: dict[Any, tuple[Any, Any]] = {}
        self._hook_handles: list[Any] = []
        self._requires_update: set[torch.Tensor] = set()
        self._synchronized = False
        self._should_synchronize = True
        self._groups = groups
        self._p_to_group: dict[torch.Tensor, tuple[torch.Tensor, ...]] = {}
        self._group_counts: dict[tuple[torch.Tensor, ...], int] = {}
        if basics.size() > 1:
            self._register_hooks()

    # ------------------------------------------------------------ hooks
    def _register_hooks(self) -> None:
        params = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        if self._groups is not None:
            self._form_groups(params)
        for p in params:
            self._requires_update.add(p)
            self._hook_handles.append(p.register_post_accumulate_grad_hook(self._make_hook(p)))

    def _form_groups(self, params: list[torch.Tensor]) -> None:
        groups = self._groups
        if not (isinstance(groups, list) or (isinstance(groups, int) and groups > 0)):
            raise ValueError("groups should be a non-negative integer or a list of list of torch.Tensor.")
        order = broadcast_object([self._parameter_names[p] for p in params], root_rank=0,
                                 name="DistributedOptimizer.groups")  # every rank groups in rank 0's order
        params = sorted(params, key=lambda p: order.index(self._parameter_names[p]))
        if isinstance(groups, list):
            seen: set[int] = set()
            formed = []
            for g in groups:
                if any(not isinstance(p, torch.Tensor) for p in g):
                    raise ValueError("groups must consist of torch.Tensor.")
                if any(id(p) in seen for p in g):
                    raise ValueError("A parameter can only appear once in groups.")
                seen.update(id(p) for p in g)
                formed.append([p for p in params if any(p is q for q in g)])
            formed += [[p] for p in params if id(p) not in seen]
        else:
            formed = _split_list(params, groups)
        for g in formed:
            if g:
                key = tuple(g)
                self._group_counts[key] = 0
                for p in g:
                    self._p_to_group[p] = key

    def _make_hook(self, p: torch.Tensor) -> Callable[..., None]:
        def hook(*ignore: Any) -> None:
            if p in self._handles and self._handles[p][0] is not None and self._allreduce_delay[p] <= 0:
                raise AssertionError("Gradients were computed more than backward_passes_per_step times before call "
                                     "to step(). Increase backward_passes_per_step to accumulate gradients locally.")
            assert self._allreduce_delay[p] > 0
            handle, ctx = None, None
            self._allreduce_delay[p] -= 1
            if self._allreduce_delay[p] == 0:
                if self._p_to_group:
                    group = self._p_to_group[p]
                    self._group_counts[group] += 1
                    if self._group_counts[group] == len(group):
                        self._handles[group] = self._grouped_allreduce_grad_async(group)
                        for q in group:
                            self._handles.pop(q, None)
                        self._group_counts[group] = 0
                    else:
                        self._handles[p] = (None, None)
                    return
                handle, ctx = self._allreduce_grad_async(p)
            self._handles[p] = (handle, ctx)
        return hook

    # ------------------------------------------------------------ allreduces
    def _scale_factors(self) -> tuple[float, float]:
        """(prescale, postscale) for gradient_predivide_factor; Average's 1/size comes on top (in the engine,
        or before compressing with a lossy compressor: ``prepare_compressed``)."""
        if self.op == Average:
            return 1.0 / self.gradient_predivide_factor, self.gradient_predivide_factor
        return 1.0, 1.0

    def _allreduce_grad_async(self, p: torch.Tensor) -> tuple[Any, Any]:
        if p.grad is None:  # no gradient here, but other ranks may have one (a branch not taken on this rank)
            p.grad = torch.zeros_like(p)
        name = self._parameter_names.get(p)
        tensor = p.grad
        if tensor.is_sparse:
            if not self.sparse_as_dense:
                return sparse_allreduce_async(tensor, name=name, op=self.op), None
            tensor = tensor.to_dense()
        pre, post = self._scale_factors()
        if compressed_sum(self._compression, self.op, [tensor]):  # mpiml.compression.reduce_compressed's way
            prepared = prepare_compressed(tensor, self._compression, self.op, *self._scale_factors())
            return allreduce_async_(prepared.wire, name=name, op=ReduceOp.Sum), prepared
        compressed, ctx = self._compression.compress(tensor)
        handle = allreduce_async_(compressed, name=name, op=self.op, prescale_factor=pre, postscale_factor=post)
        return handle, ctx

    def _grouped_allreduce_grad_async(self, group: tuple[torch.Tensor, ...]) -> tuple[Any, Any]:
        for p in group:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        name = self._parameter_names.get(group[0])
        if compressed_sum(self._compression, self.op, [p.grad for p in group]):
            prepared = [prepare_compressed(p.grad, self._compression, self.op, *self._scale_factors()) for p in group]
            return grouped_allreduce_async_([q.wire for q in prepared], name=name, op=ReduceOp.Sum), prepared
        compressed, ctxs = zip(*[self._compression.compress(p.grad) for p in group], strict=True)
        pre, post = self._scale_factors()
        handle = grouped_allreduce_async_(list(compressed), name=name, op=self.op,
                                          prescale_factor=pre, postscale_factor=post)
        return handle, ctxs

    def _decompress(self, output: torch.Tensor, ctx: Any, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(ctx, Prepared):
            return finish_compressed(output, ctx, self._compression, dtype)
        return self._compression.decompress(output, ctx)

    def synchronize(self) -> None:
        """Finish every gradient's allreduce now (starting those whose hooks did not fire on this rank)."""
        if self._p_to_group:  # groups whose hooks did not all fire here are submitted now, as whole groups
            for group in self._group_counts:
                if group not in self._handles:
                    for q in group:
                        self._handles.pop(q, None)
                    self._handles[group] = self._grouped_allreduce_grad_async(group)
                    self._group_counts[group] = 0
        else:
            for p in self._requires_update - self._handles.keys():
                self._handles[p] = self._allreduce_grad_async(p)
            for key, (handle, _) in list(self._handles.items()):
                if handle is None:  # fewer than backward_passes_per_step passes so far
                    self._handles[key] = self._allreduce_grad_async(key)
        for key, (handle, ctx) in self._handles.items():
            if isinstance(key, tuple):
                for p, output, c in zip(key, synchronize(handle), ctx, strict=True):
                    self._allreduce_delay[p] = self.backward_passes_per_step
                    p.grad.set_(self._decompress(output, c, p.grad.dtype))
                continue
            output = handle() if callable(handle) else synchronize(handle)
            self._allreduce_delay[key] = self.backward_passes_per_step
            if key.grad.is_sparse:
                aggregated = self._decompress(output, ctx, key.grad.dtype)
                key.grad = aggregated if aggregated.is_sparse else aggregated.to_sparse()
            else:
                key.grad.set_(self._decompress(output, ctx, key.grad.dtype))
        self._handles.clear()
        self._synchronized = True

    @contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Inside, ``step()`` does not synchronize (use after calling ``synchronize()`` yourself)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None and not isinstance(self, torch.optim.LBFGS):
            with torch.enable_grad():  # the closure's gradients are synchronized before the update
                loss = closure()
            closure = None
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() context after "
                              "optimizer.synchronize(). This can cause training slowdown. You may want to consider "
                              "using optimizer.skip_synchronize() context if you use optimizer.synchronize() in "
                              "your code.", stacklevel=2)
            self.synchronize()
        self._synchronized = False
        result = super(self.__class__, self).step(closure)
        return loss if loss is not None else result

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._handles:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before optimizer.step() "
                                 "or optimizer.synchronize(). This is prohibited as it can cause a race condition.")
        return super(self.__class__, self).zero_grad(set_to_none)

    def set_backward_passes_per_step(self, passes: int) -> None:
        self.backward_passes_per_step = passes
        for p in self._allreduce_delay:
            self._allreduce_delay[p] = passes

    def load_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._handles = {}
        self._synchronized = False
        self._should_synchronize = True
        for p in self._allreduce_delay:
            self._allreduce_delay[p] = self.backward_passes_per_step
        super(self.__class__, self).load_state_dict(*args, **kwargs)


def DistributedOptimizer(optimizer: torch.optim.Optimizer, named_parameters: Any = None,  # noqa: N802 - Horovod's name
                         compression: type[Compressor] = Compression.none, backward_passes_per_step: int = 1,
                         op: Any = Average, gradient_predivide_factor: float = 1.0, num_groups: int = 0,
                         groups: Any = None, sparse_as_dense: bool = False,
                         process_set: Any = global_process_set) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` so that ``step()`` applies gradients averaged over all ranks (see module docstring)."""
    basics.check_process_set(process_set)
    op = resolve_op(op, None)
    if gradient_predivide_factor != 1.0 and op != Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    if backward_passes_per_step < 1:
        raise ValueError(f"backward_passes_per_step must be at least 1, got {backward_passes_per_step}")
    if num_groups != 0:
        warnings.warn("Parameter `num_groups` has been replaced by `groups` and will be removed in v0.23.0.",
                      DeprecationWarning, stacklevel=2)
        groups = groups if groups is not None else num_groups
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_DistributedOptimizer.__dict__))
    wrapped = cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step, op,
                  gradient_predivide_factor, groups, sparse_as_dense)
    for p, state in optimizer.state.items():  # keep state the wrapped optimizer already had (e.g. a checkpoint)
        wrapped.state[p] = state
    return wrapped
