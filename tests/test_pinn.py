"""The PINN experiment (experiments/pinn.py): objective weights, smoke run, resume, replot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tangentscope import ConfigError, RunDir
from tangentscope.cli import main
from tangentscope.experiments import make_config, run_experiment
from tangentscope.experiments import pinn as pinn_exp
from tangentscope.experiments._harness import torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):      # small models: on a shared CPU one thread beats two
        yield


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("pinn") / "smoke"
    return run_experiment("pinn", preset="smoke", out=out, quiet=True)


def test_point_weights_reproduce_the_pinn_objective():
    """mean_i(weight_i · loss_i) = λ·mean(r²) + mean(IC²) + mean(BC²) + mean(data²)."""
    from tangentscope.data.burgers import (
        BurgersPINN,
        burgers_point_losses,
        residual_from_derivatives,
    )
    from tangentscope.models.siren import Siren

    cfg = make_config(pinn_exp.Config, {"n_obs": 30, "n_collocation": 20, "n_initial": 7,
                                        "n_boundary": 5, "pde_weight": 0.3})
    prob = pinn_exp.make_problem(cfg, seed=0, early_stop=True)
    torch.manual_seed(0)
    pinn = BurgersPINN(Siren(2, 8, 1, 1))
    with torch.no_grad():
        out = pinn(prob.tx)
        got = burgers_point_losses(out, prob.target).mean()
        r = residual_from_derivatives(out[:20])
        ic = prob.tx[20:27]
        assert torch.all(ic[:, 0] == 0) and torch.all(prob.tx[27:32, 1].abs() == 1)
        expect = (0.3 * (r**2).mean()
                  + ((out[20:27, 0] + torch.sin(math.pi * ic[:, 1])) ** 2).mean()
                  + (out[27:32, 0] ** 2).mean()
                  + ((out[32:, 0] - prob.target[32:, 1]) ** 2).mean())
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-7)
    assert len(prob.obs_rows) == 27 and prob.held_tx.shape == (3, 2)     # 10% held out
    # The held-out observations are not among the training rows.
    train = {tuple(v) for v in prob.tx[prob.obs_rows].tolist()}
    assert not train & {tuple(v) for v in prob.held_tx.tolist()}


def test_smoke_run_writes_every_cell_table_and_figures(smoke):
    rd = smoke
    cfg = rd.read_config()["config"]
    cells = rd.cells()
    assert set(cells) == {f"{o}/seed0" for o in cfg["optimizers"]}
    summary = rd.read_summary()
    arrays = rd.load_arrays()
    for key, cell in cells.items():
        steps = arrays[f"{key}/step"]
        assert steps[0] == 0 and steps[-1] == cfg["steps"]
        err = arrays[f"{key}/rel_l2"]
        assert np.all(np.isfinite(err)) and 0 < err.min() <= err[0] < 2
        assert cell["min_rel_l2"] == pytest.approx(err.min())
        assert cell["end_rel_l2"] == pytest.approx(err[-1])
        frac = arrays[f"{key}/fraction"][1:]
        if key.startswith("gated"):
            assert np.all((frac >= 0) & (frac <= 1))
        else:
            assert np.all(np.isnan(frac))
    assert err[0] > 0.5                                        # training really moved the error
    es = cells["adamw-es/seed0"]
    assert es["es_rel_l2"] == pytest.approx(
        arrays["adamw-es/seed0/rel_l2"][list(arrays["adamw-es/seed0/step"]).index(es["es_step"])])
    assert summary["cells"]["adamw/seed0"]["speedup_vs_adamw"] == pytest.approx(1.0)
    assert "| adamw |" in (rd.path / "table.md").read_text()
    assert arrays["u_es/adamw-es"].shape == arrays["u/adamw"].shape == (cfg["grid_t"],
                                                                         cfg["grid_x"])
    for f in ("pinn_curves.png", "pinn_solutions.png"):
        assert (rd.path / "figures" / f).stat().st_size > 1000


def test_resume_skips_finished_cells_and_replot_needs_no_training(smoke, monkeypatch, capsys):
    calls = []
    real = pinn_exp.train_cell

    def counting(cfg, name, seed):
        calls.append(name)
        return real(cfg, name, seed)

    monkeypatch.setattr(pinn_exp, "train_cell", counting)
    # Drop one finished cell, as if the run had been interrupted before it.
    f = smoke.path / "cells.jsonl"
    lines = f.read_text().splitlines()
    kept = [ln for ln in lines if json.loads(ln)["key"] != "gated/seed0"]
    f.write_text("\n".join(kept) + "\n")
    before = RunDir.open(smoke.path).read_summary()["cells"]["adamw/seed0"]
    run_experiment(None, resume=smoke.path, quiet=True, plot=False)
    assert calls == ["gated"]
    after = RunDir.open(smoke.path).read_summary()["cells"]
    assert set(after) == {ln and json.loads(ln)["key"] for ln in lines}
    assert after["adamw/seed0"]["min_rel_l2"] == before["min_rel_l2"]
    (smoke.path / "figures" / "pinn_curves.png").unlink()
    assert main(["plot", str(smoke.path)]) == 0
    assert (smoke.path / "figures" / "pinn_curves.png").exists()
    assert calls == ["gated"]


def test_bad_configs_are_rejected_before_work():
    with pytest.raises(ConfigError, match="unknown optimizer"):
        make_config(pinn_exp.Config, {"optimizers": "adamw,lbfgs"})
    with pytest.raises(ConfigError, match="batch_size"):
        make_config(pinn_exp.Config, {"batch_size": 1})
    with pytest.raises(ConfigError, match="n_obs"):
        make_config(pinn_exp.Config, {"n_obs": 1})
