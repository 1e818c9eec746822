"""What the page of a recorded run shows, computed once when ``tangentscope app RUN_DIR`` starts.

A run directory is one of:

- a :class:`~tangentscope.dynamics.KernelRecorder` trajectory (``trajectory.json``);
- a run directory holding trajectories below it (a callback's ``record_dir``, the ``channels``
  experiment's ``trajectory/``) and/or a ``metrics.csv`` (any ``tangentscope run`` directory).

Per snapshot ``k`` of each trajectory (symbols: docs/notation.md): the spectrum of ``K_SS(t_k)``
with the residual energy per eigenvector ``⟨v_i, r(t_k)⟩²``; the split of the integrated kernel
``W_S(0, t_k)`` into signal channel and reservoir (:func:`~tangentscope.split_channels`,
relative threshold) with the energy of the residual ``r(t_k)`` and of the initial residual per
``W_S`` mode; and the identity residuals of the window ``[0, t_k]``
(:func:`~tangentscope.dynamics.identity_residuals`). The metrics of ``metrics.csv`` (gate
telemetry ``gate/...``, losses, ...) as time series.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .._utils import progress
from ..dynamics import (
    KernelTrajectory,
    accumulate_operators,
    identity_residuals,
    residual,
    split_channels,
)
from ..errors import ConfigError
from ..io import RunDir

__all__ = ["RunView", "TrajectoryView", "load_run", "MAX_DIM", "MAX_MODES"]

MAX_DIM = 2048        # largest n·p analysed (a few N × N eigendecompositions per snapshot)
MAX_MODES = 400       # modes sent per spectrum (the largest)
MAX_GROUPS = 12       # metric series per chart
DISCRETIZATION: Literal["exp"] = "exp"   # of the operators (the module default)
_GROUP_KEYS = ("cell", "setting", "task", "method", "optimizer", "seed")


def _num(v: Any) -> float | None:
    """A finite float, or ``None`` (JSON has no NaN)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return float(f"{f:.6g}") if math.isfinite(f) else None


def _nums(a: Any) -> list[float | None]:
    return [_num(v) for v in np.asarray(a, dtype=float).reshape(-1)]


@dataclasses.dataclass
class TrajectoryView:
    """One recorded trajectory of the run: its series and the per-snapshot analysis.

    Attributes:
        name: its path relative to the run directory (``"."`` for the run directory itself).
        info: sizes, loss, steps/times/losses per snapshot (JSON).
        snapshots: per snapshot, the spectrum, channel split and identity residuals (JSON);
            empty when ``note`` says why it was not analysed.
        note: why the analysis is missing (too large), or ``None``.
    """

    name: str
    info: dict[str, Any]
    snapshots: list[dict[str, Any]]
    note: str | None = None


@dataclasses.dataclass
class RunView:
    """Everything the page of one run directory serves (see the module docstring).

    Attributes:
        path: the run directory.
        trajectories: the recorded trajectories found, by name.
        metrics: rows of ``metrics.csv`` (``[]`` without one).
        columns: its numeric columns; ``gate_columns`` those of the gate's telemetry.
        x: the column used as the time axis (``step`` if present), ``group``: the column that
            splits the rows into series (a cell, task or optimizer), or ``None``.
        meta: the experiment name, preset and status, the summary's scalars.
    """

    path: Path
    trajectories: dict[str, TrajectoryView]
    metrics: list[dict[str, Any]]
    columns: list[str]
    gate_columns: list[str]
    x: str | None
    group: str | None
    meta: dict[str, Any]

    def overview(self) -> dict[str, Any]:
        """``GET /api/run``: what the page needs to lay itself out."""
        return {"path": str(self.path), **self.meta,
                "trajectories": [{"name": t.name, **t.info, "note": t.note,
                                  "analysed": bool(t.snapshots)}
                                 for t in self.trajectories.values()],
                "metrics": {"columns": self.columns, "gate_columns": self.gate_columns,
                            "x": self.x, "group": self.group, "rows": len(self.metrics)}}

    def series(self, column: str) -> dict[str, Any]:
        """``GET /api/run/metrics?column=C``: ``column`` against ``x``, one series per group."""
        groups: dict[str, tuple[list[float | None], list[float | None]]] = {}
        for i, row in enumerate(self.metrics):
            y = _num(row.get(column))
            if y is None:
                continue
            g = str(row.get(self.group, "")) if self.group else ""
            if g not in groups and len(groups) >= MAX_GROUPS:
                continue
            xs, ys = groups.setdefault(g, ([], []))
            xs.append(_num(row.get(self.x)) if self.x else float(i))
            ys.append(y)
        return {"column": column, "x": self.x or "row",
                "series": [{"group": g, "x": xs, "y": ys} for g, (xs, ys) in groups.items()]}


