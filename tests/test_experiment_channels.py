"""The `channels` and `identities` experiments: smoke presets end to end through the CLI, replot
without retraining, crash + resume reproducing the uninterrupted run."""

from __future__ import annotations

import json
import math

import pytest

from tangentscope import RunDir
from tangentscope.cli import main
from tangentscope.experiments import channels as channels_exp
from tangentscope.experiments import plot_run, run_experiment

FIGURES = {"fit", "identities", "spectra", "residual_energy", "channel_energy", "rotation",
           "visibility", "schedule"}


@pytest.fixture(scope="module")
def channels_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("channels") / "run"
    assert main(["run", "channels", "--preset", "smoke", "--out", str(out)]) == 0
    return out


def test_channels_smoke_writes_a_self_describing_run(channels_run):
    rd = RunDir.open(channels_run)
    s = rd.read_summary()
    assert rd.status == "complete"
    assert {p.stem for p in (channels_run / "figures").glob("*.png")} == FIGURES
    assert (channels_run / "trajectory" / "index.jsonl").exists()
    assert s["snapshots"] == 27 and s["N"] == 16
    # smooth full-batch GD with 27 log-spaced snapshots: the identities hold to a few 1e-3
    assert s["dissipation_error"] < 2e-2 and s["displacement_error"] < 2e-2
    # Cauchy–Schwarz: test visibility never exceeds √(λ_j ∫‖K_QQ‖)
    assert s["visibility_max_bound_ratio"] <= 1 + 1e-6
    for k in ("noise_reservoir_fraction", "clean_reservoir_fraction", "noise_fitted"):
        assert 0 <= s[k] <= 1 + 1e-9
    assert len(s["windows"]) == 3 and all(w["rank"] >= 1 for w in s["windows"])
    assert s["noise_test_rms"] > 0 and math.isfinite(s["noise_test_mse"])
    rows = rd.read_metrics()
    assert len(rows) == 26 and {"dissipation_error", "displacement_error"} <= set(rows[0])
    assert "reservoir" in (channels_run / "verdict.txt").read_text()


def test_channels_replots_and_resumes_without_retraining(channels_run, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("retrained")

    monkeypatch.setattr(channels_exp, "_record", boom)
    for f in (channels_run / "figures").glob("*.png"):
        f.unlink()
    assert {p.stem for p in plot_run(channels_run)} == FIGURES
    before = RunDir.open(channels_run).read_summary()
    rd = run_experiment("channels", resume=channels_run, quiet=True, plot=False)
    after = rd.read_summary()
    assert after["dissipation_error"] == before["dissipation_error"]


def test_channels_crash_and_resume_reproduce_the_uninterrupted_run(channels_run, tmp_path,
                                                                  monkeypatch):
    real = channels_exp.train_recorded

    def interrupted(*args, **kw):
        def stop(step):
            if step == 150:
                raise KeyboardInterrupt
        return real(*args, **{**kw, "on_step": stop})

    monkeypatch.setattr(channels_exp, "train_recorded", interrupted)
    out = tmp_path / "crash"
    with pytest.raises(KeyboardInterrupt):
        run_experiment("channels", preset="smoke", out=out, quiet=True)
    assert RunDir.open(out).status == "interrupted"
    monkeypatch.setattr(channels_exp, "train_recorded", real)
    rd = run_experiment("channels", resume=out, quiet=True, plot=False)
    a, b = rd.read_summary(), RunDir.open(channels_run).read_summary()
    for k in ("dissipation_error", "displacement_error", "final_train_loss", "noise_test_rms"):
        assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-15)


def test_identities_smoke_table_and_convergence(tmp_path):
    out = tmp_path / "ident"
    rd = run_experiment("identities", preset="smoke", out=out, quiet=True)
    table = (out / "table.md").read_text()
    assert "| gd | tanh | 0.1 | 10 |" in table and "adam[adam]" in table
    cells = [r for c in rd.cells().values() for r in c["rows"]]
    assert {r["optimizer"] for r in cells} == {"gd", "sgd", "adam[adam]", "adam[adam_state]"}

    def err(lr, disc="midpoint", k=1):
        (r,) = [r for r in cells if r["optimizer"] == "gd" and r["lr"] == lr
                and r["discretization"] == disc and r["spacing"] == k]
        return r["dissipation_error"], r["displacement_error"]

    # full-batch GD: both identity errors shrink as the learning rate shrinks
    for disc in ("midpoint", "gd"):
        assert err(0.05, disc)[0] < 0.7 * err(0.1, disc)[0]
        assert err(0.05, disc)[1] < 0.7 * err(0.1, disc)[1]
    assert json.loads((out / "summary.json").read_text())["rows"] == len(cells)
