"""Drift vs diffusion of signal and memorization in the signal channel under minibatch SGD.

The claim (abstract, seeds/003): "Within the signal channel, minibatch SGD ensures that coherent
population signal accumulates via fast linear drift, while idiosyncratic memorization is
suppressed into a slow, diffusive random walk."

Per ``batch size × learning rate × sampling × seed`` cell, an MLP is trained by plain SGD
(squared loss, ±1 targets) on a 2-class Gaussian mixture with a known fraction of flipped
labels, and every step's gradient is split (:mod:`._drift_run`) into its **population** part
(a fresh pool from the data distribution, same flip rate), the training set's
**idiosyncratic** part (full batch − pool: what this sample, flipped labels included, says
beyond the population) and the **minibatch** noise (batch − full batch); ``noise`` = the last
two together (the two-way split around a population pool), ``fullbatch`` = the first two
together (the two-way split's drift when the population part is the full batch). Each
part's cumulative output displacement on the training set is projected on

- the **channel**: the top-``k`` eigenvectors of ``K_SS(0)``, ``k`` = the modes whose
  frozen-kernel ``W_S`` eigenvalue ``(n/2)(1 − e^{−2λ_j t_end/n})`` exceeds
  ``channel_threshold`` of its saturation value ``n/2`` (``W_S`` of a frozen kernel has the
  kernel's eigenvectors; the modes are fixed before training so that the quadratic variation
  can be accumulated online); ``channel_nomean``, the same without its top mode (for these
  MLPs the near-constant "mean output" mode, ``λ_1`` tens of times ``λ_2``, which carries most
  of the minibatch noise), and the **reservoir** (the other eigenvectors);
- **random** ``k``-dimensional subspaces (the shuffled-directions null);
- the **flip** direction ``ε̂ = (y − y_clean)/‖·‖`` (where memorization of the flipped labels
  shows) and the **clean** target direction.

Measured per part and subspace: the log–log slope of ``‖S(t)‖`` against steps on the early
window (steps ≤ ``τ_1 = n/(η λ_1)``, before the fastest channel mode has equilibrated), the
late window and the whole run, each against the nulls "pure drift" (slope 1, ``Γ = t``) and
"pure random walk" (the slope distribution of Gaussian walks on the same record grid, and
``Γ ~ χ²_k/k``), where ``Γ = ‖S‖²/Σ‖a‖²`` is the random-walk ratio
(:func:`~tangentscope.dynamics.diffusion.random_walk_ratio`).

    tangentscope run drift-diffusion --preset smoke
    tangentscope run drift-diffusion --preset full
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from .._utils import seed_everything
from ..data.vision import encode_targets, flip_labels, load_classification
from ..dynamics.diffusion import (
    frame_norms,
    random_walk_ratio,
    random_walk_slope_null,
    scaling_exponent,
)
from ..dynamics.label_noise import classification_error
from ..errors import ConfigError
from ..io import RunDir
from ..kernels import entk, flatten_kernel
from ..models import mlp
from ..viz.drift_diffusion import drift_diffusion_figures
from ._drift_run import PARTS, split_training
from ._framework import Experiment
from ._harness import (
    CellOutput,
    check_nonnegative,
    check_positive,
    run_cells,
    seed_table,
    torch_threads,
)

__all__ = ["Config", "EXPERIMENT", "run", "plot", "summarize", "verdict", "SUBSPACES"]

SUBSPACES = ("channel", "channel_nomean", "reservoir", "random", "flip", "clean")
WINDOWS = ("early", "late", "all")


@dataclasses.dataclass(frozen=True)
class Config:
    """Drift-vs-diffusion experiment.

    Attributes:
        seed: first seed; ``seeds`` consecutive seeds are run (data, flips, init, batches).
        seeds: number of seeds.
        n: training examples.
        dim: input dimension of the Gaussian mixture.
        separation: norm of each class mean (inputs are scaled by ``1/sqrt(dim)``).
        label_noise: fraction of training labels flipped (known flips); the population pool
            has the same flip rate.
        n_test: clean test points (test error).
        pool: population sample drawn afresh for each step's population gradient.
        pool_bank: points of the data distribution the pools are drawn from.
        width: hidden width of the MLP.
        depth: hidden layers.
        activation: MLP activation.
        batch_sizes: SGD minibatch sizes.
        lr_scales: SGD step ``η = lr_scale · n / λ_max(K_SS(0))`` (the top mode's time
            constant is ``1/lr_scale`` steps).
        samplings: ``replacement`` (i.i.d. batches: the minibatch noise is a martingale
            difference) and/or ``reshuffle`` (epochs without replacement, standard SGD).
        steps: SGD steps per cell.
        records: log-spaced record steps (plus every step up to 10).
        early_fraction: the early fit window is steps ``[1, early_fraction · steps]``, the late
            one the rest.
        channel_threshold: channel cut as a fraction of the saturation value ``n/2`` of the
            frozen-kernel ``W_S`` at the end of the run.
        random_subspaces: random ``k``-dimensional subspaces (shuffled-directions null).
        null_draws: Gaussian random walks simulated for the slope null.
        threads: torch threads (0: leave as is).
    """

    seed: int = 0
    seeds: int = 3
    n: int = 128
    dim: int = 50
    separation: float = 3.0
    label_noise: float = 0.2
    n_test: int = 1000
    pool: int = 512
    pool_bank: int = 16384
    width: int = 96
    depth: int = 1
    activation: str = "gelu"
    batch_sizes: tuple[int, ...] = (8, 32)
    lr_scales: tuple[float, ...] = (0.04, 0.16)
    samplings: tuple[str, ...] = ("replacement", "reshuffle")
    steps: int = 1000
    records: int = 40
    early_fraction: float = 0.1
    channel_threshold: float = 0.5
    random_subspaces: int = 4
    null_draws: int = 400
    threads: int = 1

    def __post_init__(self) -> None:
        check_positive(self, "n", "dim", "n_test", "pool", "pool_bank", "width", "depth",
                       "batch_sizes", "lr_scales", "steps", "records", "random_subspaces",
                       "null_draws", "seeds", "channel_threshold", "early_fraction")
        check_nonnegative(self, "separation", "label_noise")
        if not 0 < self.label_noise < 1:
            raise ConfigError(f"--label_noise must be in (0, 1) (the flip direction needs "
                              f"flipped labels), got {self.label_noise}")
        if not self.channel_threshold < 1:
            raise ConfigError(f"--channel_threshold is a fraction in (0, 1), got "
                              f"{self.channel_threshold}")
        bad = [s for s in self.samplings if s not in ("replacement", "reshuffle")]
        if bad or not self.samplings:
            raise ConfigError(f"--samplings takes 'replacement' and/or 'reshuffle', got "
                              f"{self.samplings}")
        if max(self.batch_sizes) >= self.n:
            raise ConfigError(f"--batch_sizes must be < n={self.n} (a full batch has no "
                              f"minibatch noise), got {self.batch_sizes}")
        if self.pool > self.pool_bank:
            raise ConfigError(f"--pool ({self.pool}) must be <= --pool_bank ({self.pool_bank})")


def _t_early(cfg: Config) -> float:
    return max(cfg.steps * cfg.early_fraction, 3.0)


def _record_steps(cfg: Config) -> np.ndarray:
    grid = np.unique(np.round(np.geomspace(1, cfg.steps, cfg.records)).astype(int))
    extra = np.arange(1, min(10, cfg.steps) + 1)
    return np.unique(np.concatenate([grid, extra, [min(int(_t_early(cfg)), cfg.steps),
                                                   cfg.steps]]))


def _setup(cfg: Config, seed: int) -> dict[str, Any]:
    """Data, pool bank, network, ``K_SS(0)`` eigenbasis."""
    data = load_classification("gmm", cfg.n, cfg.n_test + cfg.pool_bank,
                               label_noise=cfg.label_noise, seed=seed, dtype=torch.float64,
                               dim=cfg.dim, separation=cfg.separation)
    bank_y, _ = flip_labels(data.y_test[cfg.n_test:], cfg.label_noise, 2, seed=seed + 7_777)
    seed_everything(seed)
    net = mlp(cfg.dim, cfg.width, cfg.depth, 1, activation=cfg.activation).to(torch.float64)
    K0 = flatten_kernel(cast(torch.Tensor, entk(net, data.x, dtype=torch.float64)))
    lam, V = torch.linalg.eigh(0.5 * (K0 + K0.T))
    lam, V = lam.flip(0).clamp_min(0), V.flip(1)
    return {"data": data, "net": net, "K0": K0, "lam": lam, "V": V,
            "x_bank": data.x_test[cfg.n_test:],
            "y_bank": encode_targets(bank_y, 2, "pm1", dtype=torch.float64)}


def _slope(steps: np.ndarray, y: np.ndarray, lo: float, hi: float) -> tuple[float, float] | None:
    keep = (steps >= lo) & (steps <= hi)
    try:
        f = scaling_exponent(steps[keep], y[keep])
    except ConfigError:
        return None
    return f.slope, f.stderr


def _cell(cfg: Config, b: int, lr_scale: float, sampling: str, seed: int) -> CellOutput:
    with torch_threads(cfg.threads):
        return _cell_body(cfg, b, lr_scale, sampling, seed)


def _cell_body(cfg: Config, b: int, lr_scale: float, sampling: str, seed: int) -> CellOutput:
    s = _setup(cfg, seed)
    data, net, lam, V = s["data"], s["net"], s["lam"], s["V"]
    n = cfg.n
    lr = lr_scale * n / float(lam[0])
    t_end = lr * cfg.steps
    w_rel = 1 - torch.exp(-2 * lam * t_end / n)
    k = int(min(max(int((w_rel > cfg.channel_threshold).sum()), 1), n - 1))
    tau = n / (lr * float(lam[0]))                       # = 1 / lr_scale steps
    gen = torch.Generator().manual_seed(seed * 1009 + 17)
    Z = [torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]
         for _ in range(cfg.random_subspaces)]
    y, c = data.targets("pm1"), data.targets("pm1", clean=True)
    eps = (y - c).reshape(-1)
    frame = torch.cat([V, *Z, (eps / eps.norm())[:, None],
                       (c.reshape(-1) / c.reshape(-1).norm())[:, None]], 1)
    cols = {"channel": np.arange(k), "channel_nomean": np.arange(1, max(k, 2)),
            "reservoir": np.arange(k, n),
            "flip": np.array([n + k * cfg.random_subspaces]),
            "clean": np.array([n + k * cfg.random_subspaces + 1])}
    rand_cols = [n + i * k + np.arange(k) for i in range(cfg.random_subspaces)]
    pgen = torch.Generator().manual_seed(seed * 31 + 5)
    xb, yb = s["x_bank"], s["y_bank"]

    def pool() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(xb.shape[0], (cfg.pool,), generator=pgen)
        return xb[idx], yb[idx]

    steps = _record_steps(cfg)
    res = split_training(net, data.x, y, pool, lr=lr, steps=cfg.steps, batch_size=b,
                         sampling=cast(Any, sampling), record_at=steps, frame=frame,
                         seed=seed * 13 + b)
    cv = res.curves
    out: dict[str, Any] = {"batch_size": b, "lr_scale": lr_scale, "sampling": sampling,
                           "seed": seed, "lr": lr, "channel_k": k, "tau_steps": tau,
                           "early_end": _t_early(cfg),
                           "lambda_max": float(lam[0]), "steps": cfg.steps,
                           "top_mode_constness": float(V[:, 0].sum().abs() / math.sqrt(n)),
                           "flip_in_channel": float((V[:, :k].T @ (eps / eps.norm())).pow(2)
                                                    .sum()),
                           "seconds_train": res.seconds}
    arrays: dict[str, Any] = {"steps": cv.steps, "train_loss": res.train_loss,
                              "memorization": res.u_change @ (eps / eps.norm()).numpy()}
    t_early = _t_early(cfg)
    windows = {"early": (1, t_early), "late": (t_early, cfg.steps), "all": (1, cfg.steps)}
    for part in PARTS:
        for sub in SUBSPACES:
            col_sets = rand_cols if sub == "random" else [cols[sub]]
            stats: dict[str, list[float]] = {}
            for j, cs in enumerate(col_sets):
                norm, quad = frame_norms(cv, part, cs)
                gamma = random_walk_ratio(norm, quad)
                if j == 0:
                    arrays[f"{part}/{sub}/norm"], arrays[f"{part}/{sub}/quad"] = norm, quad
                for w, (lo, hi) in windows.items():
                    fit = _slope(cv.steps, norm, lo, hi)
                    stats.setdefault(f"slope_{w}", []).append(math.nan if fit is None
                                                              else fit[0])
                    stats.setdefault(f"slope_{w}_se", []).append(math.nan if fit is None
                                                                 else fit[1])
                early_end = int(np.searchsorted(cv.steps, t_early, side="right")) - 1
                stats.setdefault("gamma_early", []).append(float(gamma[max(early_end, 0)]))
                stats.setdefault("gamma_end", []).append(float(gamma[-1]))
                stats.setdefault("norm_end", []).append(float(norm[-1]))
            for key, vals in stats.items():
                v = float(np.nanmedian(vals)) if np.isfinite(vals).any() else None
                out[f"{part}_{sub}_{key}"] = v
        fcol = torch.as_tensor(cols["flip"])
        arrays[f"{part}/flip/signed"] = cv.frame_sums[part][:, fcol].reshape(-1).numpy()
        out[f"{part}_flip_signed_end"] = float(arrays[f"{part}/flip/signed"][-1])
    # effective dimension of the minibatch noise in the channel (participation ratio of its
    # per-mode quadratic variation): the dimension of the random-walk nulls
    qv = cv.frame_quad["minibatch"][-1, :k]
    out["minibatch_channel_k_eff"] = float(qv.sum() ** 2 / qv.pow(2).sum().clamp_min(1e-300))
    qv2 = cv.frame_quad["minibatch"][-1, 1:max(k, 2)]
    out["minibatch_channel_nomean_k_eff"] = float(qv2.sum() ** 2
                                                  / qv2.pow(2).sum().clamp_min(1e-300))
    # trust: first-order error of the split, kernel motion, channel drift
    total = sum(cv.sums[p][-1] for p in PARTS[:3])
    actual = torch.as_tensor(res.u_change[-1])
    out["first_order_error"] = float((total - actual).norm() / actual.norm().clamp_min(1e-300))
    KT = flatten_kernel(cast(torch.Tensor, entk(net, data.x, dtype=torch.float64)))
    out["kernel_motion"] = float((KT - s["K0"]).norm() / s["K0"].norm())
    VT = torch.linalg.eigh(0.5 * (KT + KT.T))[1].flip(1)[:, :k]
    out["channel_overlap_end"] = float((V[:, :k].T @ VT).pow(2).sum() / k)
    with torch.no_grad():
        u, ut = net(data.x), net(data.x_test[:cfg.n_test])
    out["train_error_noisy_labels"] = classification_error(u, data.y)
    f = data.flipped
    out["memorized_fraction"] = 1.0 - classification_error(u[f], data.y[f])
    out["test_error"] = classification_error(ut, data.y_test[:cfg.n_test])
    out["memorization_end"] = float(arrays["memorization"][-1])
    return CellOutput(out, arrays=arrays, rows=[{k2: v for k2, v in out.items()
                                                 if not isinstance(v, (list, dict))}])


def _settings(cfg: Config) -> list[tuple[int, float, str]]:
    return [(b, lr, smp) for smp in cfg.samplings for b in cfg.batch_sizes
            for lr in cfg.lr_scales]


def _key(b: int, lr: float, smp: str, seed: int) -> str:
    return f"{smp}/b{b}/lr{lr:g}/seed{seed}"


def run(cfg: Config, rd: RunDir) -> dict[str, Any]:
    """Every ``sampling × batch × lr × seed`` cell (resumable, cell by cell); the summary, and
    ``table.md`` / ``verdict.txt`` in the run directory."""
    cells = [(_key(b, lr, smp, s), functools.partial(_cell, cfg, b, lr, smp, s))
             for b, lr, smp in _settings(cfg) for s in range(cfg.seed, cfg.seed + cfg.seeds)]
    done = run_cells(rd, cells, desc="drift-diffusion")
    summary = summarize(cfg, done)
    rd.write_text("table.md", table_markdown(summary))
    rd.write_text("verdict.txt", summary["verdict"] + "\n")
    return summary


HEADLINE = tuple(
    [f"{p}_{s}_{st}" for p in PARTS for s in SUBSPACES
     for st in ("slope_early", "gamma_end", "norm_end")]
    + [f"{p}_{s}_{st}" for p in PARTS for s in ("channel", "channel_nomean")
       for st in ("slope_late", "slope_all", "gamma_early")]
    + [f"{p}_flip_signed_end" for p in PARTS]
    + ["channel_k", "minibatch_channel_k_eff", "minibatch_channel_nomean_k_eff", "tau_steps",
       "lr", "flip_in_channel", "top_mode_constness",
       "first_order_error", "kernel_motion", "channel_overlap_end", "train_error_noisy_labels",
       "memorized_fraction", "test_error", "memorization_end"])


def _nulls(cfg: Config, cells: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Random-walk nulls for the channel's early-window slope and ``Γ``, per effective
    dimension ``k_eff`` (rounded participation ratio of the minibatch noise's per-mode
    quadratic variation; isotropic Gaussian walks in ``k_eff`` dimensions)."""
    out: dict[str, Any] = {}
    steps = _record_steps(cfg)
    early = steps[steps <= _t_early(cfg)]
    ks = {_k_eff(r[f]) for r in cells for f in ("minibatch_channel_k_eff",
                                                   "minibatch_channel_nomean_k_eff")}
    for k in sorted(ks):
        key = f"k{k}"
        entry: dict[str, Any] = {"k_eff": k}
        if np.unique(early).size >= 3:
            sl = random_walk_slope_null(early, k, draws=cfg.null_draws, seed=k)
            entry["slope_early"] = [float(q) for q in np.quantile(sl, [0.025, 0.5, 0.975])]
        gam = np.random.default_rng(k).chisquare(k, cfg.null_draws) / k
        entry["gamma"] = [float(q) for q in np.quantile(gam, [0.025, 0.5, 0.975])]
        out[key] = entry
    return out


