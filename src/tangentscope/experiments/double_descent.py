"""Double descent: a width sweep with label noise, read through the signal channel.

The claim (essay): "Double descent is noise moving between the signal channel and the reservoir
as model capacity sweeps across interpolation. At the interpolation threshold, noise briefly
enters the signal channel and test error spikes. Past it, the noise gets absorbed back into the
reservoir."

Per ``optimizer × width × seed`` cell a network is trained on labels with a known fraction
flipped, and we record train error (on the noisy labels), clean test error, the step at which
training error first hit zero, and — where the stacked output space ``N = n p`` is small enough
for dense operators (``max_operator_dim``) and for the optimizers in ``operator_optimizers`` —
a :class:`~tangentscope.dynamics.KernelRecorder` trajectory on the *whole* training set, from
which :func:`~tangentscope.dynamics.label_noise.noise_channel_analysis` gives the fraction of
label-noise energy in the channel of ``W_S(0, T)`` (hard split and soft fraction), the test
displacement ``−G_Q g_noise`` and the test error with that displacement removed. With
``min_norm=True`` each cell also gets the ``t = ∞`` minimum-norm fit of its *initial* eNTK
(exact for random features, the lazy prediction for an MLP).

Presets: ``full`` — binary MNIST (parity, PCA-32, n = 500, 20% flips), one-hidden-layer GELU
MLP, full-batch Adam and the gated AdamW, operators for Adam; ``random-features`` — the same data
with frozen random features, gradient descent and the min-norm fit; ``mnist1d`` — the issue's
probe: MLP 40-h-h-10 on MNIST-1D, 4,000 examples, 15% flips, minibatch Adam vs gated AdamW,
cross-entropy, no operators (``N = 40,000``).

    tangentscope run double-descent --preset smoke
    tangentscope run double-descent --preset full
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
from ..dynamics import KernelRecorder, analytic_jump
from ..dynamics.label_noise import (
    classification_error,
    min_norm_noise_transfer,
    noise_channel_analysis,
)
from ..dynamics.linearized import gd_step_size
from ..errors import ConfigError
from ..io import RunDir
from ..kernels import entk, flatten_kernel
from ..models import mlp, random_features
from ..optim.spec import build_optimizer
from ..viz.phenomena import double_descent_figures
from ._framework import Experiment
from ._harness import (
    OPTIMIZERS,
    check_positive,
    optimizer_spec,
    run_cells,
    seed_table,
    snapshot_schedule,
    train_network,
)

__all__ = ["Config", "EXPERIMENT", "run", "plot", "summarize"]


@dataclasses.dataclass(frozen=True)
class Config:
    """Double-descent width sweep.

    Attributes:
        seed, seeds: first seed and number of seeds (data split, flips, init, batch order).
        dataset, binary, pca, n_train, n_test, label_noise: the data
            (:func:`~tangentscope.data.vision.load_classification`).
        model: ``mlp`` or ``random_features`` (frozen first layer; linear in its parameters).
        widths: hidden widths swept.
        depth, activation: MLP hidden layers and activation.
        optimizers: from :data:`~tangentscope.experiments._harness.OPTIMIZERS`.
        loss: ``squared`` (targets ±1 or one-hot) or ``cross_entropy``.
        lr: learning rate (Adam); for ``gd`` the step is ``lr_scale · n/λ_max(K_SS(0))``.
        lr_scale: see ``lr``.
        steps: optimizer steps; ``batch_size``: ``None`` = full batch.
        log_every: steps between logged train/test errors.
        operators: record kernels and run the channel analysis where ``n p <=
            max_operator_dim`` for the optimizers in ``operator_optimizers``.
        operator_optimizers: the optimizers whose runs get the kernel recording and channel
            analysis (when ``operators`` is on and the loss is squared).
        max_operator_dim: largest ``n p`` (training points × outputs) analysed; larger runs
            skip the recording.
        snapshot_every, log_snapshots, n_probe, threshold, discretization, timeline: recorder and
            analysis settings (see :mod:`tangentscope.experiments.benign_overfitting`).
        min_norm: also evaluate the ``t = ∞`` min-norm fit of the initial eNTK.
    """

    seed: int = 0
    seeds: int = 3
    dataset: str = "mnist"
    binary: str | None = "parity"
    pca: int | None = 32
    n_train: int = 500
    n_test: int = 1000
    label_noise: float = 0.2
    model: str = "mlp"
    widths: tuple[int, ...] = (2, 4, 8, 12, 16, 24, 32, 64, 128, 512)
    depth: int = 1
    activation: str = "gelu"
    optimizers: tuple[str, ...] = ("adam", "gated")
    loss: str = "squared"
    lr: float = 1e-3
    lr_scale: float = 0.5
    steps: int = 4000
    batch_size: int | None = None
    log_every: int = 100
    operators: bool = True
    operator_optimizers: tuple[str, ...] = ("adam",)
    max_operator_dim: int = 1200
    snapshot_every: int = 100
    log_snapshots: int = 20
    n_probe: int = 300
    threshold: float = 0.5
    discretization: str = "exp"
    timeline: int = 0
    min_norm: bool = False

    def __post_init__(self) -> None:
        check_positive(self, "lr", "lr_scale")
        bad = [o for o in self.optimizers if o not in OPTIMIZERS]
        if bad:
            raise ConfigError(f"unknown optimizer(s) {bad}; one of {tuple(OPTIMIZERS)}")
        if self.model not in ("mlp", "random_features"):
            raise ConfigError(f"model must be 'mlp' or 'random_features', got {self.model!r}")
        if self.loss not in ("squared", "cross_entropy"):
            raise ConfigError(f"loss must be 'squared' or 'cross_entropy', got {self.loss!r}")
        if self.loss == "cross_entropy" and self.operators and self.n_train * 10 <= \
                self.max_operator_dim:
            raise ConfigError("the channel analysis is normalized for squared loss; with "
                              "loss=cross_entropy pass --operators false")
        if not self.widths or min(self.widths) < 1 or self.seeds < 1 or self.steps < 1:
            raise ConfigError("widths must be positive, seeds and steps >= 1")


def _data(cfg: Config, seed: int) -> Any:
    return load_classification(cast(Any, cfg.dataset), cfg.n_train, cfg.n_test,
                               label_noise=cfg.label_noise, binary=cast(Any, cfg.binary),
                               pca=cfg.pca, seed=seed,
                               dtype=torch.float64)


def _targets(cfg: Config, data: Any, *, clean: bool = False, test: bool = False) -> torch.Tensor:
    if cfg.loss == "cross_entropy":
        return data.y_test if test else (data.y_clean if clean else data.y)
    enc = "pm1" if data.n_classes == 2 else "onehot"
    return data.test_targets(enc) if test else data.targets(enc, clean=clean)


def _model(cfg: Config, data: Any, width: int, seed: int) -> torch.nn.Module:
    p = 1 if (data.n_classes == 2 and cfg.loss == "squared") else data.n_classes
    if cfg.model == "random_features":
        return random_features(data.dim, width, p, activation=cfg.activation, seed=seed,
                               dtype=torch.float64)
    return mlp(data.dim, width, cfg.depth, p, activation=cfg.activation).to(torch.float64)


def _cell(cfg: Config, opt_name: str, width: int, seed: int) -> tuple[dict, dict]:
    data = _data(cfg, seed)
    seed_everything(seed)
    net = _model(cfg, data, width, seed)
    Y, Yc = _targets(cfg, data), _targets(cfg, data, clean=True)
    m = min(cfg.n_probe, data.x_test.shape[0])
    lr = gd_step_size(net, data.x, cfg.lr_scale) if opt_name == "gd" else cfg.lr
    opt = build_optimizer(optimizer_spec(opt_name), net, lr=lr, weight_decay=0.0)
    p = data.n_classes if cfg.loss == "cross_entropy" else (1 if Y.dim() == 1 else Y.shape[1])
    record = (cfg.operators and opt_name in cfg.operator_optimizers and cfg.loss == "squared"
              and data.n * p <= cfg.max_operator_dim)
    res: dict[str, Any] = {"optimizer": opt_name, "width": width, "seed": seed, "lr": lr,
                           "num_params": sum(q.numel() for q in net.parameters()
                                             if q.requires_grad),
                           "n": data.n, "p": p, "noise_rate": data.noise_rate}
    arrays: dict[str, np.ndarray] = {}
    if cfg.min_norm and cfg.loss == "squared":
        res.update(_min_norm(net, data, Y, Yc, m))
    rec = None
    if record:
        yt = _targets(cfg, data, test=True)
        rec = KernelRecorder(net, data.x, Y, loss="squared", x_test=data.x_test[:m],
                             y_test=yt[:m], optimizer=opt.optimizer,
                             schedule=snapshot_schedule(cfg.steps, cfg.snapshot_every,
                                                        cfg.log_snapshots),
                             total_steps=cfg.steps, verbose=False)
    hist = train_network(net, data.x, Y, data.y, opt, cfg.steps, loss=cfg.loss,  # type: ignore
                         batch_size=cfg.batch_size, seed=seed, x_test=data.x_test,
                         labels_test=data.y_test, log_every=cfg.log_every)
    res.update({"train_error": float(hist.train_error[-1]),
                "train_loss": float(hist.train_loss[-1]),
                "test_error": float(hist.test_error[-1]),
                "min_test_error_during_training": float(np.nanmin(hist.test_error)),
                "first_zero_train_error_step": hist.first_zero_error_step(),
                "seconds_train": hist.seconds})
    arrays.update(curve_steps=hist.steps, curve_train_error=hist.train_error,
                  curve_test_error=hist.test_error)
    if rec is not None:
        rec.close()
        traj = rec.trajectory()
        yt = _targets(cfg, data, test=True)
        rep = noise_channel_analysis(traj, Yc, yt[:m], data.y_test[:m], threshold=cfg.threshold,
                                     discretization=cfg.discretization,  # type: ignore[arg-type]
                                     timeline=cfg.timeline)
        sc = rep.summary()
        sc["probe_test_error"] = sc.pop("test_error")  # never overwrite the full-test error
        res.update(sc)
        arrays.update(eigenvalues=rep.eigenvalues, noise_per_mode=rep.noise_per_mode,
                      clean_per_mode=rep.clean_per_mode)
    return res, arrays


def _min_norm(net: torch.nn.Module, data: Any, Y: torch.Tensor, Yc: torch.Tensor, m: int
              ) -> dict[str, float]:
    """The ``t = ∞`` min-norm fit of the initial eNTK: test error and where the noise goes."""
    both = torch.cat([data.x, data.x_test])
    K0 = entk(net, both, data.x, dtype=torch.float64)
    assert isinstance(K0, torch.Tensor)         # no ``groups``: one kernel
    K = flatten_kernel(K0)
    n = data.n
    KSS, KQS = K[:n * Y.reshape(n, -1).shape[1]], K[n * Y.reshape(n, -1).shape[1]:]
    with torch.no_grad():
        u0, U_Q0 = net(data.x), net(data.x_test)
    jump = analytic_jump(KSS, u0, Y.reshape(n, -1), K_QS=KQS, U_Q0=U_Q0)
    assert jump.U_Q is not None
    eps = (Y - Yc).reshape(-1)
    nt = min_norm_noise_transfer(KSS, KQS, eps)
    UQ = jump.U_Q[-1]
    return {"minnorm_test_error": classification_error(UQ, data.y_test),
            "minnorm_train_error": classification_error(jump.u[-1], data.y),
            "minnorm_noise_channel_fraction": nt["channel_fraction"],
            "minnorm_noise_test_rms": nt["test_rms"],
            "minnorm_kernel_min_eigenvalue": nt["min_eigenvalue"],
            "minnorm_kernel_rank": nt["rank"]}


def run(cfg: Config, rd: RunDir) -> dict[str, Any]:
    """Every ``optimizer × width × seed`` cell (resumable); return the sweep summary."""
    done = run_cells(rd, [(f"{o}/h{w}/seed{s}", functools.partial(_cell, cfg, o, w, s))
                          for o in cfg.optimizers for w in cfg.widths
                          for s in range(cfg.seed, cfg.seed + cfg.seeds)],
                     desc="double-descent")
    return summarize(cfg, done)


_METRICS = ("test_error", "train_error", "train_loss", "min_test_error_during_training",
            "first_zero_train_error_step", "noise_channel_fraction", "noise_dissipated",
            "clean_dissipated", "channel_rank", "noise_test_rms", "signal_test_rms",
            "probe_test_error", "test_error_without_noise", "dissipation_error",
            "displacement_error", "gradient_error", "minnorm_test_error",
            "minnorm_noise_channel_fraction", "minnorm_noise_test_rms",
            "minnorm_kernel_min_eigenvalue", "num_params")


def summarize(cfg: Config, cells: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per optimizer: the curves (median/min/max over seeds per width), the interpolation
    threshold, the test-error peak, and where the noise measures peak."""
    out: dict[str, Any] = {"curves": {}, "landmarks": {}}
    for o in cfg.optimizers:
        rows: list[Mapping[str, Any]] = []
        for w in cfg.widths:
            rs = [r for r in cells.values() if r["optimizer"] == o and int(r["width"]) == w]
            if rs:
                rows.append({"width": w, "seeds": sorted(r["seed"] for r in rs),
                             **seed_table(rs, _METRICS)})
        out["curves"][o] = rows
        out["landmarks"][o] = _landmarks(rows)
    return out


