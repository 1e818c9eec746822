"""Figures of the reservoir-gap experiment, from its run directory alone (``summary.json``,
``metrics.csv``-equivalent cell records and ``arrays.npz``); matplotlib is imported lazily."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import RunDir
from ._mpl import pyplot, save_figure
from ._mpl import seed_stat as _stat

__all__ = ["reservoir_gap_figures"]


def _spectra(plt: Any, rd: RunDir, arrays: Mapping[str, np.ndarray]) -> Path | None:
    """Normalized spectra of ``2b W_S(0, t)``: every architecture at the middle training length,
    and one architecture along training (lowest seed)."""
    keys = sorted({k.rsplit("/", 1)[0] for k in arrays if k.endswith("/spectra")})
    if not keys:
        return None
    seed0 = min(int(k.rsplit("/seed", 1)[1]) for k in keys)
    keys = [k for k in keys if k.endswith(f"/seed{seed0}")]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    at = len(arrays[f"{keys[0]}/steps"]) // 2
    for k in keys:
        sp = arrays[f"{k}/spectra"][at]
        a1.semilogy(np.arange(1, sp.size + 1), np.clip(sp, 1e-16, None), label=k.rsplit("/", 1)[0])
    mid = keys[len(keys) // 2]
    steps = arrays[f"{mid}/steps"]
    for sp, st in zip(arrays[f"{mid}/spectra"], steps):
        a2.semilogy(np.arange(1, sp.size + 1), np.clip(sp, 1e-16, None), label=f"step {st}")
    for ax in (a1, a2):
        ax.axhspan(0.1, 0.9, color="0.5", alpha=0.12, lw=0)
        ax.axhline(0.5, color="0.3", lw=0.7, ls=":")
        ax.set_xlabel("mode j")
        ax.set_ylabel("σ_j = 2b λ_j(W_S(0, t))")
        ax.set_ylim(1e-6, 2)
        ax.legend(fontsize=7)
    a1.set_title(f"every net at step {int(arrays[f'{keys[0]}/steps'][at])} (seed {seed0}); "
                 "band σ∈[0.1, 0.9] shaded")
    a2.set_title(f"{mid.rsplit('/', 1)[0]} along training")
    return save_figure(fig, rd.figure_path("reservoir_gap_spectra"))


def _scaling(plt: Any, rd: RunDir, table: Sequence[Mapping[str, Any]]) -> Path | None:
    """Gap at the cut, band occupancy and the noise's test displacement vs training length."""
    if not table:
        return None
    keys = ("log_gap", "band_fraction", "noise_test_rms", "excess_test_mse")
    labels = ("log10 gap ratio at the cut σ = 0.5", "band occupancy σ∈[0.1, 0.9]",
              "‖G_Q g_noise‖ (RMS over the probe)", "excess test MSE (noisy − clean twin)")
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    archs = sorted({(r["depth"], r["width"]) for r in table})
    for d, w in archs:
        rows = sorted((r for r in table if (r["depth"], r["width"]) == (d, w)),
                      key=lambda r: r["step"])
        x = np.array([r["step"] for r in rows], dtype=float)
        for ax, k in zip(axes, keys):
            st = np.array([_stat(r, k) for r in rows])
            line, = ax.plot(x, st[:, 0], marker="o", ms=3, label=f"depth {d}, width {w}",
                            ls="-" if d == archs[0][0] else "--")
            ax.fill_between(x, st[:, 1], st[:, 2], color=line.get_color(), alpha=0.12, lw=0)
            if k == "log_gap":
                fr = np.array([_stat(r, "frozen_log_gap") for r in rows])
                ax.plot(x, fr[:, 0], ls=":", color=line.get_color(), lw=1)
    for ax, lab in zip(axes, labels):
        ax.set_xscale("log")
        ax.set_xlabel("GD step")
        ax.set_title(lab)
    axes[0].text(0.02, 0.95, "dotted: frozen K_SS(0)", transform=axes[0].transAxes, fontsize=7,
                 va="top")
    axes[-1].legend(fontsize=6)
    return save_figure(fig, rd.figure_path("reservoir_gap_scaling"))


