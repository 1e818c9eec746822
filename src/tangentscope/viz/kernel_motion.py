"""Figures of the kernel-motion experiment, from its run directory alone.

- ``kernel_motion_accounting``: relative error of each account of the noise's test displacement
  (recorded path ``G_Q``, frozen ``K(0)``/``K(T)``/path average, the clean twin's path) and the
  part first order leaves out, against the kernel motion ``‖K(T) − K(0)‖₂/‖K(0)‖₂``; one point
  per run, hollow where the run's own displacement identity is off by more than the trust level;
- ``kernel_motion_test``: test error of the noisy run, its clean twin and the linearized model,
  and the predicted/actual test cost (probe MSE) of the noise, against the kernel motion;
- ``kernel_motion_curves``: kernel motion against the GD step for the output-scale sweep
  (lowest seed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import RunDir
from ._mpl import pyplot, save_figure

__all__ = ["kernel_motion_figures"]

_ACCOUNTS = {"path": ("G_Q of the recorded path", "C0"), "initial": ("frozen K(0) (NTK)", "C1"),
             "final": ("frozen K(T)", "C2"), "average": ("frozen path-average K", "C4"),
             "twin": ("G_Q of the clean twin's path", "C5")}


def _scatter(ax: Any, rs: Sequence[Mapping[str, Any]], key: str, trust: float, color: str,
             label: str, marker: str = "o") -> None:
    x = np.array([float(r["kernel_motion"]) for r in rs])
    y = np.array([float(r[key]) for r in rs])
    good = np.array([float(r["displacement_error"]) <= trust for r in rs])
    ax.scatter(x[good], y[good], s=16, color=color, marker=marker, label=label)
    if (~good).any():
        if marker == "x":                  # an unfilled marker: fade it instead
            ax.scatter(x[~good], y[~good], s=16, color=color, marker=marker, alpha=0.3)
        else:
            ax.scatter(x[~good], y[~good], s=16, facecolors="none", edgecolors=color,
                       marker=marker)


def kernel_motion_figures(rd: RunDir) -> list[Path]:
    """The three figures (see the module docstring); nothing without finished runs."""
    plt = pyplot()
    cells = rd.cells()
    cfg = rd.read_config().get("config", {})
    trust = float(cfg.get("trust_identity", 0.1))
    holds = float(cfg.get("holds_rel_error", 0.25))
    rs = [r for r in cells.values() if not r.get("diverged")]
    out: list[Path] = []
    if not rs:
        return out
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for a, (label, color) in _ACCOUNTS.items():
        if f"{a}_rel_error" in rs[0]:
            _scatter(ax, rs, f"{a}_rel_error", trust, color, label)
    _scatter(ax, rs, "path_change_fraction", trust, "k", "left out by first order "
             "(‖(G_Q^noisy − G_Q^clean) g_clean‖ / ‖ΔU_Q‖)", marker="x")
    ax.axhline(holds, color="0.5", lw=0.8, ls="--")
    ax.set(xscale="log", yscale="log", xlabel="kernel motion ‖K(T) − K(0)‖₂ / ‖K(0)‖₂",
           ylabel="‖predicted − actual‖ / ‖actual‖ (noise's test displacement)",
           title="first-order accounting of label noise vs kernel motion")
    ax.legend(loc="lower right", fontsize=7)
    out.append(save_figure(fig, rd.figure_path("kernel_motion_accounting")))

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8))
    ax = axes[0]
    _scatter(ax, rs, "test_error", trust, "C3", "noisy labels (full test set)")
    _scatter(ax, rs, "test_error_twin", trust, "C0", "clean-trained twin (full test set)")
    _scatter(ax, rs, "probe_test_error_linearized", trust, "C1",
             "linearized model, noisy labels (probe)", marker="s")
    ax.set(xscale="log", xlabel="kernel motion", ylabel="test error",
           title="test error vs kernel motion")
    ax.legend(fontsize=7)
    ax = axes[1]
    for a in ("path", "initial"):
        label, color = _ACCOUNTS[a]
        _scatter(ax, rs, f"{a}_cost_ratio", trust, color, label)
    ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
    ax.set(xscale="log", xlabel="kernel motion", ylabel="predicted / actual noise cost",
           title="noise's test cost (probe MSE): predicted / actual")
    ax.legend(fontsize=7)
    out.append(save_figure(fig, rd.figure_path("kernel_motion_test")))

    arrays = rd.load_arrays()
    alpha_rs = sorted((r for r in rs if r["sweep"] == "alpha"), key=lambda r: float(r["alpha"]))
    if alpha_rs:
        seed = min(int(r["seed"]) for r in alpha_rs)
        fig, ax = plt.subplots(figsize=(6.0, 3.8))
        cmap = plt.get_cmap("viridis")
        sel = [r for r in alpha_rs if int(r["seed"]) == seed]
        for i, r in enumerate(sel):
            key = f"{r['setting']}/seed{seed}"
            t, mv = arrays.get(f"{key}/motion_times"), arrays.get(f"{key}/motion_operator")
            if t is None or mv is None:
                continue
            ok = t > 0
            step = t[ok] / float(r["lr"])           # constant GD step: τ = step · η
            ax.plot(step, np.maximum(mv[ok], 1e-6), color=cmap(i / max(len(sel) - 1, 1)),
                    label=f"α = {float(r['alpha']):g}")
        ax.set(xscale="log", yscale="log", xlabel="GD step (step size c·n/λ_max(K(0)) ∝ 1/α²)",
               ylabel="‖K(t) − K(0)‖₂ / ‖K(0)‖₂", title=f"kernel motion along training "
               f"(width {sel[0]['width']}, seed {seed})")
        ax.legend(fontsize=7, ncol=2)
        out.append(save_figure(fig, rd.figure_path("kernel_motion_curves")))
    return out
