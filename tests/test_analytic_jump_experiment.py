"""The analytic-jump experiment: a smoke run end to end through the framework (summary, tables,
figures, resume without recomputing), and the verdict logic on hand-made outcomes."""

from __future__ import annotations

import math

import pytest

import tangentscope.experiments.analytic_jump as aj
from tangentscope.experiments._framework import run_experiment


def test_smoke_run_end_to_end_and_resume(tmp_path, monkeypatch):
    rd = run_experiment("analytic-jump", preset="smoke", out=tmp_path / "aj", quiet=True)
    s = rd.read_summary()
    cfg = aj.Config(**{**aj.EXPERIMENT.presets["smoke"]})
    assert set(s["tasks"]) == set(aj.TASKS)
    for task in s["tasks"].values():
        assert set(task["families"]) == set(aj.FAMILIES)
        assert set(task["jump_vs_best_baseline"]) == {f"{g}_{w}" for g in aj.TARGETS
                                                      for w in aj.COSTS}
        for cmp in task["jump_vs_best_baseline"].values():
            assert cmp["seeds"] == 1
            assert cmp["both"] + cmp["jump_only"] + cmp["baseline_only"] + cmp["neither"] == 1
    # every race ended for a reason: both targets, the pass budget, the step cap or a divergence
    races = [r for k, r in rd.cells().items() if k.startswith("race/")]
    assert len(races) == 2 * len(aj.variants(cfg))
    for r in races:
        reached = r["train_passes"] is not None and r["test_passes"] is not None
        assert (reached or r["passes"] >= cfg.max_passes or r["steps"] == cfg.max_steps
                or r["diverged"]), r["variant"]
        if r["family"] == "jump-adamw":       # passes = optimizer steps + the jumps' cost
            assert r["jumps"] == 1 + r["steps"] // cfg.jump_every[0]
            assert r["passes"] == pytest.approx(r["steps"] + r["jump_passes"])
    # fidelity: both widths, the finite horizon and t = ∞, per task
    fid = {(r["task"], r["width"], r["horizon"]): r for r in s["fidelity"]}
    assert set(fid) == {(t, w, h) for t in aj.TASKS for w in (8, 64) for h in (100.0, "inf")}
    short = fid[("regression", 64, 100.0)]   # a short horizon on the wider net: nearly linear
    assert short["displacement_error"]["median"] < 0.2
    assert 0.8 < short["realized_fraction"]["median"] < 1.2
    # the verdict reads as words, never as a 0x ratio
    v = s["verdict"]
    assert "jump-AdamW" in v and "0x" not in v and "jump fidelity from the initialization" in v
    assert "regression at lambda_1 t = 100: " in v and "classification at t = inf: " in v
    assert (rd.path / "verdict.txt").read_text().strip() == v
    assert "| jump-adamw |" in (rd.path / "table.md").read_text()
    for f in ("analytic_jump_race", "analytic_jump_costs", "analytic_jump_fidelity"):
        assert (rd.path / "figures" / f"{f}.png").stat().st_size > 1000
    monkeypatch.setattr(aj, "race_cell", lambda *a, **k: pytest.fail("recomputed a race"))
    monkeypatch.setattr(aj, "_fidelity_cell", lambda *a, **k: pytest.fail("recomputed"))
    again = run_experiment(None, resume=rd.path, quiet=True, plot=False)
    assert again.read_summary()["verdict"] == v


def test_compare_to_best_baseline_counts_each_seed_and_censors():
    # seed 0: both reached (best baseline lbfgs, 15 vs 10); seed 1: only a baseline;
    # seed 2: only the jump; seed 3: nobody
    jump = {"0": 10.0, "1": None, "2": 20.0, "3": None}
    base = {"adamw": {"0": 30.0, "1": 50.0, "2": None, "3": None},
            "lbfgs": {"0": 15.0, "1": None, "2": None, "3": None}}
    c = aj.compare_to_best_baseline(jump, base, budget=100)
    assert (c["both"], c["jump_only"], c["baseline_only"], c["neither"]) == (1, 1, 1, 1)
    assert (c["jump_cheaper"], c["baseline_cheaper"]) == (2, 1)
    assert c["ratio_median"] == c["ratio_min"] == c["ratio_max"] == 1.5
    assert c["best_baseline_per_seed"] == {"0": "lbfgs", "1": "adamw", "2": None, "3": None}
    # censored medians: [10, 20, ∞, ∞] and [15, 50, ∞, ∞] (a median on a censored seed is None)
    assert c["jump"]["reached"] == 2 and c["jump"]["median"] is None
    assert c["baseline"]["reached"] == 2 and c["baseline"]["min"] == 15.0
    line = aj.verdict_line("regression", "train", 0.04, c)
    assert line.startswith("regression, train loss <= 0.04: jump-AdamW reached it in 2/4 seeds")
    assert "(> 100 passes)" in line and "(adamw/lbfgs) in 2/4 seeds" in line
    assert "where both did (1 seeds) the best baseline needs 1.5x the passes" in line
    assert line.endswith("; jump-AdamW cheaper in 2/4 seeds")


