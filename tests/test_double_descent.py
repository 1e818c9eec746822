"""Double descent: random features against the pseudo-inverse, the training loop against a
hand-written GD step, the landmark logic, and the experiment end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tangentscope import ConfigError, entk
from tangentscope.dynamics.label_noise import classification_error
from tangentscope.experiments import run_experiment
from tangentscope.experiments._harness import optimizer_spec, train_network
from tangentscope.experiments.double_descent import Config, _landmarks, summarize
from tangentscope.models import random_features
from tangentscope.optim.spec import build_optimizer


def test_random_features_kernel_is_the_feature_gram():
    net = random_features(5, 30, 2, seed=1, dtype=torch.float64)
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["3.weight"]
    x = torch.randn(7, 5, dtype=torch.float64)
    phi = net[1](net[0](x)) / 30 ** 0.5
    K = entk(net, x)
    assert torch.allclose(K[:, :, 0, 0], phi @ phi.T, atol=1e-12)
    assert torch.allclose(K[:, :, 0, 1], torch.zeros(7, 7, dtype=torch.float64), atol=1e-14)
    with pytest.raises(ConfigError, match="activation"):
        random_features(5, 3, 1, activation="sin")


@pytest.mark.parametrize("width", [5, 40])
def test_gd_on_random_features_converges_to_the_min_norm_fit(width):
    """Below the threshold GD converges to least squares, above it to the min-norm
    interpolant: both are ``Φ⁺ y`` (pseudo-inverse). Condition numbers here are < 120, so
    3,000 steps of size n/λ_max leave < e^{-25} of any mode."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 20, generator=g, dtype=torch.float64)
    y = torch.randn(10, 1, generator=g, dtype=torch.float64)
    net = random_features(20, width, 1, seed=2, dtype=torch.float64)
    phi = (net[1](net[0](x)) / width ** 0.5).detach()
    lam_max = float(torch.linalg.eigvalsh(phi @ phi.T)[-1])
    opt = build_optimizer("sgd", net, lr=10 / lam_max).optimizer
    train_network(net, x, y, (y[:, 0] > 0).long(), opt, 3000)
    w_ref = torch.linalg.pinv(phi) @ y
    assert torch.allclose(net[3].weight.detach().T, w_ref, atol=1e-6)


