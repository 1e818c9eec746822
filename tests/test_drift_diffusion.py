"""The drift-diffusion experiment: end to end on its smoke preset, and its split on a linear
model where the answer is known (constant population force: slope 1, Γ = t; i.i.d. minibatch
noise: a random walk, slope 1/2, Γ ≈ 1; reshuffled epochs: the noise cancels every epoch; the
first-order split is exact)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from tangentscope.dynamics.diffusion import frame_norms, random_walk_ratio, scaling_exponent
from tangentscope.errors import ConfigError
from tangentscope.experiments import run_experiment
from tangentscope.experiments._drift_run import PARTS, split_training
from tangentscope.experiments.drift_diffusion import Config


def test_smoke_end_to_end(tmp_path):
    rd = run_experiment("drift-diffusion", preset="smoke", out=tmp_path / "run", quiet=True)
    summary = json.loads((rd.path / "summary.json").read_text())
    assert summary["cells"] == 1
    row = summary["table"][0]
    for part in PARTS:
        assert f"{part}_channel_slope_early" in row
    assert row["first_order_error"]["median"] < 0.1
    assert "drift exponent" in summary["verdict"]
    assert (rd.path / "verdict.txt").read_text().strip() == summary["verdict"].strip()
    figs = sorted(p.name for p in (rd.path / "figures").glob("*.png"))
    assert figs == ["drift_diffusion_curves.png", "drift_diffusion_memorization.png",
                    "drift_diffusion_slopes.png"]


def _linear_run(sampling: str, steps: int, seed: int = 0):
    torch.manual_seed(seed)
    n, d = 64, 40
    model = nn.Linear(d, 1, bias=False).double()
    x = torch.randn(n, d, dtype=torch.float64)
    y = torch.randn(n, 1, dtype=torch.float64)
    xp = torch.randn(4096, d, dtype=torch.float64)
    yp = torch.randn(4096, 1, dtype=torch.float64) + 3.0   # a population force ≠ the sample's

    def pool():
        return xp, yp

    record = np.unique(np.concatenate([np.geomspace(1, steps, 25).astype(int),
                                       np.arange(8, steps + 1, 8)]))
    # lr tiny: the parameters barely move, so every part's law holds over the whole run
    run = split_training(model, x, y, pool, lr=1e-5, steps=steps, batch_size=8,
                         sampling=sampling, record_at=record,  # type: ignore[arg-type]
                         frame=torch.eye(n, dtype=torch.float64), seed=seed)
    return run, n


def test_linear_model_drift_is_ballistic_and_iid_noise_a_random_walk():
    run, n = _linear_run("replacement", 800)
    c = run.curves
    cols = range(n)
    pn, pq = frame_norms(c, "population", cols)
    mn, mq = frame_norms(c, "minibatch", cols)
    fp, fm = scaling_exponent(c.steps, pn), scaling_exponent(c.steps, mn)
    assert abs(fp.slope - 1.0) < 0.01                    # constant force: ‖S‖ = t ‖a‖
    assert random_walk_ratio(pn, pq)[-1] == pytest.approx(800, rel=0.01)
    assert abs(fm.slope - 0.5) < 0.08                    # a 64-dim random walk
    lo, hi = fm.interval(4.0)
    assert lo < 0.5 < hi
    assert 0.6 < random_walk_ratio(mn, mq)[-1] < 1.6      # Γ ≈ 1 (χ²-like, k_eff ≫ 1)
    # the split is exact for a linear model: the parts add up to the actual output change
    total = sum(c.sums[p] for p in PARTS[:3])
    assert np.allclose(total.numpy(), run.u_change, atol=1e-12, rtol=0)
    assert torch.allclose(c.sums["noise"], c.sums["idiosyncratic"] + c.sums["minibatch"],
                          atol=1e-13, rtol=0)


def test_reshuffled_epochs_cancel_the_minibatch_noise():
    run, n = _linear_run("reshuffle", 160)
    c = run.curves
    mn, _ = frame_norms(c, "minibatch", range(n))
    epoch_end = (c.steps % (n // 8)) == 0
    mid = (c.steps % (n // 8)) == 4
    # within an epoch the noise wanders; at its end the batches have covered the set once and
    # the noise sums to ≈ 0 (up to the O(lr) motion of the gradients)
    assert mid.sum() >= 3 and epoch_end.sum() >= 10
    assert mn[epoch_end].max() < 1e-2 * mn[mid].min()


def test_config_errors():
    with pytest.raises(ConfigError, match="batch_sizes"):
        Config(n=16, batch_sizes=(16,))
    with pytest.raises(ConfigError, match="samplings"):
        Config(samplings=("both",))
    with pytest.raises(ConfigError, match="label_noise"):
        Config(label_noise=0.0)
    with pytest.raises(ConfigError, match="pool"):
        Config(pool=10, pool_bank=5)