def _med(row: Mapping[str, Any], k: str) -> float:
    v = row.get(k)
    return float(v["median"]) if isinstance(v, Mapping) else float("nan")


def _landmarks(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Threshold = first width with median train error 0; peak = width of the largest median
    test error; where the noise measures peak; rank correlations with test error."""
    if not rows:
        return {}
    widths = [r["width"] for r in rows]
    te = np.array([_med(r, "test_error") for r in rows])
    tr = np.array([_med(r, "train_error") for r in rows])
    zero = [w for w, e in zip(widths, tr) if e == 0]
    ip = int(np.nanargmax(te))
    before = te[:ip + 1]
    lm: dict[str, Any] = {"threshold_width": zero[0] if zero else None,
                          "peak_width": widths[ip], "peak_test_error": float(te[ip]),
                          "first_min_test_error": float(np.nanmin(before)),
                          "peak_height": float(te[ip] - np.nanmin(before)),
                          "last_test_error": float(te[-1])}
    for k in ("noise_channel_fraction", "noise_dissipated", "noise_test_rms",
              "minnorm_noise_channel_fraction", "minnorm_noise_test_rms", "minnorm_test_error"):
        v = np.array([_med(r, k) for r in rows])
        if np.isfinite(v).sum() >= 3:
            iv = int(np.nanargmax(v))
            lm[f"{k}_peak_width"] = widths[iv]
            # a plateau is not a peak: how far the measure falls after its maximum (relative;
            # 0 when it stays at the maximum, as a saturated channel fraction does)
            after = v[iv + 1:][np.isfinite(v[iv + 1:])]
            lm[f"{k}_drop_after_peak"] = (float((v[iv] - after.min()) / abs(v[iv]))
                                          if after.size and v[iv] != 0 else 0.0)
            ok = np.isfinite(v) & np.isfinite(te)
            lm[f"{k}_spearman_vs_test_error"] = _spearman(v[ok], te[ok])
    return lm


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if len(a) < 3 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def plot(rd: RunDir) -> list[Path]:
    """Figures from the run directory alone."""
    return double_descent_figures(rd)


EXPERIMENT = Experiment(
    "double-descent", Config, run, plot,
    presets={
        "smoke": dict(seeds=1, n_train=60, n_test=200, pca=8, widths=(2, 8, 64),
                      optimizers=("adam", "gated"), steps=300, log_every=100,
                      snapshot_every=50, log_snapshots=6, n_probe=60),
        "full": dict(),
        "random-features": dict(model="random_features", optimizers=("gd",),
                                operator_optimizers=("gd",), lr_scale=0.5, steps=4000,
                                widths=(50, 100, 200, 300, 400, 450, 500, 550, 600, 800, 1000,
                                        2000, 4000),
                                min_norm=True, activation="relu"),
        "mnist1d": dict(dataset="mnist1d", binary=None, pca=None, n_train=4000, n_test=1000,
                        label_noise=0.15, depth=2, activation="relu", loss="cross_entropy",
                        widths=(8, 16, 24, 32, 48, 64, 96, 128, 256), batch_size=128,
                        steps=6250, log_every=625, operators=False),
    },
    description="width sweep with label noise: test-error peak vs noise in the signal channel")
