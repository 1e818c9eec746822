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
The race itself lives in the private :mod:`._jump_race`; here: the config, the fidelity cells,
the summary and the verdict (:func:`verdict`: per seed, jump-AdamW against the cheapest
baseline of that seed and against AdamW alone, in passes; a target missed within the budget
is said so, never turned into a ratio). ``table.md`` and ``verdict.txt`` go to the run
directory. The full preset (the defaults) is 102 cells, about 6 CPU-minutes on one core.

    tangentscope run analytic-jump --preset smoke
    tangentscope run analytic-jump --preset full
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dynamics.jump import JumpSubspace, apply_jump, displacement_error, linearized_outputs
from ..dynamics.label_noise import classification_error
from ..errors import ConfigError
from ..io import RunDir
from ..losses import get_loss
from ..viz.analytic_jump import analytic_jump_figures
from ._framework import Experiment
from ._harness import (
    CellOutput,
    check_positive,
    param_vector,
    run_cells,
    seed_table,
    torch_threads,
)
from ._jump_race import (
    FAMILIES,
    TARGETS,
    TASKS,
    clean_test_loss,
    make_model,
    make_task,
    race_cell,
    variants,
    warm_up,
)

__all__ = ["Config", "EXPERIMENT", "FAMILIES", "run", "plot", "summarize", "verdict",
           "verdict_line", "compare_to_best_baseline", "censored", "table_markdown"]

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
            test mean squared error (the default train target sits just below ``σ²/2 = 0.045``,
            what a perfect fit of the clean function leaves at ``reg_noise = 0.3``).
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
        jump_at_start: jump once before the first optimizer step too (then every ``m``).
        k: eNTK modes per jump / LM step.
        lanczos_tol, lanczos_max: block-Lanczos relative residual tolerance and cap on
            kernel-vector products per subspace.
        max_passes: budget of every run in gradient-equivalent passes (the same for all).
        max_steps: cap on the steps of a run (optimizer steps, L-BFGS iterations, LM steps).
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
    reg_train_target: float = 0.04
    reg_test_target: float = 0.02
    cls_n: int = 512
    cls_width: int = 128
    cls_depth: int = 1
    cls_train_target: float = 0.01
    cls_test_target: float = 0.2
    activation: str = "tanh"
    methods: tuple[str, ...] = FAMILIES
    adamw_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    sgd_lr_scales: tuple[float, ...] = (1.0, 3.0)
    momentum: float = 0.9
    lbfgs_history: int = 50
    lm_dampings: tuple[float, ...] = (1e-3,)
    jump_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    jump_every: tuple[int, ...] = (100,)
    jump_horizons: tuple[float, ...] = (1e2, 1e4)
    jump_guard: bool = False
    jump_at_start: bool = True
    k: int = 32
    lanczos_tol: float = 1e-6
    lanczos_max: int = 128
    max_passes: int = 2000
    max_steps: int = 2000
    stop_at_targets: bool = True
    curve_points: int = 60
    fidelity_widths: tuple[int, ...] = (16, 64, 256, 1024)
    fidelity_horizons: tuple[float, ...] = (1e2, 1e4)
    threads: int = 1

    def __post_init__(self) -> None:
        check_positive(self, "reg_n", "reg_n_test", "reg_width", "reg_depth",
                       "reg_train_target", "reg_test_target", "cls_n", "cls_width", "cls_depth",
                       "cls_train_target", "cls_test_target", "adamw_lrs", "sgd_lr_scales",
                       "lbfgs_history", "lm_dampings", "jump_lrs", "jump_every",
                       "jump_horizons", "k", "lanczos_tol", "lanczos_max", "max_passes",
                       "max_steps", "curve_points", "fidelity_widths",
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
                     "k", "lanczos_max", "max_passes", "max_steps", "lbfgs_history",
                     "curve_points", "seeds"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"--{name} must be an integer, got {getattr(self, name)!r}")
        if self.reg_n < 2:
            raise ConfigError(f"--reg_n must be >= 2, got {self.reg_n}")
        if self.k > min(self.reg_n, 10 * self.cls_n):
            raise ConfigError(f"--k must be at most the output-space size (reg_n = "
                              f"{self.reg_n}), got {self.k}")


