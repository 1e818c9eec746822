"""Figures of the grokking experiment: steps to target per seed and the accuracy curves.

Reads a run directory only (its summary table, ``metrics.csv``); matplotlib is imported lazily.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..io import RunDir
from ._mpl import pyplot, save_figure

__all__ = ["grokking_figures"]


def grokking_figures(rd: RunDir, summary: Mapping[str, Any],
                     steps_to_val: Mapping[tuple[str, str, int], float | None]) -> list[Path]:
    """``grokking_steps.png`` (steps to the target per seed, dots, and the median, bar, per
    optimizer and setting; above the cap = never) and ``grokking_curves.png`` (validation and
    train accuracy of the first seed, from ``metrics.csv``).

    Args:
        rd: the run directory (figures are written to its ``figures/``).
        summary: the experiment's summary (its ``table`` rows and ``target``).
        steps_to_val: ``(setting, optimizer, seed) → steps to the target`` (``None``: never).
    """
    plt = pyplot()
    rows = summary["table"]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    opts = list(dict.fromkeys(r["optimizer"] for r in rows))
    paths = []
    ncol = min(4, len(settings))
    nrow = -(-len(settings) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.2 + 0.55 * len(opts) * ncol, 3.4 * nrow),
                             squeeze=False)
    for ax in axes.flat[len(settings):]:
        ax.set_visible(False)
    for ax, s in zip(axes.flat, settings):
        for i, o in enumerate(opts):
            r = next((r for r in rows if r["setting"] == s and r["optimizer"] == o), None)
            if r is None:
                continue
            cap = r["steps_to_val"]["cap"]
            vals = [steps_to_val[(s, o, sd)] for sd in r["seeds"]]
            ys = [cap * 1.15 if v is None else v for v in vals]
            ax.scatter(np.full(len(ys), i) + np.linspace(-0.15, 0.15, len(ys)), ys, s=12,
                       marker="o", color=f"C{i}", zorder=3)
            med = r["steps_to_val"]["median"]
            if med is not None:
                ax.hlines(med, i - 0.3, i + 0.3, color=f"C{i}", lw=2.5, alpha=0.6)
            ax.axhline(cap, color="0.6", lw=0.7, ls=":")
        ax.set_yscale("log")
        ax.set_xticks(range(len(opts)), opts, rotation=60, ha="right", fontsize=7)
        ax.set_title(s)
    for row in axes:
        row[0].set_ylabel(f"steps to val acc ≥ {summary.get('target', 0.99):.0%}")
    fig.suptitle("grokking: steps to target per seed (dots; above the dotted cap = never), "
                 "median (bar)")
    fig.tight_layout()
    paths.append(save_figure(fig, rd.figure_path("grokking_steps")))

    metrics = rd.read_metrics()
    if metrics:
        fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3.2 * nrow), squeeze=False)
        for ax in axes.flat[len(settings):]:
            ax.set_visible(False)
        seed0 = min(r["seed"] for r in metrics)
        for ax, s in zip(axes.flat, settings):
            for i, o in enumerate(opts):
                pts = [(m["step"], m["val_acc"], m["train_acc"]) for m in metrics
                       if m["setting"] == s and m["optimizer"] == o and m["seed"] == seed0]
                if not pts:
                    continue
                st, va, tr = map(np.array, zip(*sorted(pts)))
                ax.plot(st, va, color=f"C{i}", label=o)
                ax.plot(st, tr, color=f"C{i}", ls="--", lw=0.8)
            ax.set_xscale("log")
            ax.set_title(f"{s} (seed {seed0}; dashed = train)")
            ax.set_xlabel("step")
        for row in axes:
            row[0].set_ylabel("accuracy")
        axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(save_figure(fig, rd.figure_path("grokking_curves")))
    return paths
