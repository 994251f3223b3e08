"""Rebuilds a dicebox network as a plain ``torch.nn.Module`` (imported lazily: torch's
Python package is only needed by users who ask for it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


class Exponential(nn.Module):
    """The "exponential" activation: elementwise exp."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)


class Normalise(nn.Module):
    """Pixels 0-255 -> (x / 255 - mean) / std per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x / 255.0 - self.mean) / self.std


class DiceboxNet(nn.Module):
    """``normalise`` then ``layers``, an ``nn.Sequential`` holding the genome's network."""

    def __init__(self, normalise: Normalise, layers: nn.Sequential) -> None:
        super().__init__()
        self.normalise = normalise
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.normalise(x))


_ACTIVATIONS = {
    "elu": nn.ELU,
    "exponential": Exponential,
    "hard_sigmoid": nn.Hardsigmoid,
    "relu": nn.ReLU,
    "selu": nn.SELU,
    "sigmoid": nn.Sigmoid,
    "softmax": lambda: nn.Softmax(dim=1),
    "softplus": nn.Softplus,
    "softsign": nn.Softsign,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
}


def _module(spec: dict[str, Any]) -> nn.Module:
    kind = spec["module"]
    if kind == "ZeroPad2d":
        return nn.ZeroPad2d(tuple(spec["pad"]))
    if kind == "Conv2d":
        return nn.Conv2d(spec["in"], spec["out"], tuple(spec["kernel"]), tuple(spec["stride"]),
                         tuple(spec["padding"]))
    if kind == "MaxPool2d":
        return nn.MaxPool2d(tuple(spec["kernel"]), tuple(spec["stride"]))
    if kind == "Dropout":
        return nn.Dropout(spec["rate"])
    if kind == "Flatten":
        return nn.Flatten()
    if kind == "Linear":
        return nn.Linear(spec["in"], spec["out"])
    if kind == "Activation":
        return _ACTIVATIONS[spec["activation"]]()
    raise ValueError(f"unknown module in the network plan: {kind}")


def build_module(plan: list[dict[str, Any]], mean: Sequence[float], std: Sequence[float],
                 weights: dict[str, np.ndarray]) -> DiceboxNet:
    layers = nn.Sequential(*(_module(spec) for spec in plan))
    layers.load_state_dict({name: torch.from_numpy(np.array(a)) for name, a in weights.items()})
    return DiceboxNet(Normalise(mean, std), layers).eval()
