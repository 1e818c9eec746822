"""Shared by the optimizer tests (no tests here): a one-thread fixture and brute-force
per-example gradients (one autograd call per example)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster and immune to spin-waiting under load."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def brute_per_example(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor | None,
                      scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``name -> (b, *shape)`` gradients of ``scale · loss_fn(model(x[i:i+1]), y[i:i+1])``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows: dict[str, list[torch.Tensor]] = {n: [] for n, _ in named}
    for i in range(x.shape[0]):
        out = model(x[i:i + 1])
        loss = loss_fn(out) if y is None else loss_fn(out, y[i:i + 1])
        gs = torch.autograd.grad(scale * loss, [p for _, p in named], allow_unused=True)
        for (n, p), g in zip(named, gs):
            rows[n].append(torch.zeros_like(p) if g is None else g.detach())
    return {n: torch.stack(v) for n, v in rows.items()}


def brute_sums(model, loss_fn, x, y, scale=None):
    """``name -> (S1, S2)`` of contributions ``scale·∇ℓ_i`` (default ``1/b``: a mean loss)."""
    scale = 1.0 / x.shape[0] if scale is None else scale
    g = brute_per_example(model, loss_fn, x, y, scale)
    return {n: (v.sum(0), (v * v).sum(0)) for n, v in g.items()}
