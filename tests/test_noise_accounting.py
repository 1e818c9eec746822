"""noise_accounting: −G_Q g_noise and the frozen-kernel alternatives against the clean twin.

Brute-force twins: on a model linear in its parameters the kernel path does not depend on the
labels, so every account equals the actual twin difference to rounding; on a nonlinear model the
frozen-K(0) account equals two explicitly linearized models (Jacobian matrices, GD in parameter
space) trained on the noisy and the clean labels, and the squared_loss_flow closed form.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tangentscope.dynamics import KernelRecorder, every, squared_loss_flow
from tangentscope.dynamics.noise_accounting import (
    PREDICTORS,
    frozen_transfer,
    noise_accounting,
)
from tangentscope.errors import ConfigError, ShapeError

F64 = torch.float64


def _data(n: int = 12, m: int = 9, d: int = 6, p: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    xq = torch.randn(m, d, generator=g, dtype=F64)
    yc = torch.randn(n, p, generator=g, dtype=F64)
    y = yc.clone()
    y[:4] = -y[:4] + 0.5                       # the known label noise
    yq = torch.randn(m, p, generator=g, dtype=F64)
    return x, xq, y, yc, yq


def _run(net: nn.Module, init: dict, x, xq, yy, lr: float, steps: int, snap: int):
    """Full-batch GD from ``init`` on ``yy``, recorded every ``snap`` steps."""
    net.load_state_dict(init)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    rec = KernelRecorder(net, x, yy, x_test=xq, optimizer=opt, schedule=every(snap),
                         total_steps=steps, verbose=False)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (net(x) - yy).pow(2).sum(1).mean()).backward()
        opt.step()
    rec.close()
    return rec.trajectory()


@pytest.fixture(scope="module")
def linear_runs():
    """A model linear in its parameters (Linear on fixed inputs), p = 2, noisy and clean."""
    x, xq, y, yc, yq = _data()
    torch.manual_seed(1)
    net = nn.Linear(x.shape[1], 2).to(F64)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    lr = 0.7
    noisy = _run(net, init, x, xq, y, lr, 30, 7)     # snapshot spacing that does not divide 30
    clean = _run(net, init, x, xq, yc, lr, 30, 7)
    return noisy, clean, yc, yq


def test_linear_model_every_account_is_exact(linear_runs):
    noisy, clean, yc, yq = linear_runs
    labels = (yq[:, 0] > 0).long()
    acc = noise_accounting(noisy, yc, twin=clean, labels_test=labels, y_test=yq)
    assert acc.actual_rms > 1e-2                        # the noise does move the test outputs
    assert set(acc.checks) == {*PREDICTORS, "twin"}
    for name, c in acc.checks.items():
        assert c.rel_error < 1e-10, name
        assert c.corr > 1 - 1e-12, name
        # removing the predicted displacement gives the twin exactly
        assert c.test_mse_without == pytest.approx(acc.test_mse_twin, rel=1e-10), name
        assert c.test_error_without == acc.test_error_twin, name
    assert acc.path_change is not None
    assert float(abs(acc.path_change).max()) < 1e-10 * acc.actual_rms
    assert acc.closure_error < 1e-10
    s = acc.summary()
    assert s["path_rel_error"] < 1e-10 and s["path_change_fraction"] < 1e-10
    # given the twin's outputs only, the same accounting (no decomposition)
    acc2 = noise_accounting(noisy, yc, clean.U_Q[-1])
    assert acc2.path_change is None and "twin" not in acc2.checks
    assert acc2.checks["path"].rel_error < 1e-10


def test_exp_discretization_is_not_exact_for_gd(linear_runs):
    """The test above can fail: the gradient-flow discretization of the same GD run is off."""
    noisy, clean, yc, _ = linear_runs
    acc = noise_accounting(noisy, yc, clean.U_Q[-1], discretization="exp")
    assert acc.checks["path"].rel_error > 1e-4
    # frozen and recorded accounts share the discretization: on a constant kernel they agree
    assert acc.checks["initial"].rel_error == pytest.approx(acc.checks["path"].rel_error,
                                                            rel=1e-8)


def _jacobian(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(n p, P)`` Jacobian of the stacked outputs, one autograd row at a time."""
    params = list(net.parameters())
    out = net(x).reshape(-1)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(o, params, retain_graph=True)])
            for o in out]
    return torch.stack(rows)


