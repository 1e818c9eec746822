"""The harness shared by the INR and PINN experiments (private): the optimizer registry,
config checks, the training loop, cells over ``optimizer × seed``, speed against AdamW,
aggregation over seeds, the Markdown table and the curve plots."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError
from ..io import RunDir
from ..optim.spec import BuiltOptimizer, OptimizerSpec, parse_optimizer
from ._framework import seed_stats
from ._harness import CellOutput, check_nonnegative, check_positive, progress, run_cells

__all__ = ["OPTIMIZERS", "EARLY_STOPPING", "add_speed", "aggregate", "check_common",
           "fit", "fit_cells", "gate_fraction", "median_spread", "method_spec", "plot_curves",
           "seeds_of",
           "steps_to_reach", "summarize_cells", "table_markdown"]

# -- optimizers ----------------------------------------------------------------------------------
#: The methods compared → their optimizer spec (:mod:`tangentscope.optim.spec`). ``adamw-es``
#: is AdamW with early stopping on held-out noisy points (:data:`EARLY_STOPPING`): early
#: stopping is the experiment's protocol, not an optimizer.
OPTIMIZERS: dict[str, str] = {"adamw": "adamw", "gated": "gated", "gated-grad": "gated-grad",
                              "gated-moments": "gated-moments",
                              "gated-streaming": "gated-streaming", "adamw-es": "adamw"}
EARLY_STOPPING = frozenset({"adamw-es"})


def method_spec(name: str, threshold: float) -> OptimizerSpec:
    """The optimizer spec of method ``name`` (:data:`OPTIMIZERS`) with the gate's ``τ``."""
    spec = parse_optimizer(OPTIMIZERS[name])
    return spec.replace(threshold=threshold) if spec.rule == "gated-adamw" else spec