# -- fidelity ------------------------------------------------------------------------------------
def _fidelity_cell(cfg: Config, task_name: str, seed: int, width: int) -> CellOutput:
    task = make_task(cfg, task_name, seed)
    model = make_model(cfg, task, seed, width)
    lossf = get_loss(task.loss)
    rows = []
    with torch_threads(cfg.threads):
        warm_up(model, task)
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
                "test_loss_before": clean_test_loss(task, test0),
                "test_loss_predicted": clean_test_loss(task, pred_test),
                "test_loss_after": clean_test_loss(task, after_test),
                "test_error_after": classification_error(after_test, task.y_test)
                if task.loss == "cross_entropy" else None})
    return CellOutput({"rows": rows}, rows=rows)


# -- run / summary -------------------------------------------------------------------------------
def run(cfg: Config, rd: RunDir) -> dict[str, Any]:
    """The race cells, then the fidelity cells (resumable, cell by cell); the summary, and
    ``table.md`` / ``verdict.txt`` in the run directory."""
    seeds = range(cfg.seed, cfg.seed + cfg.seeds)
    cells: list[tuple[str, Callable[[], CellOutput]]] = [
        (f"race/{t}/seed{s}/{label}", functools.partial(race_cell, cfg, t, s, fam, label, st))
        for t in cfg.tasks for s in seeds for fam, label, st in variants(cfg)]
    cells += [(f"fidelity/{t}/seed{s}/w{w}", functools.partial(_fidelity_cell, cfg, t, s, w))
              for t in cfg.tasks for w in cfg.fidelity_widths for s in seeds]
    done = run_cells(rd, cells, desc="analytic-jump")
    summary = summarize(cfg, done)
    rd.write_text("table.md", table_markdown(summary))
    rd.write_text("verdict.txt", summary["verdict"] + "\n")
    return summary


def _best(records: Sequence[Mapping[str, Any]], key: str) -> float | None:
    vals = [float(r[key]) for r in records if r.get(key) is not None]
    return min(vals) if vals else None


COSTS = ("steps", "passes", "seconds")


