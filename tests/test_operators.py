"""P_g, W_S, G_Q: every discretization against a dense brute-force twin, closed forms on linear
models (float64), convergence orders, and the kernel inclusion ker W ⊆ ker G."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tangentscope as ts
from tangentscope.dynamics import (
    DISCRETIZATIONS,
    KernelRecorder,
    KernelTrajectory,
    accumulate_operators,
    every,
    identity_residuals,
    integrated_entk,
    mode_visibility,
    propagator,
    split_channels,
    transfer_operator,
    window_operators,
)
from tangentscope.dynamics.operators import _phi1, _phi2
from tangentscope.errors import ConfigError, ShapeError
from tangentscope.losses import dense_hessian

F64 = torch.float64


# -- fixtures ------------------------------------------------------------------------------------
def _linear(n=10, m=6, d=25, p=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    XQ = torch.randn(m, d, generator=g, dtype=F64)
    W0 = 0.3 * torch.randn(p, d, generator=g, dtype=F64)
    y = torch.randn(n, p, generator=g, dtype=F64)
    eye = torch.eye(p, dtype=F64)
    K = torch.einsum("id,jd->ij", X, X)[:, :, None, None] * eye
    KQ = torch.einsum("id,jd->ij", XQ, X)[:, :, None, None] * eye
    return X, XQ, W0, y, K, KQ


def _flow_trajectory(times, d=25, seed=0):
    """Exact gradient flow of a linear model (constant kernel) under squared loss."""
    X, XQ, W0, y, K, KQ = _linear(d=d, seed=seed)
    sol = ts.squared_loss_flow(K, X @ W0.T, y, t=torch.tensor(times, dtype=F64), K_QS=KQ,
                               U_Q0=XQ @ W0.T)
    L = ts.losses.SquaredLoss()
    S = len(times)
    return KernelTrajectory.from_arrays(
        times, [K] * S, list(sol.u), [L.grad(u, y) for u in sol.u],
        [L.hessian(u, y) for u in sol.u], [float(v) for v in sol.loss], K_QS=[KQ] * S,
        U_Q=list(sol.U_Q)), K, KQ


def _random_trajectory(S=5, n=4, p=3, m=3, seed=0, steps_per_interval=(1, 3, 2, 4),
                       loss="cross_entropy"):
    """Varying random PSD kernels; cross-entropy Hessians (singular blocks) or squared loss."""
    g = torch.Generator().manual_seed(seed)
    r = 7
    Ks, KQs, Bs, us, gs = [], [], [], [], []
    ce = ts.losses.get_loss(loss)
    labels = torch.randint(0, p, (n,), generator=g)
    if loss == "squared":
        labels = torch.randn(n, p, generator=g, dtype=F64)
    for _ in range(S):
        J = torch.randn(n * p, r * 2, generator=g, dtype=F64) * 0.6
        JQ = torch.randn(m * p, r * 2, generator=g, dtype=F64) * 0.6
        Ks.append(J @ J.T)
        KQs.append(JQ @ J.T)
        u = torch.randn(n, p, generator=g, dtype=F64)
        us.append(u)
        gs.append(ce.grad(u, labels))
        Bs.append(ce.hessian(u, labels))
    dts, times = [[]], [0.0]
    for k in range(S - 1):
        etas = (0.05 + 0.1 * torch.rand(steps_per_interval[k % len(steps_per_interval)],
                                        generator=g, dtype=F64)).tolist()
        dts.append(etas)
        times.append(times[-1] + sum(etas))
    U_Q = [torch.randn(m, p, generator=g, dtype=F64) for _ in range(S)]
    test_gram = [1.0 + k for k in range(S)]
    return KernelTrajectory.from_arrays(times, Ks, us, gs, Bs, list(range(S)), K_QS=KQs, U_Q=U_Q,
                                        dts=dts, test_gram_norm=test_gram), Ks, KQs, Bs, dts


def _van_loan_W(A, K, h):
    """∫_0^h e^{−Aᵀσ} K e^{−Aσ} dσ from one block matrix exponential (Van Loan 1978)."""
    N = A.shape[0]
    Z = torch.zeros(2 * N, 2 * N, dtype=F64)
    Z[:N, :N], Z[:N, N:], Z[N:, N:] = A.T, K, -A
    F = torch.linalg.matrix_exp(Z * h)
    return F[N:, N:].T @ F[:N, N:]


def _int_exp(A, h):
    """∫_0^h e^{−Aσ} dσ from a block matrix exponential."""
    N = A.shape[0]
    Z = torch.zeros(2 * N, 2 * N, dtype=F64)
    Z[:N, :N], Z[:N, N:] = -A, torch.eye(N, dtype=F64)
    return torch.linalg.matrix_exp(Z * h)[:N, N:]


def _brute(traj, Ks, KQs, Bs, dts, scheme):
    """Dense twin: explicit matrices, matrix_exp and Van Loan, or the per-step GD products."""
    N = Ks[0].shape[0]
    I = torch.eye(N, dtype=F64)
    P, W, G = I.clone(), torch.zeros(N, N, dtype=F64), torch.zeros(KQs[0].shape[0], N, dtype=F64)
    for k in range(len(Ks) - 1):
        h = float(traj.times[k + 1] - traj.times[k])
        if scheme == "midpoint":
            K, KQ, B = [(a[k] + a[k + 1]) / 2 for a in (Ks, KQs, Bs)]
        else:
            K, KQ, B = Ks[k], KQs[k], Bs[k]
        Bd = dense_hessian(B)
        A = Bd @ K
        if scheme in ("exp", "midpoint"):
            W = W + P.T @ _van_loan_W(A, K, h) @ P
            G = G + KQ @ _int_exp(A, h) @ P
            P = torch.linalg.matrix_exp(-A * h) @ P
        elif scheme == "euler":
            W = W + h * P.T @ K @ P
            G = G + h * KQ @ P
            P = (I - h * A) @ P
        else:
            for eta in dts[k + 1]:
                W = W + P.T @ (eta * K - 0.5 * eta ** 2 * K @ Bd @ K) @ P
                G = G + eta * KQ @ P
                P = (I - eta * A) @ P
    return P, W, G


# -- brute-force twins ---------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["cross_entropy", "squared"])
@pytest.mark.parametrize("scheme", DISCRETIZATIONS)
def test_every_discretization_matches_its_dense_twin(scheme, loss):
    traj, Ks, KQs, Bs, dts = _random_trajectory(loss=loss)
    ops = window_operators(traj, discretization=scheme)
    P, W, G = _brute(traj, Ks, KQs, Bs, dts, scheme)
    torch.testing.assert_close(ops.P, P, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(ops.W, 0.5 * (W + W.T), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(ops.G, G, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("loss", ["cross_entropy", "squared"])
@pytest.mark.parametrize("scheme", DISCRETIZATIONS)
def test_vector_identities_equal_the_matrix_quadratic_forms(scheme, loss):
    traj = _random_trajectory(seed=1, loss=loss)[0]
    res = identity_residuals(traj, 1, discretization=scheme)
    g1 = traj.g[1].reshape(-1)
    for ops, pred in zip(accumulate_operators(traj, 1, discretization=scheme),
                         res.dissipation_predicted):
        assert float(g1 @ ops.W @ g1) == pytest.approx(pred, rel=1e-10, abs=1e-13)
    torch.testing.assert_close(ops.W, window_operators(traj, 1, discretization=scheme).W)


def test_phi_functions_match_high_precision_values():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    xs = torch.tensor([0.0, 1e-9, 1e-4, 0.01, 0.0499, 0.05, 0.0501, 0.3, 2.0, 40.0, 1e4],
                      dtype=F64)
    for x, a, b in zip(xs.tolist(), _phi1(xs).tolist(), _phi2(xs).tolist()):
        X = mpmath.mpf(x)
        e1 = 1 if x == 0 else (1 - mpmath.exp(-X)) / X
        e2 = mpmath.mpf(1) / 2 if x == 0 else (X - 1 + mpmath.exp(-X)) / X ** 2
        assert a == pytest.approx(float(e1), rel=1e-14)
        assert b == pytest.approx(float(e2), rel=1e-13)


# -- closed forms on linear models -----------------------------------------------------------------
def test_exp_is_exact_for_gradient_flow_on_a_linear_model_at_any_spacing():
    times = [0.0, 0.3, 1.0, 1.1, 4.0, 10.0]
    traj, K, KQ = _flow_trajectory(times)
    for scheme in ("exp", "midpoint"):
        res = identity_residuals(traj, discretization=scheme)
        assert res.dissipation_error.max() < 1e-10
        assert res.displacement_error.max() < 1e-10
        assert res.gradient_error.max() < 1e-10
    # a short window: the Van Loan twin itself loses digits when h·λ_max is large
    ops = window_operators(traj, 1, 3, discretization="exp")
    A = dense_hessian(traj.hessian(0)) @ ts.flatten_kernel(K)
    h = times[3] - times[1]
    torch.testing.assert_close(ops.P, torch.linalg.matrix_exp(-A * h), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ops.W, _van_loan_W(A, ts.flatten_kernel(K), h), rtol=1e-10,
                               atol=1e-10)
    torch.testing.assert_close(ops.G, ts.flatten_kernel(KQ) @ _int_exp(A, h), rtol=1e-10,
                               atol=1e-10)
    # the three named entry points agree with window_operators
    torch.testing.assert_close(propagator(traj, 1, 3), ops.P)
    torch.testing.assert_close(integrated_entk(traj, 1, 3), ops.W)
    torch.testing.assert_close(transfer_operator(traj, 1, 3), ops.G)
    with pytest.warns(FutureWarning, match="now integrated_entk"):   # the old name still works
        torch.testing.assert_close(ts.dynamics.dissipation_gramian(traj, 1, 3), ops.W)


def test_euler_converges_at_first_order_on_a_linear_flow():
    errs = []
    for S in (41, 81, 161):                       # h λ_max(BK) from 0.17 down to 0.04
        traj = _flow_trajectory(list(np.linspace(0, 1.0, S)))[0]
        errs.append(identity_residuals(traj, discretization="euler").summary()["dissipation_error"])
    assert errs[0] > 1e-3
    for a, b in zip(errs, errs[1:]):
        assert 0.4 < b / a < 0.6            # O(h): halving h halves the error


def _rotating_trajectory(S, T=1.0, N=6):
    """K(t) = Q(t) Λ Q(t)ᵀ with Q(t) = exp(tΩ) (smooth), B = I/N; only the operators matter."""
    g = torch.Generator().manual_seed(3)
    Om = torch.randn(N, N, generator=g, dtype=F64)
    Om = Om - Om.T
    lam = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.1], dtype=F64)[:N]
    JQ = torch.randn(2, N, generator=g, dtype=F64)
    times = np.linspace(0, T, S)
    Ks = [(Q := torch.linalg.matrix_exp(float(t) * Om)) @ torch.diag(lam) @ Q.T for t in times]
    z = torch.zeros(N, 1, dtype=F64)
    B = torch.full((N, 1, 1), 1.0 / N, dtype=F64)
    return KernelTrajectory.from_arrays(times, Ks, [z] * S, [z] * S, [B] * S, [0.0] * S,
                                        K_QS=[JQ @ K for K in Ks], U_Q=[z[:2]] * S)


def test_midpoint_is_second_order_and_exp_first_order_for_a_rotating_kernel():
    ref = window_operators(_rotating_trajectory(1025), discretization="midpoint")
    errs = {"exp": [], "midpoint": []}
    for S in (9, 17, 33):
        traj = _rotating_trajectory(S)
        for scheme in errs:
            W = window_operators(traj, discretization=scheme).W
            errs[scheme].append(float(torch.linalg.norm(W - ref.W) / torch.linalg.norm(ref.W)))
    for a, b in zip(errs["exp"], errs["exp"][1:]):
        assert 0.4 < b / a < 0.6
    for a, b in zip(errs["midpoint"], errs["midpoint"][1:]):
        assert 0.2 < b / a < 0.3
    assert errs["midpoint"][-1] < errs["exp"][-1] / 10


def _train_linear_gd(steps=30, every_k=3, groups=False):
    X, XQ, _, y, _, _ = _linear()
    model = torch.nn.Linear(X.shape[1], y.shape[1]).double()
    if groups:
        opt = torch.optim.SGD([{"params": [model.weight], "lr": 0.05},
                               {"params": [model.bias], "lr": 0.2}])
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, 7, gamma=0.5)
    rec = KernelRecorder(model, X, y, x_test=XQ, optimizer=opt, schedule=every(every_k),
                         verbose=False)
    for _ in range(steps):
        opt.zero_grad()
        ts.losses.SquaredLoss().value(model(X), y).backward()
        opt.step()
        sched.step()
    rec.close()
    return rec.trajectory()


@pytest.mark.parametrize("groups", [False, True])
def test_gd_is_exact_for_real_gradient_descent_on_a_linear_model(groups):
    # snapshots every 3 steps, a step LR schedule, and (groups=True) per-group learning rates
    traj = _train_linear_gd(groups=groups)
    assert len(traj) == 11
    for start in (0, 4):
        res = identity_residuals(traj, start, discretization="gd")
        assert res.dissipation_error.max() < 1e-10
        assert res.displacement_error.max() < 1e-10
        assert res.gradient_error.max() < 1e-10
    # the continuous-time schemes are not exact for discrete steps: a real, visible error
    assert identity_residuals(traj, discretization="exp").summary()["dissipation_error"] > 1e-4
    with pytest.warns(FutureWarning, match=r"now \.summary\(\)"):    # the old name still works
        assert res.final() == res.summary()


# -- the kernel inclusion ------------------------------------------------------------------------
def test_kernel_of_W_is_inside_kernel_of_G_exactly_on_a_rank_deficient_linear_model():
    traj = _flow_trajectory([0.0, 0.5, 1.5, 3.0], d=4)[0]      # rank K = 4 p = 8 < N = 20
    for scheme in DISCRETIZATIONS:
        ops = window_operators(traj, discretization=scheme)
        sp = split_channels(ops.W, threshold=1e-12)
        assert sp.rank == 8
        null = sp.eigenvectors[:, sp.rank:]
        assert float(torch.linalg.norm(ops.G @ null)) < 1e-12 * float(torch.linalg.norm(ops.G))


def test_visibility_bound_holds_on_varying_kernels():
    # ‖G ψ‖² ≤ ψᵀWψ · ∫‖K_QQ‖ needs K_QQ consistent with K_SS, K_QS: use real Jacobians
    g = torch.Generator().manual_seed(5)
    n, m, Pp, S = 5, 4, 9, 6
    Ks, KQs, grams = [], [], []
    for _ in range(S):
        J, JQ = (torch.randn(k, Pp, generator=g, dtype=F64) for k in (n, m))
        Ks.append(J @ J.T)
        KQs.append(JQ @ J.T)
        grams.append(float(torch.linalg.eigvalsh(JQ @ JQ.T)[-1]))
    z = torch.zeros(n, 1, dtype=F64)
    B = torch.full((n, 1, 1), 0.5, dtype=F64)
    traj = KernelTrajectory.from_arrays(np.linspace(0, 1, S), Ks, [z] * S, [z] * S, [B] * S,
                                        [0.0] * S, K_QS=KQs, U_Q=[z[:m]] * S,
                                        test_gram_norm=grams)
    for scheme in ("exp", "euler"):
        ops = window_operators(traj, discretization=scheme)
        vis = mode_visibility(split_channels(ops.W), ops.G, ops.test_gram_integral)
        assert vis.summary()["max_bound_ratio"] <= 1 + 1e-9
        assert ops.test_gram_integral == pytest.approx(sum(grams[:-1]) / (S - 1))


# -- errors ----------------------------------------------------------------------------------------
def test_bad_windows_and_options_are_refused_before_work():
    traj = _random_trajectory()[0]
    with pytest.raises(ShapeError, match="0 <= start < stop"):
        window_operators(traj, 3, 2)
    with pytest.raises(ShapeError, match="0 <= start < stop"):
        window_operators(traj, 0, 9)
    with pytest.raises(ConfigError, match="discretization must be one of"):
        window_operators(traj, discretization="rk4")
    nq = KernelTrajectory.from_arrays([0.0, 1.0], [torch.eye(2, dtype=F64)] * 2,
                                      [torch.zeros(2, 1)] * 2, [torch.zeros(2, 1)] * 2,
                                      [torch.ones(2, 1, 1)] * 2, [0.0, 0.0])
    with pytest.raises(ShapeError, match="x_test"):
        transfer_operator(nq)
    assert identity_residuals(nq).displacement_error is None
    assert math.isfinite(window_operators(nq).W.sum())


@pytest.mark.parametrize("scheme", ["exp", "midpoint"])
def test_squared_loss_gramian_is_one_minus_propagator_square(scheme):
    # B = b I: d(PᵀP)/dτ = −2b PᵀKP, so W_S = (I − P_gᵀP_g)/(2b) — eigenvalues in [0, 1/(2b)]
    traj = _random_trajectory(loss="squared", n=5, p=2, seed=4)[0]
    ops = window_operators(traj, discretization=scheme)
    b = traj.hessian_scale()
    assert b == pytest.approx(1 / 5)
    I = torch.eye(traj.N, dtype=F64)
    torch.testing.assert_close(ops.W, (I - ops.P.T @ ops.P) / (2 * b), rtol=1e-10, atol=1e-12)
    lam = torch.linalg.eigvalsh(ops.W)
    assert float(lam.min()) > -1e-12 and float(lam.max()) < 1 / (2 * b) + 1e-12
