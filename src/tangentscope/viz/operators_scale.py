"""Figures of the operators-scale experiment, from its run directory alone (``summary.json``,
``metrics.csv``, ``arrays.npz``); matplotlib is imported lazily."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import RunDir
from ._mpl import pyplot, save_figure
from ._mpl import seed_stat as _stat

__all__ = ["operators_scale_figures"]


def _log_density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray,
                 sigma: float = 0.15) -> np.ndarray:
    keep = nodes > 0
    lt, lw = np.log10(nodes[keep]), weights[keep] / nodes.shape[0]
    z = (grid[:, None] - lt[None, :]) / sigma
    return (lw[None, :] * np.exp(-0.5 * z * z)).sum(1) / (sigma * np.sqrt(2 * np.pi))


def _densities(plt: Any, rd: RunDir, arrays: Mapping[str, np.ndarray], probes: int
               ) -> Path | None:
    keys = sorted(k.rsplit("/", 1)[0] for k in arrays if k.endswith("/gramian_slq"))
    if not keys:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    grid = np.linspace(-8, 0.5, 300)
    for k in keys:
        nw = arrays[f"{k}/gramian_slq"]
        a1.plot(grid, _log_density(nw[0][:probes], nw[1][:probes], grid), label=k)
    a1.axvline(np.log10(0.5), color="0.3", lw=0.7, ls=":")
    a1.set_xlabel("log10 σ, σ = 2b λ(W_S(0, T)) (1 = saturated)")
    a1.set_ylabel("SLQ density (Rademacher probes)")
    a1.set_title("W_S(0, T): channel (σ > 0.5) and soft reservoir")
    a1.legend(fontsize=7)
    k0 = keys[0]
    ks, steps = arrays[f"{k0}/kernel_slq"], arrays[f"{k0}/kernel_snapshot_steps"]
    lo = float(np.log10(max(ks[:, 0][ks[:, 0] > 0].min(), 1e-12)))
    hi = float(np.log10(ks[:, 0].max())) + 0.5
    kgrid = np.linspace(lo - 0.5, hi, 300)
    for (nodes, weights), st in zip(ks, steps):
        a2.plot(kgrid, _log_density(nodes, weights, kgrid), label=f"step {int(st)}")
    a2.set_xlabel("log10 λ(K_SS(t))")
    a2.set_title(f"K_SS(t) along training ({k0})")
    a2.legend(fontsize=7)
    return save_figure(fig, rd.figure_path("operators_scale_density"))


def _noise(plt: Any, rd: RunDir) -> Path | None:
    rows = [r for r in rd.read_metrics() if "noise_soft_fraction" in r and r.get("step")
            not in (None, "")]
    if not rows:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for w in sorted({int(float(r["width"])) for r in rows}):
        rs = [r for r in rows if int(float(r["width"])) == w]
        steps = sorted({int(float(r["step"])) for r in rs})
        med = {key: [float(np.median([float(r[key]) for r in rs if int(float(r["step"])) == s]))
                     for s in steps] for key in ("noise_soft_fraction", "clean_soft_fraction",
                                                 "noise_test_rms", "clean_test_rms")}
        line = a1.semilogx(steps, med["noise_soft_fraction"], label=f"noise, h={w}")[0]
        a1.semilogx(steps, med["clean_soft_fraction"], ls="--", color=line.get_color(),
                    label=f"clean, h={w}")
        a2.semilogx(steps, med["noise_test_rms"], color=line.get_color(), label=f"noise, h={w}")
        a2.semilogx(steps, med["clean_test_rms"], ls="--", color=line.get_color())
    a1.set_xlabel("step t")
    a1.set_ylabel("2b ξᵀ W_S(0, t) ξ / ‖ξ‖² (1 = fitted)")
    a1.set_title("label noise vs clean signal: fitted share (median over seeds)")
    a2.set_xlabel("step t")
    a2.set_ylabel("‖G_Q(t, 0) ξ‖ (RMS over probe)")
    a2.set_title("test visibility (solid: noise, dashed: clean)")
    a1.legend(fontsize=7)
    return save_figure(fig, rd.figure_path("operators_scale_noise"))


def _widths(plt: Any, rd: RunDir, table: Sequence[Mapping[str, Any]]) -> Path | None:
    if len(table) < 2:
        return None
    x = [_stat(r, "params_over_N")[0] for r in table]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, lab in (("test_error", "noisy-trained"), ("twin_test_error", "clean twin")):
        s = np.array([_stat(r, key) for r in table])
        a1.errorbar(x, s[:, 0], yerr=[s[:, 0] - s[:, 1], s[:, 2] - s[:, 0]], marker="o",
                    capsize=3, label=lab)
    for key, lab in (("noise_test_rms", "‖G_Q g_noise‖ (predicted)"),
                     ("actual_noise_test_rms", "noisy − twin (measured)")):
        s = np.array([_stat(r, key) for r in table])
        a2.errorbar(x, s[:, 0], yerr=[s[:, 0] - s[:, 1], s[:, 2] - s[:, 0]], marker="o",
                    capsize=3, label=lab)
    for ax in (a1, a2):
        ax.set_xscale("log")
        ax.axvline(1.0, color="0.3", lw=0.7, ls=":")
        ax.set_xlabel("P / N")
        ax.legend(fontsize=7)
    a1.set_ylabel("test error")
    a1.set_title("double descent? (median [min, max] over seeds)")
    a2.set_ylabel("test displacement by the noise (RMS)")
    a2.set_title("the noise's test cost")
    return save_figure(fig, rd.figure_path("operators_scale_widths"))


def operators_scale_figures(rd: RunDir) -> list[Path]:
    """Every figure the run directory has the data for."""
    plt = pyplot()
    summary = rd.read_summary()
    cfg = rd.read_config().get("config", {})
    arrays = rd.load_arrays()
    out = [_densities(plt, rd, arrays, int(cfg.get("slq_probes", 4))), _noise(plt, rd),
           _widths(plt, rd, summary.get("table", []))]
    return [p for p in out if p is not None]
