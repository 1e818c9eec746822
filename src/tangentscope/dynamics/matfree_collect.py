"""Collect parameter checkpoints during training, and streaming probes.

:class:`CheckpointCollector` is the in-memory, checkpoint-storage counterpart of
``KernelRecorder``: it hooks ``optimizer.step()``, keeps ``O(P)`` floats per snapshot (the
trainable parameters, the buffers and the diagonal preconditioner ``D``) instead of an ``N × N``
kernel, and hands them to :class:`~tangentscope.dynamics.matfree_path.CheckpointKernelPath`.

:class:`StreamingProbes` propagates a few chosen vectors ``ξ`` through the run *online*: it
keeps the last two checkpoints only and, at each snapshot, applies the interval just finished
(``P ← E P``, ``W``- and ``G``-increments), so ``ξᵀ W_S(s, t) ξ`` and ``‖G_Q(t, s) ξ‖`` are
known as training runs, with ``O(P + N · c)`` memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._utils import default_memory_budget, format_bytes, parse_bytes
from ..errors import ConfigError, KernelTooLargeError
from ..losses import OutputLoss
from .matfree import Discretization, MatrixFreeOperators
from .matfree_checkpoint import CheckpointKernelPath
from .matfree_path import CheckpointState, MemoryCheckpoints, capture_state
from .schedule import Schedule, every

__all__ = ["CheckpointCollector", "StreamingProbes", "ProbeHistory"]


class CheckpointCollector:
    """Collect :class:`MemoryCheckpoints` during a training loop (the matrix-free counterpart of
    ``KernelRecorder``: ``O(P)`` floats per snapshot instead of ``O(N²)``).

    Hooks ``optimizer.step()`` like the recorder; training time advances by
    ``lr × loss_scale`` per step (``lr`` of the first parameter group). For Adam-like optimizers
    (``precondition='auto'``/``'adam'``) ``D = 1/(√v̂_{t+1} + ε)`` is the factor Adam's *next*
    step will use with the full-batch gradient (as the dense recorder forms it), times the
    per-group ratio ``lr_g / lr_0``.

    Args:
        model, x_train, y_train, loss, x_test, y_test, optimizer, schedule, loss_scale, dtype,
        attach: as ``KernelRecorder`` (``x_train``/``x_test`` are this rank's shards with
            ``group``).
        total_steps: planned optimizer steps, for the memory check.
        precondition: ``'auto'``, ``'adam'`` or ``None``.
        keep_last: keep only the newest ``keep_last`` snapshots (streaming probes); ``None``
            keeps all.
        on_snapshot: ``fn(collector, index)`` after each snapshot.
        memory_budget: bytes the kept states may use (default: half the free RAM).
        chunk_size, group: as :class:`CheckpointKernelPath`.

    Raises:
        KernelTooLargeError: the planned states do not fit ``memory_budget``.
        ConfigError: ``precondition='adam'`` without an Adam-like optimizer.
    """

    def __init__(self, model: nn.Module, x_train: Tensor, y_train: Tensor, *,
                 loss: str | OutputLoss = "squared", x_test: Tensor | None = None,
                 y_test: Tensor | None = None, optimizer: torch.optim.Optimizer | None = None,
                 schedule: Schedule | None = None, total_steps: int | None = None,
                 precondition: str | None = "auto", loss_scale: float = 1.0,
                 dtype: torch.dtype = torch.float64, attach: bool = True,
                 keep_last: int | None = None,
                 on_snapshot: Callable[[CheckpointCollector, int], Any] | None = None,
                 memory_budget: int | str | None = None, chunk_size: int | None = None,
                 group: Any = None):
        if not (loss_scale > 0 and math.isfinite(loss_scale)):
            raise ConfigError(f"loss_scale must be a positive number, got {loss_scale!r}")
        self.model, self.optimizer = model, optimizer
        self.loss_scale, self.dtype = loss_scale, dtype
        self.schedule = schedule if schedule is not None else every(10)
        self.keep_last, self.on_snapshot = keep_last, on_snapshot
        in_opt = None if optimizer is None else {id(q) for g in optimizer.param_groups
                                                 for q in g["params"]}
        self.names = [k for k, v in model.named_parameters() if v.requires_grad
                      and (in_opt is None or id(v) in in_opt)]
        if not self.names:
            raise ConfigError("no trainable parameters to checkpoint (pass the optimizer that "
                              "trains this model)")
        self.precondition = _resolve(precondition, optimizer)
        self.args = {"x_train": x_train, "y_train": y_train, "loss": loss, "x_test": x_test,
                     "y_test": y_test, "chunk_size": chunk_size, "dtype": dtype, "group": group}
        named = dict(model.named_parameters())
        per = sum(named[k].numel() for k in self.names) * (2 if self.precondition else 1)
        per = per * torch.empty((), dtype=dtype).element_size() + sum(
            b.numel() * b.element_size() for b in model.buffers())
        planned = self.schedule.planned(total_steps)
        count = keep_last if keep_last is not None else planned
        budget = (default_memory_budget() if memory_budget is None
                  else parse_bytes(memory_budget))
        if count is not None and per * count > budget:
            raise KernelTooLargeError(
                f"{count} checkpoints × {format_bytes(per)} = {format_bytes(per * count)} do not "
                f"fit the memory budget {format_bytes(budget)}: snapshot less often (every(k) "
                "with a larger k), pass keep_last=, use dtype=torch.float32, or raise "
                "memory_budget=")
        self._states: list[CheckpointState] = []
        self._times: list[float] = []
        self._steps: list[int] = []
        self._dts: list[np.ndarray] = []
        self._step, self._time = 0, 0.0
        self._pending: list[float] = []
        self._dropped = 0
        self._hook = None
        if optimizer is not None and attach:
            self._hook = optimizer.register_step_post_hook(self._on_optimizer_step)
        self.snapshot()

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        self._advance(float(optimizer.param_groups[0]["lr"]))

    @property
    def num_snapshots(self) -> int:
        """Snapshots taken so far (including dropped ones with ``keep_last``)."""
        return self._dropped + len(self._states)

    def step(self, lr: float | None = None) -> bool:
        """Advance one optimizer step (when not attached); snapshot if due."""
        if self._hook is not None:
            raise ConfigError("this collector advances on every optimizer.step(); do not call "
                              "step() too (or create it with attach=False)")
        if lr is None:
            if self.optimizer is None:
                raise ConfigError("step() needs lr= when the collector has no optimizer")
            lr = float(self.optimizer.param_groups[0]["lr"])
        return self._advance(float(lr))

    def _advance(self, lr: float) -> bool:
        if not (lr >= 0 and math.isfinite(lr)):
            raise ConfigError(f"learning rate must be a finite number >= 0, got {lr!r}")
        self._step += 1
        self._time += lr * self.loss_scale
        self._pending.append(lr * self.loss_scale)
        if self.schedule.due(self._step):
            self.snapshot()
            return True
        return False

    def snapshot(self) -> int:
        """Checkpoint the current parameters now (once per step); returns its index."""
        if self._steps and self._steps[-1] == self._step:
            return self.num_snapshots - 1
        cap = capture_state(self.model, self.names, dtype=self.dtype)
        st = CheckpointState(cap["params"], cap["buffers"], None)
        D = self._preconditioner(st)
        self._states.append(dataclasses.replace(st, preconditioner=D))
        self._times.append(self._time)
        self._steps.append(self._step)
        self._dts.append(np.asarray(self._pending, dtype=float))
        self._pending = []
        if self.keep_last is not None and len(self._states) > self.keep_last:
            del self._states[0], self._times[0], self._steps[0], self._dts[0]
            self._dropped += 1
        if self.on_snapshot is not None:
            self.on_snapshot(self, self.num_snapshots - 1)
        return self.num_snapshots - 1

    def close(self, final: bool = True) -> None:
        """Detach from the optimizer; with ``final``, snapshot the current step if not done."""
        if final:
            self.snapshot()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def checkpoints(self) -> MemoryCheckpoints:
        """The kept snapshots as :class:`MemoryCheckpoints`."""
        return MemoryCheckpoints(tuple(self._states), np.array(self._times),
                                 np.array(self._steps), tuple(self._dts))

    def path(self, **kw: Any) -> CheckpointKernelPath:
        """A :class:`CheckpointKernelPath` over the kept snapshots (``kw`` overrides the
        collector's ``chunk_size``, ``device``, ``memory_budget``)."""
        args = dict(self.args)
        x, y = args.pop("x_train"), args.pop("y_train")
        args.update(kw)
        return CheckpointKernelPath(self.model, x, y, self.checkpoints(), **args)

    def _preconditioner(self, st: CheckpointState) -> dict[str, Tensor] | None:
        if self.optimizer is None:
            return None
        named = dict(self.model.named_parameters())
        ids = {id(named[k]): k for k in self.names}
        lr0 = float(self.optimizer.param_groups[0]["lr"])
        D: dict[str, Tensor] = {}
        if self.precondition == "adam":
            grad = self._full_gradient(st)
            for grp in self.optimizer.param_groups:
                beta2, eps = grp["betas"][1], grp["eps"]
                for q in grp["params"]:
                    if id(q) not in ids:
                        continue
                    name = ids[id(q)]
                    state = self.optimizer.state.get(q, {})
                    g2 = grad[name] ** 2
                    v = (state["exp_avg_sq"].to(g2) if "exp_avg_sq" in state
                         else torch.zeros_like(g2))
                    v_next = beta2 * v + (1 - beta2) * g2
                    if grp.get("amsgrad") and "max_exp_avg_sq" in state:
                        v_next = torch.maximum(v_next, state["max_exp_avg_sq"].to(g2))
                    t = float(state.get("step", 0)) + 1
                    D[name] = 1.0 / ((v_next / (1 - beta2 ** t)).sqrt() + eps)
        ratios: dict[str, float] = {}
        for grp in self.optimizer.param_groups:
            r = float(grp["lr"]) / lr0 if lr0 > 0 else 1.0
            for q in grp["params"]:
                if id(q) in ids and r != 1.0:
                    ratios[ids[id(q)]] = r
        if not D and not ratios:
            return None
        return {k: D.get(k, torch.ones_like(v)) * ratios.get(k, 1.0) for k, v in st.params.items()}

    def _full_gradient(self, st: CheckpointState) -> dict[str, Tensor]:
        """``loss_scale · J_Sᵀ g`` on the whole (sharded) training set."""
        ck = MemoryCheckpoints((st,), np.zeros(1), np.zeros(1, dtype=np.int64),
                               (np.zeros(0),))
        args = dict(self.args)
        path = CheckpointKernelPath(self.model, args.pop("x_train"), args.pop("y_train"), ck,
                                    **args)
        return {k: v * self.loss_scale for k, v in path.parameter_gradient(0).items()}


def _resolve(precondition: str | None, optimizer: torch.optim.Optimizer | None) -> str | None:
    allowed = ("auto", "adam", None, "none")
    if precondition not in allowed:
        raise ConfigError(f"precondition must be one of {allowed}, got {precondition!r}")
    if precondition in (None, "none"):
        return None
    adam_like = optimizer is not None and all("betas" in g and "eps" in g
                                              for g in optimizer.param_groups)
    if precondition == "auto":
        return "adam" if adam_like else None
    if not adam_like:
        raise ConfigError("precondition='adam' needs an Adam-like optimizer (param groups with "
                          "betas and eps); pass optimizer=, or precondition=None")
    return "adam"


@dataclasses.dataclass(frozen=True)
class ProbeHistory:
    """Channel energy and test visibility of streamed probes over the run.

    Attributes:
        steps, times: ``(K,)`` end snapshots of the growing windows ``[s, t_k]``.
        energy: name → ``(K,)`` ``ξᵀ W_S(s, t_k) ξ``.
        visibility: name → ``(K,)`` ``‖G_Q(t_k, s) ξ‖`` (NaN without a test set).
        propagated: name → ``(K,)`` ``‖P_g(t_k, s) ξ‖``.
    """

    steps: np.ndarray
    times: np.ndarray
    energy: dict[str, np.ndarray]
    visibility: dict[str, np.ndarray]
    propagated: dict[str, np.ndarray]


class StreamingProbes:
    """Propagate probe vectors through a training run online (see the module docstring).

    Args:
        model, x_train, y_train: as :class:`CheckpointCollector` (and every keyword it takes:
            ``loss``, ``x_test``, ``y_test``, ``optimizer``, ``schedule``, ``precondition``,
            ``loss_scale``, ``dtype``, ``attach``, ``chunk_size``, ``group``).
        probes: name → ``(N,)`` or ``(n, p)`` vector.
        include_gradient: add the probe ``'g(s)'``, the output gradient at the first snapshot
            (its energy is the identity's predicted ``Φ(s) − Φ(t)``).
        discretization, krylov_tol: as :class:`MatrixFreeOperators`.
    """

    def __init__(self, model: nn.Module, x_train: Tensor, y_train: Tensor,
                 probes: dict[str, Tensor] | None = None, *, include_gradient: bool = False,
                 discretization: Discretization = "exp", krylov_tol: float | None = None,
                 **collector: Any):
        self.discretization, self.krylov_tol = discretization, krylov_tol
        self._raw = dict(probes or {})
        self._include_g = include_gradient
        self._X: Tensor | None = None
        self._G: Tensor | None = None
        self._Q: Tensor | None = None
        self._steps: list[int] = []
        self._times: list[float] = []
        self._hist: dict[str, list[np.ndarray]] = {"energy": [], "visibility": [],
                                                   "propagated": []}
        self.names: list[str] = []
        self.collector = CheckpointCollector(model, x_train, y_train, keep_last=2,
                                             on_snapshot=self._on_snapshot, **collector)

    def _start(self, col: CheckpointCollector) -> None:
        path = col.path()
        vecs = dict(self._raw)
        if self._include_g:
            vecs["g(s)"] = path.gradient(0)
        if not vecs:
            raise ConfigError("StreamingProbes needs probes= or include_gradient=True")
        cols = []
        for name, v in vecs.items():
            x = torch.as_tensor(v).reshape(-1).to(dtype=path.dtype, device=path.device)
            if x.shape[0] != path.N:
                raise ConfigError(f"probe {name!r} has {x.shape[0]} entries, need N = {path.N}")
            cols.append(x)
        self.names = list(vecs)
        self._X = torch.stack(cols, 1)
        c = self._X.shape[1]
        self._Q = torch.zeros(c, c, dtype=path.dtype, device=path.device)
        if path.m:
            self._G = torch.zeros(path.m * path.p, c, dtype=path.dtype, device=path.device)

    def _on_snapshot(self, col: CheckpointCollector, index: int) -> None:
        if index == 0:
            self._start(col)
            return
        assert self._X is not None and self._Q is not None
        path = col.path()
        ops = MatrixFreeOperators(path, 0, 1, discretization=self.discretization,
                                  krylov_tol=self.krylov_tol)
        step = next(ops.accumulate(self._X, transfer=self._G is not None))
        self._X, self._Q = step.PV, self._Q + step.VWV
        if self._G is not None and step.GV is not None:
            self._G = self._G + step.GV
        self._steps.append(int(path.steps[1]))
        self._times.append(float(path.times[1]))
        c = self._X.shape[1]
        self._hist["energy"].append(torch.diagonal(self._Q).cpu().numpy().copy())
        self._hist["propagated"].append(self._X.norm(dim=0).cpu().numpy())
        self._hist["visibility"].append(np.full(c, np.nan) if self._G is None
                                        else self._G.norm(dim=0).cpu().numpy())

    def close(self) -> None:
        """Take the final snapshot (if due) and detach from the optimizer."""
        self.collector.close()

    def history(self) -> ProbeHistory:
        """The probes' energies and visibilities so far."""
        def col(key: str) -> dict[str, np.ndarray]:
            rows = self._hist[key]
            return {n: np.array([r[j] for r in rows]) for j, n in enumerate(self.names)}

        return ProbeHistory(np.array(self._steps), np.array(self._times), col("energy"),
                            col("visibility"), col("propagated"))
