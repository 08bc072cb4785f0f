"""Reference models: logistic regression, an MLP, a small CNN, chosen by name."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["MODELS", "build_model", "parameter_count", "ModelError"]

MODELS = ("logreg", "mlp", "cnn")


class ModelError(ValueError):
    """The model cannot be built for this data; the message says why."""


class _Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


def _image_shape(sample_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(channels, height, width) for the CNN: images as they come, or square flat vectors as 1 x s x s."""
    if len(sample_shape) == 3:
        return sample_shape  # type: ignore[return-value]
    if len(sample_shape) == 2:
        return (1, *sample_shape)
    side = math.isqrt(sample_shape[0])
    if side * side == sample_shape[0]:
        return (1, side, side)
    raise ModelError(f"--model cnn needs image-shaped samples (C x H x W, H x W, or a square number of "
                     f"features); these samples have shape {sample_shape}")


class SmallCNN(nn.Module):
    """conv3x3(16) - ReLU - conv3x3(32) - ReLU - 2x2 max-pool - linear(64) - ReLU - linear(classes)."""

    def __init__(self, image: tuple[int, int, int], classes: int) -> None:
        super().__init__()
        c, h, w = image
        if h < 2 or w < 2:
            raise ModelError(f"--model cnn needs images of at least 2 x 2 pixels, got {h} x {w}")
        self.image = image
        self.features = nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(_Flatten(), nn.Linear(32 * (h // 2) * (w // 2), 64), nn.ReLU(),
                                  nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(x.shape[0], *self.image)))


def build_model(name: str, sample_shape: tuple[int, ...], classes: int, hidden: tuple[int, ...] = (128,)) -> nn.Module:
    """A fresh model for samples of ``sample_shape`` and ``classes`` classes (float32, CPU)."""
    if classes < 2:
        raise ModelError(f"need at least 2 classes, got {classes}")
    features = math.prod(sample_shape)
    if name == "logreg":
        return nn.Sequential(_Flatten(), nn.Linear(features, classes))
    if name == "mlp":
        layers: list[nn.Module] = [_Flatten()]
        width = features
        for h in hidden:
            if h < 1:
                raise ModelError(f"--hidden sizes must be positive, got {h}")
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        return nn.Sequential(*layers, nn.Linear(width, classes))
    if name == "cnn":
        return SmallCNN(_image_shape(sample_shape), classes)
    raise ModelError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def parameter_count(name: str, sample_shape: tuple[int, ...], classes: int, hidden: tuple[int, ...] = (128,)) -> int:
    """How many parameters ``build_model`` would allocate (exact), computed without allocating them, so that
    a model too large for memory is refused before torch tries."""
    features = math.prod(sample_shape)
    if name == "logreg":
        return features * classes + classes
    if name == "mlp":
        widths = [features, *hidden, classes]
        return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    if name == "cnn":
        c, h, w = _image_shape(sample_shape)
        return (c * 16 * 9 + 16) + (16 * 32 * 9 + 32) + (32 * (h // 2) * (w // 2) * 64 + 64) + (64 * classes + classes)
    raise ModelError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
