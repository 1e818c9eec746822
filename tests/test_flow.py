"""Frozen-kernel dynamics: closed forms vs ODE solves vs real gradient descent (float64)."""

from __future__ import annotations

import math

import pytest
import torch

import tangentscope as ts


def _linear_problem(n=12, m=7, d=20, p=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    Phi = torch.randn(n, d, generator=g, dtype=torch.float64)   # features: f(x) = W φ(x)
    PhiQ = torch.randn(m, d, generator=g, dtype=torch.float64)
    W0 = torch.randn(p, d, generator=g, dtype=torch.float64) * 0.3
    y = torch.randn(n, p, generator=g, dtype=torch.float64)
    # eNTK of a linear model: K[i,j,a,b] = φ_i·φ_j δ_ab
    eye = torch.eye(p, dtype=torch.float64)
    K = torch.einsum("id,jd->ij", Phi, Phi)[:, :, None, None] * eye
    KQ = torch.einsum("id,jd->ij", PhiQ, Phi)[:, :, None, None] * eye
    return Phi, PhiQ, W0, y, K, KQ


def test_closed_form_matches_rk45():
    Phi, PhiQ, W0, y, K, KQ = _linear_problem()
    u0, UQ0 = Phi @ W0.T, PhiQ @ W0.T
    t = torch.tensor([0.0, 0.1, 1.0, 5.0, 20.0], dtype=torch.float64)
    cf = ts.squared_loss_flow(K, u0, y, t=t, K_QS=KQ, U_Q0=UQ0)
    ode = ts.integrate_flow(K, u0, y, t, K_QS=KQ, U_Q0=UQ0, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(cf.u, ode.u, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(cf.U_Q, ode.U_Q, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(cf.loss, ode.loss, rtol=1e-8, atol=1e-12)
    # each residual mode decays as exp(-λ t / n)
    n = u0.shape[0]
    expect = cf.modes[0][None, :] * torch.exp(-t[:, None] * cf.eigenvalues.clamp_min(0) / n)
    torch.testing.assert_close(cf.modes, expect, rtol=1e-10, atol=1e-10)


def test_closed_form_matches_real_gradient_descent_of_a_linear_model():
    Phi, PhiQ, W0, y, K, KQ = _linear_problem()
    n, lr, steps = Phi.shape[0], 0.01, [0, 1, 10, 100, 500]
    W = W0.clone().requires_grad_(True)
    us, uqs = {}, {}
    for k in range(max(steps) + 1):
        if k in steps:
            us[k], uqs[k] = (Phi @ W.T).detach(), (PhiQ @ W.T).detach()
        loss = ts.losses.SquaredLoss().value(Phi @ W.T, y)
        (gw,) = torch.autograd.grad(loss, W)
        with torch.no_grad():
            W -= lr * gw
    cf = ts.squared_loss_flow(K, us[0], y, steps=steps, lr=lr, K_QS=KQ, U_Q0=uqs[0])
    torch.testing.assert_close(cf.u, torch.stack([us[k] for k in steps]), rtol=1e-10,
                               atol=1e-10)
    torch.testing.assert_close(cf.U_Q, torch.stack([uqs[k] for k in steps]), rtol=1e-10,
                               atol=1e-10)
    assert n == us[0].shape[0]


def test_analytic_jump_is_min_norm_interpolation():
    Phi, PhiQ, W0, y, K, KQ = _linear_problem(n=8, d=20)  # overparameterized: interpolates
    u0, UQ0 = Phi @ W0.T, PhiQ @ W0.T
    jump = ts.analytic_jump(K, u0, y, K_QS=KQ, U_Q0=UQ0)
    torch.testing.assert_close(jump.u[0], y, rtol=1e-9, atol=1e-9)
    # GD from W0 converges to W0 + min-norm correction: ΔW = (y − u0)ᵀ (Φ Φᵀ)^{-1} Φ
    dW = torch.linalg.lstsq(Phi, (y - u0)).solution.T       # min-norm solution of Φ ΔWᵀ = y−u0
    torch.testing.assert_close(jump.U_Q[0], PhiQ @ (W0 + dW).T, rtol=1e-9, atol=1e-9)
    late = ts.squared_loss_flow(K, u0, y, t=[1e7], K_QS=KQ, U_Q0=UQ0)
    torch.testing.assert_close(late.U_Q, jump.U_Q, rtol=1e-7, atol=1e-7)


def test_jump_with_rank_deficient_kernel_leaves_reservoir_untouched():
    Phi, PhiQ, W0, y, K, KQ = _linear_problem(n=12, d=5, p=1)  # rank 5 < n
    u0, UQ0 = Phi @ W0.T, PhiQ @ W0.T
    jump = ts.analytic_jump(K, u0, y, K_QS=KQ, U_Q0=UQ0)
    dW = torch.linalg.lstsq(Phi, (y - u0)).solution.T      # least squares fit
    torch.testing.assert_close(jump.U_Q[0], PhiQ @ (W0 + dW).T, rtol=1e-8, atol=1e-8)
    assert torch.isfinite(jump.U_Q).all()


def test_cross_entropy_flow_is_the_limit_of_gradient_descent():
    g = torch.Generator().manual_seed(1)
    n, d, p, T = 10, 6, 3, 2.0
    Phi = torch.randn(n, d, generator=g, dtype=torch.float64)
    W0 = torch.randn(p, d, generator=g, dtype=torch.float64) * 0.1
    y = torch.randint(0, p, (n,), generator=g)
    K = torch.einsum("id,jd->ij", Phi, Phi)[:, :, None, None] * torch.eye(p, dtype=torch.float64)
    ode = ts.integrate_flow(K, Phi @ W0.T, y, [T], loss="cross_entropy", rtol=1e-11, atol=1e-13)
    errs = []
    for lr in (1e-2, 1e-3):
        W = W0.clone()
        for _ in range(int(round(T / lr))):
            u = Phi @ W.T
            W = W - lr * ts.losses.SoftmaxCrossEntropy().grad(u, y).T @ Phi
        errs.append(float((Phi @ W.T - ode.u[0]).norm() / ode.u[0].norm()))
    assert errs[0] < 1e-2
    assert errs[1] < errs[0] / 5  # first-order convergence of GD to the flow


def _ntk_mlp_apply(width):
    def f(prm, x):
        h = torch.tanh(x @ prm["W1"].T / math.sqrt(x.shape[1]) + 0.1 * prm["b1"])
        return h @ prm["W2"].T / math.sqrt(width)
    return f


def _ntk_mlp_params(width, seed):
    g = torch.Generator().manual_seed(seed)
    return {"W1": torch.randn(width, 2, generator=g, dtype=torch.float64),
            "b1": torch.randn(width, generator=g, dtype=torch.float64),
            "W2": torch.randn(1, width, generator=g, dtype=torch.float64)}


def linearization_error(width: int, seed: int = 0, lr: float = 0.5, steps: int = 200
                        ) -> float:
    """Relative error of the frozen-kernel closed form vs real GD of an NTK-parametrized MLP."""
    g = torch.Generator().manual_seed(100)
    x = torch.randn(16, 2, generator=g, dtype=torch.float64)
    xq = torch.randn(8, 2, generator=g, dtype=torch.float64)
    y = torch.sin(2 * x[:, :1])
    f, prm = _ntk_mlp_apply(width), _ntk_mlp_params(width, seed)
    K = ts.entk(f, x, params=prm)
    KQ = ts.entk(f, xq, x, params=prm)
    u0, uq0 = f(prm, x), f(prm, xq)
    w = {k: v.clone().requires_grad_(True) for k, v in prm.items()}
    for _ in range(steps):
        loss = ts.losses.SquaredLoss().value(f(w, x), y)
        grads = torch.autograd.grad(loss, list(w.values()))
        with torch.no_grad():
            for v, gv in zip(w.values(), grads):
                v -= lr * gv
    cf = ts.squared_loss_flow(K, u0, y, steps=[steps], lr=lr, K_QS=KQ, U_Q0=uq0)
    with torch.no_grad():
        real = torch.cat([f(w, x), f(w, xq)])
    pred = torch.cat([cf.u[0], cf.U_Q[0]])
    return float((real - pred).norm() / (real - torch.cat([u0, uq0])).norm())


def test_wide_mlp_linearization_error_shrinks_with_width():
    widths = [64, 256, 1024, 4096]
    errs = [sum(linearization_error(w, s) for s in range(2)) / 2 for w in widths]
    print("width -> relative error of the closed form vs real GD:",
          dict(zip(widths, [f"{e:.2e}" for e in errs])))
    assert all(b < a for a, b in zip(errs, errs[1:]))
    assert errs[-1] < 0.5 * errs[0] and errs[-1] < 0.05


def test_flow_input_errors():
    _, _, _, y, K, KQ = _linear_problem()
    u0 = torch.zeros_like(y)
    with pytest.raises(ts.ShapeError, match="exactly one"):
        ts.squared_loss_flow(K, u0, y)
    with pytest.raises(ts.ShapeError, match="positive lr"):
        ts.squared_loss_flow(K, u0, y, steps=[1])
    with pytest.raises(ts.ShapeError, match="both K_QS and U_Q0"):
        ts.squared_loss_flow(K, u0, y, t=[1.0], K_QS=KQ)
    with pytest.raises(ts.ShapeError, match="K_SS is"):
        ts.squared_loss_flow(K[:5, :5], u0, y, t=[1.0])
    with pytest.raises(ts.ShapeError, match="finite"):
        ts.integrate_flow(K, u0, y, [math.inf])