@pytest.mark.parametrize("batch_size", [None, 4])
def test_one_training_step_is_the_hand_written_gd_step(batch_size):
    """Φ_b = Σ‖u − y‖²/(2|b|): one step changes w by −η Jᵀ(u − y)/|b|."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randn(10, 2, dtype=torch.float64)
    W0, b0 = net.weight.detach().clone(), net.bias.detach().clone()
    train_network(net, x, y, torch.zeros(10, dtype=torch.int64),
                  build_optimizer("sgd", net, lr=0.1), 1, batch_size=batch_size, seed=5)
    if batch_size is None:
        idx = torch.arange(10)
    else:
        idx = torch.randperm(10, generator=torch.Generator().manual_seed(5))[:batch_size]
    r = (x[idx] @ W0.T + b0 - y[idx]) / len(idx)
    assert torch.allclose(net.weight.detach(), W0 - 0.1 * r.T @ x[idx], atol=1e-14)
    assert torch.allclose(net.bias.detach(), b0 - 0.1 * r.sum(0), atol=1e-14)


def test_optimizers_and_errors():
    net = torch.nn.Linear(3, 1)
    from tangentscope.optim import GatedAdamW

    assert isinstance(build_optimizer(optimizer_spec("gated"), net, lr=1e-3).optimizer, GatedAdamW)
    assert isinstance(build_optimizer(optimizer_spec("adam"), net, lr=1e-3).optimizer,
                      torch.optim.Adam)
    with pytest.raises(ConfigError, match="one of"):
        optimizer_spec("lbfgs")
    with pytest.raises(ConfigError, match="positive"):
        build_optimizer(optimizer_spec("gd"), net, lr=0.0)
    assert classification_error(torch.tensor([[1.0], [-2.0]]), torch.tensor([1, 1])) == 0.5
    assert classification_error(torch.tensor([[0.1, 0.9], [2.0, 1.0]]),
                                torch.tensor([1, 0])) == 0.0
    with pytest.raises(ConfigError, match="unknown optimizer"):
        Config(optimizers=("sgdm",))
    with pytest.raises(ConfigError, match="operators false"):
        Config(loss="cross_entropy", n_train=50)


def test_landmarks_find_threshold_peak_and_noise_peak():
    def row(w, te, tr, noise):
        return {"width": w, "test_error": {"median": te}, "train_error": {"median": tr},
                "noise_test_rms": {"median": noise}}

    rows = [row(2, 0.20, 0.30, 0.1), row(4, 0.18, 0.10, 0.3), row(8, 0.35, 0.0, 2.0),
            row(16, 0.25, 0.0, 1.0), row(64, 0.17, 0.0, 0.5)]
    lm = _landmarks(rows)
    assert lm["threshold_width"] == 8 and lm["peak_width"] == 8
    assert lm["first_min_test_error"] == pytest.approx(0.18)
    assert lm["peak_height"] == pytest.approx(0.17)
    assert lm["noise_test_rms_peak_width"] == 8
    assert lm["noise_test_rms_drop_after_peak"] == pytest.approx(0.75)
    # a measure that saturates (1, 1, 1 past the threshold) has no drop: not a peak
    plateau = [dict(r, noise_channel_fraction={"median": f})
               for r, f in zip(rows, (0.5, 0.9, 1.0, 1.0, 1.0))]
    lm = _landmarks(plateau)
    assert lm["noise_channel_fraction_peak_width"] == 8
    assert lm["noise_channel_fraction_drop_after_peak"] == 0.0
    # ranks of test error (2,1,4,3,0) vs noise (0,1,4,3,2): Σd² = 8, ρ = 1 − 6·8/(5·24)
    assert lm["noise_test_rms_spearman_vs_test_error"] == pytest.approx(0.6)


def test_double_descent_smoke_run_and_resume(tmp_path, monkeypatch):
    rd = run_experiment("double-descent", preset="smoke", out=tmp_path / "dd", quiet=True)
    s = rd.read_summary()
    assert set(s["curves"]) == {"adam", "gated"}
    adam = s["curves"]["adam"]
    assert [r["width"] for r in adam] == [2, 8, 64]
    assert all("noise_dissipated" in r and "test_error" in r for r in adam)
    assert all("noise_dissipated" not in r for r in s["curves"]["gated"])  # operators: adam only
    assert "peak_width" in s["landmarks"]["adam"]
    arrays = rd.load_arrays()
    for key, res in rd.cells().items():  # the full test set, never the probe's error
        assert res["test_error"] == pytest.approx(arrays[f"{key}/curve_test_error"][-1])
    assert any(abs(r["probe_test_error"] - r["test_error"]) > 0 for r in rd.cells().values()
               if "probe_test_error" in r)
    for f in ("dd_curve", "dd_noise"):
        assert (rd.path / "figures" / f"{f}.png").stat().st_size > 1000
    import tangentscope.experiments.double_descent as dd

    monkeypatch.setattr(dd, "_cell", lambda *a, **k: pytest.fail("recomputed a cell"))
    run_experiment(None, resume=rd.path, quiet=True, plot=False)
    cfg = Config(**{**rd.read_config()["config"], "widths": (2, 8, 64),
                    "optimizers": ("adam", "gated")})
    again = summarize(cfg, rd.cells())
    assert again["landmarks"]["adam"]["peak_width"] == s["landmarks"]["adam"]["peak_width"]
    assert again["curves"]["gated"][0]["test_error"] == s["curves"]["gated"][0]["test_error"]


def test_min_norm_fields_for_random_features(tmp_path):
    rd = run_experiment("double-descent", preset="smoke", out=tmp_path / "rf", quiet=True,
                        plot=False, overrides={"model": "random_features",
                                               "optimizers": ("gd",), "widths": (20, 60, 200),
                                               "operator_optimizers": ("gd",),
                                               "min_norm": True, "steps": 50})
    rows = rd.read_summary()["curves"]["gd"]
    frac = [r["minnorm_noise_channel_fraction"]["median"] for r in rows]
    # below the threshold (N < n = 60) the range of K is a proper subspace; at N >= n it is all
    assert frac[0] < 0.9 and frac[1] == pytest.approx(1.0) and frac[2] == pytest.approx(1.0)
    assert np.isfinite(rows[1]["minnorm_noise_test_rms"]["median"])