def _scatter(plt: Any, rd: RunDir, rows: Sequence[Mapping[str, Any]],
             summary: Mapping[str, Any]) -> Path | None:
    """Test cost against the gap statistics and the strongest alternatives, one point per
    (run, training length)."""
    if not rows:
        return None
    corr = summary.get("correlations", {})
    xs = ("log_gap", "band_fraction", "noise_band_share", "time", "kernel_log_condition")
    ys = ("noise_test_rms", "excess_test_mse")
    fig, axes = plt.subplots(len(ys), len(xs), figsize=(3.1 * len(xs), 3.0 * len(ys)),
                             squeeze=False, gridspec_kw={"hspace": 0.45})
    archs = sorted({(r["depth"], r["width"]) for r in rows})
    cmap = plt.get_cmap("viridis")
    for i, yk in enumerate(ys):
        for j, xk in enumerate(xs):
            ax = axes[i][j]
            allx = np.array([float(r[xk]) for r in rows], dtype=float)
            fin = allx[np.isfinite(allx) & (np.abs(allx) < 1e300)]
            cap = 1.15 * float(fin.max()) if fin.size else 1.0   # where an infinite gap is drawn
            for a, (d, w) in enumerate(archs):
                pts = [(r[xk], r[yk]) for r in rows if (r["depth"], r["width"]) == (d, w)]
                p = np.array(pts, dtype=float)
                p[:, 0] = np.where(np.abs(p[:, 0]) >= 1e300, cap, p[:, 0])
                ax.scatter(p[:, 0], p[:, 1], s=9, color=cmap(a / max(len(archs) - 1, 1)),
                           marker="os^"[archs.index((d, w)) % 3], label=f"d{d} h{w}")
            s = corr.get(yk, {}).get(xk, {}).get("pooled")
            if s:
                ax.set_title(f"ρ = {s['rho']:+.2f} [{s['lo']:+.2f}, {s['hi']:+.2f}]")
            if xk == "time":
                ax.set_xscale("log")
            ax.set_xlabel(xk if fin.size == allx.size else f"{xk} (∞, empty reservoir: right edge)")
            if j == 0:
                ax.set_ylabel(yk)
    axes[0][-1].legend(fontsize=6, ncol=2)
    return save_figure(fig, rd.figure_path("reservoir_gap_predict"))


def _bars(plt: Any, rd: RunDir, summary: Mapping[str, Any]) -> Path | None:
    """Pooled Spearman ρ (95% bootstrap over runs) of every predictor, per test-cost measure."""
    corr = summary.get("correlations")
    if not corr:
        return None
    targets = list(corr)
    preds = list(corr[targets[0]])
    fig, ax = plt.subplots(figsize=(11, 3.6))
    width = 0.8 / len(targets)
    x = np.arange(len(preds))
    for i, t in enumerate(targets):
        st = [corr[t][p]["pooled"] for p in preds]
        rho = np.array([s["rho"] for s in st], dtype=float)
        lo = np.array([s["lo"] for s in st], dtype=float)
        hi = np.array([s["hi"] for s in st], dtype=float)
        err = np.vstack([np.nan_to_num(rho - lo), np.nan_to_num(hi - rho)])
        ax.bar(x + (i - (len(targets) - 1) / 2) * width, rho, width, yerr=err, capsize=2,
               label=t)
    n_gap = sum(1 for p in preds if p in summary.get("gap_predictors", preds))
    ax.axvline(n_gap - 0.5, color="0.3", lw=0.8)
    ax.axhline(0, color="0.3", lw=0.6)
    ax.set_xticks(x, preds, rotation=25, ha="right")
    ax.set_ylabel("Spearman ρ (pooled)")
    ax.set_title("gap statistics (left of the line) vs standard alternatives (right)")
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, rd.figure_path("reservoir_gap_correlations"))


def reservoir_gap_figures(rd: RunDir) -> list[Path]:
    """``reservoir_gap_spectra``, ``reservoir_gap_scaling``, ``reservoir_gap_predict`` and
    ``reservoir_gap_correlations`` (whichever the run directory has the data for)."""
    plt = pyplot()
    summary = rd.read_summary()
    arrays = rd.load_arrays()
    rows = [dict(r) for c in rd.cells().values() for r in c.get("stops", [])]
    out = [_spectra(plt, rd, arrays), _scaling(plt, rd, summary.get("table", [])),
           _scatter(plt, rd, rows, summary), _bars(plt, rd, summary)]
    return [p for p in out if p is not None]
