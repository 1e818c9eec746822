"""The kernel-motion experiment: its model, its sweep, its summary, and a smoke run end to end."""

from __future__ import annotations

import json

import pytest
import torch

from tangentscope import entk, flatten_kernel
from tangentscope.errors import ConfigError
from tangentscope.experiments._framework import make_config, run_experiment
from tangentscope.experiments._motion_setup import ScaledDifference, settings
from tangentscope.experiments.kernel_motion import ACCOUNTS, Config, summarize
from tangentscope.models import mlp


def test_scaled_difference_is_centered_with_kernel_alpha_squared():
    torch.manual_seed(0)
    base = mlp(3, 8, 1, 2, activation="tanh").to(torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    K0 = entk(base, x, dtype=torch.float64)
    assert isinstance(K0, torch.Tensor)
    K_h = flatten_kernel(K0)
    net = ScaledDifference(base, 3.0)
    assert torch.equal(net(x), torch.zeros(5, 2, dtype=torch.float64))
    K1 = entk(net, x, dtype=torch.float64)
    assert isinstance(K1, torch.Tensor)
    K_f = flatten_kernel(K1)
    # (α²/2)(K_a + K_b) with K_a = K_b = K_h at initialization
    assert torch.allclose(K_f, 9.0 * K_h, rtol=1e-10, atol=1e-12)


def test_settings_sweep_and_dedup():
    sts = settings((0.5, 1.0), (16, 32), (0.5, 2.0), base_width=32, base_lr_scale=0.5)
    keys = [s.key for s in sts]
    assert keys == ["a0.5/w32/lr0.5", "a1/w32/lr0.5", "a1/w16/lr0.5", "a1/w32/lr2"]
    assert [s.sweep for s in sts] == ["alpha", "alpha", "width", "lr"]


@pytest.mark.parametrize("bad", [dict(alphas=(0.0,)), dict(label_noise=0.7),
                                 dict(dataset="cifar"), dict(small_motion=1.0, large_motion=0.5),
                                 dict(discretization="rk4"), dict(widths=(0,))])
def test_config_rejects(bad):
    with pytest.raises(ConfigError):
        make_config(Config, bad)


def _record(setting: str, seed: int, motion: float, rel: float, ident: float = 0.01) -> dict:
    r = {"setting": setting, "seed": seed, "sweep": "alpha", "alpha": 1.0, "width": 8,
         "lr_scale": 0.5, "num_params": 10, "diverged": False, "kernel_motion": motion,
         "displacement_error": ident, "test_error": 0.2, "test_error_twin": 0.1,
         "noise_cost": 0.1, "path_change_fraction": rel / 2}
    r.update({f"{a}_rel_error": rel * (1 + i) for i, a in enumerate(ACCOUNTS)})
    return r


def test_summary_bins_and_verdict():
    cfg = Config(alphas=(1.0,), widths=(), lr_scales=(), base_width=8)
    cells = {f"k{i}": _record("a1/w8/lr0.5", i, m, rel) for i, (m, rel) in
             enumerate([(0.01, 0.02), (0.05, 0.03), (0.3, 0.1), (1.5, 0.6), (2.5, 0.8)])}
    cells["bad"] = _record("a1/w8/lr0.5", 9, 3.0, 0.01, ident=5.0)      # untrusted
    cells["div"] = {"setting": "a1/w8/lr0.5", "seed": 10, "diverged": True}
    s = summarize(cfg, cells)
    assert [b["cells"] for b in s["bins"]] == [2, 1, 2]
    assert [b["cells"] for b in s["bins_all"]] == [2, 1, 3]
    assert s["bins"][2]["path_rel_error"]["median"] == pytest.approx(0.7)
    assert s["untrusted"] == ["a1/w8/lr0.5/seed9"] and s["diverged"] == ["a1/w8/lr0.5/seed10"]
    assert "does not hold" in s["verdict"] and "0.7" in s["verdict"]
    assert s["max_kernel_motion"] == 3.0
    lazy = {k: v for k, v in cells.items() if k in ("k0", "k1")}
    assert "no run reached O(1) motion" in summarize(cfg, lazy)["verdict"]


def test_smoke_end_to_end(tmp_path):
    rd = run_experiment("kernel-motion", preset="smoke", out=tmp_path / "run", quiet=True)
    summary = json.loads((rd.path / "summary.json").read_text())
    cells = rd.cells()
    assert len(cells) == 2 and summary["cells"] == 2
    lazy, rich = cells["a4/w16/lr0.5/seed0"], cells["a0.25/w16/lr0.5/seed0"]
    for r in (lazy, rich):
        assert not r["diverged"]
        assert r["operator"] in ("gd", "exp")
    # the lazy-training trick works: a large output scale barely moves the kernel
    assert lazy["kernel_motion"] < 0.1 < rich["kernel_motion"]
    assert lazy["param_motion"] < rich["param_motion"]
    # where the kernel barely moves, the first-order account is accurate and closes
    assert lazy["path_rel_error"] < 0.1 and lazy["closure_error"] < 0.05
    assert isinstance(summary["verdict"], str) and "max kernel motion" in summary["verdict"]
    names = sorted(p.name for p in (rd.path / "figures").glob("kernel_motion_*.png"))
    assert names == ["kernel_motion_accounting.png", "kernel_motion_curves.png",
                     "kernel_motion_test.png"]
