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
For Adam-like optimizers the kernel is the preconditioned ``J D Jᵀ`` (see
:func:`~tangentscope.dynamics.matfree_record.adam_next_preconditioner`).

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

``storage="checkpoint"`` records what applies the kernels later instead (parameters, ``D``,
``u``, ``U_Q``, ...: ``O(P + N)`` per snapshot, records of kind ``"checkpoint"``, same store and
guarantees; :mod:`~tangentscope.dynamics.matfree_record`) for the matrix-free operators.
"""

from __future__ import annotations

import inspect
import math
import os
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
from .matfree_path import DenseKernelPath, KernelPath
from .matfree_record import (
    PATH_OPTIONS,
    adam_next_preconditioner,
    check_checkpoint_fits,
    checkpoint_estimate,
    checkpoint_path,
    checkpoint_snapshot,
    describe_estimate,
    refuse_over,
    storage_kind,
)
from .matfree_record import free_disk as _free_disk
from .schedule import Schedule, at_steps, every, logspaced, manual
from .store import DEFAULT_KIND, MemoryStore, TrajectoryStore
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
            ``memory_budget``, ``chunk_size``); with ``storage="checkpoint"`` only
            ``memory_budget`` (activations and kept states) and ``chunk_size`` (examples per
            VJP/JVP chunk), forwarded to the kernel path.
        verbose: print the size estimate.
        storage: ``"kernel"`` (dense ``K_SS, K_QS`` per snapshot, ``O(N²)``) or
            ``"checkpoint"`` (parameters, ``D``, ``u``, ``U_Q``: ``O(P + N)``; ``D`` always
            kept when the run is preconditioned; ``test_gram`` and ``save_preconditioner``
            do not apply).
        keep_last: checkpoint storage in memory only: keep the newest ``keep_last`` snapshots
            (streaming); ``None`` keeps all.
        group: checkpoint storage only: a ``torch.distributed`` group (or ``True``) over whose
            ranks ``x_train``/``x_test`` are sharded (outputs gathered, gradients summed).

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
                 entk_options: Mapping[str, Any] | None = None, verbose: bool = True,
                 storage: str = "kernel", keep_last: int | None = None, group: Any = None):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"KernelRecorder records an nn.Module, got {type(model).__name__}")
        self.model, self.optimizer = model, optimizer
        self.storage, self.keep_last, self.group = storage, keep_last, group
        self._kind = storage_kind(storage, keep_last, run_dir, group, entk_options)
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
        self._dropped = 0
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
    def store(self) -> TrajectoryStore:
        """The :class:`~tangentscope.dynamics.store.TrajectoryStore` recorded into."""
        return self._store

    @property
    def num_snapshots(self) -> int:
        """Snapshots taken so far (with ``keep_last``, dropped ones included)."""
        return self._dropped + len(self._records)

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
            return self.num_snapshots - 1
        arrays, scalars = (self._compute() if self._kind == DEFAULT_KIND
                           else self._compute_checkpoint())
        arrays["dts"] = np.asarray(self._dts, dtype=np.float64)
        rec: dict[str, Any] = {"index": self.num_snapshots, "step": self._step,
                               "time": self._time, "lr": self._lr, **scalars,
                               "wall": time.time()}
        if self.estimate["planned_snapshots"] is None and self.keep_last is None:
            self._check_room()
        rec = self._store.append(rec, arrays, kind=self._kind)
        self._records.append(rec)
        self._dts = []
        if self.keep_last is not None and len(self._records) > self.keep_last:
            assert isinstance(self._store, MemoryStore)
            self._dropped += len(self._records) - self.keep_last
            self._records = self._records[-self.keep_last:]
            self._store.discard_before(self._records[0]["step"])
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
        """The snapshots so far as a :class:`KernelTrajectory` (kernel storage; checkpoint
        storage raises ConfigError: use :meth:`kernel_path`)."""
        if self._kind != DEFAULT_KIND:
            raise ConfigError("this recorder stores parameter checkpoints (storage="
                              "'checkpoint'), not kernels: use rec.kernel_path() with the "
                              "matrix-free operators, or record with storage='kernel'")
        return KernelTrajectory.from_store(self._store)

    def kernel_path(self, **kw: Any) -> KernelPath:
        """The snapshots so far as a kernel path for the matrix-free operators: a
        ``DenseKernelPath`` (kernel storage) or a ``CheckpointKernelPath`` (on this recorder's
        data and ``group``; ``kw``: ``chunk_size``, ``device``, ``compute_dtype``, ...)."""
        if self._kind == DEFAULT_KIND:
            return DenseKernelPath(self.trajectory(), **kw)
        opts = {**{k: v for k, v in self.entk_options.items() if k in PATH_OPTIONS},
                "group": self.group, "dtype": self.dtype, **kw}
        return checkpoint_path(self._store, self.model, **opts)

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
            D = self._preconditioner(fm, lambda: self._full_gradient(fm, g))
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

    def _compute_checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, float | None]]:
        with eval_mode(self.model):
            fm = self._functional()

            def pre(grad: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor] | None:
                return self._preconditioner(fm, lambda: {k: v * self.loss_scale
                                                         for k, v in grad().items()})

            return checkpoint_snapshot(
                self.model, self._names, self.x, self.y, loss=self.loss, x_test=self.xq,
                y_test=self.yq, dtype=self.dtype, group=self.group, step=self._step,
                options={k: v for k, v in self.entk_options.items() if k in PATH_OPTIONS},
                preconditioner=pre)

    def _preconditioner(self, fm: FunctionalModel, gradient: Callable[[], dict[str, Tensor]]
                        ) -> dict[str, Tensor] | None:
        """Diagonal ``D`` per parameter: the Adam factor and/or ``lr_group / lr_0``
        (``gradient()``: the full-batch ``∇_w (loss_scale Φ)``, asked for by ``'adam'``)."""
        if self.optimizer is None:
            return None
        named = dict(self.model.named_parameters())
        ids = {id(named[k]): k for k in self._names}
        lr0 = float(self.optimizer.param_groups[0]["lr"])
        D: dict[str, Tensor] = {}
        if self.precondition == "adam":
            D = adam_next_preconditioner(self.optimizer, ids, fm, gradient())
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
                "model": type(self.model).__name__, "storage": self.storage}

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
        if self.group is not None:
            raise ConfigError("resume=True with group= is not supported: resume on one process")
        store = TrajectoryStore.open(self.path)
        mine = self._meta()
        for key in ("n", "p", "m", "loss", "num_params", "storage"):
            if store.meta.get(key, "kernel" if key == "storage" else None) != mine[key]:
                raise ConfigError(f"{self.path} was recorded with {key}={store.meta.get(key)!r}, "
                                  f"this recorder has {mine[key]!r}: resume with the same model "
                                  "and data, or use a new run_dir")
        recs = store.records(self._kind)
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
        if self._kind != DEFAULT_KIND:
            mb = self.entk_options.get("memory_budget")
            return checkpoint_estimate(
                self.model, self._names, n=self.n, p=self.p, m=self.m, dtype=self.dtype,
                preconditioned=self._preconditioned(), planned=self.schedule.planned(
                    total_steps), in_memory=self.path is None, total_steps=total_steps,
                budget=parse_bytes(mb) if mb is not None else default_memory_budget())
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
        free = None if self.path is None else _free_disk(self.path)
        return describe_estimate(self.estimate, self.path, free, self.storage,
                                 f"n={self.n}, p={self.p}, m={self.m}, {self.num_params:,} "
                                 f"parameters, {self.schedule.describe()}")

    def _check_fits(self) -> None:
        """Refuse (before anything is written) a recording that does not fit."""
        e = self.estimate
        if self._kind != DEFAULT_KIND:
            free = _free_disk(self.path) if self.path is not None else available_memory()
            check_checkpoint_fits(e, self.path, self.keep_last, free)
            return
        budget = e["entk"]["budget"]
        if e["ram_bytes"] > budget or e["entk"].get("fits") is False:
            raise KernelTooLargeError(
                f"one snapshot needs about {format_bytes(e['ram_bytes'])} of memory for its "
                f"eNTK ({self.n + self.m} inputs × p={self.p}, {self.num_params:,} parameters), "
                f"over the memory budget of {format_bytes(budget)}: use fewer training/probe "
                "points, test_gram=False, dtype=torch.float32, or a larger "
                "entk_options={'memory_budget': ...} (TANGENTSCOPE_MEMORY_BUDGET)")
        need = e["disk_bytes"] if self.path is not None else e["memory_mode_bytes"]
        if need is not None:
            refuse_over(need, _free_disk(self.path) if self.path is not None
                        else available_memory(), self.path)

    def _check_room(self) -> None:
        """With an unknown total, check before each snapshot that one more fits."""
        have = _free_disk(self.path) if self.path is not None else available_memory()
        refuse_over(self.estimate["bytes_per_snapshot"], have, self.path,
                    f"snapshot {len(self._records)} at step {self._step}")


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
