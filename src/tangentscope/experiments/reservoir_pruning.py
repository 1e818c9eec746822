"""Pruning the reservoir: parameters scored by their share of the signal channel of ``W_S``.

The claim (a reader in the public discussion of the essay): "a way to test the theory … would
be to prune the high-confidence reservoir significantly reducing the model size while still
getting good predictions."

Per seed, an MLP (64 → width × depth → 10) is trained by full-batch gradient descent on
squared loss against one-hot labels of scikit-learn's 8×8 digits, with a
:class:`~tangentscope.dynamics.KernelRecorder` on. From the recorded kernels: the propagators
``P_g(τ_i, 0)`` and ``W_S(0, T)`` (``exp`` operators), the signal channel (the modes of ``W_S``
above ``threshold`` of the saturation value ``n/2``), and per parameter
(:mod:`tangentscope.dynamics.channel_score`)

- ``channel``: ``s_k = Σ_{j ∈ channel} ψ_jᵀ W^{(k)} ψ_j``, its share of the channel over the run;
- ``channel_obd``: ``w_k² s_k``, the same weighted like OBD (removing ``w_k`` moves the outputs
  by ``−w_k j_k``);
- ``dissipation``: ``∫ (∂_k Φ)² dτ``, its share of the loss dissipated (probe ``g(0)``);

against the standard saliencies at the trained weights (:mod:`tangentscope.dynamics.pruning`):
global magnitude, SNIP ``|w ∂Φ/∂w|``, OBD (Gauss–Newton diagonal) and random. Each prunes the
trained network unstructured (global, weight matrices) at every ``sparsities`` level and
neuron-structured (the same fraction of units of every hidden layer, a unit's score the sum over
its weights) at every ``neuron_fractions`` level; the test accuracy on the held-out digits is
measured right after pruning and after ``finetune_steps`` more GD steps with the masks kept.

    tangentscope run reservoir-pruning --preset smoke
    tangentscope run reservoir-pruning --preset full
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._utils import seed_everything
from ..data.digits import noisy_digits
from ..dynamics.linearized import gd_step_size
from ..errors import ConfigError
from ..io import RunDir
from ..models import mlp
from ..viz.reservoir_pruning import reservoir_pruning_figures
from ._framework import Experiment, seed_stats
from ._harness import CellOutput, check_positive, run_cells, torch_threads
from ._prune_sweep import SALIENCIES, THEORY, curve_key, record_and_score, sweep

__all__ = ["Config", "EXPERIMENT", "SALIENCIES", "run", "plot", "summarize", "table_markdown"]


@dataclasses.dataclass(frozen=True)
class Config:
    """Reservoir pruning on the digits.

    Attributes:
        seed, seeds: first seed and number of seeds (split, initialization, random saliency).
        n_train: training digits (the other 1,797 − n_train are the test set).
        label_noise: fraction of training labels flipped (test labels are the clean ones).
        width, depth, activation: the MLP (64 → width × depth → 10).
        lr_scale: GD step ``lr_scale · n / λ_max(K_SS(0))``.
        steps: GD steps of training (full batch).
        snapshots: log-spaced kernel snapshots (each costs one ``N × N`` eNTK and, in the
            operators, one eigen-decomposition; ``N = 10 n_train``).
        threshold: channel cut as a fraction of the saturation value ``n/2`` of ``W_S``.
        probes: random orthonormal probes of the channel for the channel score (a Hutchinson
            estimate of ``tr(Π W^(k))``); 0: the exact channel basis (``rank`` probes).
        ratio: growth factor of the geometric time panels of the score's quadrature (each
            interval between snapshots; > 1, smaller is more accurate and slower).
        saliencies: which of ``channel``, ``channel_obd``, ``dissipation``, ``magnitude``,
            ``snip``, ``obd``, ``random`` to sweep.
        sparsities: unstructured sparsity levels (fraction of weight-matrix entries removed).
        neuron_fractions: fraction of the units of every hidden layer removed.
        finetune_steps: GD steps after pruning, masks kept (0: no fine-tuning).
        tolerance: accuracy drop (absolute) allowed for "the sparsest level within tolerance of
            the dense network".
    """

    seed: int = 0
    seeds: int = 3
    n_train: int = 150
    label_noise: float = 0.0
    width: int = 128
    depth: int = 2
    activation: str = "gelu"
    lr_scale: float = 0.5
    steps: int = 2000
    snapshots: int = 16
    threshold: float = 0.5
    probes: int = 64
    ratio: float = 4.0
    saliencies: tuple[str, ...] = SALIENCIES
    sparsities: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
    neuron_fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 0.875, 0.9375)
    finetune_steps: int = 100
    tolerance: float = 0.02

    def __post_init__(self) -> None:
        check_positive(self, "seeds", "n_train", "width", "depth", "lr_scale", "steps",
                       "threshold", "tolerance")
        if self.snapshots < 2:
            raise ConfigError(f"--snapshots must be >= 2, got {self.snapshots}")
        if self.finetune_steps < 0:
            raise ConfigError(f"--finetune_steps must be >= 0, got {self.finetune_steps}")
        bad = [s for s in self.saliencies if s not in SALIENCIES]
        if bad or not self.saliencies:
            raise ConfigError(f"unknown saliencies {bad}; choose from {list(SALIENCIES)}")
        if not all(0 <= s < 1 for s in (*self.sparsities, *self.neuron_fractions)):
            raise ConfigError("--sparsities and --neuron_fractions must lie in [0, 1)")
        if not self.ratio > 1 or self.probes < 0:
            raise ConfigError(f"--ratio must be > 1 and --probes >= 0, got {self.ratio}, "
                              f"{self.probes}")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"--threshold is a fraction of the saturation value, in (0, 1); "
                              f"got {self.threshold}")


def _seed_cell(cfg: Config, seed: int) -> CellOutput:
    data = noisy_digits(cfg.n_train, cfg.label_noise, seed=seed, dtype=torch.float64)
    Y = torch.nn.functional.one_hot(data.y, 10).to(torch.float64)
    seed_everything(seed)
    net = mlp(64, cfg.width, cfg.depth, 10, activation=cfg.activation).to(torch.float64)
    lr = gd_step_size(net, data.x, cfg.lr_scale)
    run_ = record_and_score(net, data.x, Y, data.y, lr, steps=cfg.steps,
                            snapshots=cfg.snapshots, threshold=cfg.threshold,
                            probes=cfg.probes, ratio=cfg.ratio, seed=seed)
    rows = sweep(run_, data.x_test, data.y_test_clean, saliencies=cfg.saliencies,
                 sparsities=cfg.sparsities, neuron_fractions=cfg.neuron_fractions,
                 finetune_steps=cfg.finetune_steps)
    rows = [{"seed": seed, **r} for r in rows]
    result = {"seed": seed, "lr": lr, "num_params": sum(p.numel() for p in net.parameters()),
              "n_test": int(data.x_test.shape[0]), **run_.info, "rows": rows}
    return CellOutput(result, arrays=run_.arrays, rows=rows)


def run(cfg: Config, rd: RunDir) -> dict[str, Any]:
    """One cell per seed (resumable); then the summary, ``table.md`` and ``verdict.txt``."""
    with torch_threads(1):
        done = run_cells(rd, [(f"seed{s}", functools.partial(_seed_cell, cfg, s))
                              for s in range(cfg.seed, cfg.seed + cfg.seeds)],
                         desc="reservoir-pruning")
    summary = summarize(cfg, done)
    rd.write_text("table.md", table_markdown(summary))
    rd.write_text("verdict.txt", summary["verdict"] + "\n")
    return summary


def _stats(vals: Sequence[float]) -> dict[str, float]:
    s = seed_stats(list(vals))
    return {"median": float(s["median"]), "min": float(s["min"]), "max": float(s["max"]),
            "n": int(s["n"])}


def summarize(cfg: Config, cells: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per curve (structure × saliency × fine-tuned) and level: test accuracy over seeds; per
    curve: mean accuracy over the levels and the sparsest level within ``tolerance`` of the
    dense network; and the verdict."""
    seeds = sorted(int(c["seed"]) for c in cells.values())
    rows = [r for c in cells.values() for r in c["rows"]]
    dense = {(r["seed"], r["finetuned"]): r["test_acc"] for r in rows if r["saliency"] == "dense"}
    points: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        if r["saliency"] != "dense":
            points.setdefault((curve_key(r), float(r["level"])), []).append(r)
    table = [{"curve": k, "level": lv, "test_acc": _stats([r["test_acc"] for r in rs]),
              "sparsity": float(np.median([r["sparsity"] for r in rs])),
              "params_kept": int(np.median([r["params_kept"] for r in rs]))}
             for (k, lv), rs in sorted(points.items())]
    curves: dict[str, dict[str, Any]] = {}
    for key in sorted({k for k, _ in points}):
        per_seed_mean, per_seed_reach = [], []
        for s in seeds:
            rs = sorted((r for (k, _), v in points.items() if k == key for r in v
                         if r["seed"] == s), key=lambda r: r["level"])
            if not rs:
                continue
            ref = dense[(s, False)]
            per_seed_mean.append(float(np.mean([r["test_acc"] for r in rs])))
            ok = [r["level"] for r in rs if r["test_acc"] >= ref - cfg.tolerance]
            per_seed_reach.append(max(ok) if ok else 0.0)
        curves[key] = {"mean_test_acc": _stats(per_seed_mean),
                       "max_level_within_tolerance": _stats(per_seed_reach),
                       "per_seed_mean": per_seed_mean}
    info_keys = ("channel_rank", "N", "channel_fraction_of_N", "gap",
                 "probes", "channel_score_quadrature_rel_error", "channel_score_trace_rel_error",
                 "dissipation_score_total_rel_error",
                 "zero_channel_score_fraction", "final_train_loss",
                 *(f"rank_corr_channel_{k}" for k in SALIENCIES if k != "channel"))
    run_info = {k: _stats([float(c[k]) for c in cells.values()]) for k in info_keys
                if all(isinstance(c.get(k), (int, float)) for c in cells.values())}
    dense_stats = {("ft" if ft else "noft"): _stats([v for (s, f), v in dense.items() if f == ft])
                   for ft in (False, True)}
    summary = {"seeds": seeds, "table": table, "curves": curves, "dense_test_acc": dense_stats,
               "run": run_info, "num_params": cells[next(iter(cells))]["num_params"]}
    summary["comparisons"] = _comparisons(cfg, curves)
    summary["verdict"] = _verdict(cfg, summary)
    return summary


