"""The soft reservoir's boundary (dynamics/reservoir.py) against float64 brute-force twins."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tangentscope import ConfigError, ShapeError
from tangentscope.dynamics import KernelRecorder, every
from tangentscope.dynamics.operators import window_operators
from tangentscope.dynamics.reservoir import (
    band_fractions,
    frozen_gramian_spectrum,
    gap_timeline,
    reservoir_gap,
    slq_band_fraction,
)
from tangentscope.experiments._harness import train_network
from tangentscope.linalg import dense_density, slq_density
from tangentscope.optim.spec import build_optimizer


# -- one spectrum ---------------------------------------------------------------------------------
def test_gap_of_a_known_spectrum():
    """Every field of ReservoirGap for a hand-made spectrum, in any input order and scale."""
    sig = np.array([1.0, 0.85, 0.8, 0.05, 0.01, 0.001])
    rng = np.random.default_rng(0)
    for scale in (1.0, 37.0):
        g = reservoir_gap(rng.permutation(sig) * scale, saturation=scale)
        assert (g.size, g.rank) == (6, 3)
        assert g.edge_channel == pytest.approx(0.8, rel=1e-14)
        assert g.edge_reservoir == pytest.approx(0.05, rel=1e-14)
        assert g.gap_ratio == pytest.approx(16.0, rel=1e-13)
        assert g.log_gap == pytest.approx(math.log10(16.0), rel=1e-13)
        assert g.max_log_gap == pytest.approx(math.log10(16.0), rel=1e-13)
        assert g.max_gap_rank == 3
        assert (g.band_count, g.band_fraction) == (2, pytest.approx(2 / 6))
        assert g.effective_rank == pytest.approx(sig.sum() ** 2 / (sig ** 2).sum(), rel=1e-13)
    # the largest consecutive ratio need not sit at the cut
    g = reservoir_gap([1.0, 0.7, 0.6, 0.001, 0.0009], saturation=1.0, cut=0.65)
    assert (g.rank, g.max_gap_rank) == (2, 3)
    assert g.gap_ratio == pytest.approx(0.7 / 0.6)
    assert g.max_log_gap == pytest.approx(math.log10(600.0))
    d = g.summary()
    assert (d["band_lo"], d["band_hi"], d["rank"]) == (0.1, 0.9, 2)


def test_gap_edge_cases():
    """Null space to rounding: infinite gaps; an empty channel: NaN; default saturation λ_max."""
    g = reservoir_gap([1.0, 0.5, 0.0, 1e-19], saturation=1.0, cut=0.4)
    assert g.rank == 2 and g.gap_ratio == math.inf and g.log_gap == math.inf
    assert g.max_log_gap == math.inf and g.max_gap_rank == 2
    g = reservoir_gap([0.3, 0.2], saturation=1.0)            # nothing above half saturation
    assert g.rank == 0 and math.isnan(g.edge_channel) and math.isnan(g.gap_ratio)
    assert math.isnan(g.log_gap) and g.edge_reservoir == pytest.approx(0.3)
    g = reservoir_gap([4.0, 1.0])                            # saturation = λ_max = 4
    assert g.rank == 1 and g.gap_ratio == pytest.approx(4.0) and g.band_count == 1
    g = reservoir_gap([1.0, 1.0, 1.0], saturation=1.0)       # no reservoir at all
    assert g.rank == 3 and g.edge_reservoir == 0.0 and g.max_log_gap == 0.0
    with pytest.raises(ConfigError, match="band"):
        reservoir_gap([1.0], band=(0.9, 0.1))
    with pytest.raises(ConfigError, match="band"):
        reservoir_gap([1.0], cut=1.5)
    with pytest.raises(ConfigError, match="saturation"):
        reservoir_gap([1.0], saturation=-1.0)
    with pytest.raises(ShapeError):
        reservoir_gap([])


def test_band_fractions_brute_force():
    rng = np.random.default_rng(1)
    lam = rng.uniform(0, 2.0, 40)
    e = rng.uniform(0, 1, 40)
    f = band_fractions(lam, e, saturation=2.0, band=(0.2, 0.7))
    s = lam / 2.0
    assert f["below"] == pytest.approx(e[s < 0.2].sum() / e.sum(), rel=1e-13)
    assert f["band"] == pytest.approx(e[(s >= 0.2) & (s <= 0.7)].sum() / e.sum(), rel=1e-13)
    assert f["above"] == pytest.approx(e[s > 0.7].sum() / e.sum(), rel=1e-13)
    assert sum(f.values()) == pytest.approx(1.0, rel=1e-13)
    assert all(math.isnan(v) for v in band_fractions(lam, np.zeros(40)).values())
    with pytest.raises(ShapeError):
        band_fractions(lam, e[:5])


# -- the frozen kernel against a recorded linear model ---------------------------------------------
def _linear_problem(n=14, m=7, d=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    xt = torch.randn(m, d, generator=g, dtype=torch.float64)
    y_clean = x[:, :1] - 0.5 * x[:, 1:2]
    eps = torch.zeros(n, 1, dtype=torch.float64)
    eps[:4] = torch.randn(4, 1, generator=g, dtype=torch.float64)
    return x, xt, y_clean + eps, y_clean


def _record_linear(x, xt, y, steps, lr, every_k, seed=3):
    torch.manual_seed(seed)
    net = torch.nn.Linear(x.shape[1], 1).double()
    opt = build_optimizer("sgd", net, lr=lr).optimizer
    rec = KernelRecorder(net, x, y, loss="squared", x_test=xt, optimizer=opt,
                         schedule=every(every_k), verbose=False)
    train_network(net, x, y, torch.zeros(x.shape[0], dtype=torch.long), opt, steps)
    rec.close()
    return rec.trajectory()


@pytest.fixture(scope="module")
def linear_run():
    x, xt, y, yc = _linear_problem()
    return x, xt, y, yc, _record_linear(x, xt, y, steps=30, lr=0.2, every_k=3)


def _closed_form(x, xt, t, lr):
    """Dense ``K_SS``, ``K_QS`` (features ``[x, 1]``) and the GD propagator after ``t`` steps."""
    n = x.shape[0]
    F = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    FQ = torch.cat([xt, torch.ones(xt.shape[0], 1, dtype=x.dtype)], 1)
    K, KQ = F @ F.T, FQ @ F.T
    E = torch.eye(n, dtype=x.dtype) - lr / n * K
    return K, KQ, E


@pytest.mark.parametrize("disc", ["gd", "exp"])
def test_frozen_spectrum_is_the_recorded_gramian_of_a_linear_model(linear_run, disc):
    """For a linear model the kernel does not move: 2b W_S from the recorded run ('gd': GD
    steps; 'exp': gradient flow for the same time) equals the closed form, and
    frozen_gramian_spectrum of the recorded K_SS reproduces it."""
    x, xt, _y, _, traj = linear_run
    n, lr, steps = x.shape[0], 0.2, 30
    K, _, E = _closed_form(x, xt, steps, lr)
    b = traj.hessian_scale(0)
    assert b == pytest.approx(1 / n, rel=1e-14)
    ops = window_operators(traj, discretization=disc)
    sig = torch.linalg.eigvalsh(2 * b * ops.W).numpy()[::-1]
    mu = torch.linalg.eigvalsh(traj.kernel(0)).numpy()
    assert np.allclose(np.sort(mu), torch.linalg.eigvalsh(K).numpy(), rtol=1e-10, atol=1e-10)
    pred = frozen_gramian_spectrum(mu, b, steps * lr, lr=lr if disc == "gd" else None)
    assert np.allclose(np.sort(pred)[::-1], sig, atol=1e-11)
    if disc == "gd":                     # and against I − Eᵀᵗ Eᵗ built by hand
        Et = torch.linalg.matrix_power(E, steps)
        dense = torch.eye(n, dtype=torch.float64) - Et.T @ Et
        assert np.allclose(torch.linalg.eigvalsh(dense).numpy()[::-1], sig, atol=1e-11)
    else:                                # 1 − exp(−2bμτ)
        assert np.allclose(np.sort(-np.expm1(-2 * b * mu * steps * lr))[::-1], sig, atol=1e-11)
    with pytest.raises(ConfigError):
        frozen_gramian_spectrum(mu, -1.0, 1.0)


def test_gap_timeline_matches_the_closed_form(linear_run):
    """Per stop: the measured gap equals the frozen prediction (linear model), the noise's
    dissipated fraction is 1 − ‖Eᵗ g_noise‖²/‖g_noise‖², its band shares match a dense
    eigen-decomposition, and −G_Q g_noise = lr Σ_k K_QS Eᵏ ε/n."""
    x, xt, y, yc, traj = linear_run
    n, lr = x.shape[0], 0.2
    _K, KQ, E = _closed_form(x, xt, 30, lr)
    eps = (y - yc).reshape(-1)
    tl = gap_timeline(traj, yc, [3, 5, -1], discretization="gd", band=(0.1, 0.9))
    assert list(tl.stops) == [3, 5, len(traj) - 1]
    assert list(tl.steps) == [9, 15, 30]
    g_noise = -eps / n                                    # ∇_u of the noise part
    for k, t in enumerate(tl.steps):
        Et = torch.linalg.matrix_power(E, int(t))
        A = torch.eye(n, dtype=torch.float64) - Et.T @ Et           # 2b W_S
        lam, V = torch.linalg.eigh(A)
        g = reservoir_gap(lam, saturation=1.0)
        for name in ("rank", "band_count"):
            assert getattr(tl.gaps[k], name) == getattr(g, name)
            assert getattr(tl.frozen_gaps[k], name) == getattr(g, name)
        assert tl.gaps[k].edge_channel == pytest.approx(g.edge_channel, rel=1e-9)
        assert tl.gaps[k].log_gap == pytest.approx(g.log_gap, rel=1e-8)
        assert tl.frozen_gaps[k].log_gap == pytest.approx(g.log_gap, rel=1e-8)
        assert np.allclose(tl.spectra[k], lam.numpy()[::-1], atol=1e-11)
        res = Et @ g_noise
        assert tl.noise_dissipated[k] == pytest.approx(
            1 - float(res @ res / (g_noise @ g_noise)), abs=1e-11)
        per = (V.T @ g_noise) ** 2
        want = band_fractions(lam, per, saturation=1.0)
        for part in ("below", "band", "above"):
            assert tl.noise_bands[k][part] == pytest.approx(want[part], abs=1e-10)
        disp = torch.zeros(xt.shape[0], dtype=torch.float64)
        gk = g_noise.clone()
        for _ in range(int(t)):
            disp -= lr * KQ @ gk
            gk = E @ gk
        assert np.allclose(tl.noise_displacement[k][:, 0], disp.numpy(), atol=1e-11)


def test_gap_timeline_refuses_bad_input(linear_run):
    x, _xt, y, yc, traj = linear_run
    S = len(traj)
    with pytest.raises(ConfigError, match="outside"):
        gap_timeline(traj, yc, [S + 3])
    with pytest.raises(ConfigError, match="after start"):
        gap_timeline(traj, yc, [2], start=2)
    with pytest.raises(ConfigError, match="start"):
        gap_timeline(traj, yc, [-1], start=S - 1)
    torch.manual_seed(0)
    net = torch.nn.Linear(x.shape[1], 1).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    rec = KernelRecorder(net, x, y, loss="squared", optimizer=opt, schedule=every(2),
                         verbose=False)
    train_network(net, x, y, torch.zeros(x.shape[0], dtype=torch.long), opt, 4)
    rec.close()
    with pytest.raises(ConfigError, match="test/probe"):
        gap_timeline(rec.trajectory(), yc, [-1])


# -- the stochastic-Lanczos band occupancy ---------------------------------------------------
def _psd(N, seed):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, -4, N, dtype=torch.float64)        # a soft, power-law spectrum
    return (Q * lam) @ Q.T, lam


def test_slq_band_fraction_against_dense():
    """Exact for the dense density; with full Lanczos each probe's quadrature is its spectral
    measure (checked against the same Rademacher probes by hand); with many short probes the
    estimate is within its sampling error of the true share."""
    N, sat, band = 60, 2.0, (0.001, 0.05)
    W, lam = _psd(N, 0)
    true = float(((lam >= band[0]) & (lam <= band[1])).double().mean())
    assert slq_band_fraction(dense_density(W), saturation=1.0, band=band) == pytest.approx(
        true, abs=1e-14)
    assert slq_band_fraction(dense_density(sat * W), saturation=sat, band=band) == \
        pytest.approx(true, abs=1e-14)
    probes = 8
    d = slq_density(lambda V: W @ V, N, probes=probes, steps=N, seed=5)
    gen = torch.Generator(device="cpu").manual_seed(5)
    V = (torch.randint(0, 2, (N, probes), generator=gen) * 2 - 1).to(torch.float64) / N ** 0.5
    ev, Q = torch.linalg.eigh(W)
    inside = (ev >= band[0]) & (ev <= band[1])
    by_hand = float(((Q.T @ V) ** 2)[inside].sum(0).mean())
    assert slq_band_fraction(d, saturation=1.0, band=band) == pytest.approx(by_hand, abs=1e-8)
    big = slq_density(lambda V: W @ V, N, probes=400, steps=25, seed=1)
    est = slq_band_fraction(big, saturation=1.0, band=band)
    assert abs(est - true) < 0.05, (est, true)


def test_gap_timeline_frozen_form_follows_the_discretization(linear_run):
    """With the 'exp' (flow) operators the frozen prediction is the flow form, so for a linear
    model it equals the measured gap; the GD form would differ at this step size."""
    x, _xt, _y, yc, traj = linear_run
    tl = gap_timeline(traj, yc, [4, -1], discretization="exp")
    b, mu = 1 / x.shape[0], torch.linalg.eigvalsh(traj.kernel(0)).numpy()
    for k, t in enumerate(tl.times):
        assert tl.frozen_gaps[k].edge_channel == pytest.approx(tl.gaps[k].edge_channel,
                                                               rel=1e-9)
        assert tl.frozen_gaps[k].log_gap == pytest.approx(tl.gaps[k].log_gap, rel=1e-8)
        gd = reservoir_gap(frozen_gramian_spectrum(mu, b, float(t), lr=0.2), saturation=1.0)
        assert abs(gd.edge_channel - tl.gaps[k].edge_channel) > 1e-4


def test_gap_timeline_slq_band_estimate(linear_run):
    """The SLQ band occupancy along the run is NaN unless asked for, and with many probes and
    full Lanczos it is within sampling error of the exact occupancy."""
    _x, _xt, _y, yc, traj = linear_run
    band = (0.05, 0.95)
    plain = gap_timeline(traj, yc, [2, -1], band=band)
    assert np.isnan(plain.slq_band).all()
    tl = gap_timeline(traj, yc, [2, -1], band=band, slq_probes=300, slq_steps=traj.N)
    exact = np.array([g.band_fraction for g in tl.gaps])
    assert exact.max() > 0
    assert np.abs(tl.slq_band - exact).max() < 0.08, (tl.slq_band, exact)
