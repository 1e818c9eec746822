"""Random features: a two-layer net whose first layer is frozen (linear in its trainable
parameters, so its eNTK is constant and the operators are exact)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .mlp import _ACTIVATIONS

__all__ = ["random_features"]


def random_features(in_dim: int, width: int, out_dim: int, *, activation: str = "relu",
                    seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """``x ↦ W₂ σ(W₁ x + b₁)/√width`` with ``W₁, b₁ ~ N(0, 1/in_dim)`` frozen (random features)
    and only the readout ``W₂`` (zero-initialized, no bias) trainable.

    The model is linear in its trainable parameters, so its eNTK ``σ(·)σ(·)ᵀ/width`` is constant
    and gradient descent from zero converges to the minimum-norm interpolant when
    ``width ≥ n``.
    """
    if activation not in _ACTIVATIONS or activation == "sin":
        raise ConfigError(f"activation must be one of {sorted(set(_ACTIVATIONS) - {'sin'})}")
    g = torch.Generator().manual_seed(seed)
    first = nn.Linear(in_dim, width)
    with torch.no_grad():
        first.weight.copy_(torch.randn(width, in_dim, generator=g) / math.sqrt(in_dim))
        first.bias.copy_(torch.randn(width, generator=g) / math.sqrt(in_dim))
    first.requires_grad_(False)
    readout = nn.Linear(width, out_dim, bias=False)
    nn.init.zeros_(readout.weight)
    act = _ACTIVATIONS[activation]
    assert act is not None

    class _Scale(nn.Module):
        def forward(self, h: Tensor) -> Tensor:
            return h / math.sqrt(width)

    return nn.Sequential(first, act(), _Scale(), readout).to(dtype)
