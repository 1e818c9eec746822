"""SIREN: sinusoidal representation networks (Sitzmann et al., NeurIPS 2020).

``x → sin(ω₀(W₁x + b₁)) → sin(ω₀(W₂h + b₂)) → … → W_L h + b_L`` with the paper's
initialisation, which keeps every hidden pre-activation ``ω₀ W h`` of unit variance:

* first layer: ``W ~ U(−1/n_in, 1/n_in)``;
* later layers (and the final linear one): ``W ~ U(−√(6/n_in)/ω₀, √(6/n_in)/ω₀)``;
* biases: PyTorch's default ``U(−1/√n_in, 1/√n_in)`` (as in the paper's code).

The network is a plain ``nn.Sequential`` of ``nn.Linear`` and :class:`~tangentscope.models.Sine`
layers, so the eNTK, per-example gradients and closed-form Linear-layer statistics see ordinary
layers. Coordinates are conventionally in ``[−1, 1]`` (:func:`pixel_grid`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .mlp import Sine

__all__ = ["Siren", "pixel_grid", "siren_init_"]


class Siren(nn.Sequential):
    """A SIREN with ``hidden_layers + 2`` linear layers.

    Args:
        in_features: coordinate dimension (2 for images, 2 for ``(t, x)``).
        hidden_features: width.
        hidden_layers: number of hidden→hidden sine layers (the paper's images use 3).
        out_features: output channels (1 for a grey image).
        first_omega_0: ``ω₀`` of the first layer (30 in the paper; it sets the bandwidth).
        hidden_omega_0: ``ω₀`` of the later layers (30).
        generator: optional RNG for the initialisation.

    Shapes:
        input ``(batch, in_features)`` → output ``(batch, out_features)``.

    Raises:
        ConfigError: non-positive sizes or ``ω₀``.
    """

    def __init__(self, in_features: int, hidden_features: int, hidden_layers: int,
                 out_features: int, *, first_omega_0: float = 30.0,
                 hidden_omega_0: float = 30.0, generator: torch.Generator | None = None):
        for name, v in (("in_features", in_features), ("hidden_features", hidden_features),
                        ("out_features", out_features)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"Siren: {name} must be a positive integer, got {v!r}")
        if not isinstance(hidden_layers, int) or hidden_layers < 0:
            raise ConfigError(f"Siren: hidden_layers must be an integer >= 0, got "
                              f"{hidden_layers!r}")
        if not (first_omega_0 > 0 and hidden_omega_0 > 0):
            raise ConfigError("Siren: omega_0 must be > 0 (the paper uses 30)")
        layers: list[nn.Module] = [nn.Linear(in_features, hidden_features), Sine(first_omega_0)]
        for _ in range(hidden_layers):
            layers += [nn.Linear(hidden_features, hidden_features), Sine(hidden_omega_0)]
        layers.append(nn.Linear(hidden_features, out_features))
        super().__init__(*layers)
        self.first_omega_0 = float(first_omega_0)
        self.hidden_omega_0 = float(hidden_omega_0)
        siren_init_(self, generator=generator)


@torch.no_grad()
def siren_init_(model: Siren, *, generator: torch.Generator | None = None) -> Siren:
    """(Re-)initialise ``model`` in place with the SIREN scheme (see the module docstring)."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for i, lin in enumerate(linears):
        n_in = lin.in_features
        bound = 1.0 / n_in if i == 0 else math.sqrt(6.0 / n_in) / model.hidden_omega_0
        lin.weight.uniform_(-bound, bound, generator=generator)
        if lin.bias is not None:
            b = 1.0 / math.sqrt(n_in)
            lin.bias.uniform_(-b, b, generator=generator)
    return model


def pixel_grid(height: int, width: int, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Pixel-centre coordinates in ``[−1, 1]²``, row-major: ``(height·width, 2)`` rows
    ``(row, col)``, matching ``image.reshape(-1)``."""
    if height < 1 or width < 1:
        raise ConfigError(f"pixel_grid needs positive sizes, got {height}x{width}")
    r = torch.linspace(-1.0, 1.0, height, dtype=dtype)
    c = torch.linspace(-1.0, 1.0, width, dtype=dtype)
    rr, cc = torch.meshgrid(r, c, indexing="ij")
    return torch.stack([rr.reshape(-1), cc.reshape(-1)], dim=1)
