"""Gradient compression, as in Horovod: ``Compression.none`` and ``Compression.fp16``.

A compressor turns a tensor into the tensor that is sent plus a context,
and back: ``compressed, ctx = c.compress(t)``; ``t2 = c.decompress(r, ctx)``.
``fp16`` sends floating-point tensors as float16 (halving the bytes) and
restores their dtype afterwards; other dtypes pass through unchanged.
"""

from __future__ import annotations

import abc
from typing import Any

import torch

__all__ = ["Compressor", "NoneCompressor", "FP16Compressor", "Compression"]


class Compressor(abc.ABC):
    """Interface for compressing and decompressing a given tensor (Horovod's, for custom compressors)."""

    @staticmethod
    @abc.abstractmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Compresses a tensor and returns it with the context needed to decompress it."""

    @staticmethod
    @abc.abstractmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Decompress the tensor with the given context."""


class NoneCompressor(Compressor):
    """Default no-op compression."""

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return tensor, None

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        return tensor


class FP16Compressor(Compressor):
    """Compress all floating point gradients to 16-bit."""

    @staticmethod
    def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, Any]:
        compressed = tensor.type(torch.float16) if tensor.dtype.is_floating_point else tensor
        return compressed, tensor.dtype

    @staticmethod
    def decompress(tensor: torch.Tensor, ctx: Any) -> torch.Tensor:
        return tensor.type(ctx) if ctx.is_floating_point else tensor


class Compression:
    """Optional gradient compression algorithm used during allreduce."""

    none = NoneCompressor
    """Do not compress the gradients. This is the default."""

    fp16 = FP16Compressor
    """Compress all floating point gradients to 16-bit."""
