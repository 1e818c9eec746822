"""Implicit bias: the spectral schedule, and how close the network is to a minimum-norm fit.

The claim (essay): "Implicit bias is the spectral schedule of W_S(t) filling the signal channel
from the largest kernel eigenvalue down. Gradient flow learns parsimonious, high-mobility modes
first and low-mobility modes last. By strictly confining its test predictions to this accumulated
signal channel, the network acts as a Moore-Penrose pseudo-inverse over the realized path,
effectively finding the minimum-norm solution in the dynamic feature space rather than the
static parameter space."

Per ``width × seed`` an MLP is trained by full-batch gradient descent on squared loss (real data:
binary MNIST by default) while a :class:`~tangentscope.dynamics.KernelRecorder` snapshots the
eNTK on the training set and a test probe. We measure

- the **spectral schedule**: the time at which each residual mode (eigenvectors of ``K_SS(0)``)
  shrank 10×, against the frozen-kernel prediction ``ln 10 · n/λ_i``
  (:func:`~tangentscope.dynamics.spectral_schedule`): log–log slope, median ratio and Spearman
  correlation; and the rank of the channel of ``W_S(0, t)`` as ``t`` grows against the
  frozen-kernel count of modes with ``1 − e^{−2λ_i t/n} > 1/2``;
- the **minimum-norm comparison**: the network's test outputs against (a) the linearized model
  after the same GD steps, (b) the ``t = ∞`` min-norm interpolant of the initial eNTK, (c) that of
  the final eNTK and (d) that of the time-averaged eNTK along the path (the "dynamic feature
  space" reading), as relative errors; the kernel's movement ``‖K_T − K_0‖/‖K_0‖``; and
  ``‖w_T − w_0‖`` against the min-norm ``√(r₀ᵀ K_0⁺ r₀)``.

Widths sweep from the lazy regime (wide) into feature learning (narrow).

    tangentscope run implicit-bias --preset smoke
    tangentscope run implicit-bias --preset full
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._utils import seed_everything
from ..data.vision import load_classification
from ..dynamics import KernelRecorder, channel_timeline, spectral_schedule
from ..dynamics.label_noise import classification_error
from ..dynamics.linearized import gd_step_size, linearized_comparison, minnorm_rel_errors
from ..errors import ConfigError
from ..io import RunDir
from ..models import mlp
from ..optim.spec import build_optimizer
from ..viz.phenomena import implicit_bias_figures
from ._framework import Experiment
from ._harness import (
    check_positive,
    optimizer_spec,
    param_vector,
    run_cells,
    seed_table,
    snapshot_schedule,
    train_network,
)

__all__ = ["Config", "EXPERIMENT", "run", "plot", "summarize"]


@dataclasses.dataclass(frozen=True)
class Config:
    """Implicit-bias sweep.

    Attributes:
        seed, seeds: first seed and number of seeds.
        dataset, binary, pca, n_train, n_test, label_noise: the data (±1 targets).
        widths: hidden widths (lazy when wide).
        depth, activation: the MLP (smooth activations keep the first-order description exact
            to O(step); ReLU kinks break it).
        lr_scale: GD step ``lr_scale · n/λ_max(K_SS(0))``.
        steps: GD steps.
        snapshot_every, log_snapshots: recorder schedule (log-spaced snapshots resolve the
            fast modes).
        n_probe: test points recorded for ``K_QS``.
        fraction: a mode counts as learned once its residual is below this fraction of its start.
        timeline: windows ``[0, t]`` at which the channel rank of ``W_S`` is computed.
    """

    seed: int = 0
    seeds: int = 3
    dataset: str = "mnist"
    binary: str | None = "parity"
    pca: int | None = 32
    n_train: int = 300
    n_test: int = 1000
    label_noise: float = 0.0
    widths: tuple[int, ...] = (8, 32, 128, 512, 2048)
    depth: int = 1
    activation: str = "gelu"
    lr_scale: float = 0.5
    steps: int = 3000
    snapshot_every: int = 100
    log_snapshots: int = 40
    n_probe: int = 500
    fraction: float = 0.1
    timeline: int = 12

    def __post_init__(self) -> None:
        check_positive(self, "lr_scale")
        if not self.widths or min(self.widths) < 1 or self.seeds < 1 or self.steps < 1:
            raise ConfigError("widths must be positive, seeds and steps >= 1")
        if not 0 < self.fraction < 1:
            raise ConfigError(f"fraction must be in (0, 1), got {self.fraction}")


def _cell(cfg: Config, width: int, seed: int) -> tuple[dict, dict]:
    data = load_classification(cfg.dataset, cfg.n_train, cfg.n_test,  # type: ignore[arg-type]
                               label_noise=cfg.label_noise, binary=cfg.binary,  # type: ignore
                               pca=cfg.pca, seed=seed, dtype=torch.float64)
    if data.n_classes != 2:
        raise ConfigError("implicit-bias uses ±1 targets: pass --binary parity (or low_high)")
    seed_everything(seed)
    net = mlp(data.dim, width, cfg.depth, 1, activation=cfg.activation).to(torch.float64)
    w0 = param_vector(net.parameters())
    lr = gd_step_size(net, data.x, cfg.lr_scale)
    opt = build_optimizer(optimizer_spec("gd"), net, lr=lr, weight_decay=0.0)
    Y = data.targets("pm1")
    m = min(cfg.n_probe, data.x_test.shape[0])
    rec = KernelRecorder(net, data.x, Y, loss="squared", x_test=data.x_test[:m],
                         y_test=data.test_targets("pm1")[:m], optimizer=opt.optimizer,
                         schedule=snapshot_schedule(cfg.steps, cfg.snapshot_every,
                                                    cfg.log_snapshots),
                         total_steps=cfg.steps, test_gram=False, verbose=False)
    hist = train_network(net, data.x, Y, data.y, opt, cfg.steps, x_test=data.x_test,
                         labels_test=data.y_test)
    rec.close()
    traj = rec.trajectory()
    dist = float(torch.linalg.norm(param_vector(net.parameters()) - w0))
    K0, KQ0, KT = traj.kernel(0), traj.cross_kernel(0), traj.kernel(-1)
    assert KQ0 is not None and traj.U_Q is not None
    cmp = linearized_comparison(K0, KQ0, traj.u[0], traj.U_Q[0], Y, traj.u[-1], traj.U_Q[-1],
                                steps=cfg.steps, lr=lr, KT=KT, param_distance=dist)
    mn = minnorm_rel_errors(traj, Y)
    sched = spectral_schedule(traj, "initial", fraction=cfg.fraction)
    pred, got = sched.predicted_time, sched.learned_time
    assert pred is not None
    ok = np.isfinite(got) & np.isfinite(pred) & (got > 0) & (pred > 0)
    slope = float(np.polyfit(np.log(pred[ok]), np.log(got[ok]), 1)[0]) if ok.sum() >= 3 \
        else float("nan")
    b = float(traj.hessian(0)[0, 0, 0])  # B = b I under squared loss; W_S saturates at 1/(2b)
    tl = channel_timeline(traj, vectors=None, threshold=0.5 / (2 * b), mode="absolute",
                          every=max(1, (len(traj) - 1) // max(cfg.timeline, 1)), top=1)
    lam0 = sched.eigenvalues
    frozen_rank = np.array([(1 - np.exp(-2 * b * lam0 * t) > 0.5).sum() for t in tl.times])
    res = {"width": width, "seed": seed, "lr": lr, "n": data.n,
           "num_params": sum(p.numel() for p in net.parameters()),
           "train_error": float(hist.train_error[-1]), "train_loss": float(hist.train_loss[-1]),
           "test_error": float(hist.test_error[-1]),
           "probe_test_error": classification_error(traj.U_Q[-1], data.y_test[:m]),
           **dataclasses.asdict(cmp), **mn,
           "param_ratio": cmp.param_distance / cmp.minnorm_param_distance,
           "param_ratio_same_step": cmp.param_distance / cmp.linearized_param_distance,
           "schedule_spearman": sched.rank_correlation, "schedule_loglog_slope": slope,
           "schedule_median_ratio": float(np.median(got[ok] / pred[ok])) if ok.any()
           else float("nan"),
           "modes_learned": int(ok.sum()), "modes_total": int(len(got)),
           "channel_rank_final": int(tl.rank[-1]),
           "channel_rank_rel_error": float(np.mean(np.abs(tl.rank - frozen_rank)
                                                   / np.maximum(frozen_rank, 1)))}
    arrays = {"predicted_time": pred, "learned_time": got, "eigenvalues0": lam0,
              "timeline_times": tl.times, "timeline_rank": tl.rank,
              "timeline_frozen_rank": frozen_rank}
    return res, arrays


def run(cfg: Config, rd: RunDir) -> dict[str, Any]:
    """Every ``width × seed`` cell (resumable); return the per-width table."""
    done = run_cells(rd, [(f"h{w}/seed{s}", functools.partial(_cell, cfg, w, s))
                          for w in cfg.widths for s in range(cfg.seed, cfg.seed + cfg.seeds)],
                     desc="implicit-bias")
    return summarize(cfg, done)


def summarize(cfg: Config, cells: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Median, min and max over seeds of every numeric metric, per width."""
    table = []
    for w in cfg.widths:
        rs = [r for r in cells.values() if int(r["width"]) == w]
        if rs:
            stats = seed_table(rs)
            stats.pop("seed", None)
            stats.pop("width", None)
            table.append({"width": w, "seeds": sorted(r["seed"] for r in rs), **stats})
    return {"table": table}


def plot(rd: RunDir) -> list[Path]:
    """Figures from the run directory alone."""
    return implicit_bias_figures(rd)


EXPERIMENT = Experiment(
    "implicit-bias", Config, run, plot,
    presets={
        "smoke": dict(seeds=1, n_train=40, n_test=200, pca=8, widths=(8, 256), steps=300,
                      snapshot_every=50, log_snapshots=10, n_probe=60, timeline=4),
        "full": dict(),
    },
    description="spectral schedule and min-norm interpolation, lazy to feature learning")
