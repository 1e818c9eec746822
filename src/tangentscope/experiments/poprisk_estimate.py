"""How good is the validation-free population-risk estimate? (docs/notation.md: the
validation-free population-risk estimate)

The claim (the essay, the preprint's abstract): the leave-one-out argument behind the gate gives
"an exact population-risk objective from a single training run with no validation data". This
experiment trains on three tasks that have a real held-out set, accumulates the estimator's
per-step predicted population-loss change (:class:`~tangentscope.optim.PopulationRiskEstimator`)
and compares it with the held-out loss:

* ``regression``: noisy 1-D regression (:func:`~tangentscope.data.noisy_1d_regression`), an MLP,
  squared loss ``‖u − y‖²/2`` per example; held out: a fresh noisy draw of the same task;
* ``digits``: scikit-learn's digits with label noise on both sides
  (:func:`~tangentscope.data.digits.noisy_digits`), an MLP, cross-entropy;
* ``modular``: ``a ∘ b mod p`` (:func:`~tangentscope.data.modular_arithmetic`), an embedding MLP
  with AdamW weight decay, cross-entropy; held out: the pairs not trained on.

Per task and seed it reports the Pearson/Spearman correlation between the estimated and the
real held-out loss curves (and, as baselines, between the training loss and the held-out loss),
and the held-out loss at the step the estimator's early-stopping rule picks vs the oracle's
minimum. Run: ``tangentscope run poprisk-estimate --preset full``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._utils import seed_everything
from ..data import modular_arithmetic, noisy_1d_regression
from ..data.digits import noisy_digits
from ..errors import ConfigError
from ..io import RunDir
from ..models import EmbeddingMLP, mlp
from ..optim import GatedAdamW, PopulationRiskEstimator, curve_agreement, stopping_step
from ..optim.spec import build_optimizer, parse_optimizer
from ..viz import pyplot, save_figure
from ._framework import Experiment
from ._harness import check_nonnegative, check_positive, progress, seed_table

__all__ = ["Config", "EXPERIMENT", "EstimateTask", "epoch_batches", "make_task", "run", "plot"]

TASKS = ("regression", "digits", "modular")
CURVES = ("estimate", "measured", "train_first_order")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings (``--field value`` on the command line).

    Attributes:
        seed: first seed; ``n_seeds`` consecutive seeds are run.
        n_seeds: number of consecutive seeds (one run per seed and optimizer).
        task: one of ``regression``, ``digits``, ``modular`` or ``all``.
        steps, eval_every, batch_size, lr: training length, held-out evaluation interval,
            minibatch size (sampled without replacement within an epoch), AdamW learning rate
            (regression and digits).
        gate: the optimizer (``off`` = AdamW through ``gated@gate=false``; ``hard``/``soft`` =
            GatedAdamW's gate; :mod:`tangentscope.optim.spec` names ``gated`` and
            ``gated-streaming``).
        stats: ``exact`` (per-example closed forms) or ``streaming`` noise estimates.
        measured: also evaluate each batch after its step (one extra forward) for the
            curvature-including ``measured`` curve.
        patience: the early-stopping rule's patience, in evaluation points.
        reg_n, reg_noise, reg_width: regression: training points, label-noise std, MLP width.
        digits_n, digits_noise, digits_width: digits: training images, flipped-label fraction,
            MLP width.
        mod_p, mod_op, mod_train_fraction, mod_weight_decay, mod_lr, mod_d_embed, mod_width:
            modular arithmetic (defaults: the grokking experiment's "tiny" regime, which
            memorizes and then generalizes within a few hundred steps).
    """

    seed: int = 0
    n_seeds: int = 3
    task: Literal["all", "regression", "digits", "modular"] = "all"
    steps: int = 4000
    eval_every: int = 25
    batch_size: int = 32
    lr: float = 1e-3
    gate: Literal["off", "hard", "soft"] = "off"
    stats: Literal["exact", "streaming"] = "exact"
    measured: bool = True
    patience: int = 20
    reg_n: int = 48
    reg_noise: float = 0.5
    reg_width: int = 256
    digits_n: int = 500
    digits_noise: float = 0.3
    digits_width: int = 256
    mod_p: int = 23
    mod_op: str = "add"
    mod_train_fraction: float = 0.8
    mod_weight_decay: float = 1.0
    mod_lr: float = 1e-2
    mod_d_embed: int = 32
    mod_width: int = 64

    def __post_init__(self):
        check_positive(self, "lr", "mod_lr")
        check_nonnegative(self, "mod_weight_decay", "reg_noise", "digits_noise")
        for name in ("n_seeds", "steps", "eval_every", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2 and self.stats == "exact":
            raise ConfigError("exact statistics need batch_size >= 2 (the variance of one "
                              "example is undefined); use --stats streaming")

    @property
    def tasks(self) -> tuple[str, ...]:
        return TASKS if self.task == "all" else (self.task,)


@dataclasses.dataclass(frozen=True)
class EstimateTask:
    """One task of the experiment: training and held-out data, the model (initialized), the
    per-example-mean loss and the AdamW hyper-parameters."""

    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor
    model: nn.Module
    loss: Any               # loss(outputs, targets) -> mean over examples
    weight_decay: float
    lr: float


def _half_mse(out: Tensor, y: Tensor) -> Tensor:
    return 0.5 * ((out - y) ** 2).sum(-1).mean()


def make_task(cfg: Config, name: str, seed: int) -> EstimateTask:
    """The task ``name`` (one of :data:`TASKS`) of ``cfg`` for ``seed`` (the model is initialized
    after ``seed_everything(seed)``)."""
    seed_everything(seed)
    if name == "regression":
        d = noisy_1d_regression(cfg.reg_n, cfg.reg_noise, seed=seed)
        held = noisy_1d_regression(2000, cfg.reg_noise, seed=10_000 + seed)   # fresh noisy draw
        return EstimateTask(d.x, d.y, held.x, held.y,
                            mlp(1, cfg.reg_width, 2, 1, activation="tanh"), _half_mse, 0.0,
                            cfg.lr)
    if name == "digits":
        dg = noisy_digits(cfg.digits_n, cfg.digits_noise, seed=seed)
        return EstimateTask(dg.x, dg.y, dg.x_test, dg.y_test, mlp(64, cfg.digits_width, 2, 10),
                            F.cross_entropy, 0.0, cfg.lr)
    dm = modular_arithmetic(cfg.mod_p, cfg.mod_op, cfg.mod_train_fraction, seed=seed)
    model = EmbeddingMLP(cfg.mod_p, d_embed=cfg.mod_d_embed, width=cfg.mod_width)
    return EstimateTask(dm.x_train, dm.y_train, dm.x_val, dm.y_val, model, F.cross_entropy,
                        cfg.mod_weight_decay, cfg.mod_lr)


def epoch_batches(n: int, b: int, g: torch.Generator) -> Iterator[Tensor]:
    """Minibatch indices ``(b,)`` without replacement within an epoch of ``n`` examples
    (the last ``n mod b`` of each shuffled epoch are dropped), for ever."""
    while True:
        perm = torch.randperm(n, generator=g)
        for s in range(0, n - b + 1, b):
            yield perm[s:s + b]


@torch.no_grad()
def _eval(task: EstimateTask) -> tuple[float, float]:
    return (float(task.loss(task.model(task.x), task.y)),
            float(task.loss(task.model(task.x_test), task.y_test)))


def _train_one(cfg: Config, name: str, seed: int) -> dict[str, np.ndarray]:
    """One run; returns the curves sampled at the evaluation steps."""
    task = make_task(cfg, name, seed)
    model = task.model
    gate = False if cfg.gate == "off" else cfg.gate
    spec = parse_optimizer("gated" if cfg.stats == "exact" else "gated-streaming")
    built = build_optimizer(spec.replace(gate=gate), model, lr=task.lr,
                            weight_decay=task.weight_decay)
    opt = built.optimizer
    assert isinstance(opt, GatedAdamW)
    est = PopulationRiskEstimator(opt)
    batches = epoch_batches(task.x.shape[0], min(cfg.batch_size, task.x.shape[0]),
                       torch.Generator().manual_seed(seed))
    rows: dict[str, list[float]] = {k: [] for k in ("step", "train", "heldout", "gate_fraction")}
    for step in progress(range(cfg.steps + 1), desc=f"{name} seed {seed}", total=cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            train, held = _eval(task)
            for k, v in (("step", step), ("train", train), ("heldout", held)):
                rows[k].append(v)
            frac = opt.gate_stats()["fraction_updated"][0] if gate else None
            rows["gate_fraction"].append(np.nan if frac is None else frac)
        if step == cfg.steps:
            break
        idx = next(batches)
        xb, yb = task.x[idx], task.y[idx]
        opt.zero_grad(set_to_none=True)
        loss = task.loss(model(xb), yb)
        loss.backward()
        est.observe(loss)
        opt.step()
        if cfg.measured:
            with torch.no_grad():
                est.observe_after(task.loss(model(xb), yb))
    curve = est.curve()
    at = np.asarray(rows["step"], dtype=int)
    out = {k: np.asarray(v, dtype=float) for k, v in rows.items()}
    for k in CURVES:
        out[k] = getattr(curve, k)[at]
    out["self_influence_total"] = np.concatenate([[0.0], np.cumsum(curve.self_influence)])[at]
    return out


def _summarize(cfg: Config, c: dict[str, np.ndarray]) -> dict[str, Any]:
    held = c["heldout"]
    oracle = int(np.argmin(held))
    out: dict[str, Any] = {"oracle_step": int(c["step"][oracle]),
                           "oracle_heldout": float(held[oracle]),
                           "final_heldout": float(held[-1])}
    for k in CURVES + ("train",):
        agree = curve_agreement(c[k], held)
        out[f"{k}_pearson"], out[f"{k}_spearman"] = agree["pearson"], agree["spearman"]
        _stop, best = stopping_step(c[k], patience=cfg.patience)
        out[f"{k}_stop_step"] = int(c["step"][best])
        out[f"{k}_stop_heldout"] = float(held[best])
        out[f"{k}_stop_regret"] = float(held[best] - held[oracle])
    out["mean_gate_fraction"] = float(np.nanmean(c["gate_fraction"])) if np.isfinite(
        c["gate_fraction"]).any() else None
    return out


def run(cfg: Config, rd: RunDir) -> dict[str, Any]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                  # small models: one thread is fastest
    try:
        return _run(cfg, rd)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Config, rd: RunDir) -> dict[str, Any]:
    done = rd.cells()
    per_task: dict[str, list[dict[str, Any]]] = {t: [] for t in cfg.tasks}
    for name in cfg.tasks:
        for seed in range(cfg.seed, cfg.seed + cfg.n_seeds):
            key = f"{name}-seed{seed}"
            if key not in done:
                curves = _train_one(cfg, name, seed)
                rd.save_arrays(**{f"{key}/{k}": v for k, v in curves.items()})
                for i in range(len(curves["step"])):
                    rd.log(task=name, seed=seed, **{k: float(v[i]) for k, v in curves.items()})
                rd.save_cell(key, _summarize(cfg, curves))
                done = rd.cells()
            per_task[name].append(done[key])
    summary: dict[str, Any] = {"tasks": {}}
    for name, recs in per_task.items():
        agg = seed_table(recs, list(recs[0]))
        summary["tasks"][name] = {"per_seed": recs, "aggregate": agg}
        for k in ("estimate_pearson", "estimate_spearman", "train_spearman",
                  "estimate_stop_heldout", "oracle_heldout", "final_heldout"):
            if k in agg:
                summary[f"{name}_{k}"] = agg[k]["median"]
    return summary


def plot(rd: RunDir) -> list[Path]:
    plt = pyplot()
    arrays = rd.load_arrays()
    tasks = sorted({k.split("-seed")[0] for k in arrays})
    paths: list[Path] = []
    if not tasks:
        return paths
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, name in zip(axes[0], tasks):
        seeds = sorted({k.split("/")[0] for k in arrays if k.startswith(f"{name}-seed")})
        for j, s in enumerate(seeds):
            a = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(s + "/")}
            lab = (lambda t: t) if j == 0 else (lambda t: None)
            ax.plot(a["step"], a["heldout"], color="k", lw=1.6, label=lab("held-out (real)"))
            ax.plot(a["step"], a["estimate"], color="C0", lw=1.2,
                    label=lab("estimate (first order)"))
            ax.plot(a["step"], a["measured"], color="C2", lw=1.0, ls="--",
                    label=lab("estimate (measured curvature)"))
            ax.plot(a["step"], a["train"], color="C3", lw=0.9, ls=":", label=lab("training loss"))
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
    axes[0][0].legend()
    paths.append(save_figure(fig, rd.figure_path("estimate_vs_heldout")))
    return paths


EXPERIMENT = Experiment(
    "poprisk-estimate", Config, run, plot,
    presets={"smoke": dict(steps=40, eval_every=10, n_seeds=1, patience=2, reg_width=32,
                           digits_n=200, digits_width=32, mod_p=11, mod_width=32),
             "full": dict(steps=4000, eval_every=25, n_seeds=3)},
    description="validation-free population-risk estimate vs real held-out loss (3 tasks)")
