"""Per-parameter channel scores against float64 brute force (saliencies: test_pruning.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tangentscope import ConfigError
from tangentscope.dynamics import KernelRecorder, every, window_operators
from tangentscope.dynamics.channel_score import channel_scores, propagated_probes
from tangentscope.dynamics.matfree_path import capture_state
from tangentscope.errors import ShapeError
from tangentscope.models import mlp


def _run(steps=12, every_k=3, n=7, p=2, seed=0, adam=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n, p, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    net = mlp(3, 5, 1, p, activation="tanh").double()
    opt = (torch.optim.Adam(net.parameters(), lr=0.02) if adam
           else torch.optim.SGD(net.parameters(), lr=0.3))
    states = []
    rec = KernelRecorder(net, x, y, optimizer=opt, schedule=every(every_k), verbose=False,
                         save_preconditioner=adam,
                         on_snapshot=lambda i, s: states.append(capture_state(net)))
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (net(x) - y).pow(2).sum(1).mean()).backward()
        opt.step()
    rec.close()
    return rec.trajectory(), net, x, states


def _brute(net, states, x, blocks, D=None):
    """Σ_c D (J_iᵀ X_i)² per snapshot, with the Jacobian formed explicitly."""
    out = []
    for i, st in enumerate(states):
        params = {k: v.clone() for k, v in st["params"].items()}
        names = list(params)

        def f(*vals, names=names):
            return torch.func.functional_call(net, dict(zip(names, vals)), (x,)).reshape(-1)

        J = torch.autograd.functional.jacobian(f, tuple(params.values()))
        Jf = torch.cat([j.reshape(j.shape[0], -1) for j in J], 1)        # (N, P)
        v = (Jf.T @ blocks[i]).pow(2).sum(1)
        if D is not None:
            v = v * D[i]
        out.append(v)
    return torch.stack(out)


@pytest.mark.parametrize("adam", [False, True])
def test_left_rule_on_euler_operators_sums_to_the_quadratic_form_exactly(adam):
    """Σ_k s_k = tr(Vᵀ W_S V) with the euler operators and the left rule, per parameter equal
    to the explicit-Jacobian sum (and J D Jᵀ for Adam)."""
    traj, net, x, states = _run(adam=adam)
    assert len(states) == len(traj)
    V = torch.randn(traj.N, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    blocks = propagated_probes(traj, V, discretization="euler")
    D = None
    if adam:
        D = []
        for k in range(len(traj)):
            flat, out, i = traj.preconditioner(k), {}, 0
            for name, v in states[k]["params"].items():
                out[name] = flat[i:i + v.numel()].reshape(v.shape)
                i += v.numel()
            D.append(out)
    sc = channel_scores(net, states, x, traj.times, blocks, quadrature="left",
                        preconditioners=D)
    W = window_operators(traj, discretization="euler").W
    assert sc.total == pytest.approx(float(torch.trace(V.T @ W @ V)), rel=1e-10)
    Dflat = None if D is None else [torch.cat([d[k].reshape(-1) for k in d]) for d in D]
    f = _brute(net, states, x, blocks, Dflat)
    h = torch.as_tensor(np.diff(traj.times))
    want = (h[:, None] * f[:-1]).sum(0)
    np.testing.assert_allclose(sc.flat().numpy(), want.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(sc.integrand, f.sum(1).numpy(), rtol=1e-10)


def test_gradient_probe_gives_the_squared_parameter_gradient():
    """With V = g(0) and snapshots every step (GD), X_i = P_g g(0) ≈ g(τ_i), so the integrand is
    ‖∇_w Φ(τ_i)‖² (to the discretization's accuracy)."""
    traj, net, x, states = _run(steps=6, every_k=1)
    blocks = propagated_probes(traj, traj.g[0].reshape(-1), discretization="gd")
    sc = channel_scores(net, states, x, traj.times, blocks)
    for i in range(len(traj)):
        # the gradient's integrand at snapshot i from the recorded g(τ_i) itself
        assert sc.integrand[i] == pytest.approx(
            float(traj.g[i].reshape(-1) @ traj.kernel(i) @ traj.g[i].reshape(-1)), rel=0.05)
    assert sc.integrand[0] == pytest.approx(
        float(traj.g[0].reshape(-1) @ traj.kernel(0) @ traj.g[0].reshape(-1)), rel=1e-10)


def test_quadratures_agree_on_a_fine_schedule_and_logmean_is_exact_for_exponentials():
    from tangentscope.dynamics.channel_score import _combine

    a, b, h = torch.tensor([2.0]), torch.tensor([2.0 * np.exp(-3.0)]), 0.5
    assert float(_combine(a, b, h, "logmean")) == pytest.approx(2.0 * (1 - np.exp(-3)) / 6)
    assert float(_combine(a, a, h, "logmean")) == pytest.approx(1.0)
    traj, net, x, states = _run(steps=12, every_k=1)
    V = torch.eye(traj.N, dtype=torch.float64)[:, :4]
    blocks = propagated_probes(traj, V)
    totals = {q: channel_scores(net, states, x, traj.times, blocks, quadrature=q).total
              for q in ("left", "trapezoid", "logmean")}
    W = window_operators(traj, discretization="exp").W
    exact = float(torch.trace(V.T @ W @ V))
    # one GD step decays the top mode by half: the left rule overcounts it, log-mean does not
    assert totals["logmean"] == pytest.approx(exact, rel=0.02)
    assert totals["trapezoid"] == pytest.approx(exact, rel=0.05)
    assert abs(totals["logmean"] - exact) < abs(totals["trapezoid"] - exact) < abs(
        totals["left"] - exact)


def test_channel_scores_refuse_bad_inputs():
    traj, net, x, states = _run(steps=3, every_k=3)
    blocks = propagated_probes(traj, torch.ones(traj.N))
    with pytest.raises(ConfigError, match="quadrature"):
        channel_scores(net, states, x, traj.times, blocks, quadrature="simpson")  # type: ignore
    with pytest.raises(ShapeError, match="one time"):
        channel_scores(net, states, x, traj.times, blocks[:1])
    with pytest.raises(ShapeError, match="rows"):
        channel_scores(net, states, x, traj.times, [b[:-1] for b in blocks])
    with pytest.raises(ShapeError, match="N ="):
        propagated_probes(traj, torch.ones(traj.N + 1))


def _exact_frozen(net, traj, states, x, V):
    """Per parameter ``Σ_i ∫_0^{h_i} ‖(J_iᵀ U e^{−bΛδ} Uᵀ X_i)_k‖² dδ`` in closed form (explicit
    Jacobian, ``φ(s) = (1 − e^{−s h})/s`` on every pair of modes)."""
    X, out = V.clone(), None
    for i in range(len(traj) - 1):
        params = {k: v.clone() for k, v in states[i]["params"].items()}
        names = list(params)

        def f(*vals, names=names):
            return torch.func.functional_call(net, dict(zip(names, vals)), (x,)).reshape(-1)

        J = torch.autograd.functional.jacobian(f, tuple(params.values()))
        Jf = torch.cat([j.reshape(j.shape[0], -1) for j in J], 1)        # (N, P)
        b = traj.hessian_scale(i)
        lam, U = torch.linalg.eigh(traj.kernel(i))
        mu = b * lam.clamp_min(0)
        h = float(traj.times[i + 1] - traj.times[i])
        Y = U.T @ X
        s = mu[:, None] + mu[None, :]
        phi = torch.where(s * h > 1e-12, -torch.expm1(-s * h) / s.clamp_min(1e-300),
                          torch.full_like(s, h))
        A = Jf.T @ U                                                     # (P, N)
        M = (Y @ Y.T) * phi
        v = ((A @ M) * A).sum(1)
        out = v if out is None else out + v
        X = U @ (torch.exp(-mu * h)[:, None] * Y)
    return out


def test_frozen_kernel_scores_equal_the_closed_form_and_sum_to_the_exp_quadratic_form():
    from tangentscope.dynamics.channel_score import frozen_kernel_channel_scores

    traj, net, x, states = _run(steps=30, every_k=10)
    V = torch.randn(traj.N, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    want = _exact_frozen(net, traj, states, x, V)
    W = window_operators(traj, discretization="exp").W
    for ratio, tol in ((2.0, 1e-5), (4.0, 1e-3)):
        sc = frozen_kernel_channel_scores(net, traj, states, x, V, ratio=ratio, chunk_size=5)
        np.testing.assert_allclose(sc.flat().numpy(), want.numpy(), rtol=tol,
                                   atol=tol * float(want.max()))
        assert sc.total == pytest.approx(float(torch.trace(V.T @ W @ V)), rel=tol)
    assert sc.quadrature == "frozen" and len(sc.integrand) == len(traj)
    # the snapshot-only rules on the same sparse run are far less accurate
    blocks = propagated_probes(traj, V)
    lm = channel_scores(net, states, x, traj.times, blocks).total
    assert abs(lm / float(torch.trace(V.T @ W @ V)) - 1) > 10 * 1e-3
    with pytest.raises(ConfigError, match="ratio"):
        frozen_kernel_channel_scores(net, traj, states, x, V, ratio=1.0)
    with pytest.raises(ShapeError, match="one state"):
        frozen_kernel_channel_scores(net, traj, states[:-1], x, V)
