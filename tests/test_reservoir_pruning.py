"""The reservoir-pruning experiment: smoke run end to end, its summary and figures, resume, and
the config checks."""

from __future__ import annotations

import json

import pytest

from tangentscope import ConfigError
from tangentscope.experiments import get_experiment, run_experiment
from tangentscope.experiments._framework import make_config
from tangentscope.experiments.reservoir_pruning import SALIENCIES, Config


def test_smoke_run_end_to_end(tmp_path):
    rd = run_experiment("reservoir-pruning", preset="smoke", out=tmp_path / "r", quiet=True)
    s = rd.read_summary()
    cell = rd.cells()["seed0"]
    cfg = get_experiment("reservoir-pruning").presets["smoke"]
    # every saliency × structure × level × fine-tuning, plus the two dense rows
    n_levels = len(cfg["sparsities"]) + len(cfg["neuron_fractions"])
    assert len(cell["rows"]) == 2 + 2 * len(SALIENCIES) * n_levels
    # the channel scores add up to the traces they split (quadrature error only)
    assert 0 < cell["channel_rank"] < cell["N"] == 10 * 40
    assert cell["channel_score_quadrature_rel_error"] < 1e-3
    assert cell["dissipation_score_total_rel_error"] < 1e-3
    # masks hit the levels: unstructured sparsity exact, neuron rows remove whole units
    for r in cell["rows"]:
        if r["structure"] == "unstructured":
            assert r["sparsity"] == pytest.approx(r["level"], abs=1e-3)
        if r["structure"] == "neurons":
            assert r["params_kept"] < cell["num_params"]
        assert 0.0 <= r["test_acc"] <= 1.0
    dense = s["dense_test_acc"]["noft"]["median"]
    assert dense > 0.5                                       # the smoke net learned something
    # random pruning at 90% unstructured is the floor: well below the dense network
    rnd = next(r for r in s["table"] if r["curve"] == "unstructured/random/noft"
               and r["level"] == 0.9)
    assert rnd["test_acc"]["median"] < dense - 0.2
    assert {c["structure"] for c in s["comparisons"]} == {"unstructured", "neurons"}
    assert "beats" in s["verdict"] and (rd.path / "verdict.txt").exists()
    assert "| magnitude |" in (rd.path / "table.md").read_text()
    figs = sorted(p.name for p in (rd.path / "figures").glob("*.png"))
    assert figs == ["reservoir_pruning_accuracy.png", "reservoir_pruning_scores.png"]
    # resume of a finished run recomputes nothing and gives the same summary
    again = run_experiment(None, resume=rd.path, quiet=True, plot=False).read_summary()
    assert json.dumps(again["table"]) == json.dumps(s["table"])


@pytest.mark.parametrize("bad", [dict(saliencies=("channel", "nope")), dict(snapshots=1),
                                 dict(sparsities=(0.5, 1.0)), dict(finetune_steps=-1),
                                 dict(threshold=1.5), dict(ratio=1.0), dict(probes=-1)])
def test_config_refuses_bad_values_before_running(bad):
    with pytest.raises(ConfigError):
        make_config(Config, bad)
