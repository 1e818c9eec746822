"""Checkpoint storage of a recorded run: what ``KernelRecorder(storage="checkpoint")`` writes, and
how a :class:`~tangentscope.dynamics.matfree_checkpoint.CheckpointKernelPath` reads it back.

A checkpoint recording is a :class:`~tangentscope.dynamics.store.TrajectoryStore` (the same
directory layout, files and crash/resume guarantees as a dense recording) whose records have
``kind="checkpoint"``. Per snapshot, instead of the ``N × N`` kernel, the record holds
(``docs/notation.md``):

- ``param/<name>``: the trainable parameters (``P`` floats in all), ``buffer/<name>``: the
  module buffers (BatchNorm statistics);
- ``D/<name>``: the diagonal preconditioner of ``K = J D Jᵀ`` (Adam's next-step ``1/(√v̂ + ε)``
  times the group ratio ``lr_g / lr_0``), when the run is preconditioned;
- ``u`` ``(n, p)``, ``U_Q`` ``(m, p)``, ``dts`` (the step increments since the previous record);
- scalars ``step, time, lr, loss, test_loss, wall``.

So a recording costs ``O(T · (P + N))`` floats for ``T`` snapshots instead of ``O(T · N²)``.
:func:`checkpoint_path` opens one as a kernel path for the matrix-free operators.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._utils import format_bytes
from ..errors import ConfigError, KernelTooLargeError, NonFiniteError, ShapeError
from ..kernels.functional import FunctionalModel
from ..losses import OutputLoss
from .matfree_checkpoint import CheckpointKernelPath
from .matfree_path import (
    CheckpointState,
    MemoryCheckpoints,
    capture_state,
    state_arrays,
    state_from_arrays,
)
from .store import DEFAULT_KIND, TrajectoryStore

__all__ = ["CHECKPOINT_KIND", "PATH_OPTIONS", "StoreCheckpoints", "checkpoint_path",
           "checkpoint_snapshot", "checkpoint_estimate", "check_checkpoint_fits", "storage_kind",
           "describe_estimate", "refuse_over",
           "adam_next_preconditioner", "free_disk"]

#: the record kind of a checkpoint recording in a trajectory store
CHECKPOINT_KIND = "checkpoint"
#: the ``entk_options`` a checkpoint recording takes (forwarded to ``CheckpointKernelPath``)
PATH_OPTIONS = ("chunk_size", "memory_budget")
_STATE_PREFIXES = ("param/", "buffer/", "D/")


class StoreCheckpoints:
    """The ``"checkpoint"`` records of a trajectory store as
    :class:`~tangentscope.dynamics.matfree_path.Checkpoints` (states read on demand).

    Args:
        store: the store (on disk or in memory).

    Raises:
        ConfigError: the store holds no checkpoint record (a dense recording, or none yet).
    """

    def __init__(self, store: TrajectoryStore):
        self.store = store
        self.recs = store.records(CHECKPOINT_KIND)
        if not self.recs:
            kernel = bool(store.records("kernel"))
            where = store.path if store.path is not None else "the recording"
            raise ConfigError(
                f"{where} holds no parameter checkpoints"
                + (" (it was recorded with storage='kernel': open it with "
                   "KernelTrajectory.load and DenseKernelPath)" if kernel else
                   " yet: load it once the recorder has taken one (it does at creation)"))
        self.times = np.array([r["time"] for r in self.recs], dtype=float)
        self.steps = np.array([r["step"] for r in self.recs], dtype=np.int64)
        self.dts = tuple(np.asarray(store.array(r, "dts"), dtype=float) for r in self.recs)

    def __len__(self) -> int:
        return len(self.recs)

    def state(self, index: int) -> CheckpointState:
        """Snapshot ``index``'s parameters, buffers and ``D``."""
        rec = self.recs[index]
        listed = rec.get("arrays")
        names = None if not isinstance(listed, list) else [
            k for k in listed if k.startswith(_STATE_PREFIXES)]
        arrays = self.store.arrays(rec, names)
        return state_from_arrays({k: v for k, v in arrays.items()
                                  if k.startswith(_STATE_PREFIXES)})

    def outputs(self, index: int) -> dict[str, np.ndarray]:
        """The recorded ``u`` (and ``U_Q``) of snapshot ``index``."""
        return self.store.arrays(self.recs[index], ["u", "U_Q"])