def check_common(cfg: Any) -> None:
    """Validate the fields both experiments' configs share (ConfigError naming the fix):
    ``optimizers``, ``sigma``, ``n_seeds``, ``steps``, ``eval_every``, ``batch_size``,
    ``holdout_fraction``."""
    if not cfg.optimizers:
        raise ConfigError(f"optimizers is empty; choose from {', '.join(OPTIMIZERS)}")
    bad = [n for n in cfg.optimizers if n not in OPTIMIZERS]
    if bad:
        raise ConfigError(f"unknown optimizer(s) {bad}; known: {', '.join(OPTIMIZERS)}")
    if not cfg.sigma >= 0:
        raise ConfigError(f"sigma must be >= 0, got {cfg.sigma}")
    check_positive(cfg, "lr")
    check_nonnegative(cfg, "weight_decay", "threshold")
    for name in ("n_seeds", "steps", "eval_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.batch_size < 0 or cfg.batch_size == 1:
        raise ConfigError(f"batch_size must be 0 (full batch) or >= 2 (the gate needs a "
                          f"variance), got {cfg.batch_size}")
    if not 0 < cfg.holdout_fraction < 1:
        raise ConfigError(f"holdout_fraction must be in (0, 1), got {cfg.holdout_fraction}")


def gate_fraction(opt: torch.optim.Optimizer) -> float:
    """Fraction of coordinates the gate let through at the last step (NaN without a gate)."""
    if not hasattr(opt, "gate_stats"):
        return float("nan")
    st = opt.gate_stats()
    pairs = [(f, n) for f, n in zip(st["fraction_updated"], st["numel"]) if f is not None]
    if not pairs:
        return 1.0
    return sum(f * n for f, n in pairs) / sum(n for _, n in pairs)


def steps_to_reach(steps: np.ndarray, values: np.ndarray, level: float, *,
                   higher_is_better: bool) -> int | None:
    """First logged step whose value reaches ``level`` (``None`` if never)."""
    ok = values >= level if higher_is_better else values <= level
    idx = np.flatnonzero(ok)
    return int(steps[idx[0]]) if idx.size else None


def median_spread(values: Sequence[float | None]) -> dict[str, Any]:
    """``{'median', 'min', 'max', 'n', 'missing'}`` over the finite values (``None`` if none)."""
    s = seed_stats([v if v is not None and math.isfinite(float(v)) else None for v in values],
                   empty=None)
    return {k: s[k] for k in ("median", "min", "max", "n", "missing")}


def aggregate(cells: Mapping[str, Mapping[str, Any]], names: Sequence[str],
              metrics: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """``optimizer -> metric -> median_spread`` over the seeds of ``cells`` (keyed
    ``'<optimizer>/seed<k>'``)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in names:
        recs = [c for k, c in cells.items() if k.split("/")[0] == name]
        out[name] = {m: median_spread([r[m] for r in recs if m in r]) for m in metrics}
    return out


def table_markdown(agg: Mapping[str, Mapping[str, Mapping[str, Any]]],
                   columns: Sequence[tuple[str, str, str]]) -> str:
    """A markdown table: one row per optimizer, ``median [min–max]`` per ``(metric, header,
    format)`` column; ``n/N`` marks seeds where the value is missing (never reached)."""
    head = "| optimizer | " + " | ".join(h for _, h, _ in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for name, row in agg.items():
        cells = []
        for metric, _, fmt in columns:
            s = row[metric]
            if s["median"] is None:
                cells.append(f"not reached (0/{s['missing']})" if s["missing"] else "–")
                continue
            txt = f"{s['median']:{fmt}}"
            if s["n"] > 1:
                txt += f" [{s['min']:{fmt}}–{s['max']:{fmt}}]"
            if s["missing"]:
                txt += f" ({s['n']}/{s['n'] + s['missing']} reached)"
            cells.append(txt)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(ax: Any, arrays: Mapping[str, np.ndarray], names: Sequence[str], key: str,
                transform: Callable[[np.ndarray], np.ndarray] = lambda v: v) -> None:
    """Median over seeds (line) and min–max (band) of ``arrays['<opt>/seed<k>/<key>']``."""
    for i, name in enumerate(names):
        runs = [k.rsplit("/", 1)[0] for k in arrays if k.startswith(name + "/seed")
                and k.endswith("/" + key)]
        if not runs:
            continue
        steps = arrays[runs[0] + "/step"]
        vals = np.stack([transform(arrays[r + "/" + key]) for r in runs
                         if arrays[r + "/" + key].shape == steps.shape])
        color = f"C{i}"
        ax.plot(steps, np.median(vals, 0), color=color, label=name, lw=1.4)
        if len(vals) > 1:
            ax.fill_between(steps, vals.min(0), vals.max(0), color=color, alpha=0.15, lw=0)


def seeds_of(cfg: Any) -> list[int]:
    """``seed, seed + 1, …`` (``n_seeds`` of them)."""
    return list(range(cfg.seed, cfg.seed + cfg.n_seeds))


def add_speed(cells: dict[str, dict[str, Any]], arrays: Mapping[str, np.ndarray], key: str,
              level_of: Callable[[dict[str, Any]], float | None], *,
              higher_is_better: bool) -> dict[str, dict[str, Any]]:
    """Add ``steps_to_level`` and ``speedup_vs_adamw`` to every cell (in a copy).

    ``level_of(adamw_cell)`` gives the level for a seed from AdamW's cell of that seed.
    """
    out = {k: dict(v) for k, v in cells.items()}
    for k, c in out.items():
        ref = cells.get(f"adamw/seed{c['seed']}")
        level = None if ref is None else level_of(ref)
        c["level"] = level
        c["steps_to_level"] = None if level is None else steps_to_reach(
            arrays[f"{k}/step"], arrays[f"{k}/{key}"], level, higher_is_better=higher_is_better)
    for c in out.values():
        ref = out.get(f"adamw/seed{c['seed']}")
        a, s = (None if ref is None else ref["steps_to_level"]), c["steps_to_level"]
        c["speedup_vs_adamw"] = a / s if a and s else None
    return out


def fit(cfg: Any, opt: BuiltOptimizer, n_rows: int, seed: int,
        loss_of: Callable[[Tensor | None], Tensor], evaluate: Callable[[int, float], None], *,
        before: Callable[[], None] | None = None, desc: str = "") -> float:
    """The training loop shared by the experiments; returns its wall-clock seconds.

    Each of ``cfg.steps`` steps draws ``cfg.batch_size`` of the ``n_rows`` training rows
    without replacement (all rows, ``idx = None``, when it is 0), calls ``before()``, then
    ``loss_of(idx).backward()`` and ``opt.step()`` (which passes the builder's exact moments,
    if any). ``evaluate(step, gate fraction)`` runs at step 0, every ``cfg.eval_every`` steps
    and at the end.
    """
    sampler = torch.Generator().manual_seed(40_000 + seed)
    t0 = time.perf_counter()
    evaluate(0, float("nan"))
    for step in progress(range(1, cfg.steps + 1), desc=desc, total=cfg.steps):
        idx = (torch.randperm(n_rows, generator=sampler)[:cfg.batch_size]
               if cfg.batch_size else None)
        if before is not None:
            before()
        loss = loss_of(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            evaluate(step, gate_fraction(opt.optimizer))
    return time.perf_counter() - t0


def fit_cells(cfg: Any, rd: RunDir, train: Callable[[str, int], tuple[dict[str, np.ndarray],
                                                                      dict[str, Any],
                                                                      dict[str, np.ndarray]]],
              final_key: str) -> None:
    """Train every unfinished ``optimizer × seed`` cell (through
    :func:`~tangentscope.experiments._harness.run_cells`): log its curves to ``metrics.csv``,
    save them (and, for the first seed, the final fields ``{'end': …, 'es': …}`` as
    ``<final_key>/<optimizer>`` and ``<final_key>_es/<optimizer>``) to ``arrays.npz``, then
    record the cell's result in ``cells.jsonl``."""

    def cell(name: str, seed: int) -> CellOutput:
        curves, result, finals = train(name, seed)
        rows = [{"optimizer": name, "seed": seed, **{k: v[i] for k, v in curves.items()}}
                for i in range(len(curves["step"]))]
        extra = {} if seed != cfg.seed else {
            f"{final_key}{'' if k == 'end' else '_' + k}/{name}": v for k, v in finals.items()}
        return CellOutput(result, curves, rows, extra)

    # optimizer-major: list the important ones first
    run_cells(rd, [(f"{name}/seed{seed}", functools.partial(cell, name, seed))
                   for name in cfg.optimizers for seed in seeds_of(cfg)])


def summarize_cells(cfg: Any, rd: RunDir, curve: str,
                    level_of: Callable[[dict[str, Any]], float | None], *, higher_is_better: bool,
                    metrics: Sequence[str], columns: Sequence[tuple[str, str, str]],
                    headline: Sequence[str]) -> dict[str, Any]:
    """Speed metrics, per-optimizer medians/spreads and ``table.md``; returns the summary
    (``table``, ``cells`` and ``<optimizer>/<metric>`` medians for the ``headline`` metrics)."""
    cells = add_speed(rd.cells(), rd.load_arrays(), curve, level_of,
                      higher_is_better=higher_is_better)
    agg = aggregate(cells, cfg.optimizers, metrics)
    rd.write_text("table.md", table_markdown(agg, columns))
    summary: dict[str, Any] = {"seeds": seeds_of(cfg), "table": agg, "cells": cells}
    for name, row in agg.items():
        for m in headline:
            summary[f"{name}/{m}"] = row[m]["median"]
    return summary
