"""Figures of the phenomena experiments (benign overfitting, double descent, implicit bias).

Every function reads a run directory only (``summary.json``, ``cells.jsonl``, ``arrays.npz``)
and writes PNGs into its ``figures/``; matplotlib is imported lazily.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import RunDir
from ._mpl import pyplot, save_figure

__all__ = ["benign_figures", "double_descent_figures", "implicit_bias_figures"]


def _band(ax: Any, x: Sequence[float], rows: Sequence[Mapping[str, Any]], key: str, label: str,
          **kw: Any) -> bool:
    """Median line with a min–max band over seeds; False if the metric is absent."""
    pts = [(xi, r[key]) for xi, r in zip(x, rows) if isinstance(r.get(key), Mapping)]
    if not pts:
        return False
    xs = np.array([p[0] for p in pts], dtype=float)
    med = np.array([p[1]["median"] for p in pts])
    lo = np.array([p[1]["min"] for p in pts])
    hi = np.array([p[1]["max"] for p in pts])
    line, = ax.plot(xs, med, marker="o", ms=3, label=label, **kw)
    ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.18, lw=0)
    return True


def _one_seed_each(keys: Any) -> list[str]:
    """``…/seedS`` cell keys reduced to the lowest seed of each setting (readable legends)."""
    best: dict[str, tuple[int, str]] = {}
    for k in set(keys):
        head, _, tail = k.rpartition("/seed")
        s = int(tail) if tail.isdigit() and head else 0
        h = head if tail.isdigit() and head else k
        if h not in best or s < best[h][0]:
            best[h] = (s, k)
    return sorted(v[1] for v in best.values())


# -- benign overfitting ------------------------------------------------------------------------
def benign_figures(rd: RunDir) -> list[Path]:
    """``benign_errors`` (test errors per task and width), ``benign_timeline`` (noise vs clean
    dissipated fraction over training) and ``benign_modes`` (noise energy per W_S mode)."""
    plt = pyplot()
    table = rd.read_summary().get("table", [])
    arrays = rd.load_arrays()
    out: list[Path] = []
    if table:
        tasks = sorted({r["task"] for r in table})
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.2), squeeze=False)
        for ax, t in zip(axes[0], tasks):
            rows = [r for r in table if r["task"] == t]
            labels = [f"h={r['width']}" for r in rows]
            bars = [("test_error", "trained on noisy labels"),
                    ("test_error_clean_trained", "same init, clean labels"),
                    ("probe_test_error_without_noise", "noisy, minus −G_Q g_noise (probe)")]
            xs = np.arange(len(rows))
            for j, (k, lab) in enumerate(bars):
                med = [r[k]["median"] if k in r else np.nan for r in rows]
                lo = [r[k]["median"] - r[k]["min"] if k in r else 0 for r in rows]
                hi = [r[k]["max"] - r[k]["median"] if k in r else 0 for r in rows]
                ax.bar(xs + (j - 1) * 0.27, med, 0.27, yerr=[lo, hi], label=lab, capsize=2)
            ax.set_xticks(xs, labels)
            ax.set_title(t)
            ax.set_ylabel("clean test error")
        axes[0][0].legend(loc="upper right")
        out.append(save_figure(fig, rd.figure_path("benign_errors")))
    keys = _one_seed_each(k.rsplit("/", 1)[0] for k in arrays if k.endswith("/timeline_noise"))
    if keys:
        fig, ax = plt.subplots(figsize=(5.2, 3.4))
        for key in keys:
            t = arrays[f"{key}/timeline_times"]
            if t.size == 0:
                continue
            line, = ax.plot(t, arrays[f"{key}/timeline_noise"], label=f"{key} noise")
            ax.plot(t, arrays[f"{key}/timeline_clean"], ls="--", color=line.get_color(),
                    label=f"{key} clean")
        ax.set_xscale("log")
        ax.set_xlabel("training time τ")
        ax.set_ylabel("fraction of its loss dissipated\n2b·vᵀW_S(0,τ)v/‖v‖²")
        ax.set_title("noise (solid) vs clean (dashed) part of g(0): share dissipated")
        ax.legend(fontsize=6, ncol=2)
        out.append(save_figure(fig, rd.figure_path("benign_timeline")))
    keys = sorted({k.rsplit("/", 1)[0] for k in arrays if k.endswith("/noise_per_mode")})
    if keys:
        fig, ax = plt.subplots(figsize=(5.2, 3.4))
        for key in keys:
            lam = arrays[f"{key}/eigenvalues"]
            ax.plot(lam, np.cumsum(arrays[f"{key}/noise_per_mode"]), label=key)
        ax.set_xscale("symlog", linthresh=1e-6)
        ax.invert_xaxis()
        ax.set_xlabel("eigenvalue of 2b·W_S (1 = mode fully fitted)")
        ax.set_ylabel("cumulative share of noise energy")
        ax.set_title("where the label noise sits in the spectrum of W_S(0, T)")
        ax.legend(fontsize=6)
        out.append(save_figure(fig, rd.figure_path("benign_modes")))
    return out


# -- double descent ------------------------------------------------------------------------------
def double_descent_figures(rd: RunDir) -> list[Path]:
    """``dd_curve`` (test/train error vs width per optimizer) and ``dd_noise`` (noise channel
    fraction and noise test displacement vs width)."""
    plt = pyplot()
    summ = rd.read_summary()
    curves: Mapping[str, list[Mapping[str, Any]]] = summ.get("curves", {})
    out: list[Path] = []
    if not curves:
        return out
    fig, ax = plt.subplots(figsize=(5.4, 3.5))
    for o, rows in curves.items():
        w = [r["width"] for r in rows]
        _band(ax, w, rows, "test_error", f"{o}: test")
        _band(ax, w, rows, "train_error", f"{o}: train (noisy labels)", ls=":")
        if any("minnorm_test_error" in r for r in rows):
            _band(ax, w, rows, "minnorm_test_error", f"{o}: min-norm fit of K(0), test",
                  ls="--")
        lm = summ.get("landmarks", {}).get(o, {})
        if lm.get("threshold_width"):
            ax.axvline(lm["threshold_width"], color="0.6", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("hidden width h")
    ax.set_ylabel("error")
    ax.set_title("double descent (dashed line: first width with zero train error)")
    ax.legend(fontsize=6)
    out.append(save_figure(fig, rd.figure_path("dd_curve")))
    keys = [("noise_channel_fraction", "noise energy in channel (hard split)"),
            ("noise_dissipated", "noise loss dissipated (soft)"),
            ("minnorm_noise_channel_fraction", "noise in range K(0) (t=∞)")]
    rms = [("noise_test_rms", "RMS of −G_Q g_noise on test"),
           ("minnorm_noise_test_rms", "RMS of K_QS K⁺ ε (t=∞)")]
    if any(k in r for rows in curves.values() for r in rows for k, _ in keys + rms):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.6, 3.4))
        for o, rows in curves.items():
            w = [r["width"] for r in rows]
            for k, lab in keys:
                _band(a1, w, rows, k, f"{o}: {lab}")
            for k, lab in rms:
                _band(a2, w, rows, k, f"{o}: {lab}")
        for a in (a1, a2):
            a.set_xscale("log")
            a.set_xlabel("hidden width h")
            a.legend(fontsize=6)
        a1.set_ylabel("fraction")
        a1.set_title("the essay predicts a peak at the threshold")
        a2.set_ylabel("test displacement caused by the noise")
        a2.set_yscale("log")
        out.append(save_figure(fig, rd.figure_path("dd_noise")))
    return out


# -- implicit bias -------------------------------------------------------------------------------
def implicit_bias_figures(rd: RunDir) -> list[Path]:
    """``implicit_schedule`` (time to learn each mode vs the frozen-kernel prediction) and
    ``implicit_linearized`` (distance to the linearized / min-norm prediction vs width)."""
    plt = pyplot()
    arrays = rd.load_arrays()
    summ = rd.read_summary()
    out: list[Path] = []
    keys = _one_seed_each(k.rsplit("/", 1)[0] for k in arrays if k.endswith("/learned_time"))
    if keys:
        fig, ax = plt.subplots(figsize=(4.8, 4.0))
        lo, hi = np.inf, 0.0
        for key in keys:
            pred, got = arrays[f"{key}/predicted_time"], arrays[f"{key}/learned_time"]
            ok = np.isfinite(pred) & np.isfinite(got) & (pred > 0) & (got > 0)
            if ok.any():
                ax.scatter(pred[ok], got[ok], s=6, alpha=0.6, label=key)
                lo, hi = min(lo, pred[ok].min(), got[ok].min()), max(hi, pred[ok].max(),
                                                                      got[ok].max())
        if hi > 0:
            ax.plot([lo, hi], [lo, hi], color="0.4", lw=0.8, ls="--", label="t = ln(10)·n/λ")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("frozen-kernel prediction ln(10)·n/λ_i (eNTK at init)")
        ax.set_ylabel("measured time to shrink mode i by 10×")
        ax.set_title("spectral schedule: modes learned in eigenvalue order")
        ax.legend(fontsize=6)
        out.append(save_figure(fig, rd.figure_path("implicit_schedule")))
    rows = summ.get("table", [])
    if rows:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.6, 3.4))
        w = [r["width"] for r in rows]
        _band(a1, w, rows, "test_rel_error", "vs linearized model, same step")
        _band(a1, w, rows, "minnorm_rel_error", "vs min-norm interpolant of K(0)")
        _band(a1, w, rows, "minnorm_path_rel_error", "vs min-norm of path-averaged K", ls="--")
        _band(a1, w, rows, "kernel_distance", "‖K_T − K_0‖/‖K_0‖", ls=":")
        a1.set_yscale("log")
        a1.set_ylabel("relative error on test outputs")
        a1.set_title("network vs kernel regression of its initial eNTK")
        _band(a2, w, rows, "param_ratio", "‖w_T − w_0‖ / min-norm ‖Δw‖")
        _band(a2, w, rows, "schedule_spearman", "Spearman(λ_i, time learned)")
        a2.axhline(1, color="0.6", lw=0.8)
        a2.set_title("implicit bias: norm and order")
        for a in (a1, a2):
            a.set_xscale("log")
            a.set_xlabel("hidden width h")
            a.legend(fontsize=6)
        out.append(save_figure(fig, rd.figure_path("implicit_linearized")))
    return out
