"""Gradient compression, as in Horovod: ``Compression.none`` and ``Compression.fp16`` (and ``bf16``).

A compressor turns a tensor into the tensor that is sent plus a context,
and back: ``compressed, ctx = c.compress(t)``; ``t2 = c.decompress(r, ctx)``.
``fp16`` sends floating-point tensors as float16 (halving the bytes) and
restores their dtype afterwards; other dtypes pass through unchanged.

This module re-exports ``mpiml.compression``, the one compressor interface
of mpiml: a custom compressor subclassing ``hvd.Compressor`` works with
both ``mpiml.torch.DistributedOptimizer`` and ``mpiml.DistributedOptimizer``.
Averaging through a lossy compressor (anything but ``Compression.none``)
goes through ``mpiml.compression.reduce_compressed``'s arithmetic: the
tensor is scaled by 1/size *before* it is compressed and the compressed
shares are summed, so a float16 average whose float16 sum would overflow
(60000 on each of 8 ranks) still comes out right. ``op=hvd.Sum`` is not
divided (unless ``prescale_factor`` says so).
"""

from __future__ import annotations

from ..compression import BF16Compressor, Compression, Compressor, FP16Compressor, NoneCompressor

__all__ = ["Compressor", "NoneCompressor", "FP16Compressor", "BF16Compressor", "Compression"]
