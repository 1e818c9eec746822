"""Collect parameter checkpoints during training, and streaming probes.

:class:`CheckpointCollector` is ``KernelRecorder(..., storage="checkpoint")`` in memory (the
recorder is the one implementation): it hooks ``optimizer.step()``, keeps ``O(P + N)`` floats
per snapshot (parameters, buffers, the diagonal preconditioner ``D``, outputs) instead of an
``N × N`` kernel, and hands them to
:class:`~tangentscope.dynamics.matfree_checkpoint.CheckpointKernelPath`.

:class:`StreamingProbes` propagates a few chosen vectors ``ξ`` through the run *online*: it
keeps the last two checkpoints only and, at each snapshot, applies the interval just finished
(``P ← E P``, ``W``- and ``G``-increments), so ``ξᵀ W_S(s, t) ξ`` and ``‖G_Q(t, s) ξ‖`` are
known as training runs, with ``O(P + N · c)`` memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .matfree import Discretization, MatrixFreeOperators
from .matfree_checkpoint import CheckpointKernelPath
from .matfree_record import StoreCheckpoints
from .recorder import KernelRecorder

__all__ = ["CheckpointCollector", "StreamingProbes", "ProbeHistory"]


class CheckpointCollector:
    """An in-memory checkpoint recording under its own name: a thin entry point over
    ``KernelRecorder(..., storage="checkpoint", run_dir=None)`` (one recorder, two storages;
    :mod:`~tangentscope.dynamics.recorder`), with :meth:`checkpoints` and :meth:`path`.

    Keeps ``O(P + N)`` floats per snapshot (parameters, buffers, the preconditioner ``D``,
    ``u``, ``U_Q``) in a :class:`~tangentscope.dynamics.store.MemoryStore`. To stream to disk
    with crash/resume guarantees, use ``KernelRecorder(..., storage="checkpoint",
    run_dir=...)`` and :func:`~tangentscope.dynamics.matfree_record.checkpoint_path`.

    Args:
        model, x_train, y_train: as ``KernelRecorder`` (and every keyword it takes: ``loss``,
            ``x_test``, ``y_test``, ``optimizer``, ``schedule``, ``total_steps``,
            ``precondition``, ``loss_scale``, ``dtype``, ``attach``).
        keep_last: keep only the newest ``keep_last`` (>= 2) snapshots; ``None`` keeps all.
        on_snapshot: ``fn(collector, index)`` after each snapshot.
        memory_budget: bytes the kept states (and one product's activations) may use
            (default: half the free RAM).
        chunk_size, group: as :class:`CheckpointKernelPath`.

    Attributes:
        recorder: the :class:`KernelRecorder` doing the work.

    Raises:
        KernelTooLargeError: the planned states do not fit ``memory_budget``.
        ConfigError: ``precondition='adam'`` without an Adam-like optimizer.
    """

    def __init__(self, model: nn.Module, x_train: Tensor, y_train: Tensor, *,
                 keep_last: int | None = None,
                 on_snapshot: Callable[[CheckpointCollector, int], Any] | None = None,
                 memory_budget: int | str | None = None, chunk_size: int | None = None,
                 group: Any = None, **recorder: Any):
        opts = {k: v for k, v in (("memory_budget", memory_budget), ("chunk_size", chunk_size))
                if v is not None}
        recorder.setdefault("verbose", False)
        self.recorder = KernelRecorder(model, x_train, y_train, storage="checkpoint",
                                       keep_last=keep_last, group=group, entk_options=opts,
                                       **recorder)
        if on_snapshot is not None:       # attached now, so the first call sees the recorder
            self.recorder.on_snapshot = lambda index, step: on_snapshot(self, index)
            on_snapshot(self, 0)

    @property
    def num_snapshots(self) -> int:
        """Snapshots taken so far (including dropped ones with ``keep_last``)."""
        return self.recorder.num_snapshots

    def step(self, lr: float | None = None) -> bool:
        """Advance one optimizer step (when not attached); snapshot if due."""
        return self.recorder.step(lr)

    def snapshot(self) -> int:
        """Checkpoint the current parameters now (once per step); returns its index."""
        return self.recorder.snapshot()

    def close(self, final: bool = True) -> None:
        """Detach from the optimizer; with ``final``, snapshot the current step if not done."""
        self.recorder.close(final)

    def checkpoints(self) -> StoreCheckpoints:
        """The kept snapshots as :class:`~tangentscope.dynamics.matfree_path.Checkpoints`."""
        return StoreCheckpoints(self.recorder.store)

    def path(self, **kw: Any) -> CheckpointKernelPath:
        """A :class:`CheckpointKernelPath` over the kept snapshots (``kw``: ``chunk_size``,
        ``device``, ``compute_dtype``, ``memory_budget``)."""
        out = self.recorder.kernel_path(**kw)
        assert isinstance(out, CheckpointKernelPath)
        return out


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
