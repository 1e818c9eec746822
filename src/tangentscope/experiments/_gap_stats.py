"""Rank correlations of the reservoir-gap experiment (private): Spearman's ρ with a cluster
bootstrap interval, per slice of the ``(width, depth, seed, training length)`` points."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._framework import seed_stats

__all__ = ["spearman", "spearman_interval", "correlation_table"]


def _ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    order = np.argsort(a, kind="mergesort")
    r = np.empty(a.size)
    r[order] = np.arange(a.size, dtype=float)
    vals, inv = np.unique(a, return_inverse=True)
    if vals.size < a.size:
        sums = np.bincount(inv, weights=r)
        r = (sums / np.bincount(inv))[inv]
    return r


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman's ρ of the pairs with no NaN (NaN below 3 pairs or for a constant side).

    ``±inf`` is kept and ranked at the end: an infinite gap (the reservoir empty or null to
    rounding) is larger than any finite one."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = ~np.isnan(x) & ~np.isnan(y)
    if ok.sum() < 3:
        return float("nan")
    rx, ry = _ranks(x[ok]), _ranks(y[ok])
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def spearman_interval(a: np.ndarray, b: np.ndarray, clusters: np.ndarray, *,
                      resamples: int = 1000, level: float = 0.95, seed: int = 0
                      ) -> dict[str, float]:
    """ρ and a percentile bootstrap interval that resamples whole ``clusters`` (the points of
    one run share its noise draw, so they are not independent)."""
    rho = spearman(a, b)
    ids = np.unique(clusters)
    if not math.isfinite(rho) or ids.size < 3 or resamples < 1:
        return {"rho": rho, "lo": float("nan"), "hi": float("nan"), "points": int(a.size)}
    rng = np.random.default_rng(seed)
    members = [np.nonzero(clusters == c)[0] for c in ids]
    boot = []
    for _ in range(resamples):
        pick = np.concatenate([members[j] for j in rng.integers(0, ids.size, ids.size)])
        r = spearman(a[pick], b[pick])
        if math.isfinite(r):
            boot.append(r)
    if not boot:
        return {"rho": rho, "lo": float("nan"), "hi": float("nan"), "points": int(a.size)}
    q = (1 - level) / 2
    return {"rho": rho, "lo": float(np.quantile(boot, q)), "hi": float(np.quantile(boot, 1 - q)),
            "points": int(a.size)}


def _column(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.array([float(r[key]) if isinstance(r.get(key), (int, float)) else np.nan
                     for r in rows], dtype=float)


def correlation_table(rows: Sequence[Mapping[str, Any]], predictors: Sequence[str],
                      targets: Sequence[str], *, resamples: int = 1000, seed: int = 0
                      ) -> dict[str, dict[str, dict[str, Any]]]:
    """``{target: {predictor: {...}}}`` over four slices of the per-stop ``rows``:

    - ``pooled``: all points, ρ with a bootstrap interval over runs (``width, depth, seed``);
    - ``fixed_time``: ρ across all runs at one training length — median, min and max over the
      training lengths (what the gap says beyond how long the net was trained);
    - ``architecture``: the last training length only, ρ across ``(width, depth)`` computed
      per seed — median, min and max over seeds;
    - ``time``: ρ across training lengths within each run — median, min and max over runs.
    """
    run = np.array([f"{r['width']}/{r['depth']}/{r['seed']}" for r in rows])
    step = np.array([int(r["step"]) for r in rows])
    last = int(step.max())
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for t in targets:
        y = _column(rows, t)
        out[t] = {}
        for p in predictors:
            x = _column(rows, p)
            pooled = spearman_interval(x, y, run, resamples=resamples, seed=seed)
            arch = []
            for s in sorted({r["seed"] for r in rows}):
                sel = [i for i, r in enumerate(rows) if r["seed"] == s and int(r["step"]) == last]
                arch.append(spearman(x[sel], y[sel]))
            within = [spearman(x[run == c], y[run == c]) for c in np.unique(run)]
            fixed = [spearman(x[step == t], y[step == t]) for t in np.unique(step)]
            out[t][p] = {"pooled": pooled,
                         "fixed_time": seed_stats([v for v in fixed if math.isfinite(v)]),
                         "architecture": seed_stats([v for v in arch if math.isfinite(v)]),
                         "time": seed_stats([v for v in within if math.isfinite(v)])}
    return out
