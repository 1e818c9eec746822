"""Figures of the reservoir-pruning experiment, from its run directory alone.

``reservoir_pruning_accuracy``: test accuracy against sparsity, one panel per structure
(unstructured, neurons) × fine-tuning, median over seeds with a min–max band per saliency, the
dense network's accuracy dashed. ``reservoir_pruning_scores``: the ``W_S`` spectrum of the first
seed with the channel cut, and the channel score of every weight against its magnitude.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..io import RunDir
from ._mpl import pyplot, save_figure

__all__ = ["reservoir_pruning_figures"]

_STYLE = {"channel": ("C3", "-"), "channel_obd": ("C1", "-"), "dissipation": ("C5", "-"),
          "magnitude": ("C0", "--"), "snip": ("C2", "--"), "obd": ("C4", "--"),
          "random": ("0.5", ":")}


def _accuracy_figure(rd: RunDir, s: Mapping[str, Any]) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9.5, 6.8), squeeze=False, constrained_layout=True)
    table = s.get("table", [])
    for i, structure in enumerate(("unstructured", "neurons")):
        for j, ft in enumerate(("noft", "ft")):
            ax = axes[i][j]
            rows = [r for r in table if r["curve"].startswith(structure + "/")
                    and r["curve"].endswith("/" + ft)]
            for sal in _STYLE:
                rs = sorted((r for r in rows if r["curve"].split("/")[1] == sal),
                            key=lambda r: r["level"])
                if not rs:
                    continue
                x = np.array([r["level"] for r in rs])
                med = np.array([r["test_acc"]["median"] for r in rs])
                lo = np.array([r["test_acc"]["min"] for r in rs])
                hi = np.array([r["test_acc"]["max"] for r in rs])
                color, ls = _STYLE[sal]
                ax.plot(x, med, color=color, ls=ls, marker="o", ms=3, label=sal)
                ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
            d = s.get("dense_test_acc", {}).get(ft)
            if d:
                ax.axhline(d["median"], color="k", lw=0.8, ls="--", label="dense")
            what = "weights removed" if structure == "unstructured" else \
                "fraction of hidden units removed"
            ax.set_xlabel(what)
            ax.set_ylabel("test accuracy")
            ax.set_title(f"{structure}, {'after fine-tuning' if ft == 'ft' else 'no fine-tuning'}")
            ax.set_ylim(0, 1)
    axes[0][0].legend(loc="lower left", ncol=2)
    fig.suptitle("reservoir pruning on digits: median and min–max over seeds")
    return save_figure(fig, rd.figure_path("reservoir_pruning_accuracy"))


def _scores_figure(rd: RunDir, s: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
                   ) -> Path | None:
    seed = s.get("seeds", [0])[0]
    key = f"seed{seed}/"
    if key + "score_channel" not in arrays:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4), constrained_layout=True)
    lam = np.asarray(arrays[key + "W_eigenvalues"], dtype=float)
    cell = rd.cells().get(f"seed{seed}", {})
    ax = axes[0]
    ax.semilogy(np.arange(1, lam.size + 1), np.clip(lam, 1e-12, None), lw=1)
    if "cut" in cell:
        ax.axhline(cell["cut"], color="C3", ls="--", lw=0.8,
                   label=f"channel cut (rank {cell.get('channel_rank')} of {lam.size})")
        ax.legend(loc="lower left")
    ax.set_xlabel("mode j")
    ax.set_ylabel("λ_j(W_S(0, T))")
    ax.set_title(f"integrated eNTK spectrum (seed {seed})")
    ax = axes[1]
    ch = np.asarray(arrays[key + "score_channel"], dtype=float)
    mag = np.asarray(arrays[key + "score_magnitude"], dtype=float)
    floor = max(float(ch.max()) * 1e-12, 1e-300)
    ax.scatter(np.clip(mag, 1e-8, None), np.clip(ch, floor, None), s=2, alpha=0.25, lw=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    rho = cell.get("rank_corr_channel_magnitude")
    ax.set_title("per weight: channel score vs |w|" + ("" if rho is None
                                                         else f" (Spearman {rho:.2f})"))
    ax.set_xlabel("|w| at T")
    ax.set_ylabel("channel score s_k (zero: floor)")
    return save_figure(fig, rd.figure_path("reservoir_pruning_scores"))


def reservoir_pruning_figures(rd: RunDir) -> list[Path]:
    """Both figures (see the module docstring); only those the run has data for."""
    s = rd.read_summary()
    out = [_accuracy_figure(rd, s)]
    sc = _scores_figure(rd, s, rd.load_arrays())
    if sc is not None:
        out.append(sc)
    return out
