"""The demo's math against brute-force twins, its control validation, and the headless run."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import tangentscope.app.model as demo
from tangentscope import ConfigError, NonFiniteError
from tangentscope.app.headless import run_headless
from tangentscope.app.model import (
    ControlError,
    DemoConfig,
    DemoTrainer,
    available_optimizers,
    channel_threshold,
    flow_time_increment,
    reservoir_share,
    validate_config,
)
from tangentscope.cli import main
from zoo import brute_force_entk

SMALL = dict(n=12, width=16, depth=2, max_steps=40, steps_per_update=10)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Small models: one intra-op thread is much faster on a shared machine; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _clusters(lam: np.ndarray, tol: float) -> list[np.ndarray]:
    """Index groups of (numerically) equal eigenvalues, descending order."""
    groups, cur = [], [0]
    for i in range(1, len(lam)):
        if lam[i - 1] - lam[i] <= tol:
            cur.append(i)
        else:
            groups.append(np.array(cur))
            cur = [i]
    groups.append(np.array(cur))
    return groups


@pytest.mark.parametrize("steps", [0, 25])
def test_snapshot_matches_brute_force_spectrum_and_energies(steps):
    tr = DemoTrainer(DemoConfig(**SMALL))
    tr.train(steps)
    snap = tr.snapshot()
    K = brute_force_entk(tr.model, tr.data.x)[:, :, 0, 0].numpy()
    with torch.no_grad():
        r = (tr.model(tr.data.x) - tr.data.y).reshape(-1).numpy()
    lam, V = np.linalg.eigh(K)
    lam, V = lam[::-1], V[:, ::-1]
    energies = (V.T @ r) ** 2
    tol = 1e-9 * lam[0]
    np.testing.assert_allclose(snap.eigenvalues, lam, rtol=0, atol=tol)
    # eigenvectors of (near-)degenerate eigenvalues are not unique: compare energy per cluster
    for g in _clusters(lam, tol):
        np.testing.assert_allclose(snap.energies[g].sum(), energies[g].sum(), rtol=1e-8,
                                   atol=1e-12 * energies.sum())
    eps = tr.data.noise.reshape(-1).numpy()
    noise = (V.T @ eps) ** 2
    for g in _clusters(lam, tol):
        np.testing.assert_allclose(snap.noise_energies[g].sum(), noise[g].sum(), rtol=1e-8,
                                   atol=1e-12 * noise.sum())
    assert snap.energies.sum() == pytest.approx(r @ r, rel=1e-10)  # Parseval: Σ E_i = ‖r‖²
    assert snap.threshold == channel_threshold(tr.t_eff, tr.cfg.n)
    res = lam <= snap.threshold
    assert snap.reservoir_fraction == pytest.approx(energies[res].sum() / energies.sum(),
                                                    rel=1e-8)
    assert snap.train_loss == pytest.approx(r @ r / (2 * tr.cfg.n), rel=1e-12)
    assert snap.step == steps and snap.fit.shape == (tr.cfg.n_test,)


def test_kernel_clock_uses_the_exact_K_g():
    """The per-step K g (one jvp with the parameter gradient) equals brute-force K_SS @ g."""
    tr = DemoTrainer(DemoConfig(**SMALL))
    tr.train(3)
    before = copy.deepcopy(tr.model)
    K = brute_force_entk(before, tr.data.x)[:, :, 0, 0]
    with torch.no_grad():
        g = (before(tr.data.x) - tr.data.y).reshape(-1) / tr.cfg.n
    tr.train(1)
    torch.testing.assert_close(tr._last[1].reshape(-1), K @ g, rtol=1e-10, atol=1e-12)


def test_flow_time_of_a_gradient_step_on_a_linear_model_is_the_learning_rate():
    torch.manual_seed(1)
    feats = torch.randn(10, 6, dtype=torch.float64)
    model = nn.Linear(6, 1, bias=False).double()
    y = torch.randn(10, 1, dtype=torch.float64)
    lr = 0.037
    u0 = model(feats)
    loss = 0.5 * ((u0 - y) ** 2).sum() / 10
    loss.backward()
    K = feats @ feats.T  # the eNTK of a linear model
    g = (u0 - y).detach().reshape(-1) / 10
    with torch.no_grad():
        model.weight -= lr * model.weight.grad
        u1 = model(feats)
    assert flow_time_increment(u0.detach(), u1, K @ g) == pytest.approx(lr, rel=1e-12)
    assert flow_time_increment(u0.detach(), u1, torch.zeros(10)) == 0.0


def test_trainer_clock_for_gradient_descent_is_the_sum_of_learning_rates():
    lr = 0.01
    tr = DemoTrainer(DemoConfig(**{**SMALL, "optimizer": "sgd", "lr": lr}))
    tr.train(51)  # the clock counts the steps whose effect it has seen: 50
    assert tr.t_eff == pytest.approx(50 * lr, rel=0.02)


def test_divergence_is_detected_early_with_the_fix_in_the_message():
    tr = DemoTrainer(DemoConfig(**{**SMALL, "optimizer": "sgd", "lr": 10.0}))
    with pytest.raises(NonFiniteError, match="lower the learning rate"):
        tr.train(100)
    assert tr.step < 20  # caught when the loss grew 1e8-fold, not ~100 steps later at Inf


def test_channel_threshold_and_reservoir_share():
    assert channel_threshold(0.0, 64) == math.inf
    assert channel_threshold(32.0, 64) == 2.0
    lam = np.array([9.0, 3.0, 1.0, 0.1])
    E = np.array([1.0, 1.0, 2.0, 4.0])
    assert reservoir_share(lam, E, 2.0) == pytest.approx(6 / 8)
    assert reservoir_share(lam, E, 3.0) == pytest.approx(7 / 8)  # λ = λ* is not yet learned
    assert reservoir_share(lam, E, math.inf) == 1.0
    assert reservoir_share(lam, E, 0.01) == 0.0
    assert math.isnan(reservoir_share(lam, np.zeros(4), 2.0))


def test_validate_config_accepts_good_values_and_numeric_strings():
    cfg = validate_config({"noise": "0.5", "n": 32.0, "width": 8, "lr": 1e-2, "seed": "3"})
    assert (cfg.noise, cfg.n, cfg.width, cfg.lr, cfg.seed) == (0.5, 32, 8, 0.01, 3)
    assert isinstance(cfg.n, int) and validate_config({}) == DemoConfig()


@pytest.mark.parametrize("field, value, words", [
    ("noise", -0.1, "0 ≤ value ≤ 5"),
    ("width", 0, "1 ≤ value ≤ 2048"),
    ("lr", 0, "0 < value ≤ 10"),
    ("lr", 1e6, "0 < value ≤ 10"),
    ("lr", "abc", "a number"),
    ("n", 2.5, "an integer"),
    ("n", 1, "2 ≤ value ≤ 512"),
    ("depth", 7, "1 ≤ value ≤ 6"),
    ("seed", True, "an integer"),
    ("noise", float("nan"), "a number"),
    ("noise", "inf", "a number"),
    ("width", None, "an integer"),
    ("width", [4], "an integer"),
    ("optimizer", "adam", "one of 'adamw'"),
    ("bogus", 1, "unknown control"),
])
def test_validate_config_rejects_bad_values_naming_field_and_range(field, value, words):
    with pytest.raises(ControlError) as e:
        validate_config({field: value})
    assert e.value.field == field
    assert words in str(e.value) and field in str(e.value)


def test_run_headless_writes_summary_figures_and_metrics(tmp_path):
    out = tmp_path / "demo"
    s = run_headless(out, show_progress=False, **SMALL)
    assert s["run_dir"] == str(out)
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("final_train_loss", "final_test_loss", "eigenvalues_before", "eigenvalues_after",
                "reservoir_fraction_before", "reservoir_fraction_after", "channel_threshold",
                "timings", "t_eff"):
        assert key in on_disk, key
    assert on_disk["steps"] == SMALL["max_steps"]
    assert on_disk["channel_threshold"] == pytest.approx(SMALL["n"] / on_disk["t_eff"])
    for when in ("before", "after"):
        lam = np.array(on_disk[f"eigenvalues_{when}"])
        assert lam.shape == (SMALL["n"],) and np.all(np.diff(lam) <= 0)
        assert 0.0 <= on_disk[f"reservoir_fraction_{when}"] <= 1.0
    n = SMALL["n"]
    assert sum(on_disk["energies_after"]) == pytest.approx(2 * n * on_disk["final_train_loss"],
                                                           rel=1e-9)
    assert on_disk["final_train_loss"] < on_disk["initial_train_loss"]
    for f in ("fit", "spectrum", "losses"):
        assert (out / "figures" / f"{f}.png").stat().st_size > 5000
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 1 + SMALL["max_steps"] // SMALL["steps_per_update"]
    assert json.loads((out / "status.json").read_text())["status"] == "complete"
    with pytest.raises(ConfigError, match="already holds a run"):
        run_headless(out, show_progress=False, **SMALL)


def test_run_headless_rejects_bad_config_before_any_work(tmp_path):
    with pytest.raises(ControlError, match="width"):
        run_headless(tmp_path / "x", width=0)
    assert not (tmp_path / "x").exists()


def test_cli_demo_headless_runs_the_default_recipe(tmp_path, monkeypatch, capsys):
    # the CLI passes no overrides: shrink the defaults so the wiring test stays fast
    monkeypatch.setattr(demo, "DemoConfig", functools.partial(DemoConfig, **SMALL))
    assert main(["demo", "--headless", "--out", str(tmp_path / "d")]) == 0
    printed = capsys.readouterr().out
    assert "summary.json" in printed and "reservoir" in printed
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())["config"]
    assert cfg == dataclasses.asdict(DemoConfig(**SMALL))


def test_gated_adamw_trains_when_available(tmp_path):
    if "gated-streaming" not in available_optimizers():
        pytest.skip("tangentscope.optim.GatedAdamW is not available in this checkout")
    s = run_headless(tmp_path / "g", show_progress=False, optimizer="gated-streaming", **SMALL)
    assert s["final_train_loss"] < s["initial_train_loss"]
