"""Gradient buckets: allreduce each group of gradients as soon as backward has produced it.

Parameters are laid out in one flat buffer per dtype in *reverse* order
(backward produces gradients roughly from the last layer to the first), and
cut into buckets of about ``bucket_bytes``: consecutive slices of that
buffer, identical on every rank. ``.grad`` of every parameter is a view into
its bucket. A post-accumulate-grad hook counts, per bucket, the parameters
whose gradient is complete for this step (the last of
``backward_passes_per_step`` passes: inner passes only accumulate); when a
bucket is complete it is handed to a communication thread, which
allreduces it while backward carries on with earlier layers. Buckets are
always launched in index order, so every rank issues the same sequence of
collectives even when some parameter got no gradient on some rank (its
bucket, and the ones after it, are launched by ``flush`` at step time).

With ``alone_bytes``, a parameter at least that large is a bucket of its own,
and its gradient is combined where autograd left it: after ``zero_grad()``
(None) backward hands over a fresh tensor, and copying it into the flat
buffer would cost a pass over its bytes for nothing. The bucket layout, and
so the sequence of collectives, depends only on the parameters' sizes, never
on where a gradient happens to lie.

Each bucket is combined by a communication hook (``mpiml.strategies.hooks``):
``hook(view, "mean", name)`` averages it in place across ranks. Compression
is a wrapper around the hook, so the buckets never see it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence

import torch

from .guards import all_finite
from .timeline import Timeline

__all__ = ["Bucket", "GradientBuckets"]


class Bucket:
    """A slice ``[lo, hi)`` of one flat gradient buffer and the parameters whose gradients live there."""

    def __init__(self, index: int, buffer: torch.Tensor, lo: int, hi: int, params: list[int],
                 alone: bool = False) -> None:
        self.index, self.buffer, self.lo, self.hi, self.params = index, buffer, lo, hi, params
        self.alone = alone  # one parameter, combined where its gradient lies
        self.view = buffer[lo:hi]
        self.target: torch.Tensor | None = None  # where it was combined this step
        self.waiting = len(params)
        self.launched = False
        self.done = threading.Event()


class GradientBuckets:
    """Owns the bucket layout, the hooks and the communication thread of one DistributedOptimizer."""

    def __init__(self, params: Sequence[torch.nn.Parameter], spans: Sequence[tuple[torch.Tensor, int, int]],
                 bucket_bytes: int, hook: Callable[[torch.Tensor, str, str], None], overlap: bool,
                 backward_passes_per_step: int, alone_bytes: int | None = None) -> None:
        """``spans[i] = (buffer, lo, hi)``: where parameter i's gradient lives in its flat buffer.

        ``hook(view, op, name)`` combines ``view`` in place across ranks with op "mean"; ``name`` says
        which step and bucket it is, so a rank that skipped a step is caught by the agreement check.
        ``alone_bytes``: see the module docstring (None: every gradient is combined in the flat buffer).
        """
        self.hook = hook
        self.overlap, self.passes = overlap, backward_passes_per_step
        self.params = list(params)
        self.spans = list(spans)
        self.buckets = self._layout(spans, bucket_bytes, alone_bytes)
        self.in_place = frozenset(b.params[0] for b in self.buckets if b.alone)  # gradients left where they lie
        self.bucket_of = {i: b for b in self.buckets for i in b.params}
        self._countdown = [self.passes] * len(params)
        self._next = 0
        self.step = 0
        self._error: BaseException | None = None
        self._queue: queue.Queue[Bucket | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.comm_seconds = 0.0
        self.timeline = Timeline(None)
        self._hooks = []
        if overlap:
            for i, p in enumerate(params):
                self._hooks.append(p.register_post_accumulate_grad_hook(self._hook(i)))

    @staticmethod
    def _layout(spans: Sequence[tuple[torch.Tensor, int, int]], bucket_bytes: int,
                alone_bytes: int | None = None) -> list[Bucket]:
        order = sorted(range(len(spans)), key=lambda i: (id(spans[i][0]), spans[i][1]))
        buckets: list[Bucket] = []
        current: list[int] = []

        def close() -> None:
            if current:
                buf = spans[current[0]][0]
                lo, hi = spans[current[0]][1], spans[current[-1]][2]
                buckets.append(Bucket(len(buckets), buf, lo, hi, list(current)))
                current.clear()

        for i in order:
            buf, lo, hi = spans[i]
            if alone_bytes is not None and (hi - lo) * buf.element_size() >= alone_bytes:
                close()
                buckets.append(Bucket(len(buckets), buf, lo, hi, [i], alone=True))
                continue
            if current and (spans[current[0]][0] is not buf or
                            (hi - spans[current[0]][1]) * buf.element_size() > bucket_bytes):
                close()
            current.append(i)
        close()
        return buckets

    # ------------------------------------------------------------ hooks (autograd thread)

    def _hook(self, i: int) -> Callable[[torch.Tensor], None]:
        buffer, lo, hi = self.spans[i]
        view = buffer[lo:hi]

        alone = i in self.in_place

        def on_grad(param: torch.Tensor) -> None:
            if not alone and param.grad is not None and param.grad.data_ptr() != view.data_ptr():
                # .grad was set to None (or replaced) since the last step: put it back into the bucket
                view.copy_(param.grad.reshape(-1))
                param.grad = view.view(param.shape)
            self._countdown[i] -= 1
            if self._countdown[i] == 0:
                bucket = self.bucket_of[i]
                bucket.waiting -= 1
                if bucket.waiting == 0:
                    self._launch_ready()
        return on_grad

    def _launch_ready(self) -> None:
        """Launch complete buckets in index order (never one before an earlier, incomplete one)."""
        while self._next < len(self.buckets) and self.buckets[self._next].waiting == 0:
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, bucket: Bucket) -> None:
        bucket.launched = True
        if not self.overlap:
            self._run(bucket)
            bucket.done.set()
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="mpiml-comm", daemon=True)
            self._thread.start()
        self._queue.put(bucket)

    # ------------------------------------------------------------ the communication thread

    def _worker(self) -> None:
        while True:
            bucket = self._queue.get()
            if bucket is None:
                return
            try:
                if self._error is None:
                    self._run(bucket)
            except BaseException as e:  # handed to the main thread in wait()
                self._error = e
            finally:
                bucket.done.set()  # the last touch: wait() may re-arm the bucket as soon as this is set

    def _run(self, bucket: Bucket) -> None:
        start = time.perf_counter()
        name = f"gradients step {self.step} bucket {bucket.index}"
        with self.timeline.span(f"allreduce bucket {bucket.index}", "comm", row="communication thread",
                                bytes=bucket.view.numel() * bucket.view.element_size(), step=self.step):
            self._reduce_bucket(bucket, name)
        self.comm_seconds += time.perf_counter() - start

    def _reduce_bucket(self, bucket: Bucket, name: str) -> None:
        bucket.target = self._where(bucket)
        self.hook(bucket.target, "mean", name)

    def combined_finite(self) -> bool:
        """After ``wait``: whether every bucket's combined gradients are finite (the same on every rank:
        an exact allreduce leaves them bitwise identical; a NaN or Inf anywhere survives the sum)."""
        return all(all_finite(b.target) for b in self.buckets if b.target is not None)

    def _where(self, bucket: Bucket) -> torch.Tensor:
        """Where the bucket's gradients lie: its view of the flat buffer, or a lone parameter's fresh gradient
        (put back into the view if it is of another kind: non-contiguous, another dtype; zeros if none)."""
        if not bucket.alone:
            return bucket.view
        p, view = self.params[bucket.params[0]], bucket.view
        g = p.grad
        if g is None:
            view.zero_()
            p.grad = view.view(p.shape)
        elif g.data_ptr() != view.data_ptr():
            if g.is_contiguous() and g.dtype == view.dtype and g.layout == torch.strided:
                return g.view(-1)
            view.copy_(g.reshape(-1))
            p.grad = view.view(p.shape)
        return view

    # ------------------------------------------------------------ step time (main thread)

    def flush(self) -> None:
        """Launch every bucket not launched yet (parameters without a gradient count as zero), in order."""
        for b in self.buckets[self._next:]:
            b.waiting = 0
        self._launch_ready()

    def wait(self) -> float:
        """Block until every launched bucket is reduced; returns the seconds spent waiting."""
        start = time.perf_counter()
        for b in self.buckets:
            if b.launched:
                b.done.wait()
        waited = time.perf_counter() - start
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return waited

    def reset(self) -> None:
        """Arm the buckets for the next step."""
        self.step += 1
        self._countdown = [self.passes] * len(self._countdown)
        for b in self.buckets:
            b.waiting, b.launched = len(b.params), False
            b.done.clear()
        self._next = 0

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
