"""``tangentscope demo --headless``: the page's default run without a browser — figures and a
summary in a run directory."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._utils import progress
from ..errors import ConfigError
from ..io import RunDir
from ..viz import pyplot, save_figure
from .model import (
    DemoConfig,
    DemoTrainer,
    Snapshot,
    numerical_zero,
    reservoir_share,
    validate_config,
)

__all__ = ["run_headless", "plot_headless"]


def run_headless(out: str | Path | None = None, *, log_every: int | None = None,
                 show_progress: bool | None = None, torch_threads: int | None = 1,
                 **config: Any) -> dict[str, Any]:
    """Train the page's default configuration without a browser; write figures and a summary.

    Args:
        out: run directory (default ``runs/demo/<time>``); must not already hold a run.
        log_every: steps between spectrum snapshots logged to ``metrics.csv`` (default
            ``max_steps // 30``, at least ``steps_per_update``).
        show_progress: progress bar (default: when stderr is a terminal).
        torch_threads: intra-op threads while training (restored afterwards; ``None``: leave
            as is). One is fastest for this small model, above all on a busy machine.
        **config: :class:`DemoConfig` fields overriding the page's defaults.

    Returns:
        The summary written to ``summary.json`` (plus ``run_dir``): final train/test loss,
        eigenvalues and residual energies before/after, the fraction of residual energy in the
        reservoir before/after under the final threshold ``λ* = n / t_eff``, and timings.

    Raises:
        ControlError: a bad config value (before any work).
        ConfigError: ``out`` already holds a run.
    """
    cfg = validate_config(config)
    every = log_every or max(cfg.steps_per_update, cfg.max_steps // 30)
    path = Path(out) if out is not None else Path("runs/demo") / _dt.datetime.now().strftime(
        "%Y%m%d-%H%M%S")
    if (path / "config.json").exists():
        raise ConfigError(f"{path} already holds a run: choose another --out directory")
    rd = RunDir.create(path, cfg, meta={"experiment": "demo", "log_every": every})
    print(f"tangentscope demo --headless: writing {path}", flush=True)
    threads = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    try:
        summary = _train_headless(cfg, rd, every, show_progress)
    finally:
        torch.set_num_threads(threads)
    figures = plot_headless(path)
    rd.set_status("complete")
    print(f"train loss {summary['initial_train_loss']:.4g} → {summary['final_train_loss']:.4g}, "
          f"test loss {summary['initial_test_loss']:.4g} → {summary['final_test_loss']:.4g}; "
          f"residual energy in the reservoir (λ ≤ {summary['channel_threshold']:.3g}) "
          f"{summary['reservoir_fraction_before']:.1%} → "
          f"{summary['reservoir_fraction_after']:.1%}", flush=True)
    for f in figures:
        print(f"  {f}")
    print(f"  {path / 'summary.json'}", flush=True)
    return {**summary, "run_dir": str(path)}


def _train_headless(cfg: DemoConfig, rd: RunDir, every: int, show_progress: bool | None
                    ) -> dict[str, Any]:
    t_start = time.perf_counter()
    trainer = DemoTrainer(cfg)
    before = trainer.snapshot()
    rd.log(**_row(before))
    train_s, spec_s, n_spec = 0.0, before.spectrum_seconds, 1
    snap = before
    for k in progress(range(0, cfg.max_steps, every), desc="demo",
                      total=math.ceil(cfg.max_steps / every),
                      disable=None if show_progress is None else not show_progress):
        t0 = time.perf_counter()
        trainer.train(min(every, cfg.max_steps - k))
        train_s += time.perf_counter() - t0
        snap = trainer.snapshot()
        spec_s += snap.spectrum_seconds
        n_spec += 1
        rd.log(**_row(snap))
    after = snap
    thr = after.threshold
    d = trainer.data
    rd.save_arrays(x=d.x.reshape(-1), y=d.y.reshape(-1), x_test=d.x_test.reshape(-1),
                   y_test=d.y_test.reshape(-1), fit_before=before.fit, fit_after=after.fit,
                   eigenvalues_before=before.eigenvalues, eigenvalues_after=after.eigenvalues,
                   energies_before=before.energies, energies_after=after.energies,
                   noise_energies_before=before.noise_energies,
                   noise_energies_after=after.noise_energies)
    summary = {
        "config": dataclasses.asdict(cfg),
        "steps": trainer.step,
        "t_eff": trainer.t_eff,
        "final_train_loss": after.train_loss,
        "final_test_loss": after.test_loss,
        "initial_train_loss": before.train_loss,
        "initial_test_loss": before.test_loss,
        "channel_threshold": thr,
        "threshold_rule": "reservoir = {i : λ_i ≤ n / t_eff} (not yet learned under the "
                          "frozen-kernel flow at the final time t_eff)",
        "n_reservoir_before": int((before.eigenvalues <= thr).sum()),
        "n_reservoir_after": int((after.eigenvalues <= thr).sum()),
        "reservoir_fraction_before": reservoir_share(before.eigenvalues, before.energies, thr),
        "reservoir_fraction_after": after.reservoir_fraction,
        "noise_reservoir_fraction_before": reservoir_share(before.eigenvalues,
                                                           before.noise_energies, thr),
        "noise_reservoir_fraction_after": reservoir_share(after.eigenvalues,
                                                          after.noise_energies, thr),
        "eigenvalues_before": before.eigenvalues,
        "eigenvalues_after": after.eigenvalues,
        "energies_before": before.energies,
        "energies_after": after.energies,
        "noise_energies_before": before.noise_energies,
        "noise_energies_after": after.noise_energies,
        "timings": {"total_s": time.perf_counter() - t_start, "train_s": train_s,
                    "spectrum_s_mean": spec_s / n_spec, "spectra": n_spec,
                    "steps_per_s": trainer.step / max(train_s, 1e-12),
                    "torch_threads": torch.get_num_threads()},
    }
    rd.write_summary(summary)
    return summary


def _row(s: Snapshot) -> dict[str, Any]:
    return {"step": s.step, "t_eff": s.t_eff, "train_loss": s.train_loss,
            "test_loss": s.test_loss, "threshold": s.threshold,
            "reservoir_fraction": s.reservoir_fraction, "lambda_max": float(s.eigenvalues[0]),
            "lambda_min": float(s.eigenvalues[-1]), "spectrum_s": s.spectrum_seconds}


def plot_headless(run_dir: str | Path) -> list[Path]:
    """Draw ``fit.png``, ``spectrum.png`` and ``losses.png`` from a headless run directory."""
    rd = RunDir.open(run_dir)
    a, s = rd.load_arrays(), rd.read_summary()
    plt = pyplot()
    out = []

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(a["x_test"], a["y_test"], color="0.4", lw=1.5, label="clean function")
    ax.scatter(a["x"], a["y"], s=12, color="k", zorder=3, label="noisy training data")
    ax.plot(a["x_test"], a["fit_before"], color="#9aa5b1", lw=1, ls="--", label="fit at init")
    ax.plot(a["x_test"], a["fit_after"], color="#1f77b4", lw=1.8,
            label=f"fit after {s['steps']} steps")
    ax.set(xlabel="x", ylabel="f(x)", title="Data and fit")
    ax.legend(loc="best")
    out.append(save_figure(fig, rd.figure_path("fit")))

    thr = s["channel_threshold"]
    fig, axes = plt.subplots(2, 2, figsize=(9, 5.2), sharex=True)
    for col, (when, lam, en, noise) in enumerate((
            ("before training", a["eigenvalues_before"], a["energies_before"],
             a["noise_energies_before"]),
            (f"after {s['steps']} steps", a["eigenvalues_after"], a["energies_after"],
             a["noise_energies_after"]))):
        idx = np.arange(1, len(lam) + 1)
        res = lam <= thr
        colors = np.where(res, "#e6862a", "#1f77b4")
        zero = numerical_zero(lam)
        axes[0, col].bar(idx, np.maximum(lam, zero), color=colors, width=0.9)
        axes[0, col].set_yscale("log")
        axes[0, col].set_ylim(zero / 2, lam.max() * 3)
        axes[0, col].axhline(thr, color="k", lw=0.8, ls=":")
        axes[0, col].set_title(f"eNTK eigenvalues λ_i, {when}")
        floor = max(en.max(), 1e-300) * 1e-12
        axes[1, col].bar(idx, np.maximum(en, floor), color=colors, width=0.9)
        axes[1, col].scatter(idx, np.maximum(noise, floor), marker="_", color="k", s=25,
                             lw=1.2, zorder=3)
        axes[1, col].set_yscale("log")
        frac = s["reservoir_fraction_before" if col == 0 else "reservoir_fraction_after"]
        axes[1, col].set_title(f"residual energy |⟨v_i, r⟩|²  ({frac:.0%} in reservoir)")
        axes[1, col].set_xlabel("eigenvector i (λ descending)")
    axes[0, 0].set_ylabel("λ_i")
    axes[1, 0].set_ylabel("|⟨v_i, r⟩|²")
    fig.suptitle(f"blue: signal channel (λ > n/t_eff = {thr:.3g}), orange: reservoir;  black "
                 "ticks: the known label noise |⟨v_i, ε⟩|²", fontsize=9)
    out.append(save_figure(fig, rd.figure_path("spectrum")))

    m = rd.metrics_columns("step", "train_loss", "test_loss", "reservoir_fraction")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(m["step"], m["train_loss"], label="train Φ (noisy labels)")
    ax.plot(m["step"], m["test_loss"], color="#2ca02c", label="test (clean function)")
    ax.set(yscale="log", xlabel="step", ylabel="½ · mean squared error", title="Losses")
    ax2 = ax.twinx()
    ax2.plot(m["step"], m["reservoir_fraction"], color="#e6862a", lw=1, ls="--",
             label="share of residual energy in reservoir (λ_i ≤ n/t_eff, right axis)")
    ax2.set(ylim=(0, 1.02), ylabel="fraction in reservoir")
    ax2.grid(False)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    out.append(save_figure(fig, rd.figure_path("losses")))
    return out