def _k_eff(v: float) -> int:
    return max(int(round(float(v))), 1)


def summarize(cfg: Config, cells: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Median, min and max over seeds of the headline metrics per setting, the nulls and the
    verdict."""
    groups: dict[tuple[str, int, float], list[Mapping[str, Any]]] = {}
    for r in cells.values():
        groups.setdefault((r["sampling"], int(r["batch_size"]), float(r["lr_scale"])),
                          []).append(r)
    table = [{"sampling": smp, "batch_size": b, "lr_scale": lr,
              "seeds": sorted(int(r["seed"]) for r in rs), **seed_table(rs, HEADLINE)}
             for (smp, b, lr), rs in sorted(groups.items())]
    nulls = _nulls(cfg, list(cells.values()))
    out: dict[str, Any] = {"table": table, "nulls": nulls, "cells": len(cells)}
    out["verdict"] = verdict(table, nulls)
    return out


def _med(row: Mapping[str, Any], key: str) -> float:
    v = row.get(key)
    return float(v["median"]) if isinstance(v, Mapping) else math.nan


def _null_for(row: Mapping[str, Any], nulls: Mapping[str, Any],
              field: str = "minibatch_channel_k_eff") -> Mapping[str, Any]:
    """The null of the setting's median ``k_eff`` (``field``)."""
    k = row.get(field)
    if not isinstance(k, Mapping):
        return {}
    want = _k_eff(k["median"])
    have = sorted((abs(int(e["k_eff"]) - want), key) for key, e in nulls.items())
    return cast(Mapping[str, Any], nulls[have[0][1]]) if have else {}


COHERENT_GAMMA = 10.0   # Γ above this is far outside every random-walk null (χ²_1: 5.0 at 97.5%)


def _count(flags: Sequence[bool], what: str) -> str:
    word = "holds" if all(flags) else "fails" if not any(flags) else "mixed"
    return f"{what}: {word} ({sum(flags)}/{len(flags)} settings)"


def verdict(table: Sequence[Mapping[str, Any]], nulls: Mapping[str, Any]) -> str:
    """The measured outcome in plain words, from criteria fixed before the run (medians over
    seeds, per setting):

    - *separation*: the population part is coherent (``Γ_end > 10``) and the minibatch part
      (i.i.d. batches) diffusive (``Γ_end`` at most the random-walk null's 97.5% point);
    - *drift exponent*: the population part's channel slope on the early window in
      ``[0.9, 1.1]``;
    - *diffusion exponent*: the minibatch part's channel slope (early window, i.i.d. batches)
      inside the random-walk null's 95% range;
    - *noise around the population* (``ĝ_B − ḡ``, the two-way split): diffusive (``Γ_end`` at
      most the null's 97.5% point) or coherent;
    - *memorization*: along the flip direction, whether the net full-batch drift (population +
      idiosyncratic) is coherent (``Γ_end > 10``) and moved the outputs more by the end than
      the minibatch random walk.
    """
    if not table:
        return "no cells"
    sep, d_exp, r_exp, noise_diff, mem_coh = [], [], [], [], []
    sep2, d_exp2, r_exp2 = [], [], []
    lines = []
    for row in table:
        tag = f"{row['sampling']} b={row['batch_size']} lr_scale={row['lr_scale']:g}"
        null = _null_for(row, nulls)
        s_lo, s_hi = (null.get("slope_early") or [math.nan, 0, math.nan])[0::2]
        g_hi = (null.get("gamma") or [0, 0, math.nan])[2]
        ps, pg = _med(row, "population_channel_slope_early"), _med(
            row, "population_channel_gamma_end")
        ms, mg = _med(row, "minibatch_channel_slope_early"), _med(
            row, "minibatch_channel_gamma_end")
        ng = _med(row, "noise_channel_gamma_end")
        d_exp.append(0.9 <= ps <= 1.1)
        noise_diff.append(ng <= g_hi)
        null2 = _null_for(row, nulls, "minibatch_channel_nomean_k_eff")
        s2_lo, s2_hi = (null2.get("slope_early") or [math.nan, 0, math.nan])[0::2]
        g2_hi = (null2.get("gamma") or [0, 0, math.nan])[2]
        ps2 = _med(row, "population_channel_nomean_slope_early")
        ms2 = _med(row, "minibatch_channel_nomean_slope_early")
        d_exp2.append(0.9 <= ps2 <= 1.1)
        if row["sampling"] == "replacement":
            sep.append(pg > COHERENT_GAMMA and mg <= g_hi)
            r_exp.append(s_lo <= ms <= s_hi)
            sep2.append(_med(row, "population_channel_nomean_gamma_end") > COHERENT_GAMMA
                        and _med(row, "minibatch_channel_nomean_gamma_end") <= g2_hi)
            r_exp2.append(s2_lo <= ms2 <= s2_hi)
        mi, mm = _med(row, "idiosyncratic_flip_norm_end"), _med(row, "minibatch_flip_norm_end")
        mf = _med(row, "fullbatch_flip_norm_end")
        mem_coh.append(mf > mm and _med(row, "fullbatch_flip_gamma_end") > COHERENT_GAMMA)
        lines.append(f"- {tag}: channel k={_med(row, 'channel_k'):.0f}; population slope "
                     f"{ps:.2f} (w/o mean mode {ps2:.2f}), Γ_end {pg:.0f}; minibatch slope "
                     f"{ms:.2f} (w/o mean mode {ms2:.2f}, null 95% [{s2_lo:.2f}, {s2_hi:.2f}]; "
                     f"with it, null 95% "
                     f"[{s_lo:.2f}, {s_hi:.2f}]), Γ_end {mg:.2f} (null ≤ {g_hi:.2f}); noise "
                     f"around the population Γ_end {ng:.0f}; along the flips idiosyncratic "
                     f"{mi:.3g} (Γ_end {_med(row, 'idiosyncratic_flip_gamma_end'):.0f}) vs "
                     f"minibatch {mm:.3g} (Γ_end {_med(row, 'minibatch_flip_gamma_end'):.2f}); "
                     f"net full-batch drift along the flips {mf:.3g} (Γ_end "
                     f"{_med(row, 'fullbatch_flip_gamma_end'):.0f}); actual memorization "
                     f"⟨ε̂, Δu⟩ {_med(row, 'memorization_end'):.3g}")
    head = []
    if sep:
        head.append(_count(sep, "coherent population drift vs diffusive minibatch noise in the "
                                "channel (i.i.d. batches)")
                    + "; " + _count(sep2, "without the mean mode"))
    head.append(_count(d_exp, "drift exponent 1 (population part, early window, slope in "
                              "[0.9, 1.1])") + "; " + _count(d_exp2, "without the mean mode"))
    if r_exp:
        head.append(_count(r_exp, "diffusion exponent 1/2 (minibatch part, early window, inside "
                                  "the random-walk null)")
                    + "; " + _count(r_exp2, "without the mean mode"))
    head.append(_count(noise_diff, "noise around the population gradient (ĝ_B − ḡ) diffusive"))
    head.append("along the flipped labels the net full-batch drift (population + "
                "idiosyncratic) is coherent (Γ_end > 10) and larger than the minibatch random "
                "walk: " + ("holds" if all(mem_coh) else "fails" if not any(mem_coh) else
                            "mixed") + f" ({sum(mem_coh)}/{len(mem_coh)} settings)")
    return "; ".join(head) + ".\n" + "\n".join(lines)


def table_markdown(summary: Mapping[str, Any]) -> str:
    """A compact table of the headline numbers (median [min, max] over seeds)."""
    def f(row: Mapping[str, Any], key: str) -> str:
        v = row.get(key)
        if not isinstance(v, Mapping):
            return "–"
        return f"{v['median']:.3g} [{v['min']:.3g}, {v['max']:.3g}]"

    cols = [("population_channel_slope_early", "pop. slope (early)"),
            ("population_channel_gamma_early", "pop. Γ (early)"),
            ("minibatch_channel_slope_early", "minibatch slope (early)"),
            ("minibatch_channel_gamma_end", "minibatch Γ (end)"),
            ("noise_channel_gamma_end", "noise Γ (end)"),
            ("population_channel_nomean_slope_early", "pop. slope w/o mean mode"),
            ("minibatch_channel_nomean_slope_early", "minibatch slope w/o mean mode"),
            ("minibatch_channel_nomean_gamma_end", "minibatch Γ w/o mean mode"),
            ("minibatch_random_slope_early", "minibatch slope, random dirs"),
            ("idiosyncratic_flip_norm_end", "idio. along flips"),
            ("minibatch_flip_norm_end", "minibatch along flips"),
            ("idiosyncratic_flip_gamma_end", "idio. Γ flips"),
            ("fullbatch_flip_norm_end", "full batch along flips"),
            ("fullbatch_flip_gamma_end", "full batch Γ flips"),
            ("memorization_end", "actual ⟨ε̂, Δu⟩"),
            ("channel_k", "k"), ("kernel_motion", "kernel motion"),
            ("first_order_error", "1st-order err")]
    lines = ["# drift-diffusion", "", summary["verdict"], "",
             "| setting | " + " | ".join(c[1] for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for row in summary["table"]:
        tag = f"{row['sampling']} b={row['batch_size']} lr={row['lr_scale']:g}"
        lines.append(f"| {tag} | " + " | ".join(f(row, c[0]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot(rd: RunDir) -> list[Path]:
    """Figures from the run directory alone."""
    return drift_diffusion_figures(rd)


EXPERIMENT = Experiment(
    "drift-diffusion", Config, run, plot,
    presets={
        "smoke": dict(seeds=1, n=32, dim=16, n_test=200, pool=128, pool_bank=1024, width=32,
                      batch_sizes=(8,), lr_scales=(0.05,), samplings=("replacement",),
                      steps=120, records=16, random_subspaces=2, null_draws=100),
        "full": dict(seeds=3),
    },
    description="drift ∝ t vs diffusion ∝ √t of SGD's population, idiosyncratic and minibatch "
                "parts in the signal channel, and of the memorized flipped labels")