def test_frozen_initial_equals_linearized_model():
    x, xq, y, yc, yq = _data(n=10, m=7, d=3, p=1, seed=3)
    y, yc, yq = y[:, :1], yc[:, :1], yq[:, :1]
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).to(F64)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    lr, steps = 0.3, 40
    noisy = _run(net, init, x, xq, y, lr, steps, 1)
    clean = _run(net, init, x, xq, yc, lr, steps, 1)
    net.load_state_dict(init)
    JS, JQ = _jacobian(net, x), _jacobian(net, xq)
    n = x.shape[0]
    with torch.no_grad():
        u0 = net(x).reshape(-1)

    def linearized(target: torch.Tensor) -> torch.Tensor:
        dw = torch.zeros(JS.shape[1], dtype=F64)
        for _ in range(steps):
            dw = dw - lr * JS.T @ (u0 + JS @ dw - target.reshape(-1)) / n
        return JQ @ dw                      # U_Q^lin(T) − U_Q(0)

    brute = (linearized(y) - linearized(yc)).reshape(-1, 1)
    acc = noise_accounting(noisy, yc, twin=clean)
    pred = torch.as_tensor(acc.predictions["initial"])
    assert torch.allclose(pred, brute, rtol=1e-10, atol=1e-12 * float(brute.abs().max()))
    # and the closed form of the linearized flow (eigenbasis of K(0)) agrees
    K0, KQ0, UQ0 = noisy.kernel(0), noisy.cross_kernel(0), noisy.U_Q[0]
    a = squared_loss_flow(K0, noisy.u[0], y, steps=[steps], lr=lr, K_QS=KQ0, U_Q0=UQ0)
    b = squared_loss_flow(K0, noisy.u[0], yc, steps=[steps], lr=lr, K_QS=KQ0, U_Q0=UQ0)
    assert a.U_Q is not None and b.U_Q is not None
    assert torch.allclose(pred, a.U_Q[-1] - b.U_Q[-1], rtol=1e-9, atol=1e-12)
    # the kernel moved and the path depends on the labels: the decomposition is not vacuous,
    # and it closes up to the two runs' identity residuals (a snapshot every step)
    assert acc.path_change is not None
    assert float(abs(acc.path_change).max()) > 1e-6
    assert acc.closure_error < 0.02
    assert acc.summary()["path_change_fraction"] > 0.01


def test_frozen_transfer_euler_keeps_the_spacing(linear_runs):
    noisy, *_ = linear_runs
    K, KQ = noisy.kernel(0), noisy.cross_kernel(0)
    G_gd = frozen_transfer(noisy, K, KQ, discretization="gd")
    G_exp = frozen_transfer(noisy, K, KQ, discretization="exp")
    G_eu = frozen_transfer(noisy, K, KQ, discretization="euler")
    assert G_gd.shape == (noisy.m * noisy.p, noisy.N)
    # one euler step per snapshot interval is coarser than the recorded GD steps
    assert float(torch.linalg.norm(G_eu - G_gd)) > float(torch.linalg.norm(G_exp - G_gd))
    with pytest.raises(ShapeError, match="K is"):
        frozen_transfer(noisy, K[:3, :3], KQ)


def test_errors(linear_runs):
    noisy, clean, yc, _ = linear_runs
    with pytest.raises(ConfigError, match="unknown predictor"):
        noise_accounting(noisy, yc, clean.U_Q[-1], predictors=("path", "magic"))
    with pytest.raises(ShapeError, match="U_Q_twin is"):
        noise_accounting(noisy, yc, clean.U_Q[-1][:3])
    with pytest.raises(ConfigError, match="U_Q_twin= or its trajectory"):
        noise_accounting(noisy, yc)
    shifted = clean.select(range(1, len(clean)))          # starts elsewhere
    with pytest.raises(ConfigError, match="same initialization"):
        noise_accounting(noisy, yc, twin=shifted)
    short = clean.window(0, len(clean) - 2)
    with pytest.raises(ConfigError, match="different training time"):
        noise_accounting(noisy, yc, twin=short)
    import dataclasses
    ce = dataclasses.replace(noisy, meta={**noisy.meta, "loss": "cross_entropy"})
    with pytest.raises(ConfigError, match="squared"):
        noise_accounting(ce, yc, clean.U_Q[-1])
    noq = dataclasses.replace(noisy, U_Q=None)
    with pytest.raises(ConfigError, match="probe"):
        noise_accounting(noq, yc, clean.U_Q[-1])