def _comparisons(cfg: Config, curves: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per structure × fine-tuning: saliencies ranked by median mean accuracy; the best theory
    score against the best standard one, paired per seed."""
    out = []
    for structure in ("unstructured", "neurons"):
        for ft in ("noft", "ft"):
            have = {s: curves[f"{structure}/{s}/{ft}"] for s in cfg.saliencies
                    if f"{structure}/{s}/{ft}" in curves}
            if not have:
                continue
            ranking = sorted(have, key=lambda s: -have[s]["mean_test_acc"]["median"])
            theory = [s for s in ranking if s in THEORY]
            standard = [s for s in ranking if s not in THEORY and s != "random"]
            row: dict[str, Any] = {"structure": structure, "finetuned": ft == "ft",
                                   "ranking": ranking,
                                   "mean_test_acc": {s: have[s]["mean_test_acc"]["median"]
                                                     for s in ranking}}
            if theory and standard:
                a, b = theory[0], standard[0]
                diff = [x - y for x, y in zip(have[a]["per_seed_mean"],
                                              have[b]["per_seed_mean"])]
                row.update(best_theory=a, best_standard=b, diff=_stats(diff),
                           wins=sum(d > 0 for d in diff), n=len(diff))
                if "channel" in have and "magnitude" in have:
                    d2 = [x - y for x, y in zip(have["channel"]["per_seed_mean"],
                                                have["magnitude"]["per_seed_mean"])]
                    row["channel_minus_magnitude"] = _stats(d2)
            out.append(row)
    return out


def _verdict(cfg: Config, s: Mapping[str, Any]) -> str:
    d = s["dense_test_acc"]["noft"]
    parts = [f"dense test accuracy {100 * d['median']:.1f}% (median of {len(s['seeds'])} seeds); "
             f"mean test accuracy over the sparsity sweep:"]
    for c in s["comparisons"]:
        label = f"{c['structure']}{' + fine-tuning' if c['finetuned'] else ''}"
        if "best_theory" not in c:
            parts.append(f"{label}: best {c['ranking'][0]}")
            continue
        df = c["diff"]
        who = (f"the channel-derived {c['best_theory']} beats the best standard saliency "
               f"{c['best_standard']}" if df["median"] > 0 else
               f"the best standard saliency {c['best_standard']} beats the best channel-derived "
               f"one ({c['best_theory']})")
        mags = c.get("channel_minus_magnitude")
        extra = (f"; the plain channel score minus magnitude {100 * mags['median']:+.1f} "
                 f"[{100 * mags['min']:+.1f}, {100 * mags['max']:+.1f}] points" if mags else "")
        parts.append(f"{label}: {who} by {100 * abs(df['median']):.1f} points (per-seed "
                     f"difference {100 * df['min']:+.1f} to {100 * df['max']:+.1f}, "
                     f"{c['wins']}/{c['n']} seeds for the channel side){extra}")
    return " ".join([parts[0]] + ["; ".join(parts[1:]) + "."])


def table_markdown(s: Mapping[str, Any]) -> str:
    """One markdown table per structure × fine-tuning: test accuracy (median [min, max] over
    seeds) per level, and the mean over levels."""
    lines = [f"dense: {100 * s['dense_test_acc']['noft']['median']:.1f}% "
             f"(after the fine-tuning steps too: "
             f"{100 * s['dense_test_acc']['ft']['median']:.1f}%)", ""]
    for structure in ("unstructured", "neurons"):
        for ft in ("noft", "ft"):
            rows = [r for r in s["table"] if r["curve"].startswith(structure + "/")
                    and r["curve"].endswith("/" + ft)]
            if not rows:
                continue
            levels = sorted({r["level"] for r in rows})
            sals = [x for x in SALIENCIES if any(r["curve"].split("/")[1] == x for r in rows)]
            what = "weights removed" if structure == "unstructured" else "units removed"
            lines += [f"### {structure}, {'fine-tuned' if ft == 'ft' else 'no fine-tuning'} "
                      f"(test accuracy %, median [min, max] over seeds)", "",
                      f"| saliency, {what}: | " + " | ".join(f"{lv:g}" for lv in levels)
                      + " | mean |", "|---" * (len(levels) + 2) + "|"]
            for sal in sals:
                cells = []
                for lv in levels:
                    r = next((x for x in rows if x["curve"] == f"{structure}/{sal}/{ft}"
                              and x["level"] == lv), None)
                    a = r["test_acc"] if r else None
                    cells.append("" if a is None else f"{100 * a['median']:.1f} "
                                 f"[{100 * a['min']:.1f}, {100 * a['max']:.1f}]")
                m = s["curves"][f"{structure}/{sal}/{ft}"]["mean_test_acc"]["median"]
                lines.append(f"| {sal} | " + " | ".join(cells) + f" | {100 * m:.1f} |")
            lines.append("")
    return "\n".join(lines)


def plot(rd: RunDir) -> list[Path]:
    """Figures from the run directory alone (:mod:`tangentscope.viz.reservoir_pruning`)."""
    return reservoir_pruning_figures(rd)


EXPERIMENT = Experiment(
    "reservoir-pruning", Config, run, plot,
    presets={
        "smoke": dict(seeds=1, n_train=40, width=24, depth=2, steps=150, snapshots=6,
                      sparsities=(0.5, 0.9), neuron_fractions=(0.5,), finetune_steps=10),
        "full": dict(seeds=3),
    },
    description="prune by the signal-channel score of W_S vs magnitude, SNIP, OBD, random")
