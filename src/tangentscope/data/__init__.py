"""Datasets that need no download: generated, or shipped inside a PyPI package."""

from .modular import ModularArithmetic, modular_arithmetic
from .regression import Regression1D, noisy_1d_regression

__all__ = ["Regression1D", "noisy_1d_regression"]
