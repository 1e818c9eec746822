"""Grokking speed: AdamW vs the population-risk gate vs Grokfast on ``(a ∘ b) mod p``.

The claim under test (the essay and the preprint's abstract): the gate "accelerates grokking by
5×" over AdamW. One run of this experiment trains every ``optimizer × setting × seed`` cell and
records the steps (and seconds) until validation accuracy first reaches ``target`` (99%), and
until train accuracy does; the summary is a table of medians and spreads over seeds with the
speed-up of each optimizer over AdamW on the same seeds.

A *setting* (:data:`SETTINGS`) fixes the task (operation, ``p``, train fraction), the model (an
MLP over learned embeddings or a small transformer) and the AdamW hyper-parameters; an
*optimizer* is a name of :mod:`tangentscope.optim.spec`: AdamW, a gated AdamW (statistics
source × gate placement × threshold), Grokfast on AdamW, or a combination, with variants spelled
``name@key=value@...``, e.g. ``gated@threshold=2``.

The seeds of one ``(setting, optimizer)`` cell are trained together as one stacked model (every
parameter carries a leading seed axis, see :func:`train_group`): with elementwise optimizers
this is exactly ``n_seeds`` independent runs (tested in float64), at the cost of one on an
accelerator. Cells can also be spread over ``workers`` processes (``cuda_workers`` of them on
the GPU). Results: docs/grokking.md.

    tangentscope run grokking --preset smoke
    tangentscope run grokking --preset full --workers 16 --cuda_workers 10
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._durable import atomic_write_torch
from ..errors import ConfigError
from ..io import RunDir
from ..models import StackedEnsemble
from ..optim.spec import BuiltOptimizer, parse_optimizer
from ..viz.grokking import grokking_figures
from ._framework import Experiment, make_config
from ._grokking_setup import (
    FULL_OPTIMIZERS,
    FULL_SETTINGS,
    SETTINGS,
    VARIANT_OPTIMIZERS,
    VARIANT_SETTINGS,
    ModularTask,
    Setting,
    build_cell_optimizer,
    build_model,
    gate_pass_fraction,
    make_task,
)
from ._harness import (
    censored_median,
    censored_ratio,
    censored_stats,
    check_nonnegative,
    check_positive,
    load_checkpoint,
    progress,
    run_jobs,
)

__all__ = ["Config", "EXPERIMENT", "GroupJob", "GroupResult", "SETTINGS",
           "Setting", "StackedEnsemble", "parse_optimizer", "plot", "run", "summarize",
           "table_markdown", "train_group"]


def stacks_seeds(setting: Setting, optimizer: str) -> bool:
    """Whether the seeds of a cell can share one stacked model (not: transformer + exact)."""
    return setting.model == "mlp" or parse_optimizer(optimizer).stats != "exact"


# -- training one (setting, optimizer) cell over its seeds --------------------------------------
@dataclasses.dataclass(frozen=True)
class GroupJob:
    """One ``(setting, optimizer)`` cell: its seeds are trained together as one stacked model."""

    setting_name: str
    setting: Setting
    optimizer: str
    seeds: tuple[int, ...]
    target: float = 0.99
    log_every: int = 200
    checkpoint: str | None = None
    checkpoint_seconds: float = 60.0


@dataclasses.dataclass(frozen=True)
class GroupResult:
    """``rows`` for ``metrics.csv`` and one result dict per seed (``cells``)."""

    rows: list[dict[str, Any]]
    cells: list[dict[str, Any]]


def relative_cost(job: GroupJob) -> float:
    """A rough per-step cost used only to start the slowest cells first."""
    c = 4.0 if job.setting.model == "transformer" else 1.0
    if parse_optimizer(job.optimizer).stats == "exact":
        c *= 1.5
    if job.setting.batch_size == 0:
        c *= 4.0
    return c


@torch.no_grad()
def _evaluate(model: nn.Module, task: ModularTask) -> dict[str, Tensor]:
    """Train/val accuracy and loss per member ``(E,)`` on every example."""
    E = task.train_idx.shape[0]
    logits = model(task.x[:, None, :].expand(-1, E, -1))  # (N, E, C)
    y = task.y[:, None].expand(-1, E)
    correct = (logits.argmax(-1) == y).float().T  # (E, N)
    loss = torch.nn.functional.cross_entropy(logits.permute(0, 2, 1), y, reduction="none").T
    out = {}
    for split, idx in (("train", task.train_idx), ("val", task.val_idx)):
        out[f"{split}_acc"] = correct.gather(1, idx).mean(1)
        out[f"{split}_loss"] = loss.gather(1, idx).mean(1)
    return out


def train_group(job: GroupJob, device: str = "cpu", *, quiet: bool = True) -> GroupResult:
    """Train ``job.seeds`` of one ``(setting, optimizer)`` until every seed has reached
    ``job.target`` on validation and train accuracy, or ``max_steps``.

    Each seed gets its own split, initialization (``seed_everything(seed)`` before building its
    model) and minibatch stream (a generator seeded ``10_000 + seed``), so the result per seed
    does not depend on which other seeds share the stack. With ``job.checkpoint`` set, the cell
    saves its state every ``checkpoint_seconds`` and resumes from it when restarted.
    """
    st = job.setting
    dev = torch.device(device)
    task = make_task(st, job.seeds)
    model = build_model(st, task, job.seeds, stacked=stacks_seeds(st, job.optimizer))
    task = dataclasses.replace(task, x=task.x.to(dev), y=task.y.to(dev),
                               train_idx=task.train_idx.to(dev), val_idx=task.val_idx.to(dev))
    model = model.to(dev)
    E, n_train = task.train_idx.shape
    batch = n_train if st.batch_size == 0 or st.batch_size >= n_train else st.batch_size
    built = build_cell_optimizer(job.optimizer, model, st, batch)
    opt = built.optimizer
    gens = [torch.Generator(device=dev).manual_seed(10_000 + s) for s in job.seeds]
    hit_val: list[int | None] = [None] * E
    hit_train: list[int | None] = [None] * E
    sec_val: list[float | None] = [None] * E
    rows: list[dict[str, Any]] = []
    gate_fracs: list[float] = []
    start, train_seconds, diverged = 0, 0.0, False
    ckpt = Path(job.checkpoint) if job.checkpoint else None
    # a damaged checkpoint is set aside and the cell starts over (its rows are logged only when
    # it ends, so nothing is duplicated)
    state = (load_checkpoint(ckpt, redo="the cell is trained from its start", map_location=dev)
             if ckpt is not None else None)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if built.grad_filter is not None:
            built.grad_filter.load_state_dict(state["grad_filter"])
        for g, gs in zip(gens, state["gens"]):
            g.set_state(gs.cpu())
        start, train_seconds = state["step"], state["train_seconds"]
        hit_val, hit_train, sec_val = state["hit_val"], state["hit_train"], state["sec_val"]
        rows, gate_fracs = state["rows"], state["gate_fracs"]
    last_ckpt = time.monotonic()
    step = start
    metrics: dict[str, Tensor] = {}
    while step < st.max_steps:
        t0 = time.perf_counter()
        for _ in range(st.eval_every):
            step += 1
            if st.warmup_steps:
                for grp in opt.param_groups:
                    grp["lr"] = st.lr * min(1.0, step / st.warmup_steps)
            if st.batch_size == 0 or st.batch_size >= n_train:
                idx = task.train_idx.T  # (n_train, E)
            else:
                u = torch.stack([torch.randint(n_train, (st.batch_size,), generator=g,
                                               device=dev) for g in gens], 1)
                idx = task.train_idx.T.gather(0, u)  # (B, E)
            logits = model(task.x[idx])  # (B, E, C)
            per_example = torch.nn.functional.cross_entropy(
                logits.permute(0, 2, 1), task.y[idx], reduction="none")  # (B, E)
            opt.zero_grad(set_to_none=True)
            per_example.mean(0).sum().backward()
            built.step()
            if step >= st.max_steps:
                break
        frac = gate_pass_fraction(opt)
        if frac is not None:
            gate_fracs.append(frac)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        train_seconds += time.perf_counter() - t0
        metrics = {k: v.cpu() for k, v in _evaluate(model, task).items()}
        if not all(math.isfinite(float(v)) for v in metrics["train_loss"]):
            diverged = True
        for e in range(E):
            if hit_train[e] is None and metrics["train_acc"][e] >= job.target:
                hit_train[e] = step
            if hit_val[e] is None and metrics["val_acc"][e] >= job.target:
                hit_val[e], sec_val[e] = step, train_seconds
        if step % job.log_every < st.eval_every or step >= st.max_steps:
            for e, seed in enumerate(job.seeds):
                rows.append({"setting": job.setting_name, "optimizer": job.optimizer,
                             "seed": seed, "step": step, "seconds": round(train_seconds, 3),
                             **{k: round(float(v[e]), 6) for k, v in metrics.items()}})
        if all(h is not None for h in hit_val + hit_train) or diverged:
            break
        if ckpt is not None and time.monotonic() - last_ckpt > job.checkpoint_seconds:
            _save_checkpoint(ckpt, model, built, gens, step, train_seconds, hit_val,
                             hit_train, sec_val, rows, gate_fracs)
            last_ckpt = time.monotonic()
    cells = [{"steps_to_val": hit_val[e], "steps_to_train": hit_train[e],
              "seconds_to_val": sec_val[e], "seconds_per_step": train_seconds / max(step, 1),
              "steps_run": step, "final_train_acc": float(metrics["train_acc"][e]),
              "final_val_acc": float(metrics["val_acc"][e]),
              "gate_pass_fraction": float(np.mean(gate_fracs)) if gate_fracs else None,
              "diverged": diverged, "n_stacked": E, "device": str(dev)} for e in range(E)]
    return GroupResult(rows, cells)


def _save_checkpoint(path: Path, model: nn.Module, built: BuiltOptimizer, gens: list, step: int,
                     train_seconds: float, hit_val: list, hit_train: list, sec_val: list,
                     rows: list, gate_fracs: list) -> None:
    state = {"model": model.state_dict(), "optimizer": built.optimizer.state_dict(),
             "grad_filter": (built.grad_filter.state_dict() if built.grad_filter is not None
                             else None),
             "gens": [g.get_state() for g in gens], "step": step,
             "train_seconds": train_seconds, "hit_val": hit_val, "hit_train": hit_train,
             "sec_val": sec_val, "rows": rows, "gate_fracs": gate_fracs}
    atomic_write_torch(path, state)   # durable: a kill leaves the previous checkpoint whole


@dataclasses.dataclass(frozen=True)
class Config:
    """Grid of ``setting × optimizer × seed`` (every field can be set on the command line).

    Attributes:
        seed: first seed; the cell trains seeds ``seed … seed + n_seeds − 1``.
        n_seeds: seeds per ``(setting, optimizer)`` cell (≥ 5 for the claim).
        optimizer: optimizer names (:func:`tangentscope.optim.spec.parse_optimizer`, with
            ``@key=value`` variants).
        setting: setting names (keys of :data:`SETTINGS`).
        op, prime, train_fraction, lr, weight_decay, batch_size, max_steps, eval_every: when
            set, override that field of every setting (``None``: the setting's own value;
            ``prime`` is the setting's ``p``).
        target: accuracy that counts as reached (0.99).
        device: ``cpu``, ``cuda`` or ``auto`` for in-process runs (``workers == 1``).
        workers: processes training cells in parallel (1: in this process).
        cuda_workers: how many of the ``workers`` use the GPU (the rest use one CPU thread).
        log_every: steps between rows of ``metrics.csv`` (the threshold is checked every
            ``eval_every`` steps regardless).
        checkpoint_seconds: a running cell checkpoints this often, so ``--resume`` continues it.
    """

    seed: int = 0
    n_seeds: int = 5
    optimizer: tuple[str, ...] = ("adamw", "gated", "grokfast")
    setting: tuple[str, ...] = ("ci",)
    op: str | None = None
    prime: int | None = None
    train_fraction: float | None = None
    lr: float | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    max_steps: int | None = None
    eval_every: int | None = None
    target: float = 0.99
    device: str = "cpu"
    workers: int = 1
    cuda_workers: int = 0
    log_every: int = 200
    checkpoint_seconds: float = 60.0

    def __post_init__(self):
        check_positive(self, "lr", "train_fraction")
        check_nonnegative(self, "weight_decay", "checkpoint_seconds")
        if self.n_seeds < 1:
            raise ConfigError(f"n_seeds must be >= 1, got {self.n_seeds}")
        if not 0 < self.target <= 1:
            raise ConfigError(f"target is an accuracy in (0, 1], got {self.target}")
        if self.workers < 1 or not 0 <= self.cuda_workers <= self.workers:
            raise ConfigError(f"need workers >= 1 and 0 <= cuda_workers <= workers, got "
                              f"workers={self.workers}, cuda_workers={self.cuda_workers}")
        for s in self.setting:
            if s not in SETTINGS:
                raise ConfigError(f"unknown setting {s!r}; known: {', '.join(SETTINGS)}")
            self.resolved_setting(s)  # the overrides, checked by Setting before any work
        for o in self.optimizer:
            parse_optimizer(o)  # raises ConfigError naming the problem
        if not self.optimizer or not self.setting:
            raise ConfigError("give at least one --optimizer and one --setting")

    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.n_seeds))

    def resolved_setting(self, name: str) -> Setting:
        """``SETTINGS[name]`` with this config's overrides applied."""
        over = {f: getattr(self, f) for f in ("op", "train_fraction", "lr", "weight_decay",
                                              "batch_size", "max_steps", "eval_every")
                if getattr(self, f) is not None}
        if self.prime is not None:
            over["p"] = self.prime
        return dataclasses.replace(SETTINGS[name], **over)


def _cell_key(setting: str, optimizer: str, seed: int) -> str:
    return f"{setting}|{optimizer}|seed{seed}"


# -- run ----------------------------------------------------------------------------------------
def run(cfg: Config, rd: RunDir) -> dict[str, Any]:
    """Train every missing cell; log curves and results as each ``(setting, optimizer)`` ends."""
    done = rd.cells()
    jobs = []
    for s in cfg.setting:
        setting = cfg.resolved_setting(s)
        for o in cfg.optimizer:
            seeds = [sd for sd in cfg.seeds() if _cell_key(s, o, sd) not in done]
            groups = [seeds] if stacks_seeds(setting, o) else [[sd] for sd in seeds]
            for grp in groups if seeds else []:
                tag = _safe(s, o, f"seeds{grp[0]}-{grp[-1]}")
                jobs.append(GroupJob(setting_name=s, setting=setting, optimizer=o,
                                     seeds=tuple(grp), target=cfg.target,
                                     log_every=cfg.log_every,
                                     checkpoint=str(rd.path / f"state-{tag}.pt"),
                                     checkpoint_seconds=cfg.checkpoint_seconds))
    # longest expected first, so a parallel run is not left waiting on one slow cell
    jobs.sort(key=lambda j: -j.setting.max_steps * relative_cost(j) * len(j.seeds))

    failed = []

    def record(job: GroupJob, res: GroupResult | str) -> None:
        if isinstance(res, str):  # not saved as a cell: --resume retries it
            failed.append({"setting": job.setting_name, "optimizer": job.optimizer,
                           "seeds": list(job.seeds), "error": res[-2000:]})
            print(f"[grokking] cell {job.setting_name} / {job.optimizer} failed:\n{res}",
                  flush=True)
            return
        for row in res.rows:
            rd.log(**row)
        for seed, cell in zip(job.seeds, res.cells):
            rd.save_cell(_cell_key(job.setting_name, job.optimizer, seed), cell)
        if job.checkpoint is not None:
            Path(job.checkpoint).unlink(missing_ok=True)

    for job, res in progress(run_jobs(train_group, jobs, workers=cfg.workers,
                                      cuda_workers=cfg.cuda_workers, device=cfg.device),
                             desc="grokking cells", total=len(jobs)):
        record(job, res)
    return {**summarize(cfg, rd.cells()), "failed_cells": failed}


def _safe(*parts: str) -> str:
    return "-".join("".join(c if c.isalnum() or c in "._=" else "_" for c in p) for p in parts)


# -- summary ------------------------------------------------------------------------------------
def summarize(cfg: Config, cells: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The comparison table (one row per ``setting × optimizer``) and the verdict."""
    rows = []
    for s in cfg.setting:
        cap = cfg.resolved_setting(s).max_steps
        base = {sd: r for sd in cfg.seeds()
                if (r := cells.get(_cell_key(s, "adamw", sd))) is not None}
        for o in cfg.optimizer:
            recs = [(sd, r) for sd in cfg.seeds()
                    if (r := cells.get(_cell_key(s, o, sd))) is not None]
            if not recs:
                continue
            val = [r["steps_to_val"] for _, r in recs]
            st = censored_stats(val, cap)
            row = {"setting": s, "optimizer": o, "seeds": [sd for sd, _ in recs],
                   "steps_to_val": st,
                   "steps_to_train": censored_stats([r["steps_to_train"] for _, r in recs], cap),
                   "seconds_to_val": censored_stats([r["seconds_to_val"] for _, r in recs], cap),
                   "seconds_per_step": float(np.median([r["seconds_per_step"] for _, r in recs])),
                   "device": "/".join(sorted({r.get("device", "?") for _, r in recs})),
                   "stacked": max(r.get("n_stacked", 1) for _, r in recs),
                   "gate_pass_fraction": _nanmedian([r.get("gate_pass_fraction") for _, r in recs]),
                   "final_val_acc": float(np.median([r["final_val_acc"] for _, r in recs]))}
            paired = [censored_ratio(base[sd]["steps_to_val"], r["steps_to_val"])
                      for sd, r in recs if sd in base]
            row["paired_speedup_median"] = censored_median(paired)
            b = censored_stats([base[sd]["steps_to_val"] for sd, _ in recs if base.get(sd)],
                               cap)
            row["speedup_vs_adamw"], row["speedup_bound"] = _speedup(b, st, cap)
            rows.append(row)
    out: dict[str, Any] = {"table": rows, "target": cfg.target, "seeds": cfg.seeds(),
                           "verdict": _verdict(rows)}
    if len(rows) == 1:  # one cell: scalars for `tangentscope compare`
        r = rows[0]
        out.update(steps_to_val=r["steps_to_val"]["median"],  # None when censored
                   steps_to_train=r["steps_to_train"]["median"],
                   seconds_to_val=r["seconds_to_val"]["median"],
                   seconds_per_step=r["seconds_per_step"],
                   reached_fraction=r["steps_to_val"]["reached"] / r["steps_to_val"]["n"])
    return out


def _nanmedian(xs: Sequence[float | None]) -> float | None:
    v = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.median(v)) if v else None


def _speedup(base: Mapping[str, Any], opt: Mapping[str, Any], cap: int
             ) -> tuple[float | None, str | None]:
    """Median-over-seeds speed-up over AdamW, with the cap as a bound when a median is
    censored: ``(x, None)`` exact, ``(x, '>=')`` AdamW censored, ``(x, '<=')`` optimizer
    censored, ``(None, None)`` both censored or no baseline."""
    if not base["n"]:
        return None, None
    a, b = base["median"], opt["median"]
    if a is not None and b is not None:
        return a / b, None
    if a is None and b is not None:
        return cap / b, ">="
    if a is not None and b is None:
        return a / cap, "<="
    return None, None


def _verdict(rows: Sequence[Mapping[str, Any]]) -> str:
    gate = [r for r in rows if r["optimizer"].startswith("gated") and r["speedup_vs_adamw"]
            is not None]
    if not gate:
        return "no gated optimizer with an AdamW baseline in this run"
    best = max(gate, key=lambda r: r["speedup_vs_adamw"])
    fast = [r for r in gate if r["speedup_vs_adamw"] >= 5]
    line = (f"best gated speed-up over AdamW (median steps to target): "
            f"{best.get('speedup_bound') or ''}{best['speedup_vs_adamw']:.2f}x "
            f"({best['optimizer']} on {best['setting']}); ")
    line += (f"5x reached in {len(fast)} of {len(gate)} gated cells" if fast else
             "5x not reached in any setting")
    return line


def table_markdown(summary: Mapping[str, Any]) -> str:
    """The summary's table as Markdown (what ``docs/grokking.md`` shows)."""
    lines = ["| setting | optimizer | steps to val ≥ target: median [q25–q75] | reached | "
             "speed-up vs AdamW (median / paired) | steps to train | ms/step (device, seeds "
             "stacked) |", "|---|---|---|---|---|---|---|"]

    def f(x: float | None, cap: int | None = None) -> str:
        return (f"> {cap:,}" if cap else "—") if x is None else f"{x:,.0f}"

    def g(x: float | None, bound: str | None = None) -> str:
        return "—" if x is None else {None: "", ">=": "≥ ", "<=": "≤ "}[bound] + f"{x:.2f}×"

    for r in summary["table"]:
        s = r["steps_to_val"]
        c = s["cap"]
        lines.append(f"| {r['setting']} | {r['optimizer']} | {f(s['median'], c)} "
                     f"[{f(s['q25'], c)}–{f(s['q75'], c)}] | {s['reached']}/{s['n']} | "
                     f"{g(r['speedup_vs_adamw'], r.get('speedup_bound'))} / "
                     f"{g(r['paired_speedup_median'])} | "
                     f"{f(r['steps_to_train']['median'], c)} | "
                     f"{r['seconds_per_step'] * 1e3:.1f} ({r.get('device', '?')}, "
                     f"{r.get('stacked', 1)}) |")
    return "\n".join(lines) + "\n"


# -- plot ---------------------------------------------------------------------------------------
def plot(rd: RunDir) -> list[Path]:
    """Steps-to-target per seed (dots) and median (bar) per optimizer and setting; curves;
    ``table.md``."""
    summary = rd.read_summary()
    if not summary:
        saved = rd.read_config()["config"]
        summary = summarize(make_config(Config, saved), rd.cells())
    cells = rd.cells()
    steps = {(r["setting"], r["optimizer"], sd):
             cells[_cell_key(r["setting"], r["optimizer"], sd)]["steps_to_val"]
             for r in summary["table"] for sd in r["seeds"]}
    paths = grokking_figures(rd, summary, steps)
    rd.write_text("table.md", table_markdown(summary))
    return paths


EXPERIMENT = Experiment(
    "grokking", Config, run, plot,
    presets={
        "smoke": dict(setting=("tiny",), optimizer=("adamw", "gated", "grokfast"), n_seeds=2,
                      log_every=100),
        "full": dict(setting=FULL_SETTINGS, optimizer=FULL_OPTIMIZERS, n_seeds=5),
        "variants": dict(setting=VARIANT_SETTINGS, optimizer=VARIANT_OPTIMIZERS, n_seeds=5),
    },
    description="the gate's 5x grokking claim: AdamW vs gated AdamW vs Grokfast, median over seeds",
)
