"""Benign overfitting: the label-noise bookkeeping against closed forms, and the experiment."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tangentscope import ConfigError
from tangentscope.dynamics import KernelRecorder, KernelTrajectory, every
from tangentscope.dynamics.label_noise import (
    dissipated_fraction,
    min_norm_noise_transfer,
    noise_channel_analysis,
)
from tangentscope.experiments import run_experiment
from tangentscope.experiments._harness import train_network
from tangentscope.optim.spec import build_optimizer


def _problem(n=12, m=9, d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    xt = torch.randn(m, d, generator=g, dtype=torch.float64)
    y_clean = torch.sign(x[:, :1])
    flip = torch.zeros(n, 1, dtype=torch.bool)
    flip[:3] = True
    y = torch.where(flip, -y_clean, y_clean)
    return x, xt, y, y_clean, torch.sign(xt[:, :1])


def _linear_run(x, xt, y, steps, lr, every_k, seed=1):
    torch.manual_seed(seed)
    net = torch.nn.Linear(x.shape[1], 1).double()
    init = {k: v.clone() for k, v in net.state_dict().items()}
    opt = build_optimizer("sgd", net, lr=lr).optimizer
    rec = KernelRecorder(net, x, y, loss="squared", x_test=xt, optimizer=opt,
                         schedule=every(every_k), verbose=False)
    train_network(net, x, y, (y[:, 0] > 0).long(), opt, steps)
    rec.close()
    with torch.no_grad():
        return rec.trajectory(), net(xt), net, init


@pytest.mark.parametrize("every_k", [1, 7])
def test_noise_displacement_equals_the_clean_twin_on_a_linear_model(every_k):
    """For a model linear in its parameters, −G_Q g_noise is exactly the difference between the
    test outputs of the noisy-trained and the clean-trained model (same init, same steps), at any
    snapshot spacing ('gd' discretization), and the soft channel fraction is 1 − ‖Pε‖²/‖ε‖²."""
    x, xt, y, yc, yt = _problem()
    n, steps, lr = x.shape[0], 40, 0.3
    traj, uq_noisy, net, init = _linear_run(x, xt, y, steps, lr, every_k)
    rep = noise_channel_analysis(traj, yc, yt, (yt[:, 0] > 0).long(), discretization="gd",
                                 timeline=3)
    net.load_state_dict(init)
    opt = build_optimizer("sgd", net, lr=lr).optimizer
    train_network(net, x, yc, (yc[:, 0] > 0).long(), opt, steps)
    with torch.no_grad():
        actual = (uq_noisy - net(xt)).numpy()
    np.testing.assert_allclose(rep.noise_displacement, actual, rtol=1e-9, atol=1e-12)
    # brute force: constant kernel K = [x 1][x 1]ᵀ, GD propagator (I − ηK/n)^steps
    X1 = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    K = X1 @ X1.T
    P = torch.linalg.matrix_power(torch.eye(n, dtype=torch.float64) - lr * K / n, steps)
    eps = (y - yc)[:, 0]
    assert rep.noise_dissipated == pytest.approx(1 - float((P @ eps).norm() ** 2 / eps.norm() ** 2),
                                                 abs=1e-10)
    assert rep.dissipation_error < 1e-10 and rep.displacement_error < 1e-9
    assert rep.test_error_without_noise <= 1.0 and len(rep.timeline_noise) >= 1
    assert 0 <= rep.noise_channel_fraction <= 1 + 1e-12
    assert rep.noise_per_mode.sum() == pytest.approx(1.0)


def test_dissipated_fraction_of_frozen_kernel_modes():
    """Frozen kernel, gradient flow: W_S = Σ (n/2)(1 − e^{−2λT/n}) v vᵀ, so an eigenvector's
    soft fraction is 1 − e^{−2λT/n}."""
    n, T = 6, 3.0
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    lam = torch.tensor([5.0, 2.0, 1.0, 0.5, 0.1, 0.0], dtype=torch.float64)
    W = Q @ torch.diag(n / 2 * (1 - torch.exp(-2 * lam * T / n))) @ Q.T
    for i in range(n):
        assert dissipated_fraction(W, Q[:, i], 1 / n) == pytest.approx(
            float(1 - torch.exp(-2 * lam[i] * T / n)), abs=1e-12)
    with pytest.raises(Exception, match="entries"):
        dissipated_fraction(W, torch.ones(n + 1), 1 / n)


def test_exp_discretization_recovers_the_frozen_kernel_closed_form():
    """A synthetic two-snapshot trajectory with a constant kernel ('exp' is exact for flow)."""
    n, T = 5, 2.5
    g = torch.Generator().manual_seed(3)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    K = A @ A.T
    KQ = torch.randn(4, n, generator=g, dtype=torch.float64)
    y_clean = torch.randn(n, 1, generator=g, dtype=torch.float64)
    y = y_clean.clone()
    y[1] += 1.0
    u0 = torch.zeros(n, 1, dtype=torch.float64)
    B = torch.eye(1, dtype=torch.float64).expand(n, 1, 1) / n
    lam, V = torch.linalg.eigh(K)
    r = lambda t: V @ torch.diag(torch.exp(-lam * t / n)) @ V.T @ (u0 - y)
    uT = y + r(T)
    phi = V @ torch.diag((1 - torch.exp(-lam * T / n)) / lam) @ V.T
    UQT = -(KQ @ phi @ (u0 - y))
    traj = KernelTrajectory.from_arrays(
        [0.0, T], [K, K], [u0, uT], [(u0 - y) / n, (uT - y) / n], [B, B],
        [float((y ** 2).sum() / (2 * n)), float(((uT - y) ** 2).sum() / (2 * n))],
        K_QS=[KQ, KQ], U_Q=[torch.zeros(4, 1, dtype=torch.float64), UQT],
        meta={"loss": "squared"})
    yt = torch.ones(4, 1, dtype=torch.float64)
    rep = noise_channel_analysis(traj, y_clean, yt, torch.ones(4, dtype=torch.int64))
    eps = (y - y_clean)[:, 0]
    Pe = V @ torch.diag(torch.exp(-lam * T / n)) @ V.T @ eps
    assert rep.noise_dissipated == pytest.approx(1 - float(Pe.norm() ** 2 / eps.norm() ** 2),
                                                 abs=1e-9)
    np.testing.assert_allclose(rep.noise_displacement[:, 0], (KQ @ phi @ eps).numpy(),
                               rtol=1e-9, atol=1e-12)


def test_min_norm_noise_transfer_matches_pinv():
    g = torch.Generator().manual_seed(0)
    F = torch.randn(8, 5, generator=g, dtype=torch.float64)        # rank-5 kernel on 8 points
    FQ = torch.randn(3, 5, generator=g, dtype=torch.float64)
    K, KQ = F @ F.T, FQ @ F.T
    eps = torch.randn(8, generator=g, dtype=torch.float64)
    out = min_norm_noise_transfer(K, KQ, eps)
    Pi = K @ torch.linalg.pinv(K)
    assert out["rank"] == 5
    assert out["channel_fraction"] == pytest.approx(float((Pi @ eps).norm() ** 2
                                                          / eps.norm() ** 2), abs=1e-10)
    ref = KQ @ torch.linalg.pinv(K) @ eps
    assert out["test_rms"] == pytest.approx(float(ref.pow(2).mean().sqrt()), rel=1e-8)


def test_noise_channel_analysis_rejects_what_it_cannot_normalize():
    x, xt, y, yc, yt = _problem()
    traj, *_ = _linear_run(x, xt, y, 3, 0.1, 1)
    with pytest.raises(ConfigError, match=r"in \(0, 1\)"):
        noise_channel_analysis(traj, yc, yt, (yt[:, 0] > 0).long(), threshold=2.0)
    ce = KernelTrajectory.from_arrays([0.0, 1.0], [torch.eye(2)] * 2, [torch.zeros(2, 1)] * 2,
                                      [torch.zeros(2, 1)] * 2, [torch.zeros(2, 1, 1)] * 2,
                                      [0.0, 0.0], meta={"loss": "cross_entropy"})
    with pytest.raises(ConfigError, match="squared loss"):
        noise_channel_analysis(ce, torch.zeros(2, 1), yt, yt[:, 0].long())


def test_benign_smoke_run_plot_and_resume(tmp_path, monkeypatch):
    rd = run_experiment("benign-overfitting", preset="smoke", out=tmp_path / "b", quiet=True)
    table = rd.read_summary()["table"]
    assert [r["width"] for r in table] == [4, 64]
    for r in table:
        for k in ("test_error", "test_error_clean_trained", "noise_channel_fraction",
                  "noise_dissipated", "counterfactual_rel_error", "displacement_error"):
            assert np.isfinite(r[k]["median"]), k
        assert 0 <= r["noise_dissipated"]["median"] <= 1 + 1e-6
    for f in ("benign_errors", "benign_timeline", "benign_modes"):
        assert (rd.path / "figures" / f"{f}.png").stat().st_size > 1000
    cells = [json.loads(line)["key"] for line in (rd.path / "cells.jsonl").read_text()
             .splitlines()]
    assert cells == ["gmm/h4/seed0", "gmm/h64/seed0"]
    # test_error is the whole test set (the logged curve), not the 100-point probe
    arrays = rd.load_arrays()
    for key, res in rd.cells().items():
        assert res["test_error"] == pytest.approx(arrays[f"{key}/curve_test_error"][-1])
        assert res["n_test"] == 1000 and res["n_probe"] == 100
    import tangentscope.experiments.benign_overfitting as bo

    monkeypatch.setattr(bo, "_train_cell", lambda *a, **k: pytest.fail("recomputed a cell"))
    run_experiment(None, resume=rd.path, quiet=True, plot=False)
    with pytest.raises(ConfigError, match="unknown task"):
        bo.Config(tasks=("cifar",))


def test_figures_keep_one_seed_per_setting():
    from tangentscope.viz.phenomena import _one_seed_each

    keys = ["gmm/h10/seed2", "gmm/h10/seed1", "mnist/h16/seed0", "gmm/h200/seed5", "other"]
    assert _one_seed_each(keys) == ["gmm/h10/seed1", "gmm/h200/seed5", "mnist/h16/seed0", "other"]
