"""Drift/noise split of SGD steps: exact on linear models, and the scaling fit's calibration."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tangentscope.dynamics.diffusion import (
    DriftNoiseSplit,
    frame_norms,
    project_curves,
    random_walk_ratio,
    random_walk_slope_null,
    scaling_exponent,
)
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
    steps = np.unique(np.geomspace(1, 600, 20).astype(int))
    split = DriftNoiseSplit(model, x, record_at=steps)
    gp = {"weight": torch.ones(1, 5, dtype=torch.float64)}
    g = torch.Generator().manual_seed(1)
    for _ in range(600):
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


def test_parts_frame_sums_and_quadratic_variation_match_brute_force():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    N = 12
    frame = torch.linalg.qr(torch.randn(N, N, dtype=torch.float64))[0]
    split = DriftNoiseSplit(model, x, frame=frame, record_at=[2, 3])
    incs: dict[str, list[torch.Tensor]] = {"a": [], "b": [], "c": []}
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        parts = {p: {k: torch.randn(v.shape, generator=g, dtype=torch.float64)
                     for k, v in model.named_parameters()} for p in incs}
        # brute force: the first-order output change J·(−lr·part) with the full Jacobian
        for p, gp in parts.items():
            J = torch.autograd.functional.jacobian(
                lambda *ws: torch.func.functional_call(
                    model, dict(zip([k for k, _ in model.named_parameters()], ws)), (x,)),
                tuple(v.detach() for _, v in model.named_parameters()))
            a = sum((Jk.reshape(N, -1) @ (-0.05 * gp[k]).reshape(-1))
                    for Jk, (k, _) in zip(J, model.named_parameters()))
            incs[p].append(a)
        split.observe_parts(parts, lr=0.05)
        with torch.no_grad():                           # move the model (not by the parts)
            for v in model.parameters():
                v.add_(0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64))
    c = split.curves()
    assert list(c.steps) == [2, 3] and c.parts == ("a", "b", "c")
    for p, a in incs.items():
        S = torch.stack(a).cumsum(0)
        assert torch.allclose(c.sums[p], S[1:], atol=1e-12, rtol=0)
        cols = [0, 4, 7]
        norm, quad = frame_norms(c, p, cols)
        F = frame[:, cols]
        want_q = torch.stack([(F.T @ ai).pow(2).sum() for ai in a]).cumsum(0)[1:]
        assert np.allclose(norm, (S[1:] @ F).norm(dim=1).numpy(), atol=1e-12, rtol=0)
        assert np.allclose(quad, want_q.numpy(), atol=1e-12, rtol=0)
        full, _ = frame_norms(c, p, range(N))
        assert np.allclose(full, project_curves(c, torch.eye(N, dtype=torch.float64),
                                                parts=(p,))[0], atol=1e-12)


def test_random_walk_ratio_and_slope_null():
    assert np.allclose(random_walk_ratio([3.0, 2.0], [9.0, 1.0]), [1.0, 4.0])
    assert np.isnan(random_walk_ratio([1.0], [0.0])[0])
    steps = np.unique(np.geomspace(1, 1000, 30).astype(int))
    null = random_walk_slope_null(steps, 4, draws=300, seed=0)
    assert null.shape == (300,)
    assert abs(float(np.median(null)) - 0.5) < 0.05
    assert 0.05 < float(np.std(null)) < 0.3
    wide = random_walk_slope_null(steps, 1, draws=300, seed=0)
    assert np.std(wide) > np.std(null)              # one dimension fluctuates more
    with pytest.raises(ConfigError, match=">= 3 positive steps"):
        random_walk_slope_null([1, 2], 3)


def test_parts_errors():
    model = nn.Linear(3, 1).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    g = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    with pytest.raises(ShapeError, match="frame has 5 rows"):
        DriftNoiseSplit(model, x, frame=torch.eye(5, dtype=torch.float64)).observe(g, g, 0.1)
    with pytest.raises(ShapeError, match="matrix"):
        DriftNoiseSplit(model, x, frame=torch.ones(4, dtype=torch.float64))
    split = DriftNoiseSplit(model, x)
    split.observe_parts({"a": g, "b": g}, 0.1)
    with pytest.raises(ShapeError, match="same parts"):
        split.observe_parts({"a": g}, 0.1)
    with pytest.raises(ConfigError, match="no part 'drift'"):
        _ = split.curves().drift
    with pytest.raises(ConfigError, match="no frame"):
        frame_norms(split.curves(), "a", [0])