def checkpoint_path(source: str | os.PathLike | TrajectoryStore, model: nn.Module,
                    **kw: Any) -> CheckpointKernelPath:
    """A :class:`CheckpointKernelPath` over a checkpoint recording (``KernelRecorder(...,
    storage="checkpoint")``).

    Args:
        source: the recording's ``run_dir`` or its store.
        model: a module of the recorded architecture (its parameter values are not used).
        kw: forwarded to :class:`CheckpointKernelPath` (``chunk_size``, ``device``,
            ``compute_dtype``, ``memory_budget``, ``group``; with ``group`` the store's data is
            this rank's shard).

    Raises:
        ConfigError: the store holds no checkpoints, or the run is preconditioned and its
            records lack ``D``.
    """
    store = source if isinstance(source, TrajectoryStore) else TrajectoryStore.open(source)
    ck = StoreCheckpoints(store)
    if store.meta.get("preconditioned") and ck.state(0).preconditioner is None:
        raise ConfigError(f"{store.path or 'this recording'} is preconditioned (Adam or "
                          "per-group learning rates) but its checkpoints hold no D: record "
                          "again with the optimizer passed to KernelRecorder")
    d = store.data()
    kw.setdefault("dtype", getattr(torch, str(store.meta.get("dtype", "float64"))))
    return CheckpointKernelPath(model, d["x"], d["y"], ck, loss=store.meta.get("loss", "squared"),
                                x_test=d.get("x_test"), y_test=d.get("y_test"), **kw)


def checkpoint_snapshot(model: nn.Module, names: list[str], x: Tensor, y: Tensor, *,
                        loss: OutputLoss, x_test: Tensor | None, y_test: Tensor | None,
                        dtype: torch.dtype, options: Mapping[str, Any], group: Any,
                        step: int,
                        preconditioner: Callable[[Callable[[], dict[str, Tensor]]],
                                                 dict[str, Tensor] | None]
                        ) -> tuple[dict[str, np.ndarray], dict[str, float | None]]:
    """One checkpoint record: the named arrays and the scalars (see the module docstring).

    Outputs and the full-batch gradient are computed through a one-state
    :class:`CheckpointKernelPath` (chunked to ``options['memory_budget']``, summed over the
    ranks of ``group``), so a snapshot costs two passes over the set and ``O(P)`` memory.

    Args:
        preconditioner: ``fn(gradient)`` → the flat-per-name ``D`` (or ``None``), where
            ``gradient()`` gives ``∇_w Φ_S = J_Sᵀ g`` on demand.

    Raises:
        NonFiniteError: the outputs are not finite (training diverged).
    """
    cap = capture_state(model, names, dtype=dtype)
    st = CheckpointState(cap["params"], cap["buffers"], None)
    ck = MemoryCheckpoints((st,), np.zeros(1), np.zeros(1, dtype=np.int64), (np.zeros(0),))
    path = CheckpointKernelPath(model, x, y, ck, loss=loss, x_test=x_test, y_test=y_test,
                                dtype=dtype, group=group, **dict(options))
    u = path.u(0)
    if not torch.isfinite(u).all():
        raise NonFiniteError(f"the model's outputs are not finite at step {step}: training "
                             "diverged (lower the learning rate)")
    D = preconditioner(lambda: path.parameter_gradient(0))
    st = CheckpointState(st.params, st.buffers, D)
    arrays = {**state_arrays(st), "u": u.detach().cpu().numpy()}
    uq = path.U_Q(0)
    if uq is not None:
        arrays["U_Q"] = uq.detach().cpu().numpy()
    test_loss = path.test_loss(0) if y_test is not None else None
    return arrays, {"loss": path.loss(0), "test_loss": test_loss, "test_gram_norm": None}


def checkpoint_estimate(model: nn.Module, names: list[str], *, n: int, p: int, m: int,
                        dtype: torch.dtype, preconditioned: bool, planned: int | None,
                        in_memory: bool, budget: int, total_steps: int | None
                        ) -> dict[str, Any]:
    """The size of a checkpoint recording: ``O(P + N)`` floats per snapshot.

    Returns the keys of the dense recorder's estimate (``bytes_per_snapshot``,
    ``planned_snapshots``, ``disk_bytes``, ``ram_bytes``, ``memory_mode_bytes``, ``entk``,
    ``total_steps``); ``ram_bytes`` is what computing one snapshot holds besides the chunked
    activations (parameters, gradient, ``D``, outputs).
    """
    item = torch.empty((), dtype=dtype).element_size()
    named = dict(model.named_parameters())
    P = sum(named[k].numel() for k in names)
    bufs = sum(b.numel() * b.element_size() for b in model.buffers())
    per = item * (P * (2 if preconditioned else 1) + (n + m) * p) + bufs + 4096
    ram = item * (4 * P + 3 * (n + m) * p) + bufs
    total = None if planned is None else per * planned
    return {"bytes_per_snapshot": per, "planned_snapshots": planned,
            "disk_bytes": None if in_memory else total, "ram_bytes": ram,
            "memory_mode_bytes": total if in_memory else None,
            "entk": {"budget": budget, "total": ram, "implementation": "checkpoints: VJP/JVP",
                     "fits": ram <= budget}, "total_steps": total_steps, "num_params": P}


