"""PINN with noisy observations: does the gate stop a physics-informed network from
memorizing measurement noise?

The claim under test (the preprint's abstract): the population-risk gate "suppresses
memorization in PINNs" (one summary: "≈2.36× faster convergence"). The problem is viscous
Burgers (:mod:`tangentscope.data.burgers`: ``u_t + u u_x = ν u_xx``, ν = 0.01/π,
``u(0, x) = −sin πx``, ``u(t, ±1) = 0``) solved from ``n_obs`` noisy measurements
``u + N(0, σ²)`` at random points, plus the PDE residual on a fixed set of collocation points
and the initial/boundary conditions. The network is a SIREN (sine activations, ω₀ = 30): high
frequency, so AdamW can fit the noise between collocation points. Plain PyTorch (no DeepXDE):
the loss is the mean over all points of ``weight · (residual² or (u − value)²)`` with one
weight per term (:func:`~tangentscope.data.burgers.burgers_point_losses`), so every point —
collocation, initial, boundary, observation — is one example of the gate's statistics.

Tracked over training: the relative L2 error against the *clean* exact solution on a 101 × 256
grid (its minimum, the step of the minimum, its end value), the observation MSE against the
noise floor ``σ²`` (below ``σ²`` = memorized noise), and the steps to first reach
``(1 + level_slack) ×`` AdamW's minimum error (same seed: same data and initialisation).

Optimizers: as in :mod:`.inr` — AdamW, the gated AdamW with exact per-point statistics
(closed form: :meth:`~tangentscope.data.burgers.BurgersPINN.grad_moments`, passed to
``GatedAdamW.step(moments=...)``) at the three placements, the streaming gate, and AdamW with
early stopping on ``holdout_fraction`` of the observations held out (``adamw-es``).

    tangentscope run pinn --preset smoke
    tangentscope run pinn --preset full
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
from ..data.burgers import (
    BurgersPINN,
    burgers_point_losses,
    burgers_reference,
    noisy_burgers_observations,
    residual_from_derivatives,
    sample_collocation,
)
from ..errors import ConfigError
from ..io import RunDir
from ..models.siren import Siren
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

__all__ = ["Config", "EXPERIMENT", "plot", "run", "train_cell"]


@dataclasses.dataclass(frozen=True)
class Config:
    """PINN experiment settings.

    Attributes:
        seed, n_seeds: seeds ``seed … seed + n_seeds − 1``; a seed fixes the observations and
            their noise, the collocation points and the initialisation (paired runs).
        optimizers: names from :data:`~tangentscope.experiments._fitting.OPTIMIZERS`.
        n_obs, sigma: noisy observations of ``u`` and their noise std.
        n_collocation, n_initial, n_boundary: fixed residual / ``t = 0`` / ``x = ±1`` points.
        pde_weight: weight of the residual term (the others have weight 1).
        width, hidden_layers, omega_0: the SIREN (ω₀ for every layer).
        lr, weight_decay, threshold: AdamW's and the gate's ``τ``.
        steps, eval_every: optimizer steps, steps between evaluations.
        batch_size: points per step, drawn without replacement each step from all of them
            (0 = full batch; the loss weights keep each term's expectation).
        holdout_fraction: observations held out for ``adamw-es``.
        level_slack: "converged" = rel. L2 error ≤ ``(1 + level_slack) ×`` AdamW's minimum.
        grid_t, grid_x: the evaluation grid of the exact solution.
        threads: ``torch.set_num_threads`` during the run (0 = leave as is).
    """

    seed: int = 0
    n_seeds: int = 3
    optimizers: tuple[str, ...] = ("adamw", "gated", "gated-streaming", "adamw-es",
                                   "gated-grad", "gated-moments")
    n_obs: int = 1000
    sigma: float = 0.1
    n_collocation: int = 1000
    n_initial: int = 256
    n_boundary: int = 256
    pde_weight: float = 1.0
    width: int = 64
    hidden_layers: int = 3
    omega_0: float = 30.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    threshold: float = 1.0
    steps: int = 3000
    eval_every: int = 50
    batch_size: int = 0
    holdout_fraction: float = 0.1
    level_slack: float = 0.05
    grid_t: int = 101
    grid_x: int = 256
    threads: int = 1

    def __post_init__(self):
        check_common(self)
        for name in ("n_obs", "n_collocation", "n_initial", "n_boundary", "width"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if round(self.holdout_fraction * self.n_obs) < 1 or \
                round((1 - self.holdout_fraction) * self.n_obs) < 1:
            raise ConfigError("holdout_fraction leaves no held-out or no training observations; "
                              "raise n_obs or change holdout_fraction")


@dataclasses.dataclass(frozen=True)
class _Problem:
    """The points and targets of one seed: ``tx (m, 2)`` and ``target (m, 3)`` rows
    ``(kind, value, weight)`` for the training loss; observation rows ``obs_rows`` of them;
    held-out observations ``held_tx, held_u``; the evaluation grid ``grid_tx, grid_u``."""

    tx: Tensor
    target: Tensor
    obs_rows: Tensor
    obs_clean: Tensor
    n_collocation: int
    held_tx: Tensor | None
    held_u: Tensor | None
    grid_tx: Tensor
    grid_u: Tensor


def make_problem(cfg: Config, seed: int, *, early_stop: bool) -> _Problem:
    """Observations, collocation/initial/boundary points and per-point loss weights."""
    obs = noisy_burgers_observations(cfg.n_obs, cfg.sigma, seed=seed)
    keep = torch.arange(cfg.n_obs)
    held_tx = held_u = None
    if early_stop:
        perm = torch.randperm(cfg.n_obs, generator=torch.Generator().manual_seed(20_000 + seed))
        k = int(round(cfg.holdout_fraction * cfg.n_obs))
        keep, held = perm[k:].sort().values, perm[:k].sort().values
        held_tx, held_u = obs.tx[held], obs.u[held, 0]
    col, ic, bc = sample_collocation(cfg.n_collocation, cfg.n_initial, cfg.n_boundary,
                                     generator=torch.Generator().manual_seed(30_000 + seed))
    tx = torch.cat([col, ic, bc, obs.tx[keep]])
    m = tx.shape[0]
    sizes = [len(col), len(ic), len(bc), len(keep)]
    lam = [cfg.pde_weight, 1.0, 1.0, 1.0]
    weight = torch.cat([torch.full((n,), m * w / n) for n, w in zip(sizes, lam)])
    kind = torch.cat([torch.ones(len(col)), torch.zeros(m - len(col))])
    value = torch.cat([torch.zeros(len(col)), -torch.sin(math.pi * ic[:, 1]),
                       torch.zeros(len(bc)), obs.u[keep, 0]])
    ref = burgers_reference(cfg.grid_t, cfg.grid_x)
    return _Problem(tx=tx, target=torch.stack([kind, value, weight], 1),
                    obs_rows=torch.arange(m - len(keep), m), obs_clean=obs.u_clean[keep, 0],
                    n_collocation=len(col), held_tx=held_tx, held_u=held_u,
                    grid_tx=torch.tensor(ref.points(), dtype=torch.float32),
                    grid_u=torch.tensor(ref.u.reshape(-1), dtype=torch.float32))


def train_cell(cfg: Config, name: str, seed: int
               ) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, np.ndarray]]:
    """Train one PINN with one optimizer; return ``(curves, result, fields)``: ``u`` on the
    evaluation grid at the end (``'end'``) and, for ``adamw-es``, at the early-stopping
    checkpoint (``'es'``)."""
    spec = method_spec(name, cfg.threshold)
    prob = make_problem(cfg, seed, early_stop=name in EARLY_STOPPING)
    seed_everything(seed)
    pinn = BurgersPINN(Siren(2, cfg.width, cfg.hidden_layers, 1, first_omega_0=cfg.omega_0,
                             hidden_omega_0=cfg.omega_0))
    exact = spec.stats == "exact"    # closed-form per-point moments, passed at each step
    opt = build_optimizer(spec, pinn, lr=cfg.lr, weight_decay=cfg.weight_decay,
                          moments=pinn.grad_moments if exact else None)
    keys = ("step", "rel_l2", "obs_mse", "obs_clean_mse", "heldout_mse", "residual_mse",
            "fraction")
    rows: dict[str, list[float]] = {k: [] for k in keys}
    finals: dict[str, np.ndarray] = {}
    obs_u = prob.target[prob.obs_rows, 1]
    grid_norm = float(prob.grid_u.norm())

    def evaluate(step: int, frac: float) -> None:
        with torch.no_grad():
            u_grid = pinn.u(prob.grid_tx)[:, 0]
            u_obs = pinn.u(prob.tx[prob.obs_rows])[:, 0]
            res = residual_from_derivatives(pinn(prob.tx[:prob.n_collocation]))
            held = (float("nan") if prob.held_tx is None or prob.held_u is None else
                    float(((pinn.u(prob.held_tx)[:, 0] - prob.held_u) ** 2).mean()))
        if held < min(rows["heldout_mse"], default=float("inf")):   # early-stopping checkpoint
            finals["es"] = u_grid.reshape(cfg.grid_t, cfg.grid_x).numpy()
        rows["step"].append(step)
        rows["rel_l2"].append(float((u_grid - prob.grid_u).norm()) / grid_norm)
        rows["obs_mse"].append(float(((u_obs - obs_u) ** 2).mean()))
        rows["obs_clean_mse"].append(float(((u_obs - prob.obs_clean) ** 2).mean()))
        rows["heldout_mse"].append(held)
        rows["residual_mse"].append(float((res**2).mean()))
        rows["fraction"].append(frac)

    def loss_of(idx: Tensor | None) -> Tensor:
        tx, target = (prob.tx, prob.target) if idx is None else (prob.tx[idx], prob.target[idx])
        return burgers_point_losses(pinn(tx), target).mean()

    seconds = fit(cfg, opt, prob.tx.shape[0], seed, loss_of, evaluate,
                  before=pinn.record_statistics if exact else None,
                  desc=f"pinn {name} seed {seed}")
    curves = {k: np.asarray(v, dtype=float) for k, v in rows.items()}
    i_min = int(np.argmin(curves["rel_l2"]))
    s2 = max(cfg.sigma**2, 1e-300)
    result = {"optimizer": name, "seed": seed,
              "min_rel_l2": curves["rel_l2"][i_min], "min_step": int(curves["step"][i_min]),
              "end_rel_l2": curves["rel_l2"][-1],
              "end_over_min": curves["rel_l2"][-1] / curves["rel_l2"][i_min],
              "obs_mse_over_sigma2_end": curves["obs_mse"][-1] / s2,
              "obs_mse_over_sigma2_min": float(np.min(curves["obs_mse"])) / s2,
              "fraction_updated_end": curves["fraction"][-1],
              "seconds": seconds, "ms_per_step": 1e3 * seconds / cfg.steps}
    if prob.held_tx is not None:
        i_es = int(np.nanargmin(curves["heldout_mse"]))
        result.update(es_step=int(curves["step"][i_es]), es_rel_l2=curves["rel_l2"][i_es])
    with torch.no_grad():
        finals["end"] = pinn.u(prob.grid_tx)[:, 0].reshape(cfg.grid_t, cfg.grid_x).numpy()
    return curves, result, finals


def run(cfg: Config, rd: RunDir) -> dict[str, Any]:
    """Train every ``optimizer × seed`` cell (skipping finished ones) and summarize."""
    with torch_threads(cfg.threads):
        fit_cells(cfg, rd, lambda name, seed: train_cell(cfg, name, seed), "u")
    return summarize(cfg, rd)


_METRICS = ("min_rel_l2", "min_step", "end_rel_l2", "end_over_min", "es_rel_l2", "es_step",
            "obs_mse_over_sigma2_end", "steps_to_level", "speedup_vs_adamw", "ms_per_step")
_COLUMNS = [("min_rel_l2", "min rel. L2", ".4f"), ("min_step", "step of min", ".0f"),
            ("end_rel_l2", "end rel. L2", ".4f"), ("end_over_min", "end / min", ".3f"),
            ("es_rel_l2", "early-stopped rel. L2", ".4f"),
            ("obs_mse_over_sigma2_end", "end obs. MSE / σ²", ".3f"),
            ("steps_to_level", "steps to level", ".0f"),
            ("speedup_vs_adamw", "speed-up vs AdamW", ".2f"), ("ms_per_step", "ms/step", ".0f")]


def summarize(cfg: Config, rd: RunDir) -> dict[str, Any]:
    """Per-optimizer medians and spreads over seeds; writes ``table.md``."""
    summary = summarize_cells(cfg, rd, "rel_l2",
                              lambda ref: ref["min_rel_l2"] * (1 + cfg.level_slack),
                              higher_is_better=False, metrics=_METRICS, columns=_COLUMNS,
                              headline=("min_rel_l2", "end_rel_l2", "obs_mse_over_sigma2_end",
                                        "steps_to_level", "speedup_vs_adamw"))
    summary["noise_floor_sigma2"] = cfg.sigma**2
    summary["level"] = f"rel. L2 <= (1 + {cfg.level_slack}) x AdamW's minimum (same seed)"
    return summary


def plot(rd: RunDir) -> list[Path]:
    """Error and observation-MSE curves (median, min–max over seeds) and the solutions."""
    plt = pyplot()
    cfg = rd.read_config()["config"]
    names = list(cfg["optimizers"])
    arrays = rd.load_arrays()
    sigma2 = max(cfg["sigma"] ** 2, 1e-300)
    out = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    plot_curves(axes[0], arrays, names, "rel_l2")
    axes[0].set(xlabel="step", ylabel="relative L2 error vs exact u", yscale="log",
                title=f"Burgers PINN, {cfg['n_obs']} observations, σ = {cfg['sigma']}")
    axes[0].legend()
    plot_curves(axes[1], arrays, names, "obs_mse", lambda v: v / sigma2)
    axes[1].axhline(1.0, color="k", ls=":", lw=1, label="noise floor σ²")
    axes[1].set(xlabel="step", ylabel="observation MSE / σ²", yscale="log",
                title="below 1 = memorized noise")
    axes[1].legend()
    out.append(save_figure(fig, rd.figure_path("pinn_curves")))
    sols = [(f"{n} (early-stopped)", arrays[f"u_es/{n}"]) if f"u_es/{n}" in arrays else
            (f"{n} (end)", arrays[f"u/{n}"]) for n in names if f"u/{n}" in arrays]
    if sols:
        ref = burgers_reference(cfg["grid_t"], cfg["grid_x"])
        ncols = min(4, len(sols) + 1)
        nrows = -(-(len(sols) + 1) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 2.7 * nrows),
                                 squeeze=False, constrained_layout=True)
        axes = axes.ravel()
        ext = (ref.t[0], ref.t[-1], ref.x[0], ref.x[-1])
        axes[0].imshow(ref.u.T, origin="lower", aspect="auto", extent=ext, cmap="RdBu_r",
                       vmin=-1, vmax=1)
        axes[0].set(title="exact u(t, x)", xlabel="t", ylabel="x")
        err_max = max(float(np.abs(u - ref.u).max()) for _, u in sols)
        for ax, (n, u) in zip(axes[1:], sols):
            im = ax.imshow(np.abs(u - ref.u).T, origin="lower", aspect="auto", extent=ext,
                           cmap="magma", vmin=0, vmax=min(err_max, 0.5))
            ax.set(title=n, xlabel="t")
        for ax in axes:
            ax.grid(False)
        for ax in axes[len(sols) + 1:]:
            ax.axis("off")
        fig.colorbar(im, ax=list(axes[1:len(sols) + 1]), label="|u − exact|", shrink=0.8)
        out.append(save_figure(fig, rd.figure_path("pinn_solutions")))
    return out


EXPERIMENT = Experiment(
    "pinn", Config, run, plot,
    presets={
        "smoke": dict(n_seeds=1, n_obs=200, n_collocation=200, n_initial=64, n_boundary=64,
                      width=32, hidden_layers=2, steps=150, eval_every=10, lr=1e-3,
                      grid_t=26, grid_x=64,
                      optimizers=("adamw", "gated", "gated-streaming", "adamw-es")),
        "full": dict(n_seeds=3, steps=3000, eval_every=50),
    },
    description="Burgers PINN from noisy observations: AdamW vs the gate vs early stopping "
                "(error vs the exact solution)")
