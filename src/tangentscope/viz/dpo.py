"""Figures of the DPO-under-noise experiment, from its run directory alone (matplotlib is
imported lazily)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import RunDir
from ._mpl import pyplot, save_figure

__all__ = ["dpo_figures"]


def dpo_figures(rd: RunDir) -> list[Path]:
    """``dpo_summary.png`` (accuracy, exact KL, non-task mass and true reward against the flip
    rate: median over seeds, min–max bars) and ``dpo_trajectories.png`` (accuracy against KL
    and memorised flipped pairs against the step, per flip rate)."""
    plt = pyplot()
    saved = rd.read_config()["config"]
    methods, noise = list(saved["methods"]), list(saved["noise_rates"])
    arr = rd.load_arrays()
    paths = []
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    panels = [("heldout_acc", "clean held-out preference accuracy"),
              ("kl", "exact KL(π‖π_ref) [nats]"),
              ("nontask_mass", "mass on non-task tokens"), ("reward", "true reward E_π[r*]")]
    for ax, (k, title) in zip(axes, panels):
        a = arr.get(f"final_{k}")
        if a is None:
            continue
        for j, m in enumerate(methods):
            x = np.asarray(noise) + (j - (len(methods) - 1) / 2) * 0.012
            med = np.nanmedian(a[:, j, :], axis=1)
            lo, hi = np.nanmin(a[:, j, :], axis=1), np.nanmax(a[:, j, :], axis=1)
            ax.errorbar(x, med, yerr=[med - lo, hi - med], marker="o", capsize=3, label=m)
        ax.set_xlabel("label flip rate")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle("DPO under noisy preferences (median over seeds, bars: min–max)")
    paths.append(save_figure(fig, rd.figure_path("dpo_summary")))
    rows = rd.read_metrics()
    noisy = [r for r in noise if r > 0] or noise
    fig, axes = plt.subplots(2, len(noisy), figsize=(5 * len(noisy), 7.5), squeeze=False)
    for i, rho in enumerate(noisy):
        for m in methods:
            sel = [r for r in rows if r["method"] == m and float(r["noise"]) == float(rho)]
            for s in sorted({r["seed"] for r in sel}):
                rs = [r for r in sel if r["seed"] == s]
                lab = m if s == min(r["seed"] for r in sel) else None
                color = f"C{methods.index(m)}"
                axes[0, i].plot([r["kl"] for r in rs], [r["heldout_acc"] for r in rs], "-o",
                                ms=2, color=color, alpha=0.7, label=lab)
                axes[1, i].plot([r["step"] for r in rs], [r["flipped_fit"] for r in rs], "-",
                                color=color, alpha=0.7, label=lab)
        axes[0, i].set(xlabel="exact KL(π‖π_ref) [nats]", ylabel="held-out accuracy",
                       title=f"flip rate {rho:g}: accuracy vs distance from π_ref")
        axes[1, i].set(xlabel="optimizer step", ylabel="flipped pairs fitted",
                       title=f"flip rate {rho:g}: memorised label noise")
        axes[0, i].legend(fontsize=7)
    fig.tight_layout()
    paths.append(save_figure(fig, rd.figure_path("dpo_trajectories")))
    return paths
