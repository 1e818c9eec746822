"""Datasets that need no download: generated, or shipped inside a PyPI package."""

from .digits import NoisyDigits, noisy_digits
from .modular import ModularArithmetic, modular_arithmetic
from .preferences import PreferencePairs, PreferenceTask, flip_preferences, make_preference_task
from .regression import Regression1D, noisy_1d_regression
from .vision import (
                          Classification,
                          flip_labels,
                          gaussian_mixture,
                          load_classification,
                          mnist1d,
                          mnist_subset,
                          with_label_noise,
)

__all__ = ["ModularArithmetic", "modular_arithmetic", "Regression1D", "noisy_1d_regression",
           "NoisyDigits", "noisy_digits", "Classification", "flip_labels", "gaussian_mixture",
           "load_classification", "mnist1d", "mnist_subset", "with_label_noise",
           "PreferencePairs", "PreferenceTask", "flip_preferences", "make_preference_task"]
