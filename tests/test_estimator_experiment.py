"""The poprisk-estimate experiment (smoke preset, as CI runs it) and its datasets."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tangentscope import ConfigError
from tangentscope.data import modular_arithmetic
from tangentscope.data.modular import OPERATIONS
from tangentscope.experiments import plot_run, run_experiment


def test_smoke_preset_runs_resumes_and_replots(tmp_path):
    rd = run_experiment("poprisk-estimate", preset="smoke", out=tmp_path / "run", quiet=True,
                        overrides={"steps": 20, "eval_every": 5})
    summary = rd.read_summary()
    assert set(summary["tasks"]) == {"regression", "digits", "modular"}
    for res in summary["tasks"].values():
        (rec,) = res["per_seed"]
        assert rec["oracle_heldout"] <= rec["estimate_stop_heldout"] + 1e-12
        rho = rec["estimate_spearman"]
        assert math.isnan(rho) or -1 <= rho <= 1              # NaN: a flat curve
    cols = rd.metrics_columns("step", "heldout", "estimate", where={"task": "digits"})
    assert cols["step"][0] == 0 and len(cols["step"]) == 5
    assert (tmp_path / "run" / "figures" / "estimate_vs_heldout.png").exists()
    # resume: every cell is done, nothing is retrained, the summary is the same
    before = (tmp_path / "run" / "cells.jsonl").read_text()
    rd2 = run_experiment("poprisk-estimate", resume=tmp_path / "run", quiet=True, plot=False)
    assert (tmp_path / "run" / "cells.jsonl").read_text() == before
    assert json.dumps(rd2.read_summary()["tasks"]) == json.dumps(summary["tasks"])
    assert plot_run(tmp_path / "run")


def test_bad_experiment_settings_are_refused():
    with pytest.raises(ConfigError, match="batch_size >= 2"):
        run_experiment("poprisk-estimate", preset="smoke", overrides={"batch_size": 1},
                       quiet=True)


@pytest.mark.parametrize("op", OPERATIONS)
def test_modular_tables_are_correct_and_splits_seeded(op):
    p = 7
    d = modular_arithmetic(p, op, 0.4, seed=3)
    ref = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
           "div": lambda a, b: a * pow(b, -1, p), "sq_sum": lambda a, b: a * a + b * b,
           "quad": lambda a, b: a * a + a * b + b * b,
           "quad_a": lambda a, b: a * a + a * b + b * b + a,
           "cube_ab": lambda a, b: a ** 3 + a * b,
           "div_odd": lambda a, b: a * pow(b, -1, p) if b % 2 else a - b}[op]
    for (a, b), c in zip(d.x.tolist(), d.y.tolist()):
        assert c == ref(a, b) % p
    n = d.x.shape[0]
    assert n == (p * (p - 1) if op == "div" else p * p)
    assert torch.equal(torch.sort(torch.cat([d.train_idx, d.val_idx])).values, torch.arange(n))
    assert d.x_train.shape[0] == round(0.4 * n) and d.vocab == p
    again = modular_arithmetic(p, op, 0.4, seed=3)
    other = modular_arithmetic(p, op, 0.4, seed=4)
    assert torch.equal(again.train_idx, d.train_idx) and torch.equal(other.x, d.x)
    assert not torch.equal(other.train_idx, d.train_idx)


def test_modular_options_and_errors():
    d = modular_arithmetic(5, "+", 0.5, equals_token=True)
    assert d.x.shape == (25, 3) and (d.x[:, 2] == 5).all() and d.vocab == 6
    assert d.op == "add"
    non_commutative = modular_arithmetic(5, "quad_a", 0.5)
    table = non_commutative.y.view(5, 5)
    assert not torch.equal(table, table.T)
    for kw, match in ((dict(op="pow"), "unknown op"), (dict(op="div", p=8), "prime"),
                      (dict(train_fraction=1.0), "train_fraction"), (dict(p=1), "p must")):
        args = dict(p=7, op="add", train_fraction=0.5) | kw
        with pytest.raises(ConfigError, match=match):
            modular_arithmetic(args["p"], args["op"], args["train_fraction"])


def test_noisy_digits():
    pytest.importorskip("sklearn")
    from tangentscope.data.digits import noisy_digits

    d = noisy_digits(300, 0.25, seed=1)
    assert d.x.shape == (300, 64) and d.x_test.shape == (1497, 64)
    assert float((d.y != d.y_clean).float().mean()) == pytest.approx(0.25, abs=0.005)
    assert float((d.y_test != d.y_test_clean).float().mean()) == pytest.approx(0.25, abs=0.005)
    assert torch.allclose(d.x.mean(0), torch.zeros(64), atol=1e-6)
    with pytest.raises(ConfigError, match="n_train"):
        noisy_digits(5)
