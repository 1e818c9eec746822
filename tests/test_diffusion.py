"""Drift/noise split of SGD steps: exact on linear models, and the scaling fit's calibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tangentscope.dynamics.diffusion import DriftNoiseSplit, project_curves, scaling_exponent
from tangentscope.errors import ConfigError, ShapeError


def test_linear_model_displacements_are_x_times_the_parameter_steps():
    torch.manual_seed(0)
    model = nn.Linear(4, 2, bias=False).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    split = DriftNoiseSplit(model, x)
    gb = {"weight": torch.randn(2, 4, dtype=torch.float64)}
    gp = {"weight": torch.randn(2, 4, dtype=torch.float64)}
    split.observe(gb, gp, lr=0.1)
    c = split.curves()
    drift = (x @ (-0.1 * gp["weight"]).T).reshape(-1)
    noise = (x @ (-0.1 * (gb["weight"] - gp["weight"])).T).reshape(-1)
    assert torch.allclose(c.drift[0], drift, atol=1e-14, rtol=0)
    assert torch.allclose(c.noise[0], noise, atol=1e-14, rtol=0)
    assert c.times[0] == pytest.approx(0.1)


def test_constant_drift_has_slope_one_and_iid_noise_slope_one_half():
    torch.manual_seed(0)
    model = nn.Linear(5, 1, bias=False).double()
    x = torch.randn(20, 5, dtype=torch.float64)
    steps = np.unique(np.geomspace(1, 2000, 25).astype(int))
    split = DriftNoiseSplit(model, x, record_at=steps)
    gp = {"weight": torch.ones(1, 5, dtype=torch.float64)}
    g = torch.Generator().manual_seed(1)
    for _ in range(2000):
        gb = {"weight": gp["weight"] + torch.randn(1, 5, generator=g, dtype=torch.float64)}
        split.observe(gb, gp, lr=0.01)
    c = split.curves()
    d, r = project_curves(c, torch.eye(20, dtype=torch.float64))
    fd, fr = scaling_exponent(c.steps, d), scaling_exponent(c.steps, r)
    assert fd.slope == pytest.approx(1.0, abs=1e-10)
    lo, hi = fr.interval(3.0)
    assert lo < 0.5 < hi and abs(fr.slope - 0.5) < 0.1


def test_bad_inputs():
    model = nn.Linear(3, 1).double()
    split = DriftNoiseSplit(model, torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ConfigError, match="observe"):
        split.curves()
    g = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    with pytest.raises(ShapeError, match="same parameters"):
        split.observe(g, {"weight": g["weight"]}, lr=0.1)
    with pytest.raises(ConfigError, match="lr"):
        split.observe(g, g, lr=float("nan"))
    with pytest.raises(ConfigError, match=">= 3 points"):
        scaling_exponent([1, 2], [1, 2])
