"""Multilayer perceptrons."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU,
                "softplus": nn.Softplus, "sin": None}


class Sine(nn.Module):
    """``sin(w0 · x)`` activation (SIREN-style)."""

    def __init__(self, w0: float = 1.0):
        super().__init__()
        self.w0 = w0

    def forward(self, x):
        import torch

        return torch.sin(self.w0 * x)


def mlp(in_dim: int, width: int, depth: int, out_dim: int, *, activation: str = "relu",
        bias: bool = True) -> nn.Sequential:
    """``in_dim → width → … → width → out_dim`` with ``depth`` hidden layers.

    Args:
        in_dim, out_dim: input and output sizes.
        width: hidden width (≥ 1).
        depth: number of hidden layers (≥ 1).
        activation: ``relu``, ``tanh``, ``gelu``, ``silu``, ``softplus`` or ``sin``.
        bias: linear layers with bias.

    Raises:
        ConfigError: non-positive sizes or an unknown activation.
    """
    for name, v in (("in_dim", in_dim), ("width", width), ("depth", depth), ("out_dim", out_dim)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"mlp: {name} must be a positive integer, got {v!r}")
    if activation not in _ACTIVATIONS:
        raise ConfigError(f"mlp: unknown activation {activation!r}; one of {sorted(_ACTIVATIONS)}")
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers.append(nn.Linear(d, width, bias=bias))
        act = _ACTIVATIONS[activation]
        layers.append(Sine() if act is None else act())
        d = width
    layers.append(nn.Linear(d, out_dim, bias=bias))
    return nn.Sequential(*layers)
