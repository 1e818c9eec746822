"""Grokking through the theory: does the target migrate from the reservoir into the signal
channel, and when — before, with, or after validation accuracy rises?

One plain model per seed (the ``grokking`` experiment's settings, AdamW by default) is trained
past grokking; every ``snapshot_every`` steps the experiment records, on a fixed probe of
``n_probe`` training and ``n_probe`` validation examples:

* ``K_SS(t)`` — the **traced, Adam-preconditioned eNTK** ``Σ_a J_a D J_aᵀ`` (``n × n``), with
  ``D = 1/(√v̂ + ε)`` the optimizer's preconditioner averaged over each parameter tensor (see
  ``precondition``), and ``K_QQ(t)`` on the validation probe.
  *Why traced outputs on a probe:* the full eNTK of a grokking model has ``n p`` rows (``p²/2``
  examples × ``p`` logits: 100 k for ``p = 59``) and does not fit; the trace over logits keeps
  the example geometry (for one-hot targets every logit plays the same role) at ``n × n``;
* ``W(t) = Σ_s η Δs K_SS(s)`` — the cumulative kernel, i.e. the integrated eNTK ``W_S`` with the
  propagator ``P_g`` left out (it needs the full ``n p``-dimensional kernel and the loss Hessian);
* the **signal channel** of ``K_SS(t)`` and of ``W(t)``: the top ``k`` eigenvectors, ``k = p − 1``
  (the dimension of the centered one-hot targets), split with :func:`split_channels`; the
  **reservoir** is the rest. Recorded: the fraction of the centered one-hot target ``Y_c``
  (``n × p``) in the channel (``target_in_channel_K``, ``…_W``; a random ``k``-dim subspace gets
  ``k/n``), the same for the output gradient ``g`` and for the validation targets under
  ``K_QQ``; kernel–target alignment; kernel rotation (centered alignment with the first
  snapshot and the largest principal angle between the top-``k`` eigenspaces);
* train and validation accuracy on all examples.

The summary gives, per seed, the steps where each curve starts rising (10% of its total rise)
and is half-way (50%), and whether the channel migration precedes, coincides with (within two
snapshot intervals) or follows the rise of validation accuracy.

    tangentscope run grokking-theory --preset full
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from .._utils import eval_mode
from ..dynamics import kernel_alignment, split_channels
from ..errors import ConfigError
from ..io import RunDir
from ..kernels import adam_preconditioner, entk
from ..optim.spec import parse_optimizer
from ..viz import pyplot, save_figure
from ._framework import Experiment
from ._grokking_setup import (
    SETTINGS,
    Setting,
    build_cell_optimizer,
    build_single_model,
    make_task,
)
from ._harness import progress

__all__ = ["Config", "EXPERIMENT", "run", "plot", "rise_step"]

_CURVES = ("val_acc", "train_acc", "target_in_channel_K", "target_in_channel_W",
           "val_target_in_channel_KQQ", "final_function_in_channel_K",
           "final_function_in_channel_W", "kernel_target_alignment", "rotation_angle")
_MIGRATION = ("target_in_channel_K", "target_in_channel_W", "final_function_in_channel_K",
              "final_function_in_channel_W")


@dataclasses.dataclass(frozen=True)
class Config:
    """Grokking-theory run: does the target move into the signal channel as validation rises.

    Attributes:
        seed, n_seeds: seeds ``seed … seed + n_seeds − 1``, one run each.
        setting: a :data:`tangentscope.experiments.grokking.SETTINGS` name (an MLP setting).
        optimizer: a grokking optimizer name (``adamw``, ``gated``, …).
        max_steps: training steps (default: the setting's).
        snapshot_every: steps between kernel snapshots (also the first snapshot is at step 1).
        n_probe: training and validation probe sizes (the kernels are ``n_probe × n_probe``).
        k: channel dimension (default ``p − 1``).
        precondition: the kernel's ``D``: ``tensor-mean`` (default) — the Adam preconditioner
            ``1/(√v̂ + ε)`` averaged over each parameter tensor, ``K = Σ_t D̄_t J_t J_tᵀ`` (one
            structured kernel per tensor; seconds); ``exact`` — the full diagonal (correct, but
            the traced structured kernel then materializes per-example gradients: minutes per
            snapshot); ``none`` — ``J Jᵀ``.
        dtype: kernel dtype (``float32`` or ``float64``; eigen-analysis is in float64).
    """

    seed: int = 0
    n_seeds: int = 3
    setting: str = "ci"
    optimizer: str = "adamw"
    max_steps: int | None = 3000
    snapshot_every: int = 50
    n_probe: int = 256
    k: int | None = None
    precondition: str = "tensor-mean"
    dtype: str = "float32"

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise ConfigError(f"unknown setting {self.setting!r}; known: {', '.join(SETTINGS)}")
        if SETTINGS[self.setting].model != "mlp":
            raise ConfigError("grokking-theory supports the MLP settings (traced structured "
                              "kernels); pick e.g. --setting ci")
        parse_optimizer(self.optimizer)
        if self.snapshot_every < 1 or self.n_probe < 2 or self.n_seeds < 1:
            raise ConfigError("need snapshot_every >= 1, n_probe >= 2 and n_seeds >= 1")
        if self.precondition not in ("tensor-mean", "exact", "none"):
            raise ConfigError(f"precondition must be tensor-mean, exact or none, got "
                              f"{self.precondition!r}")
        if self.dtype not in ("float64", "float32"):
            raise ConfigError(f"dtype must be float64 or float32, got {self.dtype!r}")
        if self.k is not None and self.k < 1:
            raise ConfigError(f"k (the channel dimension) must be >= 1, got {self.k}")
        self.resolved()  # max_steps, checked by Setting before any work

    def resolved(self) -> Setting:
        st = SETTINGS[self.setting]
        return st if self.max_steps is None else dataclasses.replace(st, max_steps=self.max_steps)


def rise_step(steps: np.ndarray, values: np.ndarray, fraction: float,
              min_rise: float = 0.02) -> float:
    """First step where ``values`` has covered ``fraction`` of its rise from its first value to
    its maximum (NaN if it rises by less than ``min_rise``: no rise to time)."""
    v = np.asarray(values, dtype=float)
    lo, hi = v[0], np.nanmax(v)
    if not hi - lo >= min_rise:
        return math.nan
    hit = np.nonzero(v >= lo + fraction * (hi - lo))[0]
    return float(steps[hit[0]]) if len(hit) else math.nan


def _channel(K: Tensor, k: int, vectors: dict[str, Tensor]) -> dict[str, Any]:
    lam = torch.linalg.eigvalsh(K).flip(0)
    k = min(k, K.shape[0] - 1)
    cut = float(0.5 * (lam[k - 1] + lam[k]))
    sp = split_channels(K, threshold=cut, mode="absolute", vectors=vectors)
    out: dict[str, Any] = {name: e.channel_fraction for name, e in sp.energies.items()}
    out["gap"] = float(lam[k - 1] / lam[k]) if lam[k] > 0 else math.inf
    out["top_eigenvector_basis"] = sp.eigenvectors[:, :sp.rank]
    return out


def _kernel(model: torch.nn.Module, opt: torch.optim.Optimizer, x: Tensor, precondition: str,
            dtype: torch.dtype) -> Tensor:
    """The traced eNTK ``Σ_a J_a D J_aᵀ`` of ``x`` with the chosen ``D`` (see :class:`Config`)."""
    if precondition == "none":
        return cast(Tensor, entk(model, x, trace_outputs=True, dtype=dtype))
    D = adam_preconditioner(opt, model)
    if precondition == "exact":
        return cast(Tensor, entk(model, x, trace_outputs=True, precondition=D, dtype=dtype))
    blocks = entk(model, x, trace_outputs=True, groups="param", dtype=dtype)
    assert isinstance(blocks, dict)             # groups="param": one kernel per tensor
    return cast(Tensor, sum(float(D[name].mean()) * K for name, K in blocks.items()))


def _state_name(seed: int) -> str:
    """The seed's checkpoint (:meth:`RunDir.save_state`), written after every snapshot."""
    return f"theory-state-seed{seed}"


def _one_seed(cfg: Config, seed: int, rd: RunDir) -> dict[str, Any]:
    st = cfg.resolved()
    dtype = getattr(torch, cfg.dtype)
    task = make_task(st, [seed])
    model = build_single_model(st, task, seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    tr, va = task.train_idx[0], task.val_idx[0]
    n_train = len(tr)
    bs = st.batch_size if 0 < st.batch_size < n_train else n_train
    built = build_cell_optimizer(cfg.optimizer, model, st, bs)
    opt = built.optimizer
    pick = torch.Generator().manual_seed(20_000 + seed)
    n = min(cfg.n_probe, len(tr), len(va))
    probe_tr = tr[torch.randperm(len(tr), generator=pick)[:n]]
    probe_va = va[torch.randperm(len(va), generator=pick)[:n]]
    xp = torch.cat([task.x[probe_tr], task.x[probe_va]])
    onehot = torch.nn.functional.one_hot(task.y, task.n_classes).to(torch.float64)
    Yc = onehot[probe_tr] - onehot[probe_tr].mean(0)
    Yc_val = onehot[probe_va] - onehot[probe_va].mean(0)
    k = cfg.k or task.n_classes - 1
    if k >= n:
        raise ConfigError(f"channel dimension k={k} must be below n_probe={n}; raise --n_probe")
    step, W, K_first, V_first, rows = 0, None, None, None, []
    bases: dict[str, list[Tensor]] = {"K": [], "W": []}
    s = rd.load_state(name=_state_name(seed))   # durable; a damaged one falls back or restarts
    if s is not None:
        model.load_state_dict(s["model"])
        built.load_state_dict(s["optimizer"])
        gen.set_state(s["gen"])
        step, W, K_first, V_first, rows = s["step"], s["W"], s["K_first"], s["V_first"], s["rows"]
        bases = s["bases"]
    todo = [s for s in range(1, st.max_steps + 1) if s == 1 or s % cfg.snapshot_every == 0]
    todo = [s for s in todo if s > step]
    for target in progress(todo, desc=f"grokking-theory seed {seed}"):
        while step < target:
            step += 1
            idx = tr[torch.randint(n_train, (bs,), generator=gen)] if bs < n_train else tr
            loss = torch.nn.functional.cross_entropy(model(task.x[idx]), task.y[idx])
            built.zero_grad(set_to_none=True)
            loss.backward()
            built.step()
        with eval_mode(model):
            K = _kernel(model, opt, xp, cfg.precondition, dtype).to(torch.float64)
            with torch.no_grad():
                logits = model(task.x).to(torch.float64)
        K_SS, K_QQ = K[:n, :n], K[n:, n:]
        g = (logits[probe_tr].softmax(-1) - onehot[probe_tr]) / n  # ∇_u Φ on the probe
        dt = st.lr * (step - (rows[-1]["step"] if rows else 0))
        W = K_SS * dt if W is None else W + K_SS * dt
        cK = _channel(K_SS, k, {"target": Yc, "residual": g})
        cW = _channel(W, k, {"target": Yc})
        cQ = _channel(K_QQ, k, {"target": Yc_val})
        if K_first is None:
            K_first, V_first = K_SS, cK["top_eigenvector_basis"]
        assert V_first is not None
        cosines = torch.linalg.svdvals(V_first.T @ cK["top_eigenvector_basis"]).clamp(0, 1)
        pred = logits.argmax(-1)
        row = {"seed": seed, "step": step,
               "train_acc": float((pred[tr] == task.y[tr]).float().mean()),
               "val_acc": float((pred[va] == task.y[va]).float().mean()),
               "train_loss": float(torch.nn.functional.cross_entropy(logits[tr], task.y[tr])),
               "val_loss": float(torch.nn.functional.cross_entropy(logits[va], task.y[va])),
               "target_in_channel_K": cK["target"], "target_in_channel_W": cW["target"],
               "val_target_in_channel_KQQ": cQ["target"], "residual_in_channel_K":
                   cK["residual"], "eigengap_K": cK["gap"],
               "kernel_target_alignment": kernel_alignment(K_SS, Yc @ Yc.T, centered=True),
               "alignment_with_first": kernel_alignment(K_SS, K_first, centered=True),
               "rotation_angle": float(torch.arccos(cosines.min())),
               "random_subspace_fraction": k / n}
        rows.append(row)
        rd.log(**row)
        bases["K"].append(cK["top_eigenvector_basis"].float())
        bases["W"].append(cW["top_eigenvector_basis"].float())
        rd.save_state({"model": model.state_dict(), "optimizer": built.state_dict(),
                       "gen": gen.get_state(), "step": step, "W": W, "K_first": K_first,
                       "V_first": V_first, "rows": rows, "bases": bases},
                      name=_state_name(seed))
    # the function the network ends up computing on the probe (centered logits): when did the
    # channel come to hold it?
    with torch.no_grad():
        out = model(task.x[probe_tr]).to(torch.float64)
    final = out - out.mean(0)
    fin = {f"final_function_in_channel_{k}": [float((V.double().T @ final).square().sum()
                                                    / final.square().sum()) for V in bases[k]]
           for k in ("K", "W")}
    rd.save_arrays(**{f"seed{seed}_{k}": np.array(v) for k, v in fin.items()},
                   **{f"seed{seed}_steps": np.array([r["step"] for r in rows])})
    return _timing([{**r, **{k: v[i] for k, v in fin.items()}} for i, r in enumerate(rows)],
                   cfg.snapshot_every)


def _timing(rows: list[dict[str, Any]], every: int) -> dict[str, Any]:
    steps = np.array([r["step"] for r in rows], dtype=float)
    out: dict[str, Any] = {"k_over_n": rows[0]["random_subspace_fraction"]}
    for c in _CURVES:
        v = np.array([r[c] for r in rows], dtype=float)
        out[f"{c}_onset"] = rise_step(steps, v, 0.1)
        out[f"{c}_half"] = rise_step(steps, v, 0.5)
        out[f"{c}_first"], out[f"{c}_last"] = float(v[0]), float(v[-1])
    tol = 2 * every
    for c in _MIGRATION:
        for when in ("onset", "half"):
            lag = out[f"{c}_{when}"] - out[f"val_acc_{when}"]
            out[f"{c}_{when}_lag"] = lag
            out[f"{c}_{when}_order"] = ("n/a" if math.isnan(lag) else "coincides" if
                                        abs(lag) <= tol else "precedes" if lag < 0 else
                                        "follows")
    return out


def run(cfg: Config, rd: RunDir) -> dict[str, Any]:
    done = rd.cells()
    per_seed = {}
    for seed in range(cfg.seed, cfg.seed + cfg.n_seeds):
        key = f"seed{seed}"
        if key not in done:
            rd.save_cell(key, _one_seed(cfg, seed, rd))
            rd.delete_state(name=_state_name(seed))
        per_seed[seed] = rd.cells()[key]
    orders = {c: [v[f"{c}_half_order"] for v in per_seed.values()] for c in _MIGRATION}
    lags = {c: [math.nan if v[f"{c}_half_lag"] is None else v[f"{c}_half_lag"]
                for v in per_seed.values()] for c in _MIGRATION}
    return {"per_seed": per_seed, "orders_half": orders, "lags_half_steps": lags,
            **{f"median_half_lag_{c}": _nanmedian(lags[c]) for c in _MIGRATION},
            "tolerance_steps": 2 * cfg.snapshot_every,
            "verdict": _verdict(orders, lags)}


def _nanmedian(xs: list[float]) -> float:
    v = [x for x in xs if not math.isnan(x)]
    return float(np.median(v)) if v else math.nan


def _verdict(orders: dict[str, list[str]], lags: dict[str, list[float]]) -> str:
    parts = []
    names = {"target_in_channel_K": "one-hot target in K_SS channel",
             "target_in_channel_W": "one-hot target in cumulative-W channel",
             "final_function_in_channel_K": "final learned function in K_SS channel",
             "final_function_in_channel_W": "final learned function in cumulative-W channel"}
    for c, name in names.items():
        counts = {o: orders[c].count(o) for o in ("precedes", "coincides", "follows", "n/a")}
        parts.append(f"{name}: half-rise "
                     + ", ".join(f"{o} val-acc in {v}" for o, v in counts.items() if v)
                     + f" of {len(orders[c])} seeds (median lag "
                     f"{_nanmedian(lags[c]):+.0f} steps)")
    return "; ".join(parts)


def plot(rd: RunDir) -> list[Path]:
    """One figure per run: accuracy, channel fractions and rotation against step, per seed."""
    plt = pyplot()
    rows = {}
    for r in rd.read_metrics():
        rows[(r["seed"], r["step"])] = r  # a row repeated by a resume: keep the last
    seeds = sorted({s for s, _ in rows})
    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    for i, seed in enumerate(seeds):
        rs = [rows[k] for k in sorted(rows) if k[0] == seed]
        st = np.array([r["step"] for r in rs])
        col = lambda c, rs=rs: np.array([r[c] for r in rs], dtype=float)
        ls = "-" if i == 0 else (":" if i == 1 else "--")
        axes[0].plot(st, col("val_acc"), "C0" + ls, label="val acc" if i == 0 else None)
        axes[0].plot(st, col("train_acc"), "C1" + ls, label="train acc" if i == 0 else None)
        axes[1].plot(st, col("target_in_channel_K"), "C2" + ls,
                     label="target in channel of K_SS(t)" if i == 0 else None)
        axes[1].plot(st, col("target_in_channel_W"), "C3" + ls,
                     label="target in channel of W(t)" if i == 0 else None)
        arr = rd.load_arrays()
        if f"seed{seed}_final_function_in_channel_K" in arr:
            axes[1].plot(arr[f"seed{seed}_steps"], arr[f"seed{seed}_final_function_in_channel_K"],
                         "C8" + ls, label="final learned function in channel of K_SS(t)"
                         if i == 0 else None)
        axes[1].plot(st, col("val_target_in_channel_KQQ"), "C4" + ls,
                     label="val target in channel of K_QQ(t)" if i == 0 else None)
        axes[1].plot(st, col("random_subspace_fraction"), color="0.6", lw=0.8,
                     label="random k-dim subspace" if i == 0 else None)
        axes[2].plot(st, col("rotation_angle"), "C5" + ls,
                     label="largest principal angle to first (rad)" if i == 0 else None)
        axes[2].plot(st, 1 - col("alignment_with_first"), "C6" + ls,
                     label="1 − CKA with first kernel" if i == 0 else None)
        axes[2].plot(st, col("kernel_target_alignment"), "C7" + ls,
                     label="kernel–target alignment" if i == 0 else None)
    axes[0].set_ylabel("accuracy")
    axes[1].set_ylabel("fraction of energy in channel")
    axes[2].set_ylabel("rotation / alignment")
    axes[2].set_xlabel("step")
    for ax in axes:
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"grokking through the theory (seeds {seeds}; line style = seed)")
    return [save_figure(fig, rd.figure_path("grokking_theory"))]


EXPERIMENT = Experiment(
    "grokking-theory", Config, run, plot,
    presets={"smoke": dict(setting="tiny", n_seeds=1, max_steps=300, snapshot_every=50,
                           n_probe=48, k=8),
             "full": dict(setting="ci", n_seeds=3, max_steps=3000, snapshot_every=50,
                          n_probe=256)},
    description="does the target migrate from reservoir to signal channel before, with or "
                "after grokking?",
)
