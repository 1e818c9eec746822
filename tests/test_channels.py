"""Channel/reservoir split, energies, visibility, noise transfer, spectra, rotation and the
spectral schedule: against hand-built spectra and closed forms (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tangentscope as ts
from tangentscope.dynamics import (
    KernelTrajectory,
    channel_timeline,
    kernel_alignment,
    kernel_rotation,
    kernel_spectra,
    label_noise_gradients,
    mode_visibility,
    noise_transfer,
    spectral_schedule,
    split_channels,
    window_operators,
)
from tangentscope.errors import ConfigError, ShapeError

F64 = torch.float64


def _known(lams, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(lams), len(lams), generator=g, dtype=F64))
    lam = torch.tensor(lams, dtype=F64)
    return Q @ torch.diag(lam) @ Q.T, Q, lam


def test_split_modes_and_energies_on_a_known_spectrum():
    W, Q, lam = _known([10.0, 5.0, 1.0, 1e-3, 1e-4, 0.0])
    v = Q[:, 0] * 3 + Q[:, 4] * 4                       # energy 9 in the channel, 16 outside
    rel = split_channels(W, threshold=0.05, vectors={"v": v})
    assert rel.rank == 3 and rel.cut == pytest.approx(0.5)
    e = rel.energies["v"]
    assert e.total == pytest.approx(25) and e.channel == pytest.approx(9)
    assert e.reservoir_fraction == pytest.approx(16 / 25)
    np.testing.assert_allclose(e.per_mode, [9, 0, 0, 0, 16, 0], atol=1e-12)
    assert rel.gap == pytest.approx(1.0 / 1e-3)
    assert split_channels(W, threshold=2.0, mode="absolute").rank == 2
    # an exactly null mode makes the rank boundary the largest gap
    assert split_channels(W, mode="gap").rank == 5
    W2, _, _ = _known([10.0, 5.0, 1.0, 1e-3, 1e-4, 5e-5])
    assert split_channels(W2, mode="gap").rank == 3          # largest ratio: 1 / 1e-3
    torch.testing.assert_close(rel.project(v) + rel.project(v, "reservoir"), v)
    torch.testing.assert_close(rel.project(v), 3 * Q[:, 0])
    assert rel.quadratic_form(v) == pytest.approx(float(v @ W @ v))
    torch.testing.assert_close(rel.eigenvalues, lam, atol=1e-12, rtol=0)
    with pytest.raises(ConfigError, match="needs threshold"):
        split_channels(W, mode="absolute")
    with pytest.raises(ConfigError, match="mode must be"):
        split_channels(W, mode="kmeans")
    with pytest.raises(ShapeError, match="square"):
        split_channels(W[:3])


def test_gap_mode_finds_the_rank_of_an_exactly_singular_operator():
    W, _, _ = _known([3.0, 2.0, 2.5e-1, 0.0, 0.0])
    sp = split_channels(W, mode="gap")
    assert sp.rank == 3 and math.isinf(sp.gap)


def test_visibility_and_noise_transfer_by_hand():
    W, Q, lam = _known([4.0, 1.0, 1e-6])
    G = torch.tensor([[1.0, 2.0, 0.5]], dtype=F64) @ Q.T    # G ψ_j = (1, 2, 0.5)_j
    sp = split_channels(W, threshold=1e-3)
    vis = mode_visibility(sp, G, test_gram_integral=2.0)
    np.testing.assert_allclose(vis.visibility, [1.0, 2.0, 0.5], rtol=1e-12)
    np.testing.assert_allclose(vis.bound, np.sqrt(lam.numpy() * 2.0), rtol=1e-9)
    s = vis.summary()
    assert s["max_reservoir_visibility"] == pytest.approx(0.5)
    assert s["reservoir_to_channel_visibility"] == pytest.approx(0.25)
    assert s["max_bound_ratio"] == pytest.approx(0.5 / math.sqrt(2e-6))
    g_noise = 2 * Q[:, 2] + Q[:, 1]
    g_clean = Q[:, 0]
    nt = noise_transfer(sp, G, g_noise, g_clean, U_Q_final=torch.tensor([[1.0]], dtype=F64),
                        y_test=torch.tensor([0.0], dtype=F64), hessian_scale=0.1)
    torch.testing.assert_close(nt.displacement, torch.tensor([-(2 * 0.5 + 2.0)], dtype=F64))
    torch.testing.assert_close(nt.displacement_channel, torch.tensor([-2.0], dtype=F64))
    torch.testing.assert_close(nt.displacement_reservoir, torch.tensor([-1.0], dtype=F64))
    assert nt.noise.reservoir_fraction == pytest.approx(4 / 5)
    assert nt.test_mse == pytest.approx(1.0) and nt.test_mse_without_noise == pytest.approx(16.0)
    assert nt.noise_fitted == pytest.approx(2 * 0.1 * (1.0 + 4 * 1e-6) / 5)
    assert nt.clean_fitted == pytest.approx(2 * 0.1 * 4.0)


def _linear_flow(times, n=8, d=12, m=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    XQ = torch.randn(m, d, generator=g, dtype=F64)
    y = torch.randn(n, 1, generator=g, dtype=F64)
    K, KQ = X @ X.T, XQ @ X.T
    u0 = torch.zeros(n, 1, dtype=F64)
    sol = ts.squared_loss_flow(K, u0, y, t=torch.tensor(times, dtype=F64), K_QS=KQ,
                               U_Q0=torch.zeros(m, 1, dtype=F64))
    L = ts.losses.SquaredLoss()
    S = len(times)
    traj = KernelTrajectory.from_arrays(
        times, [K] * S, list(sol.u), [L.grad(u, y) for u in sol.u],
        [L.hessian(u, y) for u in sol.u], [float(v) for v in sol.loss], K_QS=[KQ] * S,
        U_Q=list(sol.U_Q), data={"y": y}, meta={"loss": "squared"})
    return traj, K, y, sol


def test_spectral_schedule_matches_the_frozen_kernel_prediction():
    times = np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 400)])
    traj, K, _y, _sol = _linear_flow(times)
    sch = spectral_schedule(traj, fraction=0.1)
    n = 8
    lam = torch.linalg.eigvalsh(K).flip(0).numpy()
    expect = n * math.log(10) / lam
    np.testing.assert_allclose(sch.predicted_time, expect, rtol=1e-10)
    # measured on a log grid of ratio 10^(6/399): the first snapshot at or after the prediction
    ok = np.isfinite(sch.learned_time)
    assert ok.sum() == 8
    assert np.all(sch.learned_time >= expect * (1 - 1e-9))
    assert np.all(sch.learned_time <= expect * 10 ** (6 / 399) * (1 + 1e-9))
    assert sch.rank_correlation == pytest.approx(-1.0)


def test_kernel_spectra_residual_energy_and_timeline_on_a_linear_flow():
    traj, K, y, sol = _linear_flow([0.0, 0.5, 2.0, 8.0])
    spec = kernel_spectra(traj)
    lam, _V = torch.linalg.eigh(K)
    np.testing.assert_allclose(spec.eigenvalues[2], lam.flip(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(spec.residual_energy[0], sol.modes[0].numpy() ** 2, rtol=1e-10,
                               atol=1e-12)
    np.testing.assert_allclose(spec.residual_energy[-1], sol.modes[-1].numpy() ** 2, rtol=1e-8,
                               atol=1e-14)
    # the channel of W_S(0, t) only grows
    tl = channel_timeline(traj, vectors={"y": y}, threshold=1e-3)
    assert tl.stops.tolist() == [1, 2, 3]
    assert np.all(np.diff(tl.rank) >= 0) and np.all(np.diff(tl.channel_fraction["y"]) >= -1e-12)


def test_kernel_alignment_and_rotation_by_construction():
    K, Q, _ = _known([5.0, 3.0, 2.0, 1.0])
    assert kernel_alignment(K, 3 * K) == pytest.approx(1.0)
    A, B = torch.eye(4, dtype=F64), K
    assert kernel_alignment(A, B) == pytest.approx(float(torch.trace(K)) / (2 * float(
        torch.linalg.norm(K))))
    H = torch.eye(4, dtype=F64) - 1 / 4
    assert kernel_alignment(A, B, centered=True) == pytest.approx(
        float((H @ A @ H * (H @ B @ H)).sum()) / float(torch.linalg.norm(H @ A @ H)
                                                       * torch.linalg.norm(H @ B @ H)))
    # rotate the top eigenvector by θ within span(q0, q3)
    th = 0.3
    R = torch.eye(4, dtype=F64)
    R[0, 0] = R[3, 3] = math.cos(th)
    R[0, 3], R[3, 0] = -math.sin(th), math.sin(th)
    K2 = Q @ R @ torch.diag(torch.tensor([5.0, 3.0, 2.0, 1.0], dtype=F64)) @ R.T @ Q.T
    z = torch.zeros(4, 1, dtype=F64)
    B = torch.full((4, 1, 1), 0.25, dtype=F64)
    traj = KernelTrajectory.from_arrays([0.0, 1.0], [K, K2], [z, z], [z, z], [B, B], [0, 0])
    rot = kernel_rotation(traj, k=1, centered=False)
    assert rot.subspace_angles[0, 0] == pytest.approx(0.0, abs=1e-7)
    assert rot.subspace_angles[1, 0] == pytest.approx(th, rel=1e-9)
    assert rot.mode_angles[1, 0] == pytest.approx(th, rel=1e-9)
    assert rot.alignment[1] == pytest.approx(kernel_alignment(K, K2))
    with pytest.raises(ConfigError, match="k must be"):
        kernel_rotation(traj, k=9)


def test_label_noise_gradients_split_g_exactly():
    traj, _K, y, _sol = _linear_flow([0.0, 1.0])
    eps = torch.linspace(-1, 1, 8, dtype=F64)[:, None]
    y_clean = y - eps
    g_clean, g_noise = label_noise_gradients(traj, y_clean)
    torch.testing.assert_close(g_noise, -eps.reshape(-1) / 8)
    torch.testing.assert_close(g_clean + g_noise, traj.g[0].reshape(-1))
    ops = window_operators(traj)
    sp = split_channels(ops.W)
    nt = noise_transfer(sp, ops.G, g_noise, g_clean, hessian_scale=traj.hessian_scale())
    assert 0 <= nt.noise_fitted <= 1 + 1e-12 and 0 <= nt.clean_fitted <= 1 + 1e-12


def test_demo_bars_figure_from_a_spectrum(tmp_path):
    from tangentscope.viz import save_figure
    from tangentscope.viz.spectrum import plot_residual_energy

    traj = _linear_flow([0.0, 1.0])[0]
    spec = kernel_spectra(traj)
    axes = plot_residual_energy(spec.eigenvalues[-1], spec.residual_energy[-1])
    assert len(axes[0].patches) == traj.N
    assert save_figure(axes[0].figure, tmp_path / "bars.png").stat().st_size > 1000
