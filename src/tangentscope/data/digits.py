"""scikit-learn's bundled 8×8 digits (1,797 images, no download) with label noise."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from .vision import flip_labels

__all__ = ["NoisyDigits", "noisy_digits"]


@dataclasses.dataclass(frozen=True)
class NoisyDigits:
    """A train/held-out split of the digits with label noise on both sides.

    The held-out labels get the *same* noise process as the training labels, so the held-out
    loss estimates the population risk of the noisy distribution the model is trained on (the
    quantity a validation-free estimate targets); the clean labels are kept too.

    Attributes:
        x: ``(n, 64)`` pixels scaled to ``[0, 1]`` and centred by the training mean.
        y: ``(n,)`` noisy training labels; y_clean: their clean values.
        x_test: ``(m, 64)``; y_test: noisy held-out labels; y_test_clean: clean ones.
        n_classes: 10.
    """

    x: Tensor
    y: Tensor
    y_clean: Tensor
    x_test: Tensor
    y_test: Tensor
    y_test_clean: Tensor
    n_classes: int = 10


def noisy_digits(n_train: int = 1000, label_noise: float = 0.2, *, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> NoisyDigits:
    """Split the 1,797 digits at random into ``n_train`` training and the rest held out, and
    flip ``label_noise`` of the labels on each side to another class.

    Raises:
        ConfigError: ``n_train`` outside ``[10, 1787]`` or ``label_noise`` outside ``[0, 1)``.
    """
    from sklearn.datasets import load_digits

    if not 10 <= n_train <= 1787:
        raise ConfigError(f"n_train must be in [10, 1787] (1,797 digits, >= 10 held out), "
                          f"got {n_train}")
    if not 0.0 <= label_noise < 1.0:
        raise ConfigError(f"label_noise must be in [0, 1), got {label_noise}")
    d = load_digits()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(d.target))
    x = torch.as_tensor(d.data[perm] / 16.0, dtype=dtype)
    y = torch.as_tensor(d.target[perm], dtype=torch.long)
    x = x - x[:n_train].mean(0)
    y_tr, _ = flip_labels(y[:n_train], label_noise, 10, seed=seed)
    y_te, _ = flip_labels(y[n_train:], label_noise, 10, seed=seed + 1)
    return NoisyDigits(x[:n_train], y_tr, y[:n_train], x[n_train:], y_te, y[n_train:])
