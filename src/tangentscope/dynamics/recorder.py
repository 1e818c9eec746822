"""Record ``K_SS, K_QS, u, U_Q, g, B``, losses and the learning rate during any training loop.

Two lines in a plain PyTorch loop::

    rec = KernelRecorder(model, x, y, x_test=xq, y_test=yq, optimizer=opt,
                         schedule=every(10), run_dir="runs/mlp", total_steps=1000)
    for step in range(1000):
        ...; loss.backward(); opt.step()          # the recorder hooks opt.step()
    rec.close()
    traj = KernelTrajectory.load("runs/mlp")      # or rec.trajectory()

The recorder takes snapshot 0 when it is created, then advances one step per
``optimizer.step()`` (a step post-hook; pass ``attach=False`` and call :meth:`KernelRecorder.step`
yourself for hand-written updates). Training time advances by ``lr × loss_scale`` per step, the
learning rate read from the optimizer at that step, so LR schedules are handled; parameter
groups with different learning rates enter the kernel as a diagonal preconditioner ``lr_g/lr_0``.
For Adam-like optimizers the kernel is the preconditioned ``J D Jᵀ`` (see :func:`_adam_next`).

Snapshots are computed in eval mode (dropout off, BatchNorm running statistics; afterwards
every submodule's own ``training`` flag is exactly what it was) and in ``dtype`` (float64 by
default). They are stored through a :class:`~tangentscope.dynamics.store.TrajectoryStore`
(records of kind ``"kernel"``): on disk each is written atomically to its own file with one
fsync-ed index line, so an interrupted run loses at most the snapshot in flight; reopen it with
``resume=True`` to append.

Before anything is written the recorder sizes the recording (disk or RAM for the planned
snapshots, and the eNTK working memory of one snapshot, estimated by
:func:`~tangentscope.estimate_memory` with the very arguments :func:`~tangentscope.entk` gets)
and refuses, naming what to change, if it does not fit.
"""

from __future__ import annotations

import inspect
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vjp

from .._utils import available_memory, default_memory_budget, eval_mode, format_bytes, parse_bytes
from ..errors import ConfigError, KernelTooLargeError, NonFiniteError, ShapeError
from ..kernels.entk import entk, estimate_memory, flatten_kernel
from ..kernels.functional import FunctionalModel, functionalize
from ..kernels.precondition import adam_preconditioner
from ..losses import OutputLoss, get_loss
from .schedule import Schedule, at_steps, every, logspaced, manual
from .store import TrajectoryStore
from .trajectory import KernelTrajectory

__all__ = ["KernelRecorder", "Schedule", "every", "logspaced", "at_steps", "manual"]


