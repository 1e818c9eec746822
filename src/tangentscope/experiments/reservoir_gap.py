"""The soft reservoir's gap: does it set the test cost of the fitted label noise?

The question (issue 14, part 3; the reading note): "how the gap between the lowest
signal-channel eigenvalue and the highest reservoir eigenvalue scales with width, depth, and
training length is what controls the size of the test error from imperfect cancellation".

Each cell trains one MLP (``width × depth``, one seed) with full-batch gradient descent on
squared loss against ±1 labels of a Gaussian mixture of which a fraction is flipped, recorded
with a :class:`~tangentscope.dynamics.KernelRecorder` (``K_SS`` on the training set, ``K_QS`` on
a test probe), and its twin trained from the same initialization on the clean labels. At a few
log-spaced training lengths ``t_k`` (one pass over the run,
:func:`~tangentscope.dynamics.reservoir.gap_timeline`) it measures

- the spectrum of ``2b W_S(0, t_k)`` near the channel/reservoir cut: the gap ratio at the cut
  (``log_gap``, decades), the largest consecutive ratio anywhere (``max_log_gap``), the soft
  band occupancy (``band_fraction``, exact and by SLQ) and the frozen-kernel prediction of
  the same from ``K_SS(0)``;
- the test cost of the fitted noise: ``‖G_Q g_noise‖`` (RMS over the probe), the measured
  noisy-minus-clean test displacement, and the excess test MSE and error of the noisy-trained
  network over its clean twin;
- the standard alternatives a reviewer asks for: parameter count, width, training length, the
  kernel's condition number and effective rank at ``t_k``, and ``‖g_noise‖``.

It reports the gap's scaling (median and spread over seeds per ``width × depth × t_k``) and
Spearman's ρ of every predictor against every test-cost measure, pooled (with a bootstrap
interval over runs), across architectures at the last training length (per seed), and across
training lengths within a run.

    tangentscope run reservoir-gap --preset smoke
    tangentscope run reservoir-gap --preset full
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io import RunDir
from ..viz.reservoir_gap import reservoir_gap_figures
from ._framework import Experiment
from ._gap_cell import gap_cell
from ._gap_stats import correlation_table
from ._harness import check_positive, run_cells, seed_table

__all__ = ["Config", "EXPERIMENT", "GAP_PREDICTORS", "ALTERNATIVES", "TARGETS", "run",
           "summarize", "plot"]

#: gap statistics of ``W_S`` tested as predictors of the noise's test cost
GAP_PREDICTORS = ("log_gap", "max_log_gap", "edge_reservoir", "band_fraction",
                  "frozen_log_gap", "noise_band_share")
#: the standard alternatives
ALTERNATIVES = ("num_params", "width", "time", "kernel_log_condition", "kernel_effective_rank",
                "g_noise_norm")
#: test-cost measures of the fitted noise
TARGETS = ("noise_test_rms", "actual_noise_test_rms", "excess_test_mse", "excess_test_error")


@dataclasses.dataclass(frozen=True)
class Config:
    """Reservoir-gap experiment.

    Attributes:
        seed: first seed; ``seeds`` consecutive seeds are run (data, label flips, init).
        seeds: number of seeds.
        widths: hidden widths of the MLPs (every width with every depth).
        depths: hidden layers of the MLPs.
        activation: MLP activation (smooth, so the kernel description of a GD step holds).
        n_train: training points (``N = n_train``: one output).
        n_test: test points for the test MSE/error of the noisy and the clean-trained nets.
        n_probe: test points in the recorded probe set (``K_QS``, ``G_Q``).
        dim: input dimension of the Gaussian mixture.
        separation: norm of each class mean (the task's signal-to-noise ratio).
        label_noise: fraction of training labels flipped.
        lr_scale: GD step as a fraction of ``n / λ_max(K_SS(0))``.
        steps: GD steps (full batch).
        stops: training lengths ``t_k`` at which the gap and the test cost are measured
            (log-spaced, ending at ``steps``).
        stop_span: decades between the first and the last training length.
        snapshot_every: kernel snapshot interval (steps), plus ``log_snapshots`` log-spaced.
        log_snapshots: extra log-spaced snapshots early in training.
        discretization: of the operators (``exp``, ``midpoint``, ``gd``, ``euler``).
        cut: channel threshold as a fraction of the saturation value ``1/(2b)`` of ``W_S``.
        band_lo: lower edge of the soft band (fraction of saturation).
        band_hi: upper edge of the soft band.
        slq_probes: Rademacher probes of the SLQ band estimate (0: skip it).
        slq_steps: Lanczos steps per SLQ probe.
        bootstrap: bootstrap resamples of the pooled correlation intervals.
    """

    seed: int = 0
    seeds: int = 3
    widths: tuple[int, ...] = (16, 64, 256)
    depths: tuple[int, ...] = (1, 2, 3)
    activation: str = "gelu"
    n_train: int = 80
    n_test: int = 1000
    n_probe: int = 300
    dim: int = 20
    separation: float = 3.0
    label_noise: float = 0.2
    lr_scale: float = 0.5
    steps: int = 1500
    stops: int = 6
    stop_span: float = 2.0
    snapshot_every: int = 25
    log_snapshots: int = 12
    discretization: str = "exp"
    cut: float = 0.5
    band_lo: float = 0.1
    band_hi: float = 0.9
    slq_probes: int = 20
    slq_steps: int = 30
    bootstrap: int = 1000

    def __post_init__(self) -> None:
        check_positive(self, "lr_scale", "stop_span", "separation")
        if self.seeds < 1 or self.steps < 2 or self.stops < 2 or self.n_train < 4 \
                or self.n_probe < 1 or self.n_test < 1 or self.snapshot_every < 1:
            raise ConfigError("seeds, n_probe, n_test, snapshot_every must be >= 1, steps and "
                              "stops >= 2 and n_train >= 4")
        if not self.widths or not self.depths or min(self.widths) < 1 or min(self.depths) < 1:
            raise ConfigError(f"widths and depths must be non-empty and >= 1, got "
                              f"{self.widths}, {self.depths}")
        if not 0 < self.label_noise < 0.5:
            raise ConfigError(f"label_noise must be in (0, 0.5), got {self.label_noise}")
        if not (0 < self.band_lo < self.band_hi < 1 and 0 < self.cut < 1):
            raise ConfigError("need 0 < band_lo < band_hi < 1 and 0 < cut < 1 (fractions of the "
                              f"saturation value), got {self.band_lo}, {self.band_hi}, "
                              f"{self.cut}")
        if self.discretization not in ("exp", "midpoint", "gd", "euler"):
            raise ConfigError(f"unknown discretization {self.discretization!r}")
        if self.slq_probes < 0 or self.slq_steps < 1 or self.bootstrap < 0:
            raise ConfigError("slq_probes and bootstrap must be >= 0 and slq_steps >= 1")


def _cells(cfg: Config) -> list[tuple[int, int, int]]:
    return [(w, d, s) for d in cfg.depths for w in cfg.widths
            for s in range(cfg.seed, cfg.seed + cfg.seeds)]


def run(cfg: Config, rd: RunDir) -> dict[str, Any]:
    """Every ``width × depth × seed`` cell (resumable); the summary, ``table.md`` and
    ``verdict.txt``."""
    done = run_cells(rd, [(f"d{d}/h{w}/seed{s}", functools.partial(gap_cell, cfg, w, d, s))
                          for w, d, s in _cells(cfg)], desc="reservoir-gap")
    summary = summarize(cfg, done)
    rd.write_text("table.md", table_markdown(summary))
    rd.write_text("verdict.txt", summary["verdict"] + "\n")
    return summary


_SCALING = ("log_gap", "max_log_gap", "edge_channel", "edge_reservoir", "channel_rank",
            "band_fraction", "slq_band_fraction", "frozen_log_gap", "frozen_band_fraction",
            "noise_band_share", "noise_dissipated", "noise_test_rms", "actual_noise_test_rms",
            "counterfactual_rel_error", "excess_test_mse", "excess_test_error",
            "train_error_noisy_labels", "kernel_log_condition", "kernel_effective_rank")


#: table metrics kept with their spread; the others with their median only (small summary)
_SPREAD = ("log_gap", "band_fraction", "frozen_log_gap", "channel_rank", "noise_band_share",
           "noise_test_rms", "actual_noise_test_rms", "excess_test_mse", "excess_test_error")


def _compact(stats: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """``{metric: {median, min, max}}`` for :data:`_SPREAD`, ``{metric: median}`` otherwise
    (4 significant digits)."""
    def r(v: float) -> float:
        return float(f"{v:.4g}")

    return {k: ({q: r(v[q]) for q in ("median", "min", "max")} if k in _SPREAD
                else r(v["median"])) for k, v in stats.items()}


def _stop_rows(cells: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The per-training-length records of every cell; ``±1e308`` (how the durable JSON stores
    an infinite gap) back to ``±inf``, so a resumed run summarizes exactly like a fresh one."""
    rows: list[dict[str, Any]] = []
    for c in cells.values():
        for r in c["stops"]:
            rows.append({k: math.copysign(math.inf, v) if isinstance(v, float)
                         and abs(v) >= 1e300 else v for k, v in r.items()})
    return rows


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(float(v))


def _best(corr: Mapping[str, Mapping[str, Any]], names: Sequence[str], slice_: str
          ) -> tuple[str | None, dict[str, Any]]:
    """The predictor with the largest ``|ρ|`` in a slice (median for the per-seed slices)."""
    best, stat, top = None, {}, -1.0
    for p in names:
        s = corr[p][slice_]
        rho = s["rho"] if slice_ == "pooled" else s["median"]
        if _finite(rho) and abs(rho) > top:
            best, stat, top = p, dict(s), abs(float(rho))
    return best, stat


def _fmt(s: Mapping[str, Any], pooled: bool) -> str:
    if pooled:
        return f"ρ = {s['rho']:+.2f} [{s['lo']:+.2f}, {s['hi']:+.2f}]"
    return f"ρ = {s['median']:+.2f} [{s['min']:+.2f}, {s['max']:+.2f}]"


def _abs_range(s: Mapping[str, Any], pooled: bool) -> tuple[float, float, float]:
    """``(|ρ|, low, high)`` of a slice's statistic, the range folded onto ``|ρ|``."""
    rho, lo, hi = (s["rho"], s["lo"], s["hi"]) if pooled else (s["median"], s["min"], s["max"])
    if not all(_finite(v) for v in (rho, lo, hi)):
        return (abs(rho) if _finite(rho) else 0.0), float("nan"), float("nan")
    return (abs(rho), lo, hi) if rho >= 0 else (abs(rho), -hi, -lo)


def _verdict(corr: Mapping[str, Any], residual: float) -> tuple[str, dict[str, Any]]:
    lines, calls = [], {}
    for t in TARGETS:
        for sl in ("pooled", "fixed_time", "architecture", "time"):
            pooled = sl == "pooled"
            bg, sg = _best(corr[t], GAP_PREDICTORS, sl)
            ba, sa = _best(corr[t], ALTERNATIVES, sl)
            if bg is None:
                continue
            g, glo, _ = _abs_range(sg, pooled)
            a, _, ahi = _abs_range(sa, pooled) if ba is not None else (0.0, 0.0, 0.0)
            if not glo > 0:
                call = "the gap does not predict it (its range includes 0)"
            elif glo > ahi:
                call = "the gap predicts it better than every alternative (ranges separate)"
            elif g > a:
                call = ("the gap's |ρ| is above the best alternative's, but the ranges overlap "
                        "(not clearly better)")
            else:
                call = "the gap is no better than the best alternative"
            calls[f"{t}/{sl}"] = {"best_gap": bg, "best_alternative": ba, "call": call}
            lines.append(f"{t} [{sl}]: best gap statistic {bg} {_fmt(sg, pooled)}; best "
                         f"alternative {ba} {_fmt(sa, pooled) if ba else '—'} → {call}.")
    head = ("Does the soft reservoir's gap predict the test cost of the fitted noise? Spearman ρ "
            "over (width, depth, seed, training length) points; pooled: 95% bootstrap interval "
            "over runs; fixed_time: across runs at one training length, median [min, max] over "
            "training lengths; architecture: across width × depth at the last training length, "
            "median [min, max] over seeds; time: across training lengths within a run, median "
            "[min, max] over runs. Operators trusted to a median dissipation-identity residual "
            f"of {residual:.1e}.")
    return head + "\n" + "\n".join(lines), calls


def summarize(cfg: Config, cells: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Scaling table (median/min/max over seeds per ``depth × width × step``), the correlation
    table of every predictor against every test-cost measure, and the verdict."""
    rows = _stop_rows(cells)
    groups: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((int(r["depth"]), int(r["width"]), int(r["step"])), []).append(r)
    table = [{"depth": d, "width": w, "step": st, "seeds": sorted(r["seed"] for r in rs),
              "num_params": rs[0]["num_params"], "time": rs[0]["time"],
              **_compact(seed_table(rs, _SCALING))}
             for (d, w, st), rs in sorted(groups.items())]
    corr = correlation_table(rows, GAP_PREDICTORS + ALTERNATIVES, TARGETS,
                             resamples=cfg.bootstrap, seed=cfg.seed)
    resid = seed_table(cells.values(), ("dissipation_error", "displacement_error",
                                        "gradient_error"))
    dis = resid.get("dissipation_error", {}).get("median", float("nan"))
    slq_err = [abs(r["slq_band_fraction"] - r["band_fraction"]) for r in rows
               if _finite(r.get("slq_band_fraction"))]
    verdict, calls = _verdict(corr, dis)
    return {"table": table, "correlations": corr, "calls": calls, "verdict": verdict,
            "gap_predictors": list(GAP_PREDICTORS), "alternatives": list(ALTERNATIVES),
            "identity_residuals": resid, "cells": len(cells), "points": len(rows),
            "slq_band_abs_error_max": max(slq_err) if slq_err else None,
            "slq_band_abs_error_median": sorted(slq_err)[len(slq_err) // 2] if slq_err else None,
            "task": f"gmm n={cfg.n_train} dim={cfg.dim} separation={cfg.separation} "
                    f"label_noise={cfg.label_noise}; widths {list(cfg.widths)}, depths "
                    f"{list(cfg.depths)}, {cfg.steps} GD steps (lr_scale {cfg.lr_scale})"}


def table_markdown(summary: Mapping[str, Any]) -> str:
    """``table.md``: the gap's scaling and the correlation table."""
    def m(r: Mapping[str, Any], k: str, f: str = ".3g") -> str:
        s = r.get(k)
        if not isinstance(s, Mapping):
            return "—"
        return f"{s['median']:{f}} [{s['min']:{f}}, {s['max']:{f}}]"

    cols = ("log_gap", "band_fraction", "frozen_log_gap", "channel_rank", "noise_band_share",
            "noise_test_rms", "excess_test_mse", "excess_test_error")
    out = ["## Gap and test cost per depth × width × step (median [min, max] over seeds)", "",
           "| depth | width | params | step | " + " | ".join(cols) + " |",
           "|" + "---|" * (4 + len(cols))]
    for r in summary["table"]:
        out.append(f"| {r['depth']} | {r['width']} | {r['num_params']} | {r['step']} | "
                   + " | ".join(m(r, c) for c in cols) + " |")
    out += ["", "## Spearman ρ against the test cost (pooled: [95% bootstrap over runs]; "
            "the others: median [min, max])", ""]
    for t, preds in summary["correlations"].items():
        out += [f"### {t}", "", "| predictor | pooled | fixed training length | "
                "architecture (last step) | time (within a run) |", "|---|---|---|---|---|"]
        for p, s in preds.items():
            cells = [_fmt(s["pooled"], True) if _finite(s["pooled"]["rho"]) else "—"]
            cells += [_fmt(s[k], False) if _finite(s[k]["median"]) else "—"
                      for k in ("fixed_time", "architecture", "time")]
            out.append(f"| {p}{' (gap)' if p in GAP_PREDICTORS else ''} | "
                       + " | ".join(cells) + " |")
        out.append("")
    out += ["## Verdict", "", summary["verdict"], ""]
    return "\n".join(out)


def plot(rd: RunDir) -> list[Path]:
    """Figures from the run directory alone."""
    return reservoir_gap_figures(rd)


EXPERIMENT = Experiment(
    "reservoir-gap", Config, run, plot,
    presets={
        "smoke": dict(seeds=2, widths=(16, 32), depths=(1,), n_train=24, n_test=200, n_probe=50,
                      dim=20, steps=100, stops=3, stop_span=1.0, snapshot_every=10,
                      log_snapshots=4, slq_probes=4, slq_steps=10, bootstrap=50),
        "full": dict(seeds=5, depths=(1, 2, 3, 4)),
    },
    description="the soft reservoir's gap vs width, depth, training length, and the noise's "
                "test cost")