def summarize(cfg: Config, cells: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per task: each variant's steps/passes/seconds to each target (censored medians over
    seeds: a seed that never reached it counts as ∞), each family's best variant per seed
    (``best_per_seed``) and its statistics over seeds, jump-AdamW against the best baseline per
    seed and against AdamW alone, the optimizer it augments (:func:`compare_to_best_baseline`;
    ``jump_vs_best_baseline``, ``jump_vs_adamw``), the fidelity table per width and horizon, and the
    verdict (:func:`verdict`)."""
    races = [r for k, r in cells.items() if k.startswith("race/")]
    out: dict[str, Any] = {"budget_passes": cfg.max_passes, "tasks": {}}
    baselines = [f for f in cfg.methods if f != "jump-adamw"]
    for t in cfg.tasks:
        rs = [r for r in races if r["task"] == t]
        per_variant = {}
        for _fam, label, _st in variants(cfg):
            vr = [r for r in rs if r["variant"] == label]
            if vr:
                per_variant[label] = _target_stats(vr, cfg.max_passes)
                per_variant[label].update(seed_table(vr, ["final_train_loss", "final_test_loss",
                                                          "best_test_loss"]))
        families: dict[str, Any] = {}
        per_seed: dict[str, dict[str, dict[str, float | None]]] = {}
        for fam in cfg.methods:
            fr = [r for r in rs if r["family"] == fam]
            by_seed = {}
            for s in sorted({int(r["seed"]) for r in fr}):
                sr = [r for r in fr if int(r["seed"]) == s]
                by_seed[str(s)] = {f"{g}_{w}": _best(sr, f"{g}_{w}") for g in TARGETS
                                   for w in COSTS}
            per_seed[fam] = by_seed
            families[fam] = {f"{g}_{w}": censored([v[f"{g}_{w}"] for v in by_seed.values()],
                                                  cfg.max_passes)
                             for g in TARGETS for w in COSTS}
        targets = {"train": cfg.reg_train_target if t == "regression" else cfg.cls_train_target,
                   "test": cfg.reg_test_target if t == "regression" else cfg.cls_test_target}
        vs: dict[str, Any] = {}
        vs_adamw: dict[str, Any] = {}
        for against, into in ((baselines, vs), (["adamw"] if "adamw" in baselines else [],
                                                vs_adamw)):
            if "jump-adamw" not in per_seed or not against:
                continue
            for g in TARGETS:
                for w in COSTS:
                    key = f"{g}_{w}"
                    into[key] = compare_to_best_baseline(
                        {s: v[key] for s, v in per_seed["jump-adamw"].items()},
                        {b: {s: v[key] for s, v in per_seed[b].items()} for b in against},
                        cfg.max_passes)
        out["tasks"][t] = {"targets": targets, "variants": per_variant, "families": families,
                           "best_per_seed": per_seed, "jump_vs_best_baseline": vs,
                           "jump_vs_adamw": vs_adamw}
    fid = [row for k, r in cells.items() if k.startswith("fidelity/") for row in r["rows"]]
    table = []
    for t in cfg.tasks:
        for width in cfg.fidelity_widths:
            for h in (*cfg.fidelity_horizons, None):
                rr = [r for r in fid if r["task"] == t and r["width"] == width
                      and r["horizon"] == h]
                if rr:
                    st = seed_table(rr, ["displacement_error", "test_displacement_error",
                                         "realized_fraction", "relative_step", "loss_before",
                                         "predicted_loss", "loss_after", "test_loss_before",
                                         "test_loss_after", "num_params"])
                    table.append({"task": t, "width": width, "horizon": "inf" if h is None else h,
                                  "seeds": len(rr), **st})
    out["fidelity"] = table
    out["verdict"] = verdict(out)
    return out


def censored(values: Sequence[float | None], budget: int) -> dict[str, Any]:
    """Costs to a target over seeds, a seed that never reached it counting as ∞.

    Returns:
        ``median`` (the plain median of the ∞-filled costs — for an even count the mean of the
        middle two — and ``None`` where it is ∞: more than half the seeds, or exactly half,
        missed the target), ``min`` / ``max`` over the seeds that reached it (``None``
        without one), ``reached``, ``n`` and ``cap`` (the pass budget).
    """
    xs = np.array([math.inf if v is None else float(v) for v in values], dtype=float)
    hit = xs[np.isfinite(xs)]
    med = float(np.median(xs)) if xs.size else math.inf
    return {"median": med if math.isfinite(med) else None,
            "min": float(hit.min()) if hit.size else None,
            "max": float(hit.max()) if hit.size else None,
            "reached": int(hit.size), "n": int(xs.size), "cap": budget}


def _target_stats(records: Sequence[Mapping[str, Any]], budget: int) -> dict[str, Any]:
    return {f"{g}_{w}": censored([r.get(f"{g}_{w}") for r in records], budget)
            for g in TARGETS for w in COSTS}


def compare_to_best_baseline(jump: Mapping[str, float | None],
                             baselines: Mapping[str, Mapping[str, float | None]],
                             budget: int) -> dict[str, Any]:
    """jump-AdamW's cost to a target against the best baseline's, seed by seed.

    Args:
        jump: ``seed -> cost`` of jump-AdamW's best variant (``None``: not reached within the
            budget).
        baselines: ``family -> seed -> cost`` of each baseline family's best variant.
        budget: the pass budget (the censoring point, for the record).

    Returns:
        ``seeds``; the counts ``both`` (jump and some baseline reached it), ``jump_only``,
        ``baseline_only``, ``neither``; ``jump_cheaper`` / ``baseline_cheaper``: seeds where
        that side reached it with fewer passes (or the other not at all); ``jump`` and
        ``baseline``: :func:`censored` statistics over seeds (the baseline per seed is the
        cheapest family that reached it); ``ratio_median`` / ``ratio_min`` / ``ratio_max``:
        best-baseline cost / jump cost over the ``both`` seeds only (``None`` without such a
        seed; > 1 favours the jump); ``best_baseline_per_seed``: the family.
    """
    counts = dict.fromkeys(("both", "jump_only", "baseline_only", "neither"), 0)
    cheaper = {"jump_cheaper": 0, "baseline_cheaper": 0}
    ratios, best_cost, best_family = [], [], {}
    for s, j in jump.items():
        cand = sorted((float(c), b) for b, v in baselines.items()
                      if (c := v.get(s)) is not None)
        b_cost, b_fam = cand[0] if cand else (None, None)
        best_cost.append(b_cost)
        best_family[s] = b_fam
        cheaper["jump_cheaper"] += j is not None and (b_cost is None or j < b_cost)
        cheaper["baseline_cheaper"] += b_cost is not None and (j is None or b_cost < j)
        if j is not None and b_cost is not None:
            counts["both"] += 1
            ratios.append(b_cost / max(float(j), 1e-12))
        else:
            counts["jump_only" if j is not None else "baseline_only" if b_cost is not None
                   else "neither"] += 1
    return {"seeds": len(jump), **counts, **cheaper,
            "jump": censored(list(jump.values()), budget),
            "baseline": censored(best_cost, budget),
            "ratio_median": float(np.median(ratios)) if ratios else None,
            "ratio_min": min(ratios) if ratios else None,
            "ratio_max": max(ratios) if ratios else None,
            "best_baseline_per_seed": best_family, "budget": budget}


def _cost(st: Mapping[str, Any]) -> str:
    """``median [min, max]`` of :func:`censored` (the span only when every seed reached it);
    ``> budget`` where the median is ∞."""
    if st["median"] is None:
        return f"> {st['cap']}"
    span = "" if st["n"] - st["reached"] or st["min"] == st["max"] else \
        f" [{st['min']:.3g}, {st['max']:.3g}]"
    return f"{st['median']:.3g}{span}"


def verdict_line(task: str, target: str, value: float, cmp: Mapping[str, Any]) -> str:
    """One sentence on one task and target from :func:`compare_to_best_baseline` on passes."""
    n, cap = cmp["seeds"], cmp["budget"]
    j_hit, b_hit = cmp["both"] + cmp["jump_only"], cmp["both"] + cmp["baseline_only"]
    head = f"{task}, {target} loss <= {value:g}: "
    if not j_hit and not b_hit:
        return head + f"no method reached it within {cap} passes (0/{n} seeds)"
    fams = sorted({f for f in cmp["best_baseline_per_seed"].values() if f is not None})
    base = (f"the best baseline ({'/'.join(fams)}) in {b_hit}/{n} seeds"
            f" ({_cost(cmp['baseline'])} passes)") if b_hit else \
        f"no baseline within {cap} passes (0/{n} seeds)"
    if not j_hit:
        return head + f"jump-AdamW did not reach it within {cap} passes (0/{n} seeds); " + base
    line = head + f"jump-AdamW reached it in {j_hit}/{n} seeds ({_cost(cmp['jump'])} passes), " \
        + base
    if cmp["ratio_median"] is not None:
        r = cmp["ratio_median"]
        span = "" if cmp["both"] == 1 else f" [{cmp['ratio_min']:.3g}, {cmp['ratio_max']:.3g}]"
        line += (f"; where both did ({cmp['both']} seeds) the best baseline needs {r:.3g}x{span}"
                 " the passes of jump-AdamW (> 1 favours the jump)")
    return line + f"; jump-AdamW cheaper in {cmp['jump_cheaper']}/{n} seeds"


def verdict(summary: Mapping[str, Any]) -> str:
    """The measured outcome in plain words (deterministic: passes, never seconds): a count of
    the races (task, target, seed) in which jump-AdamW needed fewer passes than the best
    baseline of that seed (and than AdamW alone), per task and target one
    :func:`verdict_line`, and the jump's fidelity (at the shortest horizon and at ``t = ∞``)
    from the narrowest to the widest network."""
    lines: list[str] = []
    wins = {"best": [0, 0], "adamw": [0, 0]}
    for t, s in summary["tasks"].items():
        for g in TARGETS:
            cmp = s["jump_vs_best_baseline"].get(f"{g}_passes")
            if cmp is None:
                continue
            lines.append(verdict_line(t, g, s["targets"][g], cmp))
            for name, c in (("best", cmp), ("adamw", s.get("jump_vs_adamw", {}).get(
                    f"{g}_passes"))):
                if c is not None:
                    wins[name][0] += c["jump_cheaper"]
                    wins[name][1] += c["seeds"] - c["neither"]
    (w, n), (aw, an) = wins["best"], wins["adamw"]
    if not lines:
        head = "nothing to compare: race jump-adamw and at least one baseline (--methods)"
    elif n:
        head = (f"jump-AdamW needed fewer passes than the best baseline of the seed in {w} of "
                f"{n} races (task, target, seed) that some method reached")
        if an:
            head += f", and fewer than AdamW alone in {aw} of {an}"
    else:
        head = "no method reached any target within the budget"
    fid = []
    table = [r for r in summary.get("fidelity", []) if "displacement_error" in r]
    finite = sorted({r["horizon"] for r in table if r["horizon"] != "inf"})
    for h in [*finite[:1], "inf"]:
        for t in summary["tasks"]:
            rows = sorted((r for r in table if r["task"] == t and r["horizon"] == h),
                          key=lambda r: r["width"])
            if rows:
                a, b = rows[0], rows[-1]
                at = "t = inf" if h == "inf" else f"lambda_1 t = {h:g}"
                fid.append(f"{t} at {at}: {a['displacement_error']['median']:.3g} at width "
                           f"{a['width']} -> {b['displacement_error']['median']:.3g} at width "
                           f"{b['width']}")
    tail = ["jump fidelity from the initialization (||u_after - u_pred|| / ||u_pred - u_0||, "
            "median): " + "; ".join(fid)] if fid else []
    return ". ".join([head, *lines, *tail]) + "."


def table_markdown(summary: Mapping[str, Any]) -> str:
    """Passes and seconds to each target per family (median [min, max] over seeds, reached
    seeds), and the fidelity table."""
    out = ["# analytic-jump", "", summary["verdict"], ""]
    for t, s in summary["tasks"].items():
        out += [f"## {t} (targets: train {s['targets']['train']:g}, test "
                f"{s['targets']['test']:g}; budget {summary['budget_passes']} passes)", "",
                "| family | train: passes | train: seconds | test: passes | test: seconds |",
                "|---|---|---|---|---|"]
        for fam, st in s["families"].items():
            cells = []
            for g in TARGETS:
                for w in ("passes", "seconds"):
                    c = st[f"{g}_{w}"]
                    cells.append(("not reached" if not c["reached"] else _cost(c))
                                 + f" ({c['reached']}/{c['n']})")
            out.append(f"| {fam} | " + " | ".join(cells) + " |")
        out.append("")
    fid = summary.get("fidelity", [])
    if fid:
        out += ["## fidelity of the jump from the initialization", "",
                "| task | width | λ₁t | displacement (train) | displacement (test) | "
                "realized / predicted loss drop | ‖Δw‖/‖w‖ |", "|---|---|---|---|---|---|---|"]
        for r in fid:
            cells = [f"{r[k]['median']:.3g} [{r[k]['min']:.3g}, {r[k]['max']:.3g}]"
                     if k in r else "-" for k in ("displacement_error",
                                                  "test_displacement_error",
                                                  "realized_fraction", "relative_step")]
            out.append(f"| {r['task']} | {r['width']} | {r['horizon']} | " + " | ".join(cells)
                       + " |")
    return "\n".join(out) + "\n"


def plot(rd: RunDir) -> list[Path]:
    """Figures from the run directory alone."""
    return analytic_jump_figures(rd)


EXPERIMENT = Experiment(
    "analytic-jump", Config, run, plot,
    presets={
        "smoke": dict(seeds=1, reg_n=24, reg_n_test=32, reg_width=16, cls_n=40, cls_width=16,
                      adamw_lrs=(1e-2,), sgd_lr_scales=(1.0,), jump_lrs=(1e-2,),
                      jump_every=(10,), jump_horizons=(1e2,), k=4, lanczos_max=16,
                      max_passes=60, max_steps=30, curve_points=10,
                      fidelity_widths=(8, 64), fidelity_horizons=(1e2,)),
        "full": dict(),
    },
    description="jump the linearized flow of the top-k eNTK modes in parameter space, raced "
                "against AdamW, SGD, L-BFGS and Levenberg-Marquardt; its fidelity vs width")
