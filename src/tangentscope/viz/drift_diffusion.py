"""Figures of the drift-diffusion experiment, from its run directory alone.

- ``drift_diffusion_curves``: for the first setting's lowest seed, ``‖S(t)‖`` of each part of the
  SGD step in the channel (with and without its mean mode), the reservoir and along the flip
  direction against steps (log–log,
  with ``∝ t`` and ``∝ √t`` guides and the end of the early fit window), and the random-walk ratio
  ``Γ(t)`` (1 = diffusion, ``t`` = straight drift);
- ``drift_diffusion_slopes``: the early-window channel slope of each part per setting (median,
  min–max over seeds) against the random-walk null's 95% band and the lines 1/2 and 1, with
  random directions for comparison;
- ``drift_diffusion_memorization``: the signed displacement along the flip direction by part
  (positive = toward the flipped labels; symmetric-log axis) and the actual memorization, per
  setting's lowest seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..io import RunDir
from ._mpl import pyplot, save_figure

__all__ = ["drift_diffusion_figures"]

_PARTS = ("population", "idiosyncratic", "minibatch", "noise", "fullbatch")
_COLORS = {"population": "C0", "idiosyncratic": "C3", "minibatch": "C2", "noise": "C7",
           "fullbatch": "C1"}


def _first_keys(cells: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Per setting, the cell key of its lowest seed (in setting order)."""
    best: dict[tuple[str, int, float], tuple[int, str]] = {}
    for key, r in cells.items():
        tag = (str(r["sampling"]), int(r["batch_size"]), float(r["lr_scale"]))
        if tag not in best or int(r["seed"]) < best[tag][0]:
            best[tag] = (int(r["seed"]), key)
    return [k for _, (_, k) in sorted(best.items())]


def _guides(ax: Any, t: np.ndarray, y0: float) -> None:
    ax.plot(t, y0 * t / t[0], "k--", lw=0.7, alpha=0.5, label="∝ t")
    ax.plot(t, y0 * np.sqrt(t / t[0]), "k:", lw=0.9, alpha=0.6, label="∝ √t")


def drift_diffusion_figures(rd: RunDir) -> list[Path]:
    """The three figures (see the module docstring); those without data are skipped."""
    plt = pyplot()
    cells = rd.cells()
    if not cells:
        return []
    arrays = rd.load_arrays()
    summary = rd.read_summary()
    out: list[Path] = []
    keys = _first_keys(cells)
    key = keys[0]
    r = cells[key]
    steps = arrays.get(f"{key}/steps")
    if steps is not None:
        fig, axes = plt.subplots(2, 4, figsize=(15, 6.4))
        for j, sub in enumerate(("channel", "channel_nomean", "reservoir", "flip")):
            ax, axg = axes[0, j], axes[1, j]
            for p in _PARTS:
                norm = arrays[f"{key}/{p}/{sub}/norm"]
                quad = arrays[f"{key}/{p}/{sub}/quad"]
                ax.loglog(steps, np.maximum(norm, 1e-300), color=_COLORS[p], label=p)
                with np.errstate(divide="ignore", invalid="ignore"):
                    gam = np.where(quad > 0, norm ** 2 / np.where(quad > 0, quad, 1), np.nan)
                axg.loglog(steps, gam, color=_COLORS[p], label=p)
            _guides(ax, steps.astype(float), float(arrays[f"{key}/minibatch/{sub}/norm"][0]))
            axg.loglog(steps, steps, "k--", lw=0.7, alpha=0.5, label="Γ = t (drift)")
            axg.axhline(1.0, color="k", ls=":", lw=0.9, label="Γ = 1 (random walk)")
            for a in (ax, axg):
                a.axvline(float(r["early_end"]), color="0.6", lw=0.8)
            ax.set_title(f"{sub}: ‖S(t)‖")
            axg.set_title(f"{sub}: Γ(t) = ‖S‖²/Σ‖a‖²")
            axg.set_xlabel("SGD step")
        axes[0, 0].legend(fontsize=7)
        axes[1, 0].legend(fontsize=7)
        fig.suptitle(f"{r['sampling']} b={r['batch_size']} lr_scale={r['lr_scale']:g} "
                     f"seed {r['seed']} (k={r['channel_k']}; grey: end of the early window)")
        out.append(save_figure(fig, rd.figure_path("drift_diffusion_curves")))
    table = summary.get("table", [])
    if table:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
        xs = np.arange(len(table))
        for ax, sub in zip(axes, ("channel", "random")):
            for i, p in enumerate(_PARTS):
                med, lo, hi = [], [], []
                for row in table:
                    v = row.get(f"{p}_{sub}_slope_early")
                    ok = isinstance(v, Mapping)
                    med.append(v["median"] if ok else np.nan)
                    lo.append(v["median"] - v["min"] if ok else 0)
                    hi.append(v["max"] - v["median"] if ok else 0)
                ax.errorbar(xs + (i - 2) * 0.11, med, yerr=[lo, hi], fmt="o", ms=4,
                            color=_COLORS[p], label=p, capsize=2)
            nulls = summary.get("nulls", {})
            for x, row in zip(xs, table):
                kk = row.get("minibatch_channel_k_eff", {})
                want = max(int(round(kk["median"])), 1) if kk else 0
                near = sorted((abs(int(v["k_eff"]) - want), key) for key, v in nulls.items())
                e = nulls[near[0][1]] if kk and near else {}
                if "slope_early" in e:
                    ax.fill_between([x - 0.3, x + 0.3], e["slope_early"][0],
                                    e["slope_early"][2], color="0.85", zorder=0)
            ax.axhline(1.0, color="k", ls="--", lw=0.7)
            ax.axhline(0.5, color="k", ls=":", lw=0.9)
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{row['sampling'][:4]}\nb={row['batch_size']}\n"
                                f"lr={row['lr_scale']:g}" for row in table], fontsize=7)
            ax.set_title(f"early-window log–log slope, {sub} "
                         + ("(grey: random-walk null 95%)" if sub == "channel" else
                            "subspaces (null)"))
        axes[0].set_ylabel("slope of ‖S(t)‖ vs t")
        axes[0].legend(fontsize=7)
        out.append(save_figure(fig, rd.figure_path("drift_diffusion_slopes")))
    if steps is not None:
        ncol = min(len(keys), 4)
        nrow = -(-len(keys) // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 3.0 * nrow), squeeze=False,
                                 sharey=True)
        for ax in axes.flat[len(keys):]:
            ax.set_visible(False)
        for ax, kk in zip(axes.flat, keys):
            st = arrays[f"{kk}/steps"]
            for p in ("population", "idiosyncratic", "minibatch", "fullbatch"):
                ax.semilogx(st, arrays[f"{kk}/{p}/flip/signed"], color=_COLORS[p], label=p)
            ax.semilogx(st, arrays[f"{kk}/memorization"], "k", lw=1.2, label="actual Δu")
            ax.axhline(0, color="0.5", lw=0.6)
            ax.set_yscale("symlog", linthresh=0.1)
            rr = cells[kk]
            ax.set_title(f"{rr['sampling'][:4]} b={rr['batch_size']} lr={rr['lr_scale']:g}",
                         fontsize=8)
            ax.set_xlabel("SGD step")
        axes[0, 0].set_ylabel("⟨ε̂, displacement⟩ (toward flipped labels)")
        axes[0, 0].legend(fontsize=7)
        out.append(save_figure(fig, rd.figure_path("drift_diffusion_memorization")))
    return out
