"""The grokking experiments: stacked seeds equal separate runs, checkpoints resume exactly,
the summary's censoring, config errors, and both smoke presets end to end (CI)."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch

from tangentscope import ConfigError, RunDir
from tangentscope.errors import RecoveredFileWarning
from tangentscope.experiments import grokking as G
from tangentscope.experiments import grokking_theory as GT
from tangentscope.experiments import plot_run, run_experiment
from tangentscope.experiments._harness import censored_ratio, censored_stats

TINY = dataclasses.replace(G.SETTINGS["tiny"], max_steps=60, eval_every=20)


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _losses(res: G.GroupResult) -> dict[tuple[int, int], float]:
    return {(r["seed"], r["step"]): r["train_loss"] for r in res.rows}


@pytest.mark.parametrize("optimizer", ["adamw", "gated", "gated-streaming@gate_on=grad",
                                       "gated-grad+grokfast"])
def test_stacked_seeds_equal_separate_runs(optimizer, float64):
    job = G.GroupJob("tiny", TINY, optimizer, (0, 1), log_every=20)
    both = _losses(G.train_group(job))
    apart = {**_losses(G.train_group(dataclasses.replace(job, seeds=(0,)))),
             **_losses(G.train_group(dataclasses.replace(job, seeds=(1,))))}
    assert both.keys() == apart.keys() and len(both) == 6
    for k in both:
        assert both[k] == pytest.approx(apart[k], rel=1e-9, abs=1e-9), k


def test_checkpoint_resume_continues_exactly(tmp_path, float64):
    job = G.GroupJob("tiny", TINY, "gated-grad+grokfast", (0, 1), log_every=20)
    full = G.train_group(job)
    ck = str(tmp_path / "state.pt")
    half = dataclasses.replace(job, setting=dataclasses.replace(TINY, max_steps=40),
                               checkpoint=ck, checkpoint_seconds=0.0)
    G.train_group(half)  # stops at step 40 leaving its checkpoint
    resumed = G.train_group(dataclasses.replace(job, checkpoint=ck))
    assert _losses(resumed) == pytest.approx(_losses(full), rel=1e-12)
    assert resumed.cells[0]["steps_run"] == 60


def test_summary_censors_seeds_that_never_reach_the_target():
    st = censored_stats([100, None, 300], cap=1000)
    assert st["median"] == 300 and st["reached"] == 2 and st["max"] is None
    never = censored_stats([None, None, 5], cap=10)
    assert never["median"] is None and never["min"] == 5
    assert censored_ratio(200, 100) == 2.0 and censored_ratio(None, 100) is None
    cs = censored_stats
    assert G._speedup(cs([None, None], 1000), cs([100, 300], 1000), 1000) == (5.0, ">=")
    assert G._speedup(cs([400, 600], 1000), cs([None, None], 1000), 1000) == (0.5, "<=")
    assert G._speedup(cs([400, 600], 1000), cs([100, 200], 1000), 1000) == (500 / 150, None)


def test_config_and_optimizer_errors_name_the_fix():
    with pytest.raises(ConfigError, match="unknown setting 'nope'; known: tiny, ci"):
        G.Config(setting=("nope",))
    with pytest.raises(ConfigError, match="unknown optimizer key 'thresh'"):
        G.Config(optimizer=("gated@thresh=2",))
    with pytest.raises(ConfigError, match="unknown optimizer 'lbfgs'"):
        G.parse_optimizer("lbfgs")
    with pytest.raises(ConfigError, match="cuda_workers <= workers"):
        G.Config(workers=2, cuda_workers=3)
    spec = G.parse_optimizer("gated@threshold=2@gate=soft")
    assert {k: spec.settings[k] for k in ("gate_on", "stats", "threshold", "gate")} == {
        "gate_on": "update", "stats": "exact", "threshold": 2, "gate": "soft"}
    with pytest.raises(ConfigError, match="supports the MLP settings"):
        GT.Config(setting="tf-add")


def test_rise_step():
    steps = np.array([0, 10, 20, 30, 40])
    assert GT.rise_step(steps, np.array([0.0, 0.05, 0.6, 1.0, 1.0]), 0.5) == 20
    assert GT.rise_step(steps, np.array([0.0, 0.05, 0.6, 1.0, 1.0]), 0.1) == 20
    assert math.isnan(GT.rise_step(steps, np.ones(5), 0.5))
    assert math.isnan(GT.rise_step(steps, np.array([0.2, 0.21, 0.2, 0.205, 0.21]), 0.5))


def test_grokking_smoke_preset_runs_resumes_and_plots(tmp_path, monkeypatch):
    out = tmp_path / "g"
    rd = run_experiment("grokking", preset="smoke", out=out, quiet=True)
    s = rd.read_summary()
    rows = {(r["setting"], r["optimizer"]): r for r in s["table"]}
    assert set(rows) == {("tiny", "adamw"), ("tiny", "gated"), ("tiny", "grokfast")}
    assert rows[("tiny", "adamw")]["steps_to_val"]["reached"] == 2  # AdamW groks tiny
    assert 0 < rows[("tiny", "gated")]["gate_pass_fraction"] < 1
    assert len(rd.cells()) == 6 and "5x" in s["verdict"]
    assert (out / "figures" / "grokking_steps.png").stat().st_size > 1000
    assert "| tiny | adamw |" in (out / "table.md").read_text()
    monkeypatch.setattr(G, "train_group", lambda *a, **k: pytest.fail("retrained a done cell"))
    run_experiment(None, resume=out, quiet=True, plot=False)
    assert json.loads((out / "status.json").read_text())["status"] == "complete"
    assert plot_run(out)


def test_grokking_theory_smoke_preset(tmp_path):
    rd = run_experiment("grokking-theory", preset="smoke", out=tmp_path / "t", quiet=True)
    s = rd.read_summary()
    cell = s["per_seed"]["0"]
    assert cell["k_over_n"] == pytest.approx(8 / 48)
    rows = rd.read_metrics()
    assert [r["step"] for r in rows] == [1, 50, 100, 150, 200, 250, 300]
    for r in rows:
        assert 0 <= r["target_in_channel_K"] <= 1 and 0 <= r["target_in_channel_W"] <= 1
    assert rows[0]["alignment_with_first"] == pytest.approx(1.0)
    assert (tmp_path / "t" / "figures" / "grokking_theory.png").exists()


def test_a_damaged_cell_checkpoint_restarts_the_cell(tmp_path, float64):
    job = G.GroupJob("tiny", TINY, "gated", (0, 1), log_every=20)
    full = G.train_group(job)
    ck = tmp_path / "state.pt"
    ck.write_bytes(b"\x80\x04 a checkpoint cut by a kill")
    with pytest.warns(RecoveredFileWarning, match="state.pt"):
        again = G.train_group(dataclasses.replace(job, checkpoint=str(ck)))
    assert _losses(again) == _losses(full) and (tmp_path / "state.pt.damaged").exists()


def test_grokking_theory_resumes_from_a_damaged_checkpoint_without_duplicates(tmp_path,
                                                                              monkeypatch):
    ref = run_experiment("grokking-theory", preset="smoke", out=tmp_path / "ref", quiet=True,
                         plot=False)
    real, saved = RunDir.save_state, []

    def save_then_stop(self, state, **kw):
        real(self, state, **kw)
        saved.append(state["step"])
        if len(saved) == 4:
            raise KeyboardInterrupt                    # killed after the 4th snapshot

    monkeypatch.setattr(RunDir, "save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_experiment("grokking-theory", preset="smoke", out=tmp_path / "cut", quiet=True,
                       plot=False)
    monkeypatch.undo()
    state = tmp_path / "cut" / "theory-state-seed0.pt"
    state.write_bytes(state.read_bytes()[:100])        # the newest checkpoint is damaged
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecoveredFileWarning)
        rd = run_experiment(None, resume=tmp_path / "cut", quiet=True, plot=False)
    rows, want = rd.read_metrics(), ref.read_metrics()
    assert [r["step"] for r in rows] == [r["step"] for r in want]     # no duplicated rows
    for a, b in zip(rows, want):
        assert a["val_acc"] == b["val_acc"] and a["target_in_channel_K"] == pytest.approx(
            b["target_in_channel_K"], rel=1e-6)
    assert not state.exists()                           # the seed finished: checkpoint gone