def check_checkpoint_fits(estimate: Mapping[str, Any], path: Path | None,
                          keep_last: int | None, free: int) -> None:
    """Refuse a checkpoint recording that does not fit, before anything is written.

    Args:
        estimate: :func:`checkpoint_estimate`'s result.
        path: the run directory (``None``: in memory, checked against the memory budget).
        keep_last: an in-memory recording keeps only this many snapshots.
        free: the free disk at ``path`` (or the available RAM).

    Raises:
        KernelTooLargeError: in memory, the kept snapshots exceed the memory budget.
        ConfigError: on disk, the planned snapshots exceed the free disk.
    """
    per, planned = estimate["bytes_per_snapshot"], estimate["planned_snapshots"]
    if path is None:
        count = keep_last if keep_last is not None else planned
        budget = min(int(estimate["entk"]["budget"]), free)
        if count is not None and per * count > budget:
            raise KernelTooLargeError(
                f"{count} checkpoints × {format_bytes(per)} = {format_bytes(per * count)} do "
                f"not fit the memory budget {format_bytes(budget)}: snapshot less often "
                "(every(k) with a larger k), pass keep_last=, a run_dir= (stream to disk), "
                "dtype=torch.float32, or raise entk_options={'memory_budget': ...}")
        return
    if planned is not None:
        refuse_over(per * planned, free, path)


def refuse_over(need: int, have: int, path: Path | None, what: str | None = None) -> None:
    """Refuse a recording (or, with ``what``, one more snapshot of it) that needs more than
    the ``have`` bytes of free disk at ``path`` (available RAM when ``None``).

    Raises:
        ConfigError: ``need > have``, naming what to change.
    """
    if need <= have:
        return
    where = f"free disk at {path}" if path is not None else "available RAM"
    if what is None:
        raise ConfigError(
            f"the recording needs about {format_bytes(need)} but only {format_bytes(have)} "
            f"of {where} is left: snapshot less often (every(k) with a larger k, or "
            "logspaced(total_steps, num)), use fewer training/probe points, dtype=float32, "
            "or another run_dir")
    raise ConfigError(
        f"{what} needs {format_bytes(need)} but only {format_bytes(have)} of {where} is left "
        "(the snapshots so far are kept): snapshot less often, pass total_steps= so the "
        "recording is sized before training, or use another run_dir")


def describe_estimate(e: Mapping[str, Any], path: Path | None, free: int | None, storage: str,
                      sizes: str) -> str:
    """The recorder's one-line size estimate (printed before training).

    Args:
        e: the estimate (:func:`checkpoint_estimate`'s keys).
        path: the run directory (``None``: memory); free: its free bytes.
        storage: ``"kernel"`` or ``"checkpoint"``; sizes: ``n, p, m, ...`` as text.
    """
    where = str(path) if path is not None else "memory"
    if e["planned_snapshots"] is None:
        total = (f"{format_bytes(e['bytes_per_snapshot'])} per snapshot, total unknown "
                 "(total_steps not given: the whole recording is not checked against the "
                 f"{'free disk' if path is not None else 'available RAM'}, each "
                 "snapshot is checked before it is written; pass total_steps= to check it "
                 "all before training)")
    else:
        total = (f"{e['planned_snapshots']} snapshots × {format_bytes(e['bytes_per_snapshot'])}"
                 f" = {format_bytes(e['bytes_per_snapshot'] * e['planned_snapshots'])}")
    room = "" if free is None else f" ({format_bytes(free)} free)"
    impl = e["entk"].get("implementation")
    kind = "" if storage == "kernel" else f" ({storage} storage)"
    return (f"[tangentscope] KernelRecorder{kind} → {where}: {total}{room}; "
            f"RAM ≈ {format_bytes(e['ram_bytes'])} while a snapshot is computed"
            f"{f' ({impl})' if impl else ''} ({sizes})")


def storage_kind(storage: str, keep_last: int | None, run_dir: Any, group: Any,
                 options: Mapping[str, Any] | None) -> str:
    """The record kind of ``storage`` (``"kernel"`` or ``"checkpoint"``, the recorder's
    arguments); refuses options that do not go with it, before anything is computed.

    Raises:
        ConfigError: an unknown storage, or keep_last/group/entk_options that do not apply.
    """
    if storage not in ("kernel", "checkpoint"):
        raise ConfigError(f"storage must be 'kernel' (dense K_SS per snapshot) or "
                          f"'checkpoint' (parameters, O(P + N)), got {storage!r}")
    if storage == "kernel":
        if keep_last is not None or group is not None:
            raise ConfigError("keep_last= and group= need storage='checkpoint'")
        return DEFAULT_KIND
    if keep_last is not None and (run_dir is not None or keep_last < 2):
        raise ConfigError(f"keep_last={keep_last!r} needs run_dir=None (an in-memory "
                          "recording) and keep_last >= 2")
    bad = sorted(set(options or {}) - set(PATH_OPTIONS))
    if bad:
        raise ConfigError(f"entk_options {bad} do not apply to storage='checkpoint' (it "
                          f"takes {list(PATH_OPTIONS)})")
    return CHECKPOINT_KIND


def adam_next_preconditioner(optimizer: torch.optim.Optimizer, ids: Mapping[int, str],
                             fm: FunctionalModel, grad: Mapping[str, Tensor]
                             ) -> dict[str, Tensor]:
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


def free_disk(path: Path) -> int:
    """Free bytes on the filesystem of ``path`` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free
