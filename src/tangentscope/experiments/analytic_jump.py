"""The analytic jump to the final network state, raced against first- and second-order optimizers.

The claim (essay, "What the Future Holds"): "in output space, training dynamics can be
understood through a locally linear differential equation along the realized path, where
dominant eigenmodes of the evolving kernel equilibrate exponentially fast. Forcing an optimizer
to slowly step through these solved directions is highly inefficient and suggests a path to
analytically jump to the final network state."

Two measurements (library: :mod:`tangentscope.dynamics.jump`):

- **the race** — per task (noisy 1-D regression, squared loss; scikit-learn's 8×8 digits,
  cross-entropy) and seed, every method starts from the same initialization and trains on the
  full batch until it reaches a train-loss and a test-loss target (or its budget): AdamW, SGD
  with momentum (each over a learning-rate grid), L-BFGS (``torch.optim.LBFGS``, strong Wolfe),
  Levenberg–Marquardt in the top-``k`` eNTK subspace
  (:class:`~tangentscope.dynamics.jump.LevenbergMarquardt`), and "jump every ``m`` AdamW steps
  to the horizon ``λ_1 t = h``" (:class:`~tangentscope.dynamics.jump.JumpSchedule`). Measured:
  optimizer steps, gradient-equivalent passes over the training set and wall-clock seconds to
  each target; per family the best variant of the grid per seed.
- **fidelity** — from the initialization, at widths from narrow (feature learning) to wide
  (lazy), the jump to ``t = ∞`` and to finite horizons: how far the network lands from the
  linearized prediction (``‖u_after − u_pred‖ / ‖u_pred − u_0‖`` on train and test inputs) and
  which fraction of the predicted loss decrease it realizes.

Costs: a first-order step is 1 pass (forward + backward over the set), an L-BFGS closure 1,
a kernel-vector product ``J D Jᵀ v`` 2 (one VJP, one JVP), a forward-only loss evaluation ½.

    tangentscope run analytic-jump --preset smoke
    tangentscope run analytic-jump --preset full
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data import noisy_1d_regression, noisy_digits
from ..dynamics.jump import (
    JumpSchedule,
    JumpSubspace,
    LevenbergMarquardt,
    apply_jump,
    displacement_error,
    linearized_outputs,
)
from ..dynamics.label_noise import classification_error
from ..errors import ConfigError
from ..io import RunDir
from ..losses import OutputLoss, get_loss
from ..models import mlp
from ..optim.spec import build_optimizer
from ..viz.analytic_jump import analytic_jump_figures
from ._framework import Experiment
from ._harness import (
    CellOutput,
    censored_stats,
    check_positive,
    param_vector,
    run_cells,
    seed_table,
    torch_threads,
)

__all__ = ["Config", "EXPERIMENT", "FAMILIES", "run", "plot", "summarize"]

TASKS = ("regression", "classification")
FAMILIES = ("adamw", "sgd", "lbfgs", "lm", "jump-adamw")
TARGETS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Config:
    """The analytic-jump race and the fidelity sweep.

    Attributes:
        seed, seeds: first seed and number of seeds (data, initialization, Lanczos start).
        tasks: ``regression`` (noisy 1-D, squared loss) and/or ``classification`` (digits,
            cross-entropy).
        reg_n, reg_noise, reg_n_test: regression training points, label-noise std, clean test
            points.
        reg_width, reg_depth: the regression MLP (1 → width × depth → 1).
        reg_train_target, reg_test_target: targets: training ``Φ = ‖u − y‖²/(2n)`` and clean
            test mean squared error.
        cls_n: digits training images (the other 1,797 − n are the clean test set).
        cls_width, cls_depth: the classification MLP (64 → width × depth → 10).
        cls_train_target, cls_test_target: targets: training and test mean cross-entropy.
        activation: MLP activation (smooth: the jump linearizes the network).
        methods: families raced: ``adamw``, ``sgd``, ``lbfgs``, ``lm``, ``jump-adamw``.
        adamw_lrs: AdamW learning rates (weight decay 0: every method minimizes the same loss).
        sgd_lr_scales, momentum: SGD (heavy ball) learning rates ``scale / λ_1(S(0))`` and its
            momentum.
        lbfgs_history: L-BFGS memory (learning rate 1, strong-Wolfe line search, one iteration
            per step).
        lm_dampings: Levenberg–Marquardt first damping ``μ / λ_1(S)``.
        jump_lrs: AdamW learning rates between jumps.
        jump_every: ``m``, AdamW steps between jumps.
        jump_horizons: jump times as horizons ``λ_1 t`` (modes within that factor of the top
            one equilibrate).
        jump_guard: revert a jump that raised the training loss.
        k: eNTK modes per jump / LM step.
        lanczos_tol, lanczos_max: block-Lanczos relative residual tolerance and cap on
            kernel-vector products per subspace.
        max_steps: step budget of AdamW, SGD and jump-AdamW (optimizer steps).
        lbfgs_steps, lm_steps: step budgets of L-BFGS and Levenberg–Marquardt.
        stop_at_targets: end a run once it has reached both targets.
        curve_points: log-spaced points of each stored loss curve.
        fidelity_widths: widths of the fidelity sweep (narrow = feature learning, wide = lazy).
        fidelity_horizons: finite horizons ``λ_1 t`` of the fidelity sweep (``t = ∞`` is always
            included).
        threads: torch threads (0: leave torch's default).
    """

    seed: int = 0
    seeds: int = 3
    tasks: tuple[str, ...] = TASKS
    reg_n: int = 128
    reg_noise: float = 0.3
    reg_n_test: int = 256
    reg_width: int = 128
    reg_depth: int = 2
    reg_train_target: float = 0.02
    reg_test_target: float = 0.02
    cls_n: int = 512
    cls_width: int = 128
    cls_depth: int = 1
    cls_train_target: float = 0.01
    cls_test_target: float = 0.2
    activation: str = "tanh"
    methods: tuple[str, ...] = FAMILIES
    adamw_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    sgd_lr_scales: tuple[float, ...] = (0.3, 1.0, 3.0)
    momentum: float = 0.9
    lbfgs_history: int = 50
    lm_dampings: tuple[float, ...] = (1e-3,)
    jump_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    jump_every: tuple[int, ...] = (100,)
    jump_horizons: tuple[float, ...] = (1e2, 1e4)
    jump_guard: bool = False
    k: int = 32
    lanczos_tol: float = 1e-6
    lanczos_max: int = 128
    max_steps: int = 3000
    lbfgs_steps: int = 500
    lm_steps: int = 100
    stop_at_targets: bool = True
    curve_points: int = 60
    fidelity_widths: tuple[int, ...] = (16, 64, 256, 1024, 4096)
    fidelity_horizons: tuple[float, ...] = (1e2, 1e4)
    threads: int = 1

    def __post_init__(self) -> None:
        check_positive(self, "reg_n", "reg_n_test", "reg_width", "reg_depth",
                       "reg_train_target", "reg_test_target", "cls_n", "cls_width", "cls_depth",
                       "cls_train_target", "cls_test_target", "adamw_lrs", "sgd_lr_scales",
                       "lbfgs_history", "lm_dampings", "jump_lrs", "jump_every",
                       "jump_horizons", "k", "lanczos_tol", "lanczos_max", "max_steps",
                       "lbfgs_steps", "lm_steps", "curve_points", "fidelity_widths",
                       "fidelity_horizons", "seeds")
        if not self.reg_noise >= 0 or not math.isfinite(self.reg_noise):
            raise ConfigError(f"--reg_noise must be a finite number >= 0, got {self.reg_noise}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not self.tasks or set(self.tasks) - set(TASKS):
            raise ConfigError(f"--tasks must be a subset of {','.join(TASKS)}, got {self.tasks}")
        if not self.methods or set(self.methods) - set(FAMILIES):
            raise ConfigError(f"--methods must be a subset of {','.join(FAMILIES)}, got "
                              f"{self.methods}")
        if not 10 <= self.cls_n <= 1787:
            raise ConfigError(f"--cls_n must be in [10, 1787] (1,797 digits), got {self.cls_n}")
        for name in ("reg_n", "reg_n_test", "reg_width", "reg_depth", "cls_width", "cls_depth",
                     "k", "lanczos_max", "max_steps", "lbfgs_steps", "lm_steps", "lbfgs_history",
                     "curve_points", "seeds"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"--{name} must be an integer, got {getattr(self, name)!r}")
        if self.reg_n < 2:
            raise ConfigError(f"--reg_n must be >= 2, got {self.reg_n}")
        if self.k > min(self.reg_n, 10 * self.cls_n):
            raise ConfigError(f"--k must be at most the output-space size (reg_n = "
                              f"{self.reg_n}), got {self.k}")


# -- tasks ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Task:
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


def _task(cfg: Config, name: str, seed: int) -> _Task:
    if name == "regression":
        d = noisy_1d_regression(cfg.reg_n, cfg.reg_noise, n_test=cfg.reg_n_test, seed=seed,
                                dtype=torch.float64)
        return _Task(name, "squared", d.x, d.y, d.x_test, d.y_test, 1, 1, cfg.reg_width,
                     cfg.reg_depth, cfg.reg_train_target, cfg.reg_test_target)
    g = noisy_digits(cfg.cls_n, 0.0, seed=seed, dtype=torch.float64)
    return _Task(name, "cross_entropy", g.x, g.y, g.x_test, g.y_test_clean, 64, 10,
                 cfg.cls_width, cfg.cls_depth, cfg.cls_train_target, cfg.cls_test_target)


def _model(cfg: Config, task: _Task, seed: int, width: int | None = None) -> nn.Module:
    torch.manual_seed(seed)
    return mlp(task.in_dim, width or task.width, task.depth, task.out_dim,
               activation=cfg.activation).double()


def _test_loss(task: _Task, out: Tensor) -> float:
    """Clean test MSE (regression, ``mean ‖u − y‖²``) or mean cross-entropy."""
    if task.loss == "squared":
        return float((out - task.y_test).pow(2).sum(1).mean())
    return float(nn.functional.cross_entropy(out, task.y_test))


def _variants(cfg: Config) -> list[tuple[str, str, dict[str, Any]]]:
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
class _Tracker:
    """Train/test loss after every update (untimed), first hits of the targets, a curve."""

    def __init__(self, model: nn.Module, task: _Task, lossf: OutputLoss, budget: int,
                 points: int):
        self.model, self.task, self.lossf = model, task, lossf
        self.keep = set(np.unique(np.geomspace(1, max(budget, 1), points).astype(int)).tolist())
        self.hits: dict[str, dict[str, float] | None] = dict.fromkeys(TARGETS)
        self.curve: list[tuple[int, float, float, float, float]] = []
        self.best_test = math.inf
        self.last: tuple[float, float] = (math.nan, math.nan)
        self.diverged = False

    def __call__(self, step: int, passes: float, seconds: float) -> bool:
        """Record the state after ``step`` updates; True once both targets are reached (or the
        run diverged)."""
        with torch.no_grad():
            out = self.model(self.task.x)
            tr = float(self.lossf.value(out, self.task.y))
            te = _test_loss(self.task, self.model(self.task.x_test))
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
        return self.diverged or all(h is not None for h in self.hits.values())


def _warm_up(model: nn.Module, task: _Task) -> None:
    """One tiny subspace (untimed): torch.func's first-call set-up costs seconds, once per
    process; without this the first jump of a process would carry it."""
    JumpSubspace(model, task.x[:4], task.y[:4], loss=task.loss, k=2, max_iter=4)


def _race_cell(cfg: Config, task_name: str, seed: int, family: str, label: str,
               settings: Mapping[str, Any]) -> CellOutput:
    task = _task(cfg, task_name, seed)
    model = _model(cfg, task, seed)
    lossf = get_loss(task.loss)
    _warm_up(model, task)
    budget = {"lbfgs": cfg.lbfgs_steps, "lm": cfg.lm_steps}.get(family, cfg.max_steps)
    track = _Tracker(model, task, lossf, budget, cfg.curve_points)
    extra: dict[str, Any] = {}
    with torch_threads(cfg.threads):
        track(0, 0.0, 0.0)
        if family == "lm":
            steps, passes, seconds = _run_lm(cfg, model, task, settings, track, budget, extra)
        elif family == "lbfgs":
            steps, passes, seconds = _run_lbfgs(cfg, model, task, lossf, track, budget)
        else:
            steps, passes, seconds = _run_first_order(cfg, model, task, lossf, family,
                                                      settings, track, budget, extra)
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


def _run_first_order(cfg: Config, model: nn.Module, task: _Task, lossf: OutputLoss,
                     family: str, settings: Mapping[str, Any], track: _Tracker, budget: int,
                     extra: dict[str, Any]) -> tuple[int, float, float]:
    if family == "sgd":
        top = float(JumpSubspace(model, task.x, task.y, loss=task.loss, k=1, tol=1e-4,
                                 max_iter=cfg.lanczos_max).eigenvalues[0])
        lr = settings["scale"] / top
        built = build_optimizer("sgd", model, lr=lr, weight_decay=0.0, momentum=cfg.momentum)
        extra["lr"] = lr
    else:
        built = build_optimizer("adamw", model, lr=settings["lr"], weight_decay=0.0)
    opt = built.optimizer
    sched = None
    if family == "jump-adamw":
        sched = JumpSchedule(model, task.x, task.y, every=int(settings["m"]), loss=task.loss,
                             k=cfg.k, horizon=float(settings["h"]), guard=cfg.jump_guard,
                             tol=cfg.lanczos_tol, max_iter=cfg.lanczos_max)
    passes, seconds, step, jump_seconds = 0.0, 0.0, 0, 0.0
    for step in range(1, budget + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        lossf.value(model(task.x), task.y).backward()
        built.step()
        passes += 1.0
        if sched is not None:
            t1 = time.perf_counter()
            jump = sched.after_step()
            if jump is not None:
                passes += 2.0 * jump.matvecs + 0.5
                jump_seconds += time.perf_counter() - t1
        seconds += time.perf_counter() - t0
        if track(step, passes, seconds):
            break
    if sched is not None:
        h = sched.history
        extra.update({"jumps": len(h), "jumps_accepted": sum(r.accepted for r in h),
                      "jump_passes": sum(2.0 * r.matvecs + 0.5 for r in h),
                      "jump_seconds": jump_seconds,
                      "jump_displacement_error": float(np.median([r.displacement_error
                                                                  for r in h])) if h else None,
                      "jump_loss_ratio": float(np.median([r.loss_after / r.loss_before
                                                          for r in h])) if h else None})
    return step, passes, seconds


def _run_lbfgs(cfg: Config, model: nn.Module, task: _Task, lossf: OutputLoss, track: _Tracker,
               budget: int) -> tuple[int, float, float]:
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=1,
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
    for step in range(1, budget + 1):
        t0 = time.perf_counter()
        opt.step(closure)
        seconds += time.perf_counter() - t0
        if track(step, float(calls[0]), seconds):
            break
    return step, float(calls[0]), seconds


def _run_lm(cfg: Config, model: nn.Module, task: _Task, settings: Mapping[str, Any],
            track: _Tracker, budget: int, extra: dict[str, Any]) -> tuple[int, float, float]:
    lm = LevenbergMarquardt(model, task.x, task.y, loss=task.loss, k=cfg.k,
                            damping=float(settings["damping"]), tol=cfg.lanczos_tol,
                            max_iter=cfg.lanczos_max)
    passes, seconds, step, rejected, errors = 0.0, 0.0, 0, 0, []
    for step in range(1, budget + 1):
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


# -- fidelity ------------------------------------------------------------------------------------
def _fidelity_cell(cfg: Config, task_name: str, seed: int, width: int) -> CellOutput:
    task = _task(cfg, task_name, seed)
    model = _model(cfg, task, seed, width)
    lossf = get_loss(task.loss)
    rows = []
    with torch_threads(cfg.threads):
        _warm_up(model, task)
        sub = JumpSubspace(model, task.x, task.y, loss=task.loss, k=min(cfg.k, task.x.shape[0]
                                                                        * task.out_dim),
                           tol=cfg.lanczos_tol, max_iter=cfg.lanczos_max)
        w0 = param_vector(model.parameters())
        top = float(sub.eigenvalues[0])
        with torch.no_grad():
            test0 = model(task.x_test)
        for h in (*cfg.fidelity_horizons, math.inf):
            jump = sub.jump(h / top if math.isfinite(h) else math.inf)
            pred_test = linearized_outputs(model, jump, task.x_test)
            saved = {n: q.detach().clone() for n, q in model.named_parameters()}
            apply_jump(model, jump)
            with torch.no_grad():
                after, after_test = model(task.x), model(task.x_test)
            for n, q in model.named_parameters():
                q.data.copy_(saved[n])
            loss_after = float(lossf.value(after, task.y))
            drop = jump.loss_before - jump.predicted_loss
            rows.append({
                "task": task_name, "seed": seed, "width": width,
                "horizon": h if math.isfinite(h) else None, "infinite": not math.isfinite(h),
                "num_params": int(w0.numel()), "top_eigenvalue": top,
                "displacement_error": displacement_error(jump.outputs_before,
                                                         jump.predicted_outputs, after),
                "test_displacement_error": displacement_error(test0, pred_test, after_test),
                "loss_before": jump.loss_before, "predicted_loss": jump.predicted_loss,
                "loss_after": loss_after,
                "realized_fraction": (jump.loss_before - loss_after) / drop if drop > 0
                else None,
                "relative_step": jump.norm() / float(w0.norm()),
                "test_loss_before": _test_loss(task, test0),
                "test_loss_predicted": _test_loss(task, pred_test),
                "test_loss_after": _test_loss(task, after_test),
                "test_error_after": classification_error(after_test, task.y_test)
                if task.loss == "cross_entropy" else None})
    return CellOutput({"rows": rows}, rows=rows)


# -- run / summary -------------------------------------------------------------------------------
def run(cfg: Config, rd: RunDir) -> dict[str, Any]:
    """The race cells, then the fidelity cells (resumable, cell by cell); the summary."""
    seeds = range(cfg.seed, cfg.seed + cfg.seeds)
    cells: list[tuple[str, Callable[[], CellOutput]]] = [
        (f"race/{t}/seed{s}/{label}", functools.partial(_race_cell, cfg, t, s, fam, label, st))
        for t in cfg.tasks for s in seeds for fam, label, st in _variants(cfg)]
    cells += [(f"fidelity/{t}/seed{s}/w{w}", functools.partial(_fidelity_cell, cfg, t, s, w))
              for t in cfg.tasks for w in cfg.fidelity_widths for s in seeds]
    done = run_cells(rd, cells, desc="analytic-jump")
    return summarize(cfg, done)


def _best(records: Sequence[Mapping[str, Any]], key: str) -> float | None:
    vals = [float(r[key]) for r in records if r.get(key) is not None]
    return min(vals) if vals else None


def summarize(cfg: Config, cells: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per task: each variant's steps/passes/seconds to each target (censored medians over
    seeds: a seed that never reached it counts as ∞), each family's best variant per seed, the
    jump's speed-up over the best baseline, and the fidelity table per width and horizon."""
    races = [r for k, r in cells.items() if k.startswith("race/")]
    out: dict[str, Any] = {"tasks": {}}
    baselines = [f for f in cfg.methods if f != "jump-adamw"]
    for t in cfg.tasks:
        rs = [r for r in races if r["task"] == t]
        variants = {}
        for _fam, label, _st in _variants(cfg):
            vr = [r for r in rs if r["variant"] == label]
            if vr:
                variants[label] = _target_stats(vr, budget=_budget(cfg, vr[0]["family"]))
                variants[label].update(seed_table(vr, ["final_train_loss", "final_test_loss",
                                                       "best_test_loss"]))
        families: dict[str, Any] = {}
        per_seed: dict[str, dict[int, dict[str, float | None]]] = {}
        for fam in cfg.methods:
            fr = [r for r in rs if r["family"] == fam]
            by_seed = {}
            for s in sorted({int(r["seed"]) for r in fr}):
                sr = [r for r in fr if int(r["seed"]) == s]
                by_seed[s] = {f"{g}_{w}": _best(sr, f"{g}_{w}") for g in TARGETS
                              for w in ("steps", "passes", "seconds")}
            per_seed[fam] = by_seed
            families[fam] = {key: censored_stats([v[key] for v in by_seed.values()],
                                                 _budget(cfg, fam))
                             for key in next(iter(by_seed.values()), {})}
        out["tasks"][t] = {"variants": variants, "families": families,
                           "jump_vs_best_baseline": _speedups(per_seed, baselines)}
    fid = [row for k, r in cells.items() if k.startswith("fidelity/") for row in r["rows"]]
    table = []
    for t in cfg.tasks:
        for w in cfg.fidelity_widths:
            for h in (*cfg.fidelity_horizons, None):
                rr = [r for r in fid if r["task"] == t and r["width"] == w
                      and r["horizon"] == h]
                if rr:
                    st = seed_table(rr, ["displacement_error", "test_displacement_error",
                                         "realized_fraction", "relative_step", "loss_before",
                                         "predicted_loss", "loss_after", "test_loss_before",
                                         "test_loss_after", "num_params"])
                    table.append({"task": t, "width": w, "horizon": "inf" if h is None else h,
                                  "seeds": len(rr), **st})
    out["fidelity"] = table
    out["verdict"] = _verdict(out)
    return out


def _budget(cfg: Config, family: str) -> int:
    return {"lbfgs": cfg.lbfgs_steps, "lm": cfg.lm_steps}.get(family, cfg.max_steps)


def _target_stats(records: Sequence[Mapping[str, Any]], budget: int) -> dict[str, Any]:
    return {f"{g}_{w}": censored_stats([r.get(f"{g}_{w}") for r in records], budget)
            for g in TARGETS for w in ("steps", "passes", "seconds")}


def _speedups(per_seed: Mapping[str, Mapping[int, Mapping[str, float | None]]],
              baselines: Sequence[str]) -> dict[str, Any]:
    """Per target and cost: (best baseline cost) / (jump-AdamW cost) per seed (> 1: the jump
    is cheaper; ∞ where only the jump reached the target, 0 where only a baseline did)."""
    if "jump-adamw" not in per_seed or not baselines:
        return {}
    out: dict[str, Any] = {}
    for g in TARGETS:
        for w in ("steps", "passes", "seconds"):
            key = f"{g}_{w}"
            ratios = []
            for s, jv in per_seed["jump-adamw"].items():
                base = [per_seed[b][s][key] for b in baselines if s in per_seed[b]]
                bests = [v for v in base if v is not None]
                b, j = (min(bests) if bests else None), jv[key]
                if b is None and j is None:
                    continue
                ratios.append(math.inf if b is None else 0.0 if j is None else b / max(j, 1e-12))
            best_family = {}
            for s in per_seed["jump-adamw"]:
                cand = [(per_seed[b][s][key], b) for b in baselines if s in per_seed[b]
                        and per_seed[b][s][key] is not None]
                best_family[str(s)] = min(cand)[1] if cand else None
            out[key] = {"ratio_median": float(np.median(ratios)) if ratios else None,
                        "ratio_min": min(ratios) if ratios else None,
                        "ratio_max": max(ratios) if ratios else None,
                        "best_baseline_per_seed": best_family}
    return out


def _verdict(summary: Mapping[str, Any]) -> str:
    """One deterministic line per task (gradient-equivalent passes, not seconds)."""
    lines = []
    for t, s in summary["tasks"].items():
        sp = s["jump_vs_best_baseline"]
        for g in TARGETS:
            r = sp.get(f"{g}_passes", {}).get("ratio_median")
            if r is not None:
                lines.append(f"{t}/{g}: best baseline needs {r:.3g}x the passes of jump-AdamW "
                             "(median over seeds; > 1 favours the jump)")
    return "; ".join(lines)


def plot(rd: RunDir) -> list[Path]:
    """Figures from the run directory alone."""
    return analytic_jump_figures(rd)


EXPERIMENT = Experiment(
    "analytic-jump", Config, run, plot,
    presets={
        "smoke": dict(seeds=1, reg_n=24, reg_n_test=32, reg_width=16, cls_n=40, cls_width=16,
                      adamw_lrs=(1e-2,), sgd_lr_scales=(1.0,), jump_lrs=(1e-2,),
                      jump_every=(10,), jump_horizons=(1e2,), k=4, lanczos_max=16,
                      max_steps=30, lbfgs_steps=10, lm_steps=4, curve_points=10,
                      fidelity_widths=(8, 64), fidelity_horizons=(1e2,)),
        "full": dict(),
    },
    description="jump the linearized flow of the top-k eNTK modes in parameter space, raced "
                "against AdamW, SGD, L-BFGS and Levenberg-Marquardt; its fidelity vs width")