def load_run(path: str | Path) -> RunView:
    """Read and analyse the run directory ``path`` (see the module docstring).

    Raises:
        ConfigError: ``path`` is not a directory, or holds neither a recorded trajectory nor a
            ``metrics.csv`` (the message says what to pass).
        DamagedFileError: a file of the run is truncated or garbled.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"{p} is not a directory: pass a KernelRecorder run_dir, a callback's "
                          "record_dir or a `tangentscope run` directory")
    if (p / "trajectory.json").is_file():
        found = [p]
    else:
        found = sorted({f.parent for f in p.rglob("trajectory.json")
                        if len(f.relative_to(p).parts) <= 4})
    rows: list[dict[str, Any]] = []
    if (p / "metrics.csv").is_file():
        rows = RunDir(p).read_metrics()
    if not found and not rows:
        raise ConfigError(f"{p} holds no recorded trajectory (trajectory.json) and no metrics.csv:"
                          " pass the run_dir of a KernelRecorder, the record_dir of a "
                          "TangentscopeCallback / TrainingMonitor, or a `tangentscope run` "
                          "directory")
    trajs = {}
    for d in found:
        name = "." if d == p else str(d.relative_to(p))
        trajs[name] = analyse_trajectory(KernelTrajectory.load(d), name)
    allkeys: list[str] = []
    for r in rows:
        allkeys += [k for k in r if k not in allkeys]
    columns = [k for k in allkeys if any(_num(r.get(k)) is not None for r in rows)]
    text = [k for k in allkeys if k not in columns]
    group = next((k for k in _GROUP_KEYS if k in text), None)
    x = "step" if "step" in columns else None
    return RunView(p, trajs, rows, [c for c in columns if c != x],
                   [c for c in columns if c.startswith("gate") or "gate_" in c], x, group,
                   _meta(p))


def _meta(p: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"experiment": None, "preset": None, "status": None, "summary": {}}
    if not (p / "config.json").is_file():
        return out
    rd = RunDir(p)
    cfg = rd.read_config()
    out["experiment"] = cfg.get("experiment") if isinstance(cfg.get("experiment"), str) else None
    out["preset"] = cfg.get("preset") if isinstance(cfg.get("preset"), str) else None
    out["kind"] = cfg.get("kind")
    out["status"] = rd.status_record().get("status")
    if (p / "summary.json").is_file():
        summary = rd.read_summary()
        out["summary"] = {k: _num(v) for k, v in summary.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


def analyse_trajectory(traj: KernelTrajectory, name: str) -> TrajectoryView:
    """The per-snapshot analysis of one trajectory (``note`` instead when ``n p`` is over
    :data:`MAX_DIM`)."""
    info = {"n": traj.n, "p": traj.p, "m": traj.m, "N": traj.N,
            "loss_name": traj.meta.get("loss"), "model": traj.meta.get("model"),
            "optimizer": traj.meta.get("optimizer"), "snapshots": len(traj),
            "steps": [int(s) for s in traj.steps], "times": _nums(traj.times),
            "loss": _nums(traj.loss), "test_loss": _nums(traj.test_loss)}
    if traj.N > MAX_DIM:
        return TrajectoryView(name, info, [], f"n·p = {traj.N} is over the page's {MAX_DIM}: "
                                              "analyse it with tangentscope.dynamics in Python")
    r0 = residual(traj, 0)
    snaps: list[dict[str, Any]] = [{} for _ in range(len(traj))]
    for k in range(len(traj)):
        lam, V = torch.linalg.eigh(0.5 * (traj.kernel(k) + traj.kernel(k).T))
        lam, V = lam.flip(0), V.flip(1)
        r = residual(traj, k)
        snaps[k] = {"k": k, "step": int(traj.steps[k]), "time": _num(traj.times[k]),
                    "loss": _num(traj.loss[k]), "test_loss": _num(traj.test_loss[k]),
                    "lr": _num(traj.lrs[k]),
                    "kernel": {"eigenvalues": _nums(lam[:MAX_MODES]),
                               "energies": _nums(((V.T @ r) ** 2)[:MAX_MODES]),
                               "residual_norm2": _num(r @ r)},
                    "channel": None, "identities": None}
    if len(traj) > 1:
        ops_iter = accumulate_operators(traj, 0, discretization=DISCRETIZATION)
        for ops in progress(ops_iter, desc=f"analysing {name}", total=len(traj) - 1):
            k = ops.stop
            r = residual(traj, k)
            split = split_channels(ops.W, vectors={"residual": r, "initial": r0})
            e, e0 = split.energies["residual"], split.energies["initial"]
            snaps[k]["channel"] = {
                "rank": split.rank, "cut": _num(split.cut), "gap": _num(split.gap),
                "eigenvalues": _nums(split.eigenvalues[:MAX_MODES]),
                "energies": _nums(e.per_mode[:MAX_MODES]),
                "initial_energies": _nums(e0.per_mode[:MAX_MODES]),
                "residual_channel_fraction": _num(e.channel_fraction),
                "initial_channel_fraction": _num(e0.channel_fraction)}
        ids = identity_residuals(traj, 0, discretization=DISCRETIZATION)
        for i, k in enumerate(ids.stops.tolist()):
            snaps[k]["identities"] = {
                "dissipation_error": _num(ids.dissipation_error[i]),
                "gradient_error": _num(ids.gradient_error[i]),
                "displacement_error": None if ids.displacement_error is None
                else _num(ids.displacement_error[i]),
                "dissipation_actual": _num(ids.dissipation_actual[i]),
                "dissipation_predicted": _num(ids.dissipation_predicted[i])}
    info["identities"] = {key: [None if s["identities"] is None else s["identities"][key]
                                for s in snaps]
                          for key in ("dissipation_error", "gradient_error",
                                      "displacement_error")}
    info["channel_fraction"] = [None if s["channel"] is None
                                else s["channel"]["residual_channel_fraction"] for s in snaps]
    return TrajectoryView(name, info, snaps)
