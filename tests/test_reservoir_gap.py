"""The reservoir-gap experiment: its rank statistics against scipy and by hand, and the smoke
preset end to end (records, figures, resume)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from tangentscope import ConfigError
from tangentscope.dynamics.reservoir import reservoir_gap
from tangentscope.experiments import run_experiment
from tangentscope.experiments._gap_cell import stop_steps
from tangentscope.experiments._gap_stats import correlation_table, spearman, spearman_interval
from tangentscope.experiments.reservoir_gap import Config


def test_spearman_against_scipy():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, 40).astype(float)            # many ties
    b = a + rng.normal(0, 2, 40)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    a2, b2 = a.copy(), b.copy()
    a2[3], b2[7] = np.nan, np.nan                       # NaN pairs are dropped
    keep = ~np.isnan(a2) & ~np.isnan(b2)
    assert spearman(a2, b2) == pytest.approx(stats.spearmanr(a2[keep], b2[keep]).statistic,
                                             abs=1e-12)
    x = np.array([0.1, 0.5, np.inf, 0.3])               # inf ranks above every finite value
    assert spearman(x, [1.0, 3.0, 4.0, 2.0]) == pytest.approx(1.0)
    assert np.isnan(spearman([1.0, 2.0], [2.0, 1.0]))
    assert np.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


def test_spearman_interval_resamples_whole_clusters():
    """Monotone within and across clusters: ρ = 1 in every resample; a noisy relation: the
    interval brackets ρ; fewer than three clusters: no interval."""
    x = np.arange(12.0)
    r = spearman_interval(x, 2 * x, np.repeat(np.arange(4), 3), resamples=200)
    assert (r["rho"], r["lo"], r["hi"], r["points"]) == (1.0, 1.0, 1.0, 12)
    rng = np.random.default_rng(1)
    y = x + rng.normal(0, 4, 12)
    r = spearman_interval(x, y, np.repeat(np.arange(6), 2), resamples=300, seed=2)
    assert r["lo"] <= r["rho"] <= r["hi"] and r["hi"] - r["lo"] > 0.05
    r = spearman_interval(x, y, np.repeat(np.arange(2), 6))
    assert np.isnan(r["lo"]) and np.isfinite(r["rho"])


def test_correlation_table_slices():
    """A predictor that tracks the test cost over training but is unrelated to it across runs
    shows up as ρ = 1 in the 'time' slice and ρ ≈ 0 at a fixed training length."""
    rows, rng = [], np.random.default_rng(3)
    for w in (4, 8, 16):
        for s in (0, 1, 2):
            offset = rng.normal()
            for step in (10, 100, 1000):
                rows.append({"width": w, "depth": 1, "seed": s, "step": step,
                             "clock": float(step), "cost": np.log(step) + 0.1 * offset,
                             "rand": rng.normal()})
    t = correlation_table(rows, ["clock", "rand"], ["cost"], resamples=100)["cost"]
    assert t["clock"]["time"]["median"] == pytest.approx(1.0)
    assert t["clock"]["time"]["n"] == 9
    assert np.isnan(t["clock"]["fixed_time"]["median"])      # constant at a fixed step
    assert t["clock"]["pooled"]["rho"] > 0.9
    # per seed at the last step: 3 widths, the cost ordered by the offsets alone
    assert t["rand"]["architecture"]["n"] == 3


def test_stop_steps():
    assert stop_steps(1000, 4, 3.0) == [1, 10, 100, 1000]
    assert stop_steps(10, 5, 3.0)[-1] == 10 and len(set(stop_steps(10, 5, 3.0))) <= 5
    with pytest.raises(ConfigError, match="band"):
        Config(band_lo=0.9, band_hi=0.1)
    with pytest.raises(ConfigError, match="label_noise"):
        Config(label_noise=0.6)
    with pytest.raises(ConfigError, match="widths"):
        Config(widths=())


def test_reservoir_gap_smoke_run_plot_and_resume(tmp_path, monkeypatch):
    rd = run_experiment("reservoir-gap", preset="smoke", out=tmp_path / "g", quiet=True)
    s = rd.read_summary()
    keys = [json.loads(line)["key"] for line in (rd.path / "cells.jsonl").read_text()
            .splitlines()]
    assert keys == ["d1/h16/seed0", "d1/h16/seed1", "d1/h32/seed0", "d1/h32/seed1"]
    arrays = rd.load_arrays()
    for key, cell in rd.cells().items():
        assert cell["dissipation_error"] < 0.1            # the operators are trustworthy here
        spectra = arrays[f"{key}/spectra"]
        assert list(arrays[f"{key}/steps"]) == [r["step"] for r in cell["stops"]]
        assert spectra.min() > -1e-8 and spectra.max() < 1 + 1e-6   # 2bW_S ∈ [0, 1]
        for sp, r in zip(spectra, cell["stops"]):         # the record is the spectrum's gap
            g = reservoir_gap(sp, saturation=1.0)
            assert (g.rank, g.band_fraction) == (r["channel_rank"], r["band_fraction"])
            assert r["excess_test_mse"] == pytest.approx(
                r["test_mse"] - r["test_mse_clean_trained"], abs=1e-12)
            assert abs(r["noise_band_share"] + r["noise_reservoir_share"]
                       + r["noise_channel_share"] - 1) < 1e-9
            assert 0 <= r["noise_dissipated"] <= 1 + 1e-6
            assert abs(r["slq_band_fraction"] - r["band_fraction"]) < 0.5
    assert s["points"] == 12 and s["cells"] == 4
    corr = s["correlations"]
    assert set(corr) == {"noise_test_rms", "actual_noise_test_rms", "excess_test_mse",
                         "excess_test_error"}
    assert np.isfinite(corr["noise_test_rms"]["time"]["pooled"]["rho"])
    assert "gap" in s["verdict"] and (rd.path / "verdict.txt").read_text().strip() == \
        s["verdict"].strip()
    assert "| depth | width |" in (rd.path / "table.md").read_text()
    for f in ("spectra", "scaling", "predict", "correlations"):
        assert (rd.path / "figures" / f"reservoir_gap_{f}.png").stat().st_size > 1000
    import tangentscope.experiments.reservoir_gap as rg

    monkeypatch.setattr(rg, "gap_cell", lambda *a, **k: pytest.fail("recomputed a cell"))
    run_experiment(None, resume=rd.path, quiet=True, plot=False)
    again = rd.read_summary()              # summarized from the saved cells: the same numbers
    for k in ("table", "correlations", "verdict", "calls"):
        assert again[k] == s[k], k
