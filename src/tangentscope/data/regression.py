"""Noisy 1-D regression, the theory's running example."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["Regression1D", "noisy_1d_regression", "target_function"]


def target_function(x: Tensor) -> Tensor:
    """The clean function ``f*(x) = sin(πx) + 0.3 sin(3πx)`` on ``[-1, 1]`` (smooth, a few
    oscillations, so a small MLP learns it in a few hundred steps)."""
    return torch.sin(math.pi * x) + 0.3 * torch.sin(3 * math.pi * x)


@dataclasses.dataclass(frozen=True)
class Regression1D:
    """Arrays of a noisy 1-D regression task.

    Attributes:
        x: ``(n, 1)`` training inputs in ``[-1, 1]``.
        y: ``(n, 1)`` noisy targets ``f*(x) + ε``.
        y_clean: ``(n, 1)`` ``f*(x)``.
        noise: ``(n, 1)`` the noise ``ε`` actually added (known label noise).
        x_test: ``(m, 1)`` evenly spaced test inputs.
        y_test: ``(m, 1)`` clean test targets.
    """

    x: Tensor
    y: Tensor
    y_clean: Tensor
    noise: Tensor
    x_test: Tensor
    y_test: Tensor


def noisy_1d_regression(n: int = 64, noise: float = 0.3, *, n_test: int = 256,
                        outlier_fraction: float = 0.0, seed: int = 0,
                        dtype: torch.dtype = torch.float32) -> Regression1D:
    """Sample a noisy 1-D regression task.

    Args:
        n: training points (≥ 2), uniform on ``[-1, 1]``.
        noise: standard deviation of Gaussian label noise (≥ 0).
        n_test: evenly spaced clean test points.
        outlier_fraction: in ``[0, 1]``; this fraction of points (chosen at random) get their
            noise instead of size ``noise`` (the rest are clean) — "20–30% of points given label
            noise" in the operators issue.
        seed: RNG seed.
    """
    if n < 2:
        raise ConfigError(f"need at least 2 training points, got n={n}")
    if not noise >= 0 or not math.isfinite(noise):
        raise ConfigError(f"noise must be a finite number >= 0, got {noise!r}")
    if not 0.0 <= outlier_fraction <= 1.0:
        raise ConfigError(f"outlier_fraction must be in [0, 1], got {outlier_fraction}")
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 1, generator=g, dtype=torch.float64) * 2 - 1).sort(0).values
    y_clean = target_function(x)
    eps = noise * torch.randn(n, 1, generator=g, dtype=torch.float64)
    if outlier_fraction > 0:
        mask = torch.zeros(n, 1, dtype=torch.bool)
        k = int(round(outlier_fraction * n))
        mask[torch.randperm(n, generator=g)[:k]] = True
        eps = torch.where(mask, eps, torch.zeros_like(eps))
    x_test = torch.linspace(-1, 1, n_test, dtype=torch.float64)[:, None]
    return Regression1D(x.to(dtype), (y_clean + eps).to(dtype), y_clean.to(dtype),
                        eps.to(dtype), x_test.to(dtype), target_function(x_test).to(dtype))
