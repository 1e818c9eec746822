"""The analytic jump in parameter space against closed forms (float64, explicit tolerances)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tangentscope as ts
from tangentscope.dynamics.jump import (
    JumpSchedule,
    LevenbergMarquardt,
    apply_jump,
    displacement_error,
    linearized_outputs,
    parameter_jump,
)
from tangentscope.errors import ConfigError, ShapeError


def _linear(d: int = 6, p: int = 1, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d, p, bias=False).double()


def _data(n: int = 10, d: int = 6, p: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randn(n, p, generator=g, dtype=torch.float64))


def test_linear_model_infinite_jump_is_the_min_norm_least_squares_step():
    # n > d: over-determined, K = X Xᵀ of rank d; the jump with k = d modes lands on lstsq
    model = _linear()
    x, y = _data(n=10)
    w0 = model.weight.detach().clone()
    jump = parameter_jump(model, x, y, k=6)
    apply_jump(model, jump)
    w_ls = torch.linalg.lstsq(x, y).solution.T
    assert torch.allclose(model.weight, w_ls, atol=1e-10, rtol=0)
    # linear in the parameters: the network lands exactly on the linearized prediction
    assert torch.allclose(model(x), jump.predicted_outputs, atol=1e-10, rtol=0)
    assert jump.loss_before > jump.predicted_loss
    assert not torch.equal(w0, model.weight)


@pytest.mark.parametrize("t", [0.3, 4.0, 50.0])
def test_linear_model_finite_time_matches_the_frozen_kernel_flow(t):
    model = _linear(d=8)
    x, y = _data(n=5, d=8)        # under-determined: full-rank K, N = 5 modes
    u0 = model(x).detach()
    K = ts.entk(model, x)
    assert isinstance(K, torch.Tensor)
    flow = ts.squared_loss_flow(K, u0, y, t=[t])
    jump = parameter_jump(model, x, y, k=5, t=t)
    assert torch.allclose(jump.predicted_outputs, flow.u[0], atol=1e-10, rtol=0)
    apply_jump(model, jump)
    assert torch.allclose(model(x), flow.u[0], atol=1e-10, rtol=0)


def _gauss_newton_flow(K: torch.Tensor, B: torch.Tensor, g0: torch.Tensor, t: float):
    """``z(t) = ∫₀ᵗ exp(−BKσ) g₀ dσ`` densely, from the exponential of the augmented system."""
    N = K.shape[0]
    A = torch.zeros(N + 1, N + 1, dtype=K.dtype)
    A[:N, :N] = -B @ K
    A[:N, N] = g0
    return torch.linalg.matrix_exp(A * t)[:N, N]


@pytest.mark.parametrize("t", [0.5, 3.0, math.inf])
def test_cross_entropy_jump_is_the_gauss_newton_flow(t):
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    lossf = ts.losses.get_loss("cross_entropy")
    u0 = model(x).detach()
    K0 = ts.entk(model, x)
    assert isinstance(K0, torch.Tensor)
    K = ts.flatten_kernel(K0)
    B = ts.losses.dense_hessian(lossf.hessian(u0, labels))
    g0 = lossf.grad(u0, labels).reshape(-1)
    N = K.shape[0]
    jump = parameter_jump(model, x, labels, loss="cross_entropy", k=N, t=t)
    # t = ∞: the dense flow at a time where every non-zero mode (smallest λ here ≈ 0.035) has
    # equilibrated to rounding (e^{−35}); the null modes move no output at any time
    expect = u0.reshape(-1) - K @ _gauss_newton_flow(K, B, g0, 1e3 if math.isinf(t) else t)
    assert torch.allclose(jump.predicted_outputs.reshape(-1), expect, atol=1e-9, rtol=0)


def test_truncation_and_damping():
    model = _linear(d=8)
    x, y = _data(n=5, d=8)
    full = parameter_jump(model, x, y, k=5)
    top2 = parameter_jump(model, x, y, k=2)
    lm = parameter_jump(model, x, y, k=5, damping=10.0)
    assert top2.k == 2 and full.k == 5
    assert full.predicted_loss < 1e-20               # interpolates
    assert top2.predicted_loss > full.predicted_loss
    assert lm.norm() < full.norm()                   # damping shortens the step
    assert torch.all(full.eigenvalues[:-1] >= full.eigenvalues[1:])


def test_schedule_jumps_every_m_steps_on_a_real_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    x, y = _data(n=12, d=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = JumpSchedule(model, x, y, every=5, k=6)
    handle = opt.register_step_post_hook(sched.hook)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = 0.5 * ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    handle.remove()
    assert len(sched.jumps) == 2
    # the first jump's linearized prediction and the real network after it
    assert sched.jumps[0].predicted_loss < sched.jumps[0].loss_before


def test_bad_arguments_name_the_fix():
    model = _linear()
    x, y = _data()
    with pytest.raises(ConfigError, match="k must be"):
        parameter_jump(model, x, y, k=0)
    with pytest.raises(ConfigError, match="positive flow time"):
        parameter_jump(model, x, y, t=-1.0)
    with pytest.raises(ConfigError, match="damping"):
        parameter_jump(model, x, y, t=1.0, damping=1.0)
    with pytest.raises(ConfigError, match="every"):
        JumpSchedule(model, x, y, every=0)


def test_linearized_outputs_and_displacement_error_on_a_linear_model():
    # f linear in w: the linearized prediction on other inputs is exact, the error 0
    model = _linear(d=8)
    x, y = _data(n=5, d=8)
    x_test = torch.randn(7, 8, dtype=torch.float64)
    jump = parameter_jump(model, x, y, k=5, t=2.0)
    before_test = model(x_test).detach()
    pred_test = linearized_outputs(model, jump, x_test)
    apply_jump(model, jump)
    after_test = model(x_test).detach()
    assert torch.allclose(pred_test, after_test, atol=1e-12, rtol=0)
    assert displacement_error(before_test, pred_test, after_test) < 1e-10
    # the ratio itself, by hand
    b, p, a = torch.zeros(3, 1), torch.ones(3, 1), torch.full((3, 1), 1.5)
    assert displacement_error(b, p, a) == pytest.approx(0.5)
    with pytest.raises(ShapeError, match="same inputs"):
        displacement_error(b, p, a[:2])


def test_preconditioned_jump_is_the_min_norm_step_in_the_inverse_metric():
    # K = X D Xᵀ: the t = ∞ jump is w₀ − D Xᵀ (X D Xᵀ)⁻¹ (X w₀ − y) (n < d, K full rank)
    model = _linear(d=8)
    x, y = _data(n=5, d=8)
    D = torch.linspace(0.2, 3.0, 8, dtype=torch.float64).reshape(1, 8)
    w0 = model.weight.detach().clone()
    jump = parameter_jump(model, x, y, k=5, precondition={"weight": D})
    apply_jump(model, jump)
    XD = x * D
    want = w0 - (XD.T @ torch.linalg.solve(XD @ x.T, x @ w0.T - y)).T
    assert torch.allclose(model.weight, want, atol=1e-10, rtol=0)


def test_levenberg_marquardt_step_on_a_linear_model():
    # S = K/n: the damped step is Δw = −Xᵀ (X Xᵀ + n μ I)⁻¹ r; on a linear model the gain
    # ratio is 1, so the step is accepted and Nielsen's rule divides μ by 3
    model = _linear(d=8)
    x, y = _data(n=5, d=8)
    w0 = model.weight.detach().clone()
    lm = LevenbergMarquardt(model, x, y, k=5, damping=0.1)
    info = lm.step()
    assert info.accepted and len(info.trials) == 1
    assert info.gain_ratio == pytest.approx(1.0, abs=1e-9)
    r = x @ w0.T - y
    want = w0 - (x.T @ torch.linalg.solve(x @ x.T + 5 * info.damping * torch.eye(5,
                                                                             dtype=x.dtype),
                                          r)).T
    assert torch.allclose(model.weight, want, atol=1e-10, rtol=0)
    assert lm.mu == pytest.approx(info.damping / 3)
    assert info.loss_after == pytest.approx(info.predicted_loss, abs=1e-14)
    assert info.loss_after < info.loss_before
    state = lm.state_dict()
    other = LevenbergMarquardt(model, x, y, k=5)
    other.load_state_dict(state)
    assert other.state_dict() == state


def _tanh_regression():
    torch.manual_seed(0)
    model = ts.models.mlp(1, 8, 2, 1, activation="tanh").double()
    d = ts.data.noisy_1d_regression(24, 0.3, n_test=8, seed=0, dtype=torch.float64)
    return model, d.x, d.y


def test_guarded_schedule_reverts_a_jump_that_raised_the_loss():
    # the t = ∞ jump of a narrow tanh net asks for a move far outside the linear regime
    model, x, y = _tanh_regression()
    w0 = {n: q.detach().clone() for n, q in model.named_parameters()}
    sched = JumpSchedule(model, x, y, every=1, k=8, guard=True)
    sched.jump_now()
    rec = sched.history[0]
    assert rec.loss_after > rec.loss_before > rec.predicted_loss
    assert not rec.accepted and rec.displacement_error > 1.0
    for n, q in model.named_parameters():
        assert torch.equal(q, w0[n])
    # a short horizon λ₁t = 1 stays close to the linearization and is kept
    short = JumpSchedule(model, x, y, every=1, k=8, horizon=1.0, guard=True)
    jump = short.jump_now()
    assert jump.t == pytest.approx(1.0 / float(jump.eigenvalues[0]))
    assert short.history[0].accepted and short.history[0].displacement_error < 0.1


def test_schedule_with_the_adam_preconditioner_uses_the_optimizers_state():
    model, x, y = _tanh_regression()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        opt.zero_grad()
        (0.5 * ((model(x) - y) ** 2).mean()).backward()
        opt.step()
    want = parameter_jump(model, x, y, k=4, t=0.5,
                          precondition=ts.adam_preconditioner(opt, model))
    sched = JumpSchedule(model, x, y, every=1, k=4, t=0.5, optimizer=opt,
                         precondition="adam")
    got = sched.jump_now()
    for n in want.delta:
        assert torch.allclose(got.delta[n], want.delta[n], atol=1e-12, rtol=0)
    with pytest.raises(ConfigError, match="optimizer"):
        JumpSchedule(model, x, y, every=1, precondition="adam")