# -- the recorder ------------------------------------------------------------------------------
class KernelRecorder:
    """Snapshot the theory's objects during training (see the module docstring).

    Args:
        model: the ``nn.Module`` being trained.
        x_train, y_train: the training set ``(n, ...)`` and targets (what ``Φ`` averages over).
        loss: ``'squared'`` (``Φ = ‖u − y‖²/(2n)``), ``'cross_entropy'`` or an OutputLoss.
        x_test, y_test: probe/test inputs ``(m, ...)`` for ``K_QS`` and ``U_Q``; ``y_test``
            (optional) gives the test loss.
        optimizer: the optimizer; its step hook advances the recorder (``attach=True``) and its
            learning rate (and Adam state) set the time and the kernel.
        schedule: :func:`every`, :func:`logspaced`, :func:`at_steps` or :func:`manual`
            (default ``every(10)``).
        run_dir: directory to stream snapshots to; ``None`` keeps them in memory.
        total_steps: planned optimizer steps: the recording's total size is checked against
            the free disk (or RAM) before training. Without it (``every(k)`` schedules) the
            total is unknown: only one snapshot's size is checked, before each snapshot.
        precondition: ``'auto'`` (Adam/AdamW → ``'adam'``, else none), ``'adam'`` (``D`` the
            optimizer's next-step ``1/(√v̂ + ε)`` including the current full-batch gradient),
            ``'adam_state'`` (``D`` from the stored state only,
            :func:`~tangentscope.adam_preconditioner`) or ``None``.
        loss_scale: the loss you backpropagate is ``loss_scale × Φ`` (e.g. ``2/p`` for
            ``nn.MSELoss()``, whose mean also runs over outputs); time advances by
            ``lr × loss_scale`` per step.
        dtype: dtype of the kernels and stored arrays (float64 default).
        test_gram: record ``‖K_QQ‖₂`` (one extra ``m × m`` kernel) for the visibility bound.
        save_preconditioner: store the flat ``D`` ``(P,)`` in every snapshot.
        attach: hook ``optimizer.step()``; else call :meth:`step` after each update.
        resume: reopen ``run_dir`` and append (the model must be at the snapshot ``step``).
        step: the current optimizer step (default 0; on resume, the last snapshot's step).
        on_snapshot: ``fn(index, step)`` called after each snapshot is stored (checkpointing).
        extra_data: arrays stored once in ``data.npz`` (e.g. the known label noise).
        entk_options: forwarded to :func:`tangentscope.entk` (``implementation``,
            ``memory_budget``, ``chunk_size``).
        verbose: print the size estimate.

    Raises:
        ShapeError: inputs and targets that do not match.
        ConfigError: a run directory that already holds a run (pass ``resume=True``), a resume
            whose model does not match the recorded snapshot, or a run that would not fit on disk.
        KernelTooLargeError: one snapshot's eNTK does not fit the memory budget.
        All are raised before anything is written.
    """

    def __init__(self, model: nn.Module, x_train: Tensor, y_train: Tensor, *,
                 loss: str | OutputLoss = "squared", x_test: Tensor | None = None,
                 y_test: Tensor | None = None, optimizer: torch.optim.Optimizer | None = None,
                 schedule: Schedule | None = None, run_dir: str | os.PathLike | None = None,
                 total_steps: int | None = None, precondition: str | None = "auto",
                 loss_scale: float = 1.0, dtype: torch.dtype = torch.float64,
                 test_gram: bool = True, save_preconditioner: bool = False, attach: bool = True,
                 resume: bool = False, step: int | None = None,
                 on_snapshot: Callable[[int, int], Any] | None = None,
                 extra_data: Mapping[str, Any] | None = None,
                 entk_options: Mapping[str, Any] | None = None, verbose: bool = True):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"KernelRecorder records an nn.Module, got {type(model).__name__}")
        self.model, self.optimizer = model, optimizer
        self.loss = get_loss(loss)
        self.schedule = schedule if schedule is not None else every(10)
        if not isinstance(self.schedule, Schedule):
            raise ConfigError("schedule must be every(k), logspaced(T, num), at_steps([...]) or "
                              "manual()")
        if not (loss_scale > 0 and math.isfinite(loss_scale)):
            raise ConfigError(f"loss_scale must be a positive number, got {loss_scale!r}")
        self.loss_scale, self.dtype, self.test_gram = float(loss_scale), dtype, test_gram
        self.save_preconditioner, self.on_snapshot = save_preconditioner, on_snapshot
        self.entk_options = dict(entk_options or {})
        self._extra = dict(extra_data or {})
        x, y = self._inputs(x_train, y_train, "x_train", "y_train")
        assert y is not None
        self.x: Tensor = x
        self.y: Tensor = y
        self.xq: Tensor | None = None
        self.yq: Tensor | None = None
        if x_test is not None:
            self.xq, self.yq = self._inputs(x_test, y_test, "x_test", "y_test")
        self._names = self._param_names()
        self.precondition = self._resolve_precondition(precondition)
        self.path = None if run_dir is None else Path(run_dir)
        self.n, self.m = self.x.shape[0], 0 if self.xq is None else self.xq.shape[0]
        with eval_mode(model):
            fm = self._functional()
            self.p, self.num_params = fm.output_dim(self.x), fm.num_params
            self.estimate = self._estimate(fm, total_steps)
        lr0 = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else float("nan")
        self._step, self._time, self._lr = int(step or 0), 0.0, lr0
        self._dts: list[float] = []
        self._records: list[dict[str, Any]] = []
        self._hook = None
        if verbose:
            print(self._describe_estimate(), flush=True)
        self._check_fits()
        self._store = self._resume(step) if resume else self._start()
        if optimizer is not None and attach:
            self._hook = optimizer.register_step_post_hook(self._on_optimizer_step)
        if not resume:
            self.snapshot()

    # -- public ----------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Optimizer steps taken so far."""
        return self._step

    @property
    def time(self) -> float:
        """Training time ``τ = Σ lr × loss_scale`` so far."""
        return self._time

    @property
    def num_snapshots(self) -> int:
        return len(self._records)

    def step(self, lr: float | None = None) -> bool:
        """Advance one optimizer step (call right after ``optimizer.step()``, before an LR
        scheduler's ``step()``); snapshot if the schedule says so. Returns whether it did.

        Args:
            lr: the learning rate of the step just taken (default: read from the optimizer).
        """
        if self._hook is not None:
            raise ConfigError("this recorder is attached to the optimizer and advances on every "
                              "optimizer.step(); do not call rec.step() too (or create it with "
                              "attach=False)")
        if lr is None:
            if self.optimizer is None:
                raise ConfigError("rec.step() needs lr= when the recorder has no optimizer")
            lr = float(self.optimizer.param_groups[0]["lr"])
        return self._advance(float(lr))

    def snapshot(self) -> int:
        """Record a snapshot now (if none exists at this step); returns its index."""
        if self._records and self._records[-1]["step"] == self._step:
            return len(self._records) - 1
        arrays, scalars = self._compute()
        arrays["dts"] = np.asarray(self._dts, dtype=np.float64)
        rec: dict[str, Any] = {"index": len(self._records), "step": self._step,
                               "time": self._time, "lr": self._lr, **scalars,
                               "wall": time.time()}
        if self.estimate["planned_snapshots"] is None:
            self._check_room()
        rec = self._store.append(rec, arrays)
        self._records.append(rec)
        self._dts = []
        index = int(rec["index"])
        if self.on_snapshot is not None:
            self.on_snapshot(index, self._step)
        return index

    def close(self, final: bool = True) -> None:
        """Detach from the optimizer; with ``final``, snapshot the current step if not done."""
        if final:
            self.snapshot()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def trajectory(self) -> KernelTrajectory:
        """The snapshots so far as a :class:`KernelTrajectory`."""
        return KernelTrajectory.from_store(self._store)

    def __enter__(self) -> KernelRecorder:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(final=exc_type is None)

    # -- stepping --------------------------------------------------------------------------
    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        self._advance(float(optimizer.param_groups[0]["lr"]))

    def _advance(self, lr: float) -> bool:
        if not (lr >= 0 and math.isfinite(lr)):
            raise ConfigError(f"learning rate must be a finite number >= 0, got {lr!r}")
        self._step += 1
        dt = lr * self.loss_scale
        self._time += dt
        self._dts.append(dt)
        self._lr = lr
        if self.schedule.due(self._step):
            self.snapshot()
            return True
        return False

    # -- one snapshot ----------------------------------------------------------------------
    def _entk_args(self, D: Mapping[str, Tensor] | None
                   ) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
        """``(x1, x2, keywords)`` of the snapshot's :func:`entk` call (also what the memory
        estimate is given): one call on train and probe inputs, so each example's Jacobian is
        computed once."""
        kw = {"precondition": D, "dtype": self.dtype, **self.entk_options}
        if self.xq is None:
            return self.x, None, kw
        return torch.cat([self.x, self.xq]), None if self.test_gram else self.x, kw

    def _compute(self) -> tuple[dict[str, np.ndarray], dict[str, float | None]]:
        with eval_mode(self.model):
            fm = self._functional()
            x = self.x.to(self.dtype) if self.x.is_floating_point() else self.x
            with torch.no_grad():
                u = fm.apply(fm.params, x)
            if not torch.isfinite(u).all():
                raise NonFiniteError(f"the model's outputs are not finite at step {self._step}: "
                                     "training diverged (lower the learning rate)")
            g = self.loss.grad(u, self.y)
            D = self._preconditioner(fm, g)
            out: dict[str, Tensor] = {"u": u, "g": g, "B": self.loss.hessian(u, self.y)}
            sc: dict[str, float | None] = {"loss": float(self.loss.value(u, self.y)),
                                           "test_loss": None, "test_gram_norm": None}
            N = self.n * self.p
            x1, x2, kw = self._entk_args(D)
            K_full = entk(fm, x1, x2, **kw)
            assert isinstance(K_full, Tensor)
            K = flatten_kernel(K_full)
            if self.xq is None:
                out["K_SS"] = K
            else:
                with torch.no_grad():
                    out["U_Q"] = fm.apply(fm.params, self.xq)
                if self.yq is not None:
                    sc["test_loss"] = float(self.loss.value(out["U_Q"], self.yq))
                out["K_SS"], out["K_QS"] = K[:N, :N], K[N:, :N]
                if self.test_gram:
                    sc["test_gram_norm"] = float(torch.linalg.eigvalsh(K[N:, N:])[-1])
            if D is not None and self.save_preconditioner:
                out["D"] = torch.cat([D[k].reshape(-1) for k in fm.params])
        arrays = {k: v.detach().to(self.dtype).cpu().numpy() for k, v in out.items()}
        return arrays, sc

    def _functional(self) -> FunctionalModel:
        named = dict(self.model.named_parameters())
        return functionalize(self.model, {k: named[k] for k in self._names}, dtype=self.dtype)

    def _param_names(self) -> list[str]:
        named = list(self.model.named_parameters())
        if self.optimizer is None:
            names = [k for k, v in named if v.requires_grad]
        else:
            in_opt = {id(q) for grp in self.optimizer.param_groups for q in grp["params"]}
            names = [k for k, v in named if id(v) in in_opt and v.requires_grad]
        if not names:
            raise ConfigError("no trainable parameters to record: the optimizer holds none of the "
                              "model's parameters (pass the optimizer that trains this model)")
        return names

    def _resolve_precondition(self, precondition: str | None) -> str | None:
        allowed = ("auto", "adam", "adam_state", None, "none")
        if precondition not in allowed:
            raise ConfigError(f"precondition must be one of {allowed}, got {precondition!r}")
        if precondition in (None, "none"):
            return None
        adam_like = self.optimizer is not None and all(
            "betas" in grp and "eps" in grp for grp in self.optimizer.param_groups)
        if precondition == "auto":
            return "adam" if adam_like else None
        if not adam_like:
            raise ConfigError(f"precondition={precondition!r} needs an Adam-like optimizer "
                              "(param groups with betas and eps); pass optimizer=, or "
                              "precondition=None")
        return precondition

    def _preconditioner(self, fm: FunctionalModel, g: Tensor) -> dict[str, Tensor] | None:
        """Diagonal ``D`` per parameter: the Adam factor and/or ``lr_group / lr_0``."""
        if self.optimizer is None:
            return None
        named = dict(self.model.named_parameters())
        ids = {id(named[k]): k for k in self._names}
        lr0 = float(self.optimizer.param_groups[0]["lr"])
        D: dict[str, Tensor] = {}
        if self.precondition == "adam":
            D = _adam_next(self.optimizer, ids, fm, self._full_gradient(fm, g))
        elif self.precondition == "adam_state":
            D = {k: v.to(self.dtype) for k, v in adam_preconditioner(self.optimizer,
                                                                     names=ids).items()}
        ratios = {}
        for grp in self.optimizer.param_groups:
            r = float(grp["lr"]) / lr0 if lr0 > 0 else 1.0
            for q in grp["params"]:
                if id(q) in ids and r != 1.0:
                    ratios[ids[id(q)]] = r
        if not D and not ratios:
            return None
        return {k: D.get(k, torch.ones_like(v)) * ratios.get(k, 1.0) for k, v in fm.params.items()}

    def _full_gradient(self, fm: FunctionalModel, g: Tensor) -> dict[str, Tensor]:
        """``∇_w (loss_scale Φ) = loss_scale J_Sᵀ g`` on the whole training set."""
        x = self.x.to(self.dtype) if self.x.is_floating_point() else self.x
        _, pull = vjp(lambda prm: fm.apply(prm, x), fm.params)[:2]
        return {k: v * self.loss_scale for k, v in pull(g)[0].items()}

    # -- storage ---------------------------------------------------------------------------
    def _inputs(self, x: Any, y: Any, xn: str, yn: str) -> tuple[Tensor, Tensor | None]:
        x = torch.as_tensor(x)
        if x.dim() == 0 or x.shape[0] == 0:
            raise ShapeError(f"{xn} must be a non-empty batch (n, ...), got shape {tuple(x.shape)}")
        if y is None:
            if yn == "y_train":
                raise ShapeError("y_train is required (the loss Φ needs targets)")
            return x, None
        y = torch.as_tensor(y)
        if y.shape[0] != x.shape[0]:
            raise ShapeError(f"{yn} has {y.shape[0]} rows but {xn} has {x.shape[0]}: one target "
                             "per example")
        if y.is_floating_point():
            y = y.to(self.dtype)
        return x, y

    def _meta(self) -> dict[str, Any]:
        return {"n": self.n, "p": self.p, "m": self.m, "loss": getattr(self.loss, "name", "?"),
                "loss_scale": self.loss_scale, "dtype": str(self.dtype).replace("torch.", ""),
                "preconditioned": self.precondition is not None or self._group_lrs_differ(),
                "precondition": self.precondition, "schedule": self.schedule.describe(),
                "num_params": self.num_params, "param_names": self._names,
                "optimizer": None if self.optimizer is None else type(self.optimizer).__name__,
                "model": type(self.model).__name__}

    def _group_lrs_differ(self) -> bool:
        if self.optimizer is None:
            return False
        return len({float(g["lr"]) for g in self.optimizer.param_groups}) > 1

    def _data_arrays(self) -> dict[str, np.ndarray]:
        data = {"x": self.x, "y": self.y, **({"x_test": self.xq} if self.xq is not None else {}),
                **({"y_test": self.yq} if self.yq is not None else {}), **self._extra}
        return {k: torch.as_tensor(v).detach().cpu().numpy() for k, v in data.items()}

    def _start(self) -> TrajectoryStore:
        if self.path is not None and TrajectoryStore.exists(self.path):
            raise ConfigError(f"{self.path} already holds a recorded trajectory; pass resume=True "
                              "to append to it, or choose another run_dir")
        return TrajectoryStore.create(self.path, self._meta(), self._data_arrays())

    def _resume(self, step: int | None) -> TrajectoryStore:
        if self.path is None or not TrajectoryStore.exists(self.path):
            raise ConfigError(f"resume=True needs a run_dir holding a trajectory; {self.path} "
                              "has none (start without resume)")
        store = TrajectoryStore.open(self.path)
        mine = self._meta()
        for key in ("n", "p", "m", "loss", "num_params"):
            if store.meta.get(key) != mine[key]:
                raise ConfigError(f"{self.path} was recorded with {key}={store.meta.get(key)!r}, "
                                  f"this recorder has {mine[key]!r}: resume with the same model "
                                  "and data, or use a new run_dir")
        recs = store.records()
        if not recs:
            raise ConfigError(f"{self.path} has no finished snapshot to resume from; delete it "
                              "and start again")
        at = recs[-1] if step is None else next((r for r in recs if r["step"] == step), None)
        if at is None:
            raise ConfigError(f"no snapshot at step {step} in {self.path}; resume from one of "
                              f"the recorded steps {[r['step'] for r in recs][-5:]} (restore "
                              "the model checkpoint saved with that snapshot)")
        u_rec = torch.as_tensor(store.arrays(at, ["u"])["u"])
        x = self.x.to(self.dtype) if self.x.is_floating_point() else self.x
        with eval_mode(self.model), torch.no_grad():
            fm = self._functional()
            u_now = fm.apply(fm.params, x)
        if not torch.allclose(u_now.to(u_rec.dtype), u_rec, rtol=1e-6, atol=1e-9):
            err = float((u_now.to(u_rec.dtype) - u_rec).abs().max())
            raise ConfigError(f"the model's outputs differ from snapshot step {at['step']} "
                              f"(max |Δu| = {err:.3g}): restore the model (and optimizer) saved "
                              "with that snapshot before resuming, or pass step= for the "
                              "snapshot your checkpoint matches")
        store.clean_temporaries()
        if at is not recs[-1]:
            store.truncate_after(at["step"])
            recs = [r for r in recs if r["step"] <= at["step"]]
        self._records = recs
        self._step, self._time, self._lr = at["step"], at["time"], at["lr"]
        return store

    # -- estimates -------------------------------------------------------------------------
    def _preconditioned(self) -> bool:
        return self.precondition is not None or self._group_lrs_differ()

    def _estimate(self, fm: FunctionalModel, total_steps: int | None) -> dict[str, Any]:
        """Bytes per snapshot, planned snapshots, and the eNTK memory of one snapshot."""
        if total_steps is not None and (isinstance(total_steps, bool)
                                        or not isinstance(total_steps, int) or total_steps < 0):
            raise ConfigError(f"total_steps must be an integer >= 0 (or None), got "
                              f"{total_steps!r}")
        item = torch.empty((), dtype=self.dtype).element_size()
        N, Mq = self.n * self.p, self.m * self.p
        floats = N * N + Mq * N + self.n * self.p * (self.p + 2) + Mq
        if self.save_preconditioner and self.precondition is not None:
            floats += self.num_params
        per = item * floats + 2048
        planned = self.schedule.planned(total_steps)
        D = ({k: torch.ones_like(v) for k, v in fm.params.items()} if self._preconditioned()
             else None)
        x1, x2, kw = self._entk_args(D)
        mem = _entk_memory(fm, x1, x2, kw)
        ram = mem["total"] + (item * Mq * Mq if self.test_gram else 0)
        return {"bytes_per_snapshot": per, "planned_snapshots": planned,
                "disk_bytes": None if planned is None else per * planned,
                "ram_bytes": ram, "memory_mode_bytes": None if planned is None or self.path
                else per * planned, "entk": mem, "total_steps": total_steps}

    def _describe_estimate(self) -> str:
        e = self.estimate
        where = str(self.path) if self.path is not None else "memory"
        if e["planned_snapshots"] is None:
            total = (f"{format_bytes(e['bytes_per_snapshot'])} per snapshot, total unknown "
                     "(total_steps not given: the whole recording is not checked against the "
                     f"{'free disk' if self.path is not None else 'available RAM'}, each "
                     "snapshot is checked before it is written; pass total_steps= to check it "
                     "all before training)")
        else:
            total = (f"{e['planned_snapshots']} snapshots × {format_bytes(e['bytes_per_snapshot'])}"
                     f" = {format_bytes(e['bytes_per_snapshot'] * e['planned_snapshots'])}")
        free = ""
        if self.path is not None:
            free = f" ({format_bytes(_free_disk(self.path))} free)"
        impl = e["entk"].get("implementation")
        return (f"[tangentscope] KernelRecorder → {where}: {total}{free}; RAM ≈ "
                f"{format_bytes(e['ram_bytes'])} while a snapshot is computed"
                f"{f' ({impl})' if impl else ''} "
                f"(n={self.n}, p={self.p}, m={self.m}, {self.num_params:,} parameters, "
                f"{self.schedule.describe()})")

    def _check_fits(self) -> None:
        """Refuse (before anything is written) a recording that does not fit."""
        e = self.estimate
        budget = e["entk"]["budget"]
        if e["ram_bytes"] > budget or e["entk"].get("fits") is False:
            raise KernelTooLargeError(
                f"one snapshot needs about {format_bytes(e['ram_bytes'])} of memory for its "
                f"eNTK ({self.n + self.m} inputs × p={self.p}, {self.num_params:,} parameters), "
                f"over the memory budget of {format_bytes(budget)}: use fewer training/probe "
                "points, test_gram=False, dtype=torch.float32, or a larger "
                "entk_options={'memory_budget': ...} (TANGENTSCOPE_MEMORY_BUDGET)")
        need = e["disk_bytes"] if self.path is not None else e["memory_mode_bytes"]
        if need is None:
            return
        have = _free_disk(self.path) if self.path is not None else available_memory()
        if need > have:
            where = f"free disk at {self.path}" if self.path is not None else "available RAM"
            raise ConfigError(
                f"the recording needs about {format_bytes(need)} but only {format_bytes(have)} "
                f"of {where} is left: snapshot less often (every(k) with a larger k, or "
                "logspaced(total_steps, num)), use fewer training/probe points, dtype=float32, "
                "or another run_dir")

    def _check_room(self) -> None:
        """With an unknown total, check before each snapshot that one more fits."""
        per = self.estimate["bytes_per_snapshot"]
        have = _free_disk(self.path) if self.path is not None else available_memory()
        if per > have:
            where = f"free disk at {self.path}" if self.path is not None else "available RAM"
            raise ConfigError(
                f"snapshot {len(self._records)} at step {self._step} needs "
                f"{format_bytes(per)} but only {format_bytes(have)} of {where} is left (the "
                "snapshots so far are kept): snapshot less often, pass total_steps= so the "
                "recording is sized before training, or use another run_dir")


