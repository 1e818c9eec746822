"""Implicit neural representation: does the gate stop a SIREN from memorizing image noise?

The claim under test (the preprint's abstract): the population-risk gate "suppresses
memorization in PINNs and implicit neural representations" (one summary: "≈2.36× faster
convergence"). A SIREN (Sitzmann et al. 2020; ω₀ = 30, 3 hidden layers) is fitted, full batch,
to ``skimage.data.camera()`` block-averaged to ``size × size``, scaled to ``[−1, 1]`` and
corrupted by Gaussian noise ``σ``. Every pixel is one example. Tracked over training:

* PSNR against the *clean* image, ``10 log10(2² / MSE)`` (peak-to-peak 2 on ``[−1, 1]``): its
  peak, the step of the peak, its end value — memorization shows as the fall from the peak
  towards the noisy image's own PSNR, ``10 log10(4/σ²)``;
* the fit MSE against the noisy training pixels relative to ``σ²``: below 1 means the network
  reproduces noise;
* "faster convergence", defined as the steps to first reach AdamW's peak PSNR minus
  ``level_db`` (same seed: same noise and initialisation), and the ratio of AdamW's steps to
  the optimizer's.

Optimizers (:data:`OPTIMIZERS`): ``adamw`` (``torch.optim.AdamW``); the gated AdamW with exact
per-pixel statistics (``PerExampleStats``: closed forms on the Linear layers) at the three gate
placements (``gated`` = on the update, ``gated-grad``, ``gated-moments``); the gate with the
streaming statistics (``gated-streaming``); and the standard remedy for memorization in
INRs/deep image priors, early stopping: ``adamw-es`` trains AdamW on ``1 − holdout_fraction``
of the pixels and keeps the checkpoint with the lowest MSE on the held-out noisy pixels.

    tangentscope run inr --preset smoke
    tangentscope run inr --preset full

The harness shared with :mod:`.pinn` (optimizer registry, steps-to-level, aggregation over
seeds, curve plots) is :mod:`._fitting`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._utils import seed_everything
from ..errors import ConfigError
from ..io import RunDir
from ..models.siren import Siren, pixel_grid
from ..optim import PerExampleStats
from ..optim.spec import build_optimizer
from ..viz import pyplot, save_figure
from ._fitting import (
    EARLY_STOPPING,
    check_common,
    fit,
    fit_cells,
    method_spec,
    plot_curves,
    summarize_cells,
)
from ._framework import Experiment
from ._harness import torch_threads

__all__ = ["Config", "EXPERIMENT", "camera_image", "plot", "psnr", "run", "train_cell"]

# -- the image ----------------------------------------------------------------------------------
def camera_image(size: int) -> Tensor:
    """``skimage.data.camera()`` (512², shipped with scikit-image) block-averaged to
    ``size × size`` and scaled to ``[−1, 1]``: ``(size·size, 1)`` float32, row-major.

    Raises:
        ConfigError: ``size`` does not divide 512, or scikit-image is missing.
    """
    if not (isinstance(size, int) and 1 <= size <= 512 and 512 % size == 0):
        raise ConfigError(f"size must divide 512 (e.g. 32, 64, 128, 256), got {size!r}")
    try:
        from skimage import data as skdata
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError("the INR experiment needs scikit-image: pip install "
                          "'tangentscope[data]'") from e
    img = skdata.camera().astype(np.float64) / 255.0
    k = 512 // size
    img = img.reshape(size, k, size, k).mean(axis=(1, 3))
    return torch.tensor(img * 2.0 - 1.0, dtype=torch.float32).reshape(-1, 1)


def psnr(pred: Tensor, clean: Tensor) -> float:
    """PSNR in dB for images on ``[−1, 1]`` (peak-to-peak 2): ``10 log10(4 / MSE)``."""
    mse = float(((pred - clean) ** 2).mean())
    return 10.0 * math.log10(4.0 / mse) if mse > 0 else float("inf")


# -- config -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Config:
    """INR experiment settings.

    Attributes:
        seed, n_seeds: seeds ``seed … seed + n_seeds − 1``; a seed fixes the noise, the
            held-out pixels and the initialisation (shared by all optimizers: paired runs).
        optimizers: names from :data:`OPTIMIZERS`.
        size: image side (divides 512).
        sigma: noise std on the ``[−1, 1]`` scale.
        width, hidden_layers, omega_0: the SIREN (ω₀ for every layer).
        lr, weight_decay: AdamW's (same for every optimizer).
        threshold: the gate's ``τ``.
        steps: optimizer steps.
        eval_every: steps between evaluations.
        batch_size: pixels per step, drawn without replacement each step (0 = every pixel:
            full batch, the SIREN paper's setting).
        holdout_fraction: pixels held out for ``adamw-es``.
        level_db: "converged" = within ``level_db`` dB of AdamW's peak PSNR (same seed).
        threads: ``torch.set_num_threads`` during the run (0 = leave as is).
    """

    seed: int = 0
    n_seeds: int = 3
    optimizers: tuple[str, ...] = ("adamw", "gated", "gated-streaming", "adamw-es",
                                   "gated-grad", "gated-moments")
    size: int = 64
    sigma: float = 0.1
    width: int = 256
    hidden_layers: int = 3
    omega_0: float = 30.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    threshold: float = 1.0
    steps: int = 400
    eval_every: int = 5
    batch_size: int = 0
    holdout_fraction: float = 0.1
    level_db: float = 0.5
    threads: int = 1

    def __post_init__(self):
        check_common(self)
        if not (isinstance(self.size, int) and self.size >= 4 and 512 % self.size == 0):
            raise ConfigError(f"size must divide 512 and be >= 4, got {self.size}")


# -- one cell -----------------------------------------------------------------------------------
def _noisy(clean: Tensor, sigma: float, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(10_000 + seed)
    return clean + sigma * torch.randn(clean.shape, generator=g)


def _holdout(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(20_000 + seed))
    k = max(1, int(round(fraction * n)))
    return perm[k:].sort().values, perm[:k].sort().values


def train_cell(cfg: Config, name: str, seed: int, clean: Tensor, coords: Tensor
               ) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, np.ndarray]]:
    """Fit one SIREN with one optimizer; return ``(curves, result, images)`` with images
    ``{'end': …}`` plus ``'es'`` (the early-stopping checkpoint) for ``adamw-es``."""
    noisy = _noisy(clean, cfg.sigma, seed)
    n = clean.shape[0]
    if name in EARLY_STOPPING:
        train_idx, held_idx = _holdout(n, cfg.holdout_fraction, seed)
    else:
        train_idx, held_idx = torch.arange(n), None
    x, y = coords[train_idx], noisy[train_idx]
    seed_everything(seed)
    model = Siren(2, cfg.width, cfg.hidden_layers, 1, first_omega_0=cfg.omega_0,
                  hidden_omega_0=cfg.omega_0)
    opt = build_optimizer(method_spec(name, cfg.threshold), model, lr=cfg.lr,
                          weight_decay=cfg.weight_decay)
    rows: dict[str, list[float]] = {k: [] for k in ("step", "psnr", "fit_mse", "heldout_mse",
                                                    "fraction")}
    finals: dict[str, np.ndarray] = {}

    def evaluate(step: int, frac: float) -> None:
        with torch.no_grad():
            full = model(coords)
        rows["step"].append(step)
        rows["psnr"].append(psnr(full, clean))
        rows["fit_mse"].append(float(((full[train_idx] - y) ** 2).mean()))
        held = (float("nan") if held_idx is None else
                float(((full[held_idx] - noisy[held_idx]) ** 2).mean()))
        if held < min(rows["heldout_mse"], default=float("inf")):   # early-stopping checkpoint
            finals["es"] = full.reshape(cfg.size, cfg.size).numpy()
        rows["heldout_mse"].append(held)
        rows["fraction"].append(frac)

    def loss_of(idx: Tensor | None) -> Tensor:
        xb, yb = (x, y) if idx is None else (x[idx], y[idx])
        return ((model(xb) - yb) ** 2).mean()

    seconds = fit(cfg, opt, x.shape[0], seed, loss_of, evaluate, desc=f"inr {name} seed {seed}")
    if isinstance(opt.stats, PerExampleStats):
        opt.stats.remove()
    curves = {k: np.asarray(v, dtype=float) for k, v in rows.items()}
    i_peak = int(np.argmax(curves["psnr"]))
    result = {"optimizer": name, "seed": seed,
              "peak_psnr": curves["psnr"][i_peak], "peak_step": int(curves["step"][i_peak]),
              "end_psnr": curves["psnr"][-1],
              "drop_db": curves["psnr"][i_peak] - curves["psnr"][-1],
              "fit_mse_over_sigma2_end": curves["fit_mse"][-1] / max(cfg.sigma**2, 1e-300),
              "fraction_updated_end": curves["fraction"][-1],
              "seconds": seconds, "ms_per_step": 1e3 * seconds / cfg.steps}
    if held_idx is not None:
        i_es = int(np.nanargmin(curves["heldout_mse"]))
        result.update(es_step=int(curves["step"][i_es]), es_psnr=curves["psnr"][i_es])
    with torch.no_grad():
        finals["end"] = model(coords).reshape(cfg.size, cfg.size).numpy()
    return curves, result, finals


# -- run / summary ------------------------------------------------------------------------------
_METRICS = ("peak_psnr", "peak_step", "end_psnr", "drop_db", "es_psnr", "es_step",
            "fit_mse_over_sigma2_end", "steps_to_level", "speedup_vs_adamw", "ms_per_step")
_COLUMNS = [("peak_psnr", "peak PSNR (dB)", ".2f"), ("peak_step", "step of peak", ".0f"),
            ("end_psnr", "end PSNR (dB)", ".2f"), ("drop_db", "peak − end (dB)", ".2f"),
            ("es_psnr", "early-stopped PSNR (dB)", ".2f"),
            ("fit_mse_over_sigma2_end", "end fit MSE / σ²", ".3f"),
            ("steps_to_level", "steps to level", ".0f"),
            ("speedup_vs_adamw", "speed-up vs AdamW", ".2f"), ("ms_per_step", "ms/step", ".0f")]


def run(cfg: Config, rd: RunDir) -> dict[str, Any]:
    """Train every ``optimizer × seed`` cell (skipping finished ones) and summarize."""
    clean = camera_image(cfg.size)
    coords = pixel_grid(cfg.size, cfg.size)
    rd.save_arrays(clean=clean.reshape(cfg.size, cfg.size).numpy(),
                   noisy=_noisy(clean, cfg.sigma, cfg.seed).reshape(cfg.size, cfg.size).numpy())
    with torch_threads(cfg.threads):
        fit_cells(cfg, rd, lambda name, seed: train_cell(cfg, name, seed, clean, coords),
                  "image")
    return summarize(cfg, rd)


def summarize(cfg: Config, rd: RunDir) -> dict[str, Any]:
    """Per-optimizer medians and spreads over seeds; writes ``table.md``."""
    summary = summarize_cells(cfg, rd, "psnr", lambda ref: ref["peak_psnr"] - cfg.level_db,
                              higher_is_better=True, metrics=_METRICS, columns=_COLUMNS,
                              headline=("peak_psnr", "end_psnr", "drop_db", "steps_to_level",
                                        "speedup_vs_adamw"))
    summary["noisy_image_psnr"] = (10 * math.log10(4 / cfg.sigma**2) if cfg.sigma > 0
                                   else float("inf"))
    summary["level"] = f"AdamW peak PSNR - {cfg.level_db} dB (same seed)"
    return summary


# -- plot ---------------------------------------------------------------------------------------
def plot(rd: RunDir) -> list[Path]:
    """PSNR and fit-MSE curves (median, min–max band over seeds) and the final images."""
    plt = pyplot()
    cfg = rd.read_config()["config"]
    names = list(cfg["optimizers"])
    arrays = rd.load_arrays()
    sigma2 = cfg["sigma"] ** 2
    out = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    plot_curves(axes[0], arrays, names, "psnr")
    if cfg["sigma"] > 0:
        axes[0].axhline(10 * math.log10(4 / sigma2), color="k", ls=":", lw=1,
                        label="noisy image")
    axes[0].set(xlabel="step", ylabel="PSNR vs clean image (dB)",
                title=f"SIREN on camera {cfg['size']}², σ = {cfg['sigma']}")
    peaks = [v for k, v in arrays.items() if k.endswith("/psnr")]
    if peaks:
        top = max(float(np.nanmax(v)) for v in peaks)
        axes[0].set_ylim(top - 8, top + 1)
    axes[0].legend()
    plot_curves(axes[1], arrays, names, "fit_mse", lambda v: v / max(sigma2, 1e-300))
    axes[1].axhline(1.0, color="k", ls=":", lw=1, label="noise floor σ²")
    axes[1].set(xlabel="step", ylabel="fit MSE on training pixels / σ²", yscale="log",
                title="below 1 = memorized noise")
    axes[1].legend()
    out.append(save_figure(fig, rd.figure_path("inr_curves")))
    imgs = [("clean", arrays.get("clean")), ("noisy", arrays.get("noisy"))] + [
        (f"{n} ({'early-stopped' if f'image_es/{n}' in arrays else 'end'})",
         arrays.get(f"image_es/{n}", arrays.get(f"image/{n}"))) for n in names]
    shown = [(t, im) for t, im in imgs if im is not None]
    if shown:
        fig, axes = plt.subplots(1, len(shown), figsize=(2.2 * len(shown), 2.5))
        for ax, (title, im) in zip(np.atleast_1d(axes), shown):
            ax.imshow(np.clip(im, -1, 1), cmap="gray", vmin=-1, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        out.append(save_figure(fig, rd.figure_path("inr_images")))
    return out


EXPERIMENT = Experiment(
    "inr", Config, run, plot,
    presets={
        "smoke": dict(n_seeds=1, size=32, width=64, hidden_layers=2, lr=3e-4, steps=120,
                      eval_every=5, optimizers=("adamw", "gated", "gated-streaming",
                                                "adamw-es")),
        # The record: 128². A 64² run (``--size 64``, the probe setting) is the
        # reduced full run reported in docs/inr.md.
        "full": dict(n_seeds=3, size=128, steps=400, eval_every=5),
    },
    description="SIREN on a noisy image: AdamW vs the gate vs early stopping (PSNR over "
                "training)")
