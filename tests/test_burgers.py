"""The Burgers reference solution (Cole–Hopf + Gauss–Hermite) and the autograd PDE residual."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tangentscope import ConfigError, ShapeError
from tangentscope.data.burgers import (
    BURGERS_NU,
    burgers_exact,
    burgers_reference,
    burgers_residual,
    noisy_burgers_observations,
    sample_collocation,
)
from tangentscope.experiments._harness import torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):      # small models: on a shared CPU one thread beats two
        yield

def _trapezoid_twin(t: float, x: np.ndarray, nu: float = BURGERS_NU, m: int = 20_001):
    """Brute force: the Cole–Hopf quotient by a dense trapezoid rule in η (log-sum-exp form)."""
    half = 12.0 * math.sqrt(4 * nu * t)                 # the Gaussian is e^{-144} there
    eta = np.linspace(-half, half, m)
    y = x[:, None] - eta
    log_p = -eta**2 / (4 * nu * t) - np.cos(np.pi * y) / (2 * np.pi * nu)
    p = np.exp(log_p - log_p.max(axis=1, keepdims=True))
    return -(p * np.sin(np.pi * y)).sum(1) / p.sum(1)


def test_reproduces_the_literature_maximum_slope():
    # Basdevant et al. (1986): max |u_x| = 152.00516 (quoted as 152.00) at x = 0,
    # t = 1.6037/π.
    t_star = 1.6037 / math.pi
    u, u_x = burgers_exact(t_star, 0.0, return_dx=True)
    assert abs(float(u)) < 1e-12
    assert abs(u_x) == pytest.approx(152.00516, abs=1e-4)
    # ... and it is the maximum over time: the slope 1-2% earlier or later is smaller.
    ts = t_star * np.array([0.98, 0.99, 1.01, 1.02])
    assert np.all(np.abs(burgers_exact(ts, 0.0, return_dx=True)[1]) < abs(u_x))
    # and over space: the steepest point of the profile is x = 0.
    xs = np.linspace(-1, 1, 401)
    slopes = np.abs(burgers_exact(t_star, xs, return_dx=True)[1])
    assert xs[np.argmax(slopes)] == 0.0


@pytest.mark.parametrize("t", [1e-3, 0.1, 1.6037 / math.pi, 1.0])
def test_gauss_hermite_matches_a_dense_trapezoid_twin(t):
    x = np.linspace(-1, 1, 41)
    np.testing.assert_allclose(burgers_exact(t, x), _trapezoid_twin(t, x), rtol=0, atol=1e-12)


def test_closed_form_slope_matches_central_differences():
    x = np.linspace(-0.9, 0.9, 19)
    h = 1e-6
    for t in (0.05, 0.3, 0.8):
        fd = (burgers_exact(t, x + h) - burgers_exact(t, x - h)) / (2 * h)
        np.testing.assert_allclose(burgers_exact(t, x, return_dx=True)[1], fd, rtol=1e-6,
                                   atol=1e-5)


def test_reference_satisfies_pde_initial_and_boundary_conditions():
    ref = burgers_reference(101, 256)
    np.testing.assert_allclose(ref.u[0], -np.sin(np.pi * ref.x), atol=1e-14)
    np.testing.assert_allclose(ref.u[:, [0, -1]], 0.0, atol=1e-12)
    assert burgers_reference(101, 256) is ref                     # cached
    assert not ref.u.flags.writeable
    # Finite-difference residual on a fine grid away from the shock (|x| > 0.1): small.
    t = np.linspace(0.1, 1.0, 31)
    x = np.linspace(-0.9, 0.9, 361)
    dt, dx = 1e-5, 1e-4
    T, X = np.meshgrid(t, x, indexing="ij")
    u, u_x = burgers_exact(T, X, return_dx=True)
    u_t = (burgers_exact(T + dt, X) - burgers_exact(T - dt, X)) / (2 * dt)
    u_xx = (burgers_exact(T, X + dx) - 2 * u + burgers_exact(T, X - dx)) / dx**2
    res = u_t + u * u_x - BURGERS_NU * u_xx
    away = np.abs(X) > 0.1
    assert np.abs(res[away]).max() < 1e-6
    # Inside the shock (|u_x| up to 152, ν u_xx up to ~10^2): the closed-form u_x differenced
    # once more with a tiny step, relative to the size of the terms that balance there.
    # A wrong viscosity is clearly detected by the same check (the check can fail).
    wrong = u_t + u * u_x - 2 * BURGERS_NU * u_xx
    assert np.abs(wrong[away]).max() > 1e-2
    # Inside the shock (|u_x| up to 152, ν u_xx up to ~10^2): the closed-form u_x differenced
    # once more with a tiny step, relative to the size of the terms that balance there.
    ts, xs, h = np.linspace(0.4, 1.0, 13)[:, None], np.linspace(-0.02, 0.02, 81)[None], 1e-7
    v, v_x = burgers_exact(ts, xs, return_dx=True)
    v_t = (burgers_exact(ts + h, xs) - burgers_exact(ts - h, xs)) / (2 * h)
    v_xx = (burgers_exact(ts, xs + h, return_dx=True)[1]
            - burgers_exact(ts, xs - h, return_dx=True)[1]) / (2 * h)
    shock = v_t + v * v_x - BURGERS_NU * v_xx
    terms = np.abs(v_t) + np.abs(v * v_x) + np.abs(BURGERS_NU * v_xx)
    assert terms.max() > 10 and np.abs(shock).max() < 1e-6 * terms.max()


def test_autograd_residual_against_a_known_function():
    # u = sin(x) e^{-t}: u_t = -u, u_x = cos(x) e^{-t}, u_xx = -u.
    def u_fn(tx):
        return (torch.sin(tx[:, 1]) * torch.exp(-tx[:, 0]))[:, None]

    tx = torch.rand(17, 2, dtype=torch.float64)
    u = u_fn(tx)[:, 0]
    nu = 0.3
    expect = -u + u * torch.cos(tx[:, 1]) * torch.exp(-tx[:, 0]) + nu * u
    got = burgers_residual(u_fn, tx, nu=nu, create_graph=False)
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)
    with pytest.raises(ShapeError, match=r"\(m, 2\)"):
        burgers_residual(u_fn, tx[:, :1])
    with pytest.raises(ShapeError, match=r"\(m, 1\)"):
        burgers_residual(lambda z: z, tx)


def test_exact_solution_has_zero_residual_through_the_autograd_path():
    # A closed-form Cole–Hopf solution (phi solves the heat equation phi_t = nu phi_xx) has
    # zero Burgers residual through the autograd path, and a wrong nu does not.
    nu = 0.05

    def u_fn(tx):  # phi = 1 + e^{-nu t} cos x  solves phi_t = nu phi_xx; u = -2 nu phi_x / phi
        t, x = tx[:, 0], tx[:, 1]
        phi = 1.5 + torch.exp(-nu * t) * torch.cos(x)
        phi_x = -torch.exp(-nu * t) * torch.sin(x)
        return (-2 * nu * phi_x / phi)[:, None]

    tx = torch.rand(64, 2, dtype=torch.float64) * torch.tensor([1.0, 6.0], dtype=torch.float64)
    r = burgers_residual(u_fn, tx, nu=nu, create_graph=False)
    assert r.abs().max() < 1e-12
    assert burgers_residual(u_fn, tx, nu=2 * nu, create_graph=False).abs().max() > 1e-4


def test_observations_and_collocation():
    obs = noisy_burgers_observations(500, 0.1, seed=3, dtype=torch.float64)
    assert obs.tx.shape == (500, 2) and obs.u.shape == (500, 1)
    torch.testing.assert_close(obs.u, obs.u_clean + obs.noise)
    assert 0.08 < obs.noise.std().item() < 0.12
    assert obs.tx[:, 0].min() >= 0 and obs.tx[:, 0].max() <= 1
    np.testing.assert_allclose(obs.u_clean[:, 0].numpy(),
                               burgers_exact(obs.tx[:, 0].numpy(), obs.tx[:, 1].numpy()))
    again = noisy_burgers_observations(500, 0.1, seed=3, dtype=torch.float64)
    torch.testing.assert_close(obs.u, again.u)
    inner, init, bnd = sample_collocation(10, 5, 6, generator=torch.Generator().manual_seed(0))
    assert inner.shape == (10, 2) and init.shape == (5, 2) and bnd.shape == (6, 2)
    assert torch.all(init[:, 0] == 0) and torch.all(bnd[:, 1].abs() == 1)


def test_bad_inputs_are_rejected_with_the_fix():
    with pytest.raises(ConfigError, match="nodes"):
        burgers_exact(0.1, 0.0, nodes=1000)
    with pytest.raises(ConfigError, match="t >= 0"):
        burgers_exact(-0.1, 0.0)
    with pytest.raises(ConfigError, match="nu"):
        burgers_exact(0.1, 0.0, nu=0.0)
    with pytest.raises(ConfigError, match="sigma"):
        noisy_burgers_observations(10, -1.0)


# -- BurgersPINN: Taylor-mode derivatives and closed-form per-example statistics ----------------
def _pinn(activation: str):
    from tangentscope.data.burgers import BurgersPINN
    from tangentscope.models import mlp
    from tangentscope.models.siren import Siren

    torch.manual_seed(0)
    net = (Siren(2, 16, 2, 1, first_omega_0=5.0) if activation == "sin"
           else mlp(2, 16, 2, 1, activation="tanh"))
    return BurgersPINN(net.double())


def _points_and_targets(m: int = 40):
    g = torch.Generator().manual_seed(1)
    tx = torch.rand(m, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0]) \
        - torch.tensor([0.0, 1.0])
    kind = (torch.arange(m) % 2).double()
    value = torch.randn(m, generator=g, dtype=torch.float64)
    weight = torch.rand(m, generator=g, dtype=torch.float64) + 0.5
    return tx, torch.stack([kind, value, weight], 1)


@pytest.mark.parametrize("activation", ["sin", "tanh"])
def test_pinn_derivatives_match_autograd(activation):
    pinn = _pinn(activation)
    tx, _ = _points_and_targets()
    out = pinn(tx)
    u = pinn.u(tx)
    torch.testing.assert_close(out[:, :1], u, rtol=1e-12, atol=1e-12)
    # Brute force: autograd through the value-only network (double backward).
    x = tx.clone().requires_grad_(True)
    (du,) = torch.autograd.grad(pinn.u(x).sum(), x, create_graph=True)
    (du_x,) = torch.autograd.grad(du[:, 1].sum(), x)
    torch.testing.assert_close(out[:, 1], du[:, 0].detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[:, 2], du[:, 1].detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[:, 3], du_x[:, 1], rtol=1e-10, atol=1e-10)
    from tangentscope.data.burgers import residual_from_derivatives

    res = residual_from_derivatives(out)
    torch.testing.assert_close(res, burgers_residual(pinn.u, tx, create_graph=False),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("activation", ["sin", "tanh"])
def test_pinn_grad_moments_match_vmap_per_example_gradients(activation):
    from tangentscope.data.burgers import burgers_point_losses
    from tangentscope.optim import VmapStats

    pinn = _pinn(activation)
    tx, target = _points_and_targets()
    twin = VmapStats(pinn, lambda o, y: burgers_point_losses(o, y).sum(), chunk_size=16)
    twin.backward(tx, target)
    expect = twin.collect()
    grads = {id(p): p.grad.clone() for p in pinn.parameters()}
    pinn.zero_grad(set_to_none=True)
    pinn.record_statistics()
    burgers_point_losses(pinn(tx), target).mean().backward()
    got = pinn.grad_moments()
    assert set(got) == set(expect) == {id(p) for p in pinn.parameters()}
    for p in pinn.parameters():
        e, g = expect[id(p)], got[id(p)]
        assert g.count == e.count == tx.shape[0]
        torch.testing.assert_close(g.grad_sum, e.grad_sum, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(g.grad_sum, p.grad, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(g.grad_sq_sum, e.grad_sq_sum, rtol=1e-10, atol=1e-15)
        torch.testing.assert_close(grads[id(p)], p.grad, rtol=1e-10, atol=1e-13)
    with pytest.raises(ConfigError, match="record_statistics"):
        pinn.grad_moments()                       # recording stops after one use


def test_exact_gate_with_closed_form_moments_equals_vmap_source():
    # End to end: GatedAdamW fed the closed-form moments takes the same steps as GatedAdamW
    # with the brute-force VmapStats source.
    from tangentscope.data.burgers import burgers_point_losses
    from tangentscope.optim import GatedAdamW, VmapStats

    tx, target = _points_and_targets()
    a, b = _pinn("sin"), _pinn("sin")
    opt_a = GatedAdamW(a.parameters(), lr=1e-2, weight_decay=0.0, gate_on="moments")
    src = VmapStats(b, lambda o, y: burgers_point_losses(o, y).sum(), chunk_size=None)
    opt_b = GatedAdamW(b.parameters(), lr=1e-2, weight_decay=0.0, gate_on="moments", stats=src)
    for _ in range(4):
        opt_a.zero_grad()
        a.record_statistics()
        burgers_point_losses(a(tx), target).mean().backward()
        opt_a.step(moments=a.grad_moments())
        opt_b.zero_grad()
        src.backward(tx, target)
        opt_b.step()
    fa, fb = opt_a.gate_stats()["fraction_updated"], opt_b.gate_stats()["fraction_updated"]
    assert fa == pytest.approx(fb) and 0 < fa[0] < 1             # the gate really acted
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-9, atol=1e-12)


def test_point_losses_and_unsupported_networks():
    from tangentscope import UnsupportedModelError
    from tangentscope.data.burgers import BurgersPINN, burgers_point_losses
    from tangentscope.models import mlp

    out = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    target = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.5, 3.0]], dtype=torch.float64)
    r = 2.0 + 1.0 * 3.0 - BURGERS_NU * 4.0
    torch.testing.assert_close(burgers_point_losses(out, target),
                               torch.tensor([2.0 * r**2, 3.0 * 0.25], dtype=torch.float64))
    with pytest.raises(UnsupportedModelError, match="Sine, Tanh"):
        BurgersPINN(mlp(2, 8, 1, 1, activation="relu"))
    with pytest.raises(UnsupportedModelError, match="2 inputs and 1 output"):
        BurgersPINN(mlp(3, 8, 1, 1, activation="tanh"))
    with pytest.raises(ShapeError, match=r"\(m, 2\)"):
        BurgersPINN(mlp(2, 8, 1, 1, activation="tanh"))(torch.zeros(3, 3))