@pytest.mark.parametrize(("jump", "base", "want", "absent"), [
    # the smoke run's case: the jump never reached it, a baseline did in 7 passes
    ({"0": None}, {"sgd": {"0": 7.0}},
     "jump-AdamW did not reach it within 60 passes (0/1 seeds); the best baseline (sgd) in "
     "1/1 seeds (7 passes)", "needs"),
    ({"0": None, "1": None}, {"sgd": {"0": None, "1": None}},
     "no method reached it within 60 passes (0/2 seeds)", "jump-AdamW"),
    ({"0": 12.0, "1": 8.0}, {"sgd": {"0": None, "1": None}},
     "jump-AdamW reached it in 2/2 seeds (10 [8, 12] passes), no baseline within 60 passes "
     "(0/2 seeds)", "needs"),
    ({"0": 10.0, "1": 20.0, "2": 40.0}, {"sgd": {"0": 30.0, "1": 20.0, "2": 20.0}},
     "the best baseline needs 1x [0.5, 3] the passes of jump-AdamW", "did not"),
])
def test_verdict_line_reads_plainly_when_targets_are_missed(jump, base, want, absent):
    line = aj.verdict_line("classification", "test", 0.2, aj.compare_to_best_baseline(
        jump, base, budget=60))
    assert want in line
    assert absent not in line
    assert "0x" not in line and "None" not in line and "inf" not in line


def _record(task, seed, family, variant, train, test):
    return {"task": task, "seed": seed, "family": family, "variant": variant,
            "train_steps": train, "train_passes": train, "train_seconds": None,
            "test_steps": test, "test_passes": test, "test_seconds": None,
            "final_train_loss": 0.1, "final_test_loss": 0.2, "best_test_loss": 0.2}


def test_summarize_takes_each_familys_best_variant_per_seed_and_counts_wins():
    cfg = aj.Config(seeds=2, tasks=("classification",), methods=("adamw", "jump-adamw"),
                    adamw_lrs=(1e-3, 1e-2), jump_lrs=(1e-2,), jump_every=(10,),
                    jump_horizons=(100.0,), max_passes=500)
    j = "jump-adamw@lr=0.01@m=10@h=100"
    cells = {}
    for seed, (a1, a2, jt) in enumerate([((100, 300), (80, None), (40, 90)),
                                         ((None, None), (120, 400), (None, None))]):
        for fam, label, (tr, te) in (("adamw", "adamw@lr=0.001", a1),
                                     ("adamw", "adamw@lr=0.01", a2), ("jump-adamw", j, jt)):
            cells[f"race/classification/seed{seed}/{label}"] = _record(
                "classification", seed, fam, label, tr, te)
    s = aj.summarize(cfg, cells)
    task = s["tasks"]["classification"]
    assert task["best_per_seed"]["adamw"]["0"]["train_passes"] == 80     # the better lr
    assert task["best_per_seed"]["adamw"]["0"]["test_passes"] == 300     # the other lr
    assert task["best_per_seed"]["adamw"]["1"]["train_passes"] == 120
    tr = task["jump_vs_best_baseline"]["train_passes"]
    assert (tr["both"], tr["baseline_only"], tr["ratio_median"]) == (1, 1, 2.0)
    te = task["jump_vs_best_baseline"]["test_passes"]
    assert (te["both"], te["baseline_only"]) == (1, 1)
    assert te["ratio_median"] == pytest.approx(300 / 90)
    # medians over 2 seeds: jump [40, ∞] → ∞ (None), adamw [80, 120] → 100
    assert task["families"]["adamw"]["train_passes"]["median"] == 100
    assert task["families"]["jump-adamw"]["train_passes"]["median"] is None
    # seed by seed the jump is cheaper on seed 0 (both targets) and never finishes seed 1
    assert s["verdict"].startswith("jump-AdamW needed fewer passes than the best baseline of "
                                   "the seed in 2 of 4 races")
    assert "and fewer than AdamW alone in 2 of 4" in s["verdict"]
    assert task["jump_vs_adamw"]["train_passes"]["ratio_median"] == 2.0
    assert not math.isnan(tr["ratio_max"])
    md = aj.table_markdown(s)
    assert "| adamw | 100 [80, 120] (2/2) | not reached (0/2) |" in md


def test_verdict_without_a_baseline_says_there_is_nothing_to_compare():
    cfg = aj.Config(seeds=1, tasks=("regression",), methods=("jump-adamw",), jump_lrs=(1e-2,),
                    jump_every=(10,), jump_horizons=(100.0,))
    cells = {"race/regression/seed0/x": _record("regression", 0, "jump-adamw",
                                                "jump-adamw@lr=0.01@m=10@h=100", 50, 60)}
    v = aj.summarize(cfg, cells)["verdict"]
    assert v.startswith("nothing to compare") and "no method reached" not in v