def _entk_memory(fm: FunctionalModel, x1: Tensor, x2: Tensor | None,
                 kw: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`estimate_memory` of the ``entk(fm, x1, x2, **kw)`` call a snapshot makes.

    It gets the same keywords (those its signature takes). Where it does not plan chunks
    itself (no ``memory_budget`` keyword), the chunk ``entk`` would choose is found the same
    way ``entk`` does: the largest of ``n, n/2, n/4, ...`` examples that fits the budget.

    Returns:
        the estimate (``total`` bytes and ``chunk_size`` at least; ``implementation``,
        ``fits`` where it reports them) with ``budget``.
    """
    params = inspect.signature(estimate_memory).parameters
    takes_any = any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params.values())
    passed = {k: v for k, v in kw.items() if takes_any or k in params}
    mb = kw.get("memory_budget")
    budget = parse_bytes(mb) if mb is not None else default_memory_budget()
    est: dict[str, Any] = dict(estimate_memory(fm, x1, x2, **passed))
    if not (takes_any or "memory_budget" in params) and kw.get("chunk_size") is None:
        c = max(x1.shape[0], x1.shape[0] if x2 is None else x2.shape[0])
        while c > 1 and est["total"] > budget:
            c //= 2
            est = dict(estimate_memory(fm, x1, x2, **{**passed, "chunk_size": c}))
    return {"budget": budget, **est}


def _adam_next(optimizer: torch.optim.Optimizer, ids: Mapping[int, str], fm: FunctionalModel,
               grad: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``D = 1/(√v̂ + ε)`` that Adam's *next* step will use, with the full-batch gradient.

    ``v̂ = (β₂ v + (1 − β₂) ∇L²)/(1 − β₂^{t+1})`` (AMSGrad: the running max); this is
    well defined at step 0, where the stored state is empty. Momentum (the update uses ``m̂``, not
    the current gradient) and decoupled weight decay are not in ``J D Jᵀ``: their effect shows up
    as identity error, which the operators docs measure.
    """
    D: dict[str, Tensor] = {}
    for grp in optimizer.param_groups:
        beta2, eps = grp["betas"][1], grp["eps"]
        for q in grp["params"]:
            if id(q) not in ids:
                continue
            name = ids[id(q)]
            st = optimizer.state.get(q, {})
            g2 = grad[name] ** 2
            v = st["exp_avg_sq"].to(g2.dtype) if "exp_avg_sq" in st else torch.zeros_like(g2)
            v_next = beta2 * v + (1 - beta2) * g2
            if grp.get("amsgrad") and "max_exp_avg_sq" in st:
                v_next = torch.maximum(v_next, st["max_exp_avg_sq"].to(g2.dtype))
            t = float(st.get("step", 0)) + 1
            D[name] = 1.0 / ((v_next / (1 - beta2 ** t)).sqrt() + eps)
    missing = set(fm.params) - set(D)
    if missing:
        raise ShapeError(f"the optimizer has no Adam state for {sorted(missing)[:3]}")
    return D


def _free_disk(path: Path) -> int:
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free
