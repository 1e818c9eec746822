"""The analytic-jump race (private to :mod:`tangentscope.experiments.analytic_jump`): tasks,
models and one run of one method from the shared initialization to its targets or its budget.

Costs: a first-order step is 1 gradient-equivalent pass (forward + backward over the set), an
L-BFGS closure 1, a kernel-vector product ``J D Jᵀ v`` 2 (one VJP, one JVP), a forward-only loss
evaluation ½. Train/test losses are tracked after every update outside the timed region.
``cfg`` below is the experiment's ``Config``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data import noisy_1d_regression, noisy_digits
from ..dynamics.jump import JumpSchedule, JumpSubspace, LevenbergMarquardt
from ..losses import OutputLoss, get_loss
from ..models import mlp
from ..optim.spec import build_optimizer
from ._harness import CellOutput, torch_threads

__all__ = ["TASKS", "FAMILIES", "TARGETS", "Task", "make_task", "make_model", "clean_test_loss",
           "variants", "Tracker", "warm_up", "race_cell", "jump_passes"]

TASKS = ("regression", "classification")
FAMILIES = ("adamw", "sgd", "lbfgs", "lm", "jump-adamw")
TARGETS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Task:
    """One race task: data, loss, network shape and the two targets."""

    name: str
    loss: str
    x: Tensor
    y: Tensor
    x_test: Tensor
    y_test: Tensor
    in_dim: int
    out_dim: int
    width: int
    depth: int
    train_target: float
    test_target: float


def make_task(cfg: Any, name: str, seed: int) -> Task:
    """The noisy 1-D regression (squared loss, clean test targets) or the digits (cross-entropy,
    the images not drawn for training as the test set), drawn with ``seed``."""
    if name == "regression":
        d = noisy_1d_regression(cfg.reg_n, cfg.reg_noise, n_test=cfg.reg_n_test, seed=seed,
                                dtype=torch.float64)
        return Task(name, "squared", d.x, d.y, d.x_test, d.y_test, 1, 1, cfg.reg_width,
                    cfg.reg_depth, cfg.reg_train_target, cfg.reg_test_target)
    g = noisy_digits(cfg.cls_n, 0.0, seed=seed, dtype=torch.float64)
    return Task(name, "cross_entropy", g.x, g.y, g.x_test, g.y_test_clean, 64, 10,
                cfg.cls_width, cfg.cls_depth, cfg.cls_train_target, cfg.cls_test_target)


def make_model(cfg: Any, task: Task, seed: int, width: int | None = None) -> nn.Module:
    """The float64 MLP of ``task`` (``width`` overrides the task's), initialized from ``seed``."""
    torch.manual_seed(seed)
    return mlp(task.in_dim, width or task.width, task.depth, task.out_dim,
               activation=cfg.activation).double()


def clean_test_loss(task: Task, out: Tensor) -> float:
    """Clean test MSE (regression, ``mean ‖u − y‖²``) or mean cross-entropy."""
    if task.loss == "squared":
        return float((out - task.y_test).pow(2).sum(1).mean())
    return float(nn.functional.cross_entropy(out, task.y_test))


def variants(cfg: Any) -> list[tuple[str, str, dict[str, Any]]]:
    """``(family, label, settings)`` of every raced variant."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    for fam in cfg.methods:
        if fam == "adamw":
            out += [(fam, f"adamw@lr={lr:g}", {"lr": lr}) for lr in cfg.adamw_lrs]
        elif fam == "sgd":
            out += [(fam, f"sgd@scale={s:g}", {"scale": s}) for s in cfg.sgd_lr_scales]
        elif fam == "lbfgs":
            out.append((fam, "lbfgs", {}))
        elif fam == "lm":
            out += [(fam, f"lm@damping={d:g}", {"damping": d}) for d in cfg.lm_dampings]
        else:
            out += [(fam, f"jump-adamw@lr={lr:g}@m={m}@h={h:g}", {"lr": lr, "m": m, "h": h})
                    for lr in cfg.jump_lrs for m in cfg.jump_every for h in cfg.jump_horizons]
    return out


# -- the race ------------------------------------------------------------------------------------
class Tracker:
    """Train/test loss after every update (untimed), first hits of the targets, a curve."""

    def __init__(self, model: nn.Module, task: Task, lossf: OutputLoss, cfg: Any):
        self.model, self.task, self.lossf = model, task, lossf
        self.max_passes, self.stop = cfg.max_passes, cfg.stop_at_targets
        self.keep = set(np.unique(np.geomspace(1, cfg.max_steps, cfg.curve_points)
                                  .astype(int)).tolist())
        self.hits: dict[str, dict[str, float] | None] = dict.fromkeys(TARGETS)
        self.curve: list[tuple[int, float, float, float, float]] = []
        self.best_test = math.inf
        self.last: tuple[float, float] = (math.nan, math.nan)
        self.diverged = False

    def __call__(self, step: int, passes: float, seconds: float) -> bool:
        """Record the state after ``step`` updates; True when the run should end (both
        targets reached with ``stop_at_targets``, the pass budget spent, or a divergence)."""
        with torch.no_grad():
            out = self.model(self.task.x)
            tr = float(self.lossf.value(out, self.task.y))
            te = clean_test_loss(self.task, self.model(self.task.x_test))
        self.last = (tr, te)
        self.best_test = min(self.best_test, te) if math.isfinite(te) else self.best_test
        for name, value, target in (("train", tr, self.task.train_target),
                                    ("test", te, self.task.test_target)):
            if self.hits[name] is None and value <= target:
                self.hits[name] = {"steps": step, "passes": passes, "seconds": seconds}
        if step == 0 or step in self.keep or any(h is not None and h["steps"] == step
                                                 for h in self.hits.values()):
            self.curve.append((step, passes, seconds, tr, te))
        self.diverged = not (math.isfinite(tr) and math.isfinite(te))
        reached = all(h is not None for h in self.hits.values())
        return self.diverged or (self.stop and reached) or passes >= self.max_passes


def warm_up(model: nn.Module, task: Task) -> None:
    """One tiny subspace (untimed): torch.func's first-call set-up costs seconds, once per
    process; without this the first jump of a process would carry it."""
    JumpSubspace(model, task.x[:4], task.y[:4], loss=task.loss, k=2, max_iter=4)


def race_cell(cfg: Any, task_name: str, seed: int, family: str, label: str,
              settings: Mapping[str, Any]) -> CellOutput:
    """One method (``family`` with ``settings``) on one task and seed, from the seed's
    initialization until both targets, the pass budget or the step cap; the result record and
    the loss curve (``steps``, ``passes``, ``seconds``, ``train_loss``, ``test_loss``)."""
    task = make_task(cfg, task_name, seed)
    model = make_model(cfg, task, seed)
    lossf = get_loss(task.loss)
    extra: dict[str, Any] = {}
    with torch_threads(cfg.threads):
        warm_up(model, task)
        track = Tracker(model, task, lossf, cfg)
        track(0, 0.0, 0.0)
        if family == "lm":
            steps, passes, seconds = _run_lm(cfg, model, task, settings, track, extra)
        elif family == "lbfgs":
            steps, passes, seconds = _run_lbfgs(cfg, model, task, lossf, track)
        else:
            steps, passes, seconds = _run_first_order(cfg, model, task, lossf, family,
                                                      settings, track, extra)
    res: dict[str, Any] = {"task": task_name, "seed": seed, "family": family, "variant": label,
                           "steps": steps, "passes": passes, "seconds": seconds,
                           "final_train_loss": track.last[0], "final_test_loss": track.last[1],
                           "best_test_loss": track.best_test, "diverged": track.diverged,
                           **extra}
    for name in TARGETS:
        hit = track.hits[name]
        for what in ("steps", "passes", "seconds"):
            res[f"{name}_{what}"] = None if hit is None else hit[what]
    c = np.array(track.curve, dtype=float)
    arrays = {"steps": c[:, 0], "passes": c[:, 1], "seconds": c[:, 2], "train_loss": c[:, 3],
              "test_loss": c[:, 4]}
    return CellOutput(res, arrays)


def jump_passes(matvecs: int) -> float:
    """A jump: ``matvecs`` kernel-vector products (2 passes each) and one forward (½)."""
    return 2.0 * matvecs + 0.5


def _run_first_order(cfg: Any, model: nn.Module, task: Task, lossf: OutputLoss,
                     family: str, settings: Mapping[str, Any], track: Tracker,
                     extra: dict[str, Any]) -> tuple[int, float, float]:
    if family == "sgd":                     # set-up, untimed: the step size from λ_1(S(0))
        top = float(JumpSubspace(model, task.x, task.y, loss=task.loss, k=1, tol=1e-4,
                                 max_iter=cfg.lanczos_max).eigenvalues[0])
        lr = settings["scale"] / top
        built = build_optimizer("sgd", model, lr=lr, weight_decay=0.0, momentum=cfg.momentum)
        extra["lr"] = lr
    else:
        built = build_optimizer("adamw", model, lr=settings["lr"], weight_decay=0.0)
    opt = built.optimizer
    sched = None
    passes, seconds, step, jump_seconds = 0.0, 0.0, 0, 0.0
    if family == "jump-adamw":
        sched = JumpSchedule(model, task.x, task.y, every=int(settings["m"]), loss=task.loss,
                             k=cfg.k, horizon=float(settings["h"]), guard=cfg.jump_guard,
                             tol=cfg.lanczos_tol, max_iter=cfg.lanczos_max)
        if cfg.jump_at_start:
            t0 = time.perf_counter()
            jump = sched.jump_now()
            jump_seconds = seconds = time.perf_counter() - t0
            passes = jump_passes(jump.matvecs)
    done = sched is not None and cfg.jump_at_start and track(0, passes, seconds)
    for step in range(1, 0 if done else cfg.max_steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        lossf.value(model(task.x), task.y).backward()
        built.step()
        passes += 1.0
        if sched is not None:
            t1 = time.perf_counter()
            stepped = sched.after_step()
            if stepped is not None:
                passes += jump_passes(stepped.matvecs)
                jump_seconds += time.perf_counter() - t1
        seconds += time.perf_counter() - t0
        if track(step, passes, seconds):
            break
    if sched is not None:
        h = sched.history
        extra.update({"jumps": len(h), "jumps_accepted": sum(r.accepted for r in h),
                      "jump_passes": sum(jump_passes(r.matvecs) for r in h),
                      "jump_seconds": jump_seconds,
                      "first_jump_loss_ratio": h[0].loss_after / h[0].loss_before if h
                      else None,
                      "jump_displacement_error": float(np.median([r.displacement_error
                                                                  for r in h])) if h else None,
                      "jump_loss_ratio": float(np.median([r.loss_after / r.loss_before
                                                          for r in h])) if h else None})
    return step, passes, seconds


def _run_lbfgs(cfg: Any, model: nn.Module, task: Task, lossf: OutputLoss,
               track: Tracker) -> tuple[int, float, float]:
    # one iteration per step() call, with room for the line search (torch's default max_eval
    # for max_iter=1 would leave it none)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=1, max_eval=25,
                            history_size=cfg.lbfgs_history, line_search_fn="strong_wolfe",
                            tolerance_grad=0.0, tolerance_change=0.0)
    calls = [0]

    def closure() -> Tensor:
        calls[0] += 1
        opt.zero_grad(set_to_none=True)
        loss = lossf.value(model(task.x), task.y)
        loss.backward()
        return loss

    seconds, step = 0.0, 0
    for step in range(1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        opt.step(closure)
        seconds += time.perf_counter() - t0
        if track(step, float(calls[0]), seconds):
            break
    return step, float(calls[0]), seconds


def _run_lm(cfg: Any, model: nn.Module, task: Task, settings: Mapping[str, Any],
            track: Tracker, extra: dict[str, Any]) -> tuple[int, float, float]:
    lm = LevenbergMarquardt(model, task.x, task.y, loss=task.loss, k=cfg.k,
                            damping=float(settings["damping"]), tol=cfg.lanczos_tol,
                            max_iter=cfg.lanczos_max)
    passes, seconds, step, rejected = 0.0, 0.0, 0, 0
    errors: list[float] = []
    for step in range(1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        info = lm.step()
        seconds += time.perf_counter() - t0
        passes += 2.0 * info.matvecs + 0.5 * info.forwards
        rejected += sum(not r.accepted for r in info.trials)
        errors += [r.displacement_error for r in info.trials if r.accepted]
        if track(step, passes, seconds):
            break
    extra.update({"lm_rejected_trials": rejected, "lm_final_damping": lm.mu,
                  "jump_displacement_error": float(np.median(errors)) if errors else None})
    return step, passes, seconds
