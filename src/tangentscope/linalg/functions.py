"""Scalar functions of one eigenvalue used by the interval maps (``docs/notation.md``).

``φ₁(x) = (1 − e^{−x})/x`` and ``φ₂(x) = (x − 1 + e^{−x})/x²`` for ``x ≥ 0``, evaluated without
cancellation near 0 (a Taylor series below ``x = 0.05``). They are the exponential integrators'
φ-functions with a sign flip: ``∫₀^h e^{−σλ} dσ = h φ₁(hλ)`` and
``∫₀^h (h − σ) e^{−σλ} dσ = h² φ₂(hλ)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["phi1", "phi2"]


def phi1(x: Tensor) -> Tensor:
    """``(1 − e^{−x})/x`` elementwise (→ 1 at 0), accurate for all ``x ≥ 0``.

    Args:
        x: any shape, ``x ≥ 0`` (negative rounding noise is fine).

    Returns:
        Same shape and dtype as ``x``.
    """
    small = x.abs() < 0.05
    xs = torch.where(small, torch.ones_like(x), x)
    series = 1 - x / 2 + x ** 2 / 6 - x ** 3 / 24 + x ** 4 / 120 - x ** 5 / 720 + x ** 6 / 5040
    return torch.where(small, series, -torch.expm1(-xs) / xs)


def phi2(x: Tensor) -> Tensor:
    """``(x − 1 + e^{−x})/x²`` elementwise (→ 1/2 at 0), accurate for all ``x ≥ 0``.

    Args:
        x: any shape, ``x ≥ 0``.

    Returns:
        Same shape and dtype as ``x``.
    """
    small = x.abs() < 0.05
    xs = torch.where(small, torch.ones_like(x), x)
    series = (0.5 - x / 6 + x ** 2 / 24 - x ** 3 / 120 + x ** 4 / 720 - x ** 5 / 5040
              + x ** 6 / 40320)
    return torch.where(small, series, (xs + torch.expm1(-xs)) / xs ** 2)
