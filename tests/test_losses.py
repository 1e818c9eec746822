"""Closed-form g and B of each output loss against autograd (float64)."""

from __future__ import annotations

import pytest
import torch
from torch.func import hessian

import tangentscope as ts
from tangentscope.losses import dense_hessian, hessian_matvec


def _autograd(loss, u, y):
    g = torch.func.grad(lambda v: loss.value(v, y))(u)
    H = hessian(lambda v: loss.value(v, y))(u)  # (n, p, n, p)
    n, p = u.shape
    return g, H.reshape(n * p, n * p)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("p", [1, 4])
def test_squared_and_cross_entropy(reduction, p):
    torch.manual_seed(0)
    n = 6
    u = torch.randn(n, p, dtype=torch.float64)
    cases = [(ts.losses.SquaredLoss(reduction), torch.randn(n, p, dtype=torch.float64))]
    if p > 1:
        cases.append((ts.losses.SoftmaxCrossEntropy(reduction), torch.randint(0, p, (n,))))
        cases.append((ts.losses.SoftmaxCrossEntropy(reduction),
                      torch.softmax(torch.randn(n, p, dtype=torch.float64), -1)))
    for loss, y in cases:
        g, H = _autograd(loss, u, y)
        torch.testing.assert_close(loss.grad(u, y), g, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dense_hessian(loss.hessian(u, y)), H, rtol=1e-12,
                                   atol=1e-12)
        v = torch.randn(n * p, dtype=torch.float64)
        torch.testing.assert_close(hessian_matvec(loss.hessian(u, y), v), H @ v)


def test_cross_entropy_matches_torch():
    u = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    torch.testing.assert_close(ts.losses.SoftmaxCrossEntropy().value(u, y),
                               torch.nn.functional.cross_entropy(u, y))


def test_per_example_loss_via_autograd():
    def logcosh(ui, yi):
        return torch.log(torch.cosh(ui - yi)).sum()

    loss = ts.losses.PerExampleLoss(logcosh)
    u = torch.randn(4, 2, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)
    g, H = _autograd(loss, u, y)
    torch.testing.assert_close(loss.grad(u, y), g)
    torch.testing.assert_close(dense_hessian(loss.hessian(u, y)), H)


def test_loss_errors():
    with pytest.raises(ts.ShapeError, match="equal"):
        ts.losses.SquaredLoss().grad(torch.zeros(3, 2), torch.zeros(3, 1))
    with pytest.raises(ts.ShapeError, match=r"\[0, 3\)"):
        ts.losses.SoftmaxCrossEntropy().grad(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ts.ShapeError, match="unknown loss"):
        ts.losses.get_loss("hinge-ish")


def test_block_eigh_in_batches_equals_one_call(monkeypatch):
    """``sqrt_blocks`` splits its batched ``eigh`` (cuSOLVER fails on 100,000 blocks): the
    batched result equals one call's, float64."""
    from tangentscope.losses import output

    g = torch.Generator().manual_seed(0)
    A = torch.randn(50, 4, 4, dtype=torch.float64, generator=g)
    B = A @ A.mT
    want = output.sqrt_blocks(B)
    monkeypatch.setattr(output, "EIGH_BATCH", 7)
    got = output.sqrt_blocks(B)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got @ got, B, rtol=1e-10, atol=1e-10)
