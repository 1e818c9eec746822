"""SIREN (models/siren.py) and the INR experiment (experiments/inr.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tangentscope import ConfigError
from tangentscope.experiments._harness import torch_threads
from tangentscope.models.siren import Siren, pixel_grid, siren_init_


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):      # small models: on a shared CPU one thread beats two
        yield

def _brute_force_siren(model: Siren, x: torch.Tensor) -> torch.Tensor:
    """``sin(ω₀(Wx + b))`` written out layer by layer."""
    lins = [m for m in model if isinstance(m, nn.Linear)]
    h = torch.sin(model.first_omega_0 * (x @ lins[0].weight.T + lins[0].bias))
    for lin in lins[1:-1]:
        h = torch.sin(model.hidden_omega_0 * (h @ lin.weight.T + lin.bias))
    return h @ lins[-1].weight.T + lins[-1].bias


def test_forward_matches_the_formula_and_shapes():
    model = Siren(2, 32, 2, 3).double()
    x = torch.rand(50, 2, dtype=torch.float64) * 2 - 1
    out = model(x)
    assert out.shape == (50, 3)
    torch.testing.assert_close(out, _brute_force_siren(model, x), rtol=1e-12, atol=1e-12)
    assert sum(isinstance(m, nn.Linear) for m in model) == 4     # first + 2 hidden + last


def test_initialisation_bounds_follow_the_paper():
    model = Siren(3, 400, 2, 1, first_omega_0=30.0, hidden_omega_0=20.0,
                  generator=torch.Generator().manual_seed(0))
    lins = [m for m in model if isinstance(m, nn.Linear)]
    bounds = [1 / 3] + [math.sqrt(6 / 400) / 20.0] * 3
    for lin, bound in zip(lins, bounds):
        w = lin.weight.detach()
        assert w.abs().max() <= bound
        assert w.abs().max() > 0.97 * bound                     # uniform fills the interval
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert lin.bias.abs().max() <= 1 / math.sqrt(lin.in_features)
    # Re-initialisation with the same generator is reproducible.
    w0 = lins[1].weight.detach().clone()
    siren_init_(model, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lins[1].weight.detach(), w0)


def test_hidden_preactivations_have_unit_variance():
    # The point of the init: ω₀ W h has variance ≈ 1 in every hidden layer (Sitzmann et al.,
    # Thm 1.8), whatever ω₀ is — a wrong scale (e.g. no 1/ω₀) would give ≈ ω₀².
    torch.manual_seed(0)
    model = Siren(2, 1024, 3, 1)
    h = model[1](model[0](torch.rand(2048, 2) * 2 - 1))
    for k in (2, 4, 6):
        lin, act = model[k], model[k + 1]
        pre = act.w0 * (h @ lin.weight.T)
        assert pre.std().item() == pytest.approx(1.0, abs=0.1)
        h = act(lin(h))


def test_pixel_grid_is_row_major_in_minus_one_one():
    g = pixel_grid(3, 4)
    assert g.shape == (12, 2)
    assert g[0].tolist() == [-1.0, -1.0] and g[-1].tolist() == [1.0, 1.0]
    assert g[1].tolist() == pytest.approx([-1.0, -1.0 + 2 / 3])   # second column, first row
    assert g[4, 0].item() == pytest.approx(0.0)                   # second row


def test_bad_sizes_are_rejected():
    with pytest.raises(ConfigError, match="hidden_features"):
        Siren(2, 0, 1, 1)
    with pytest.raises(ConfigError, match="omega_0"):
        Siren(2, 8, 1, 1, first_omega_0=0.0)
    with pytest.raises(ConfigError, match="positive"):
        pixel_grid(0, 4)


# -- the experiment -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from tangentscope.experiments import run_experiment

    return run_experiment("inr", preset="smoke", out=tmp_path_factory.mktemp("inr") / "s",
                          quiet=True)


def test_camera_image_and_psnr():
    from tangentscope.experiments.inr import camera_image, psnr

    img = camera_image(64)
    assert img.shape == (4096, 1) and img.min() >= -1 and img.max() <= 1
    # Block averaging: the 32² image is the 2×2 mean of the 64² one.
    coarse = img.reshape(32, 2, 32, 2).mean((1, 3)).reshape(-1, 1)
    torch.testing.assert_close(camera_image(32), coarse, rtol=0, atol=1e-6)
    noisy = img + 0.1 * torch.randn(img.shape, generator=torch.Generator().manual_seed(0))
    assert psnr(noisy, img) == pytest.approx(10 * math.log10(4 / 0.01), abs=0.2)
    assert psnr(img, img) == float("inf")
    with pytest.raises(ConfigError, match="divide 512"):
        camera_image(100)


def test_steps_to_reach_and_aggregation():
    import numpy as np

    from tangentscope.experiments._fitting import median_spread, steps_to_reach

    steps = np.array([0, 5, 10, 15])
    assert steps_to_reach(steps, np.array([1.0, 2.0, 3.0, 2.5]), 2.5, higher_is_better=True) == 10
    assert steps_to_reach(steps, np.array([4.0, 3.0, 2.0, 1.0]), 2.0,
                          higher_is_better=False) == 10
    assert steps_to_reach(steps, np.zeros(4), 1.0, higher_is_better=True) is None
    s = median_spread([3.0, None, 1.0, 2.0])
    assert s == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3, "missing": 1}


def test_smoke_run_curves_table_resume_and_replot(smoke, monkeypatch):
    import numpy as np

    from tangentscope.cli import main
    from tangentscope.experiments import inr, run_experiment

    cfg = smoke.read_config()["config"]
    cells = smoke.cells()
    assert set(cells) == {f"{o}/seed0" for o in cfg["optimizers"]}
    arrays = smoke.load_arrays()
    for key, cell in cells.items():
        p = arrays[f"{key}/psnr"]
        assert arrays[f"{key}/step"][-1] == cfg["steps"]
        assert np.all(np.isfinite(p)) and p.max() > p[0] + 5           # it learned the image
        assert cell["peak_psnr"] == pytest.approx(p.max())
        assert cell["drop_db"] == pytest.approx(p.max() - p[-1]) and cell["drop_db"] >= 0
    assert arrays["image/adamw"].shape == (cfg["size"], cfg["size"])
    assert arrays["image_es/adamw-es"].shape == (cfg["size"], cfg["size"])
    assert "image_es/adamw" not in arrays
    summary = smoke.read_summary()
    assert summary["noisy_image_psnr"] == pytest.approx(10 * math.log10(4 / cfg["sigma"] ** 2))
    ref = summary["cells"]["adamw/seed0"]
    assert ref["steps_to_level"] is not None and ref["speedup_vs_adamw"] == 1.0
    assert "es_psnr" in cells["adamw-es/seed0"] and "es_psnr" not in cells["adamw/seed0"]
    for f in ("inr_curves.png", "inr_images.png"):
        assert (smoke.path / "figures" / f).stat().st_size > 1000
    # Resume of a finished run trains nothing; replot needs only the directory.
    monkeypatch.setattr(inr, "train_cell", lambda *a, **k: pytest.fail("retrained a cell"))
    run_experiment(None, resume=smoke.path, quiet=True, plot=False)
    (smoke.path / "figures" / "inr_images.png").unlink()
    assert main(["plot", str(smoke.path)]) == 0
    assert (smoke.path / "figures" / "inr_images.png").exists()


def test_bad_configs_are_rejected_before_work():
    from tangentscope.experiments import inr, make_config

    with pytest.raises(ConfigError, match="unknown optimizer"):
        make_config(inr.Config, {"optimizers": "adamw,sgd"})
    with pytest.raises(ConfigError, match="divide 512"):
        make_config(inr.Config, {"size": 100})
    with pytest.raises(ConfigError, match="batch_size"):
        make_config(inr.Config, {"batch_size": 1})
