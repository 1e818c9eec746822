"""Figures of the analytic-jump experiment, from its run directory alone.

- ``analytic_jump_race``: training and test loss against gradient-equivalent passes and against
  wall-clock seconds, the best variant of each family (by passes to the training target) on the
  lowest seed, per task, with the targets;
- ``analytic_jump_costs``: passes and seconds to each target per family (median, min–max over
  seeds; "n/r" instead of a bar: the median seed did not reach the target within the budget;
  under each name the seeds that reached it);
- ``analytic_jump_fidelity``: the jump's displacement error (network vs linearized prediction)
  and the realized fraction of the predicted loss decrease, against width, per horizon.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..io import RunDir
from ._mpl import pyplot, save_figure

__all__ = ["analytic_jump_figures"]


def _best_labels(cells: Mapping[str, Mapping[str, Any]], task: str, seed: int
                 ) -> dict[str, str]:
    """family → the variant (cell key) that reached the training target in the fewest passes
    on ``seed`` (else the lowest final training loss)."""
    best: dict[str, tuple[float, str]] = {}
    for key, r in cells.items():
        if not key.startswith("race/") or r["task"] != task or int(r["seed"]) != seed:
            continue
        score = r["train_passes"] if r.get("train_passes") is not None else \
            1e30 + (r["final_train_loss"] if math.isfinite(r["final_train_loss"]) else 1e30)
        if r["family"] not in best or score < best[r["family"]][0]:
            best[r["family"]] = (score, key)
    return {f: k for f, (_, k) in sorted(best.items())}


def _cost_bars(ax: Any, names: list[str], stats: list[Mapping[str, Any]]) -> None:
    """Median bars with min–max whiskers over the seeds that reached the target; a family
    whose median seed did not reach it gets no bar but an "n/r" mark (not reached within the
    budget), with the reached seeds counted under its name."""
    med = np.array([s.get("median") if s.get("median") is not None else np.nan
                    for s in stats], dtype=float)
    lo = np.array([s.get("min") if s.get("min") is not None else np.nan for s in stats],
                  dtype=float)
    hi = np.array([s.get("max") if s.get("max") is not None else np.nan for s in stats],
                  dtype=float)
    xs = np.arange(len(names))
    ok = np.isfinite(med) & (med > 0)
    if ok.any():
        hi = np.where(np.isfinite(hi), hi, med)
        err = np.vstack([med[ok] - np.where(np.isfinite(lo), lo, med)[ok], hi[ok] - med[ok]])
        ax.bar(xs[ok], med[ok], yerr=err, capsize=2,
               color=["C3" if f == "jump-adamw" else "C0" for f, o in zip(names, ok) if o])
        ax.set_yscale("log")
    for x in xs[~ok]:
        ax.text(x, 0.02, "n/r", transform=ax.get_xaxis_transform(), ha="center", fontsize=7,
                color="C3" if names[x] == "jump-adamw" else "k")
    ax.set_xticks(xs, [f"{f}\n{s.get('reached', 0)}/{s.get('n', 0)}"
                       for f, s in zip(names, stats)], rotation=30, fontsize=6)
    if not ok.any():
        ax.set_yticks([])


def analytic_jump_figures(rd: RunDir) -> list[Path]:
    """The three figures (see the module docstring); those without data are skipped."""
    plt = pyplot()
    cells = rd.cells()
    arrays = rd.load_arrays()
    summary = rd.read_summary()
    cfg = rd.read_config().get("config", {})
    out: list[Path] = []
    tasks = list(summary.get("tasks", {}))
    races = [r for k, r in cells.items() if k.startswith("race/")]
    if races and tasks:
        seed = min(int(r["seed"]) for r in races)
        fig, axes = plt.subplots(2, 2 * len(tasks), figsize=(4.0 * 2 * len(tasks), 6.6),
                                 squeeze=False, layout="constrained")
        for j, t in enumerate(tasks):
            target = {"train": cfg.get("reg_train_target" if t == "regression"
                                       else "cls_train_target"),
                      "test": cfg.get("reg_test_target" if t == "regression"
                                      else "cls_test_target")}
            for key in _best_labels(cells, t, seed).values():
                if f"{key}/steps" not in arrays:
                    continue
                for i, col in enumerate(("train_loss", "test_loss")):
                    y = arrays[f"{key}/{col}"]
                    lab = cells[key]["variant"]
                    axes[i][2 * j].plot(np.maximum(arrays[f"{key}/passes"], 0.5), y, label=lab)
                    axes[i][2 * j + 1].plot(np.maximum(arrays[f"{key}/seconds"], 1e-3), y,
                                            label=lab)
            for i, name in enumerate(("train", "test")):
                for c, xl in ((2 * j, "gradient-equivalent passes"), (2 * j + 1, "seconds")):
                    ax = axes[i][c]
                    ax.set_xscale("log")
                    ax.set_yscale("log")
                    if target[name]:
                        ax.axhline(target[name], color="k", ls=":", lw=1)
                    ax.set_xlabel(xl)
                    ax.set_ylabel(f"{name} loss")
                    ax.set_title(f"{t}, seed {seed}", fontsize=8)
            axes[0][2 * j].legend(fontsize=6, loc="lower left")
        out.append(save_figure(fig, rd.figure_path("analytic_jump_race")))
        fig, axes = plt.subplots(2, 2 * len(tasks), figsize=(3.6 * 2 * len(tasks), 6.0),
                                 squeeze=False, layout="constrained")
        for j, t in enumerate(tasks):
            fams = summary["tasks"][t]["families"]
            names = list(fams)
            for i, g in enumerate(("train", "test")):
                for c, w in enumerate(("passes", "seconds")):
                    ax = axes[i][2 * j + c]
                    st = [fams[f].get(f"{g}_{w}", {}) for f in names]
                    _cost_bars(ax, names, st)
                    ax.set_title(f"{t}: {w} to {g} target", fontsize=8)
        out.append(save_figure(fig, rd.figure_path("analytic_jump_costs")))
    fid = summary.get("fidelity", [])
    if fid:
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), layout="constrained")
        for t in tasks:
            for h in sorted({str(r["horizon"]) for r in fid if r["task"] == t}):
                rows = sorted((r for r in fid if r["task"] == t and str(r["horizon"]) == h),
                              key=lambda r: r["width"])
                widths = [r["width"] for r in rows]
                lab = f"{t}, λ₁t={h}" if h != "inf" else f"{t}, t=∞"
                for ax, key in zip(axes, ("displacement_error", "test_displacement_error",
                                          "realized_fraction")):
                    pts = [(x, r[key]) for x, r in zip(widths, rows) if key in r]
                    if not pts:
                        continue
                    medians = [p[1]["median"] for p in pts]
                    line, = ax.plot([p[0] for p in pts], medians, marker="o", ms=3, label=lab,
                                    ls="--" if t == "classification" else "-")
                    ax.fill_between([p[0] for p in pts], [p[1]["min"] for p in pts],
                                    [p[1]["max"] for p in pts], color=line.get_color(),
                                    alpha=0.15, lw=0)
        for ax, title in zip(axes, ("train: ‖u_after − u_pred‖/‖u_pred − u_0‖",
                                    "test: same", "realized / predicted loss decrease")):
            ax.set_xscale("log")
            ax.set_xlabel("width")
            ax.set_title(title, fontsize=8)
        axes[0].set_yscale("log")
        axes[1].set_yscale("log")
        axes[2].axhline(1.0, color="k", ls=":", lw=1)
        axes[2].set_yscale("symlog", linthresh=1.0)
        axes[0].legend(fontsize=6)
        out.append(save_figure(fig, rd.figure_path("analytic_jump_fidelity")))
    return out
