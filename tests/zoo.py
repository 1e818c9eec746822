"""Test models (float64) and an independent brute-force eNTK: one autograd call per output."""

from __future__ import annotations

import torch
from torch import nn

from tangentscope.models import TinyTransformer, mlp


def make_mlp(p: int = 1, in_dim: int = 3, width: int = 16, act: str = "tanh") -> nn.Module:
    return mlp(in_dim, width, 2, p, activation=act).double()


class SmallCNN(nn.Module):
    def __init__(self, p: int = 3):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 3, 3, stride=2)
        self.fc = nn.Linear(3 * 2 * 2, p)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.tanh(self.c2(h))
        return self.fc(h.flatten(1))


def make_cnn(p: int = 3) -> nn.Module:
    return SmallCNN(p).double()


def make_bn(p: int = 2) -> nn.Module:
    m = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, p)).double()
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
        m[1].weight.uniform_(0.5, 1.5)
        m[1].bias.uniform_(-0.2, 0.2)
    return m.eval()


def make_transformer(p: int = 5) -> nn.Module:
    return TinyTransformer(7, p, d_model=8, n_heads=2, n_layers=1, d_mlp=16, max_len=4).double()


def inputs_for(name: str, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "cnn":
        return torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)
    if name == "transformer":
        return torch.randint(0, 7, (n, 4), generator=g)
    return torch.randn(n, 3, generator=g, dtype=torch.float64)


MODELS = {
    "mlp_p1": lambda: make_mlp(1),
    "mlp_p4": lambda: make_mlp(4),
    "cnn": lambda: make_cnn(3),
    "bn_eval": lambda: make_bn(2),
    "transformer": lambda: make_transformer(5),
}


def kind(name: str) -> str:
    return "cnn" if name == "cnn" else "transformer" if name == "transformer" else "vec"


def brute_force_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(n, p, P)`` rows of the Jacobian, one ``torch.autograd.grad`` per (example, output)."""
    params = [q for q in model.parameters() if q.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i:i + 1]).reshape(-1)
        per = []
        for a in range(out.shape[0]):
            gs = torch.autograd.grad(out[a], params, retain_graph=True, allow_unused=True)
            per.append(torch.cat([(torch.zeros_like(q) if g is None else g).reshape(-1)
                                  for q, g in zip(params, gs)]))
        rows.append(torch.stack(per))
    return torch.stack(rows)


def brute_force_entk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None,
                     d: torch.Tensor | None = None) -> torch.Tensor:
    """``(n1, n2, p, p)`` eNTK ``J1 diag(d) J2ᵀ`` from :func:`brute_force_jacobian`."""
    J1 = brute_force_jacobian(model, x1)
    J2 = J1 if x2 is None else brute_force_jacobian(model, x2)
    if d is not None:
        J1 = J1 * d
    return torch.einsum("iak,jbk->ijab", J1, J2)
