"""Lightning callback: tangentscope telemetry through the trainer's own loggers (extra
``lightning``; ``lightning`` is imported when the class is first used, not before)::

    from tangentscope.integrations.lightning import TangentscopeCallback

    cb = TangentscopeCallback(Probe(x_probe, y_probe), every=50)
    trainer = L.Trainer(max_steps=1000, callbacks=[cb], logger=TensorBoardLogger("tb"))
    trainer.fit(module, loader)

Rows go to every logger of the trainer (``trainer.loggers``: TensorBoard, CSV, W&B, ...) with
``log_metrics(metrics, step=trainer.global_step)``, on the global-zero process only. The keys
are those of :class:`~tangentscope.integrations.monitor.TrainingMonitor`; the optimizer is the
trainer's first (``trainer.optimizers[0]``, a tangentscope optimizer for gate telemetry).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..dynamics import Schedule
from ..errors import ConfigError
from ..optim import PopulationRiskEstimator
from .monitor import Probe, TrainingMonitor

__all__ = ["callback_class"]

_CLASS: type | None = None


def callback_class() -> type:
    """The ``lightning.pytorch.Callback`` subclass (built on first use; imports lightning)."""
    global _CLASS
    if _CLASS is None:
        from lightning.pytorch import Callback

        _CLASS = type("TangentscopeCallback", (_Callback, Callback),
                      {"__module__": __name__, "__doc__": _Callback.__doc__})
    return _CLASS


def __getattr__(name: str) -> Any:
    if name == "TangentscopeCallback":
        return callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Callback:
    """A ``lightning.pytorch.Callback`` logging gate telemetry, the population-risk estimate and
    probe eNTK metrics to the trainer's loggers (keys: see
    :class:`~tangentscope.integrations.monitor.TrainingMonitor`).

    Args:
        probe: the probe set (inputs go through the ``LightningModule``'s ``forward``, or
            ``probe.output``); ``None``: gate and population-risk telemetry only.
        every: probe every ``every`` optimizer steps (or a
            :class:`~tangentscope.dynamics.Schedule`); step 0 is always probed.
        log_every: telemetry every ``log_every`` optimizer steps (default the trainer's
            ``log_every_n_steps``).
        topk, threshold, spectrum, dtype, entk_options: of the probe metrics.
        estimator: a :class:`~tangentscope.optim.PopulationRiskEstimator` already attached to
            the optimizer, or ``True`` to attach one (needs a ``GatedAdamW``); the batch loss
            is the loss Lightning backpropagates (summed over accumulated batches).
        record_dir, record_every: record the probe set's trajectory and every logged row to
            this run directory (``tangentscope app RUN_DIR`` opens it).
    """

    def __init__(self, probe: Probe | None = None, *, every: int | Schedule = 100,
                 log_every: int | None = None, topk: int = 8, threshold: float = 1e-3,
                 spectrum: str = "auto", estimator: PopulationRiskEstimator | bool | None = None,
                 record_dir: str | os.PathLike | None = None,
                 record_every: int | Schedule | None = None, dtype: torch.dtype | None = None,
                 entk_options: Mapping[str, Any] | None = None):
        if log_every is not None and (isinstance(log_every, bool) or not isinstance(log_every, int)
                                      or log_every < 1):
            raise ConfigError(f"log_every must be an integer >= 1 or None, got {log_every!r}")
        self.log_every = log_every
        self.monitor = TrainingMonitor(probe, every=every, topk=topk, threshold=threshold,
                                       spectrum=spectrum, estimator=estimator,
                                       record_dir=record_dir, record_every=record_every,
                                       dtype=dtype, entk_options=entk_options, log=self._log)
        self._trainer: Any = None
        self._loss: Tensor | None = None
        self._lr: float | None = None
        self._last_step = -1
        self._active = False

    # -- hooks --------------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._trainer = trainer
        self._active = bool(trainer.is_global_zero)
        if not self._active:
            return
        opts = trainer.optimizers
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if total is None:
            est = trainer.estimated_stepping_batches
            total = int(est) if est != float("inf") else None
        self._last_step = int(trainer.global_step)
        self.monitor.start(pl_module, opts[0] if opts else None, step=self._last_step,
                           total_steps=total)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        if self._active and self.monitor.estimator is not None:
            loss = loss.detach().float().reshape(())
            self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if not self._active:
            return
        if self._loss is not None:
            self.monitor.set_step_loss(self._loss)
        self._loss = None
        self._lr = self.monitor.current_lr()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = int(trainer.global_step)
        if not self._active or step == self._last_step:   # accumulating: no step yet
            return
        self._last_step = step
        every = self.log_every or int(getattr(trainer, "log_every_n_steps", 50) or 50)
        self.monitor.after_step(step, telemetry=step % every == 0, lr=self._lr)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._active:
            return
        rest = self.monitor.telemetry()
        if rest:
            self.monitor.emit(rest, int(trainer.global_step))
        self.monitor.close()
        for lg in trainer.loggers:
            lg.save()
        self._active = False

    # -- internals ----------------------------------------------------------------------------
    def _log(self, metrics: dict[str, float], step: int) -> None:
        for lg in self._trainer.loggers if self._trainer is not None else ():
            lg.log_metrics(dict(metrics), step=step)
