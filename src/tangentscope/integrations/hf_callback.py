"""``transformers.Trainer`` callback: tangentscope telemetry through the trainer's own loggers.

Import it as :class:`tangentscope.integrations.hf.TangentscopeCallback` (this module imports
``transformers`` when the class is first used, not before)::

    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, sched))
    trainer.add_callback(TangentscopeCallback(trainer, probe=causal_lm_probe(ids), every=50))
    trainer.train()

Rows go through ``trainer.log`` — so to every reporting integration ``report_to`` enabled
(TensorBoard, W&B, MLflow, ...) and to ``trainer.state.log_history``; Hugging Face's TensorBoard
integration prefixes the keys with ``train/`` (``train/gate/fraction/0``). The keys are those of
:class:`~tangentscope.integrations.monitor.TrainingMonitor`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..dynamics import Schedule
from ..errors import ConfigError
from ..optim import PopulationRiskEstimator
from .monitor import Probe, TrainingMonitor

__all__ = ["callback_class"]

_CLASS: type | None = None

_NO_TRAINER = ("TangentscopeCallback logs through Trainer.log, so it needs the trainer: "
               "trainer.add_callback(TangentscopeCallback(trainer, probe=...)) after building the "
               "Trainer (or cb.attach(trainer))")


def callback_class() -> type:
    """The ``TrainerCallback`` subclass (built on first use; imports ``transformers``)."""
    global _CLASS
    if _CLASS is None:
        from transformers import TrainerCallback

        _CLASS = type("TangentscopeCallback", (_Callback, TrainerCallback),
                      {"__module__": "tangentscope.integrations.hf",
                       "__doc__": _Callback.__doc__})
    return _CLASS


class _Callback:
    """A ``transformers.TrainerCallback`` logging gate telemetry, the population-risk estimate
    and probe eNTK metrics through ``Trainer.log`` (see
    :class:`~tangentscope.integrations.monitor.TrainingMonitor` for the keys).

    Args:
        trainer: the ``Trainer`` (or TRL trainer) it logs through; ``None``: call
            :meth:`attach` before training.
        probe: the probe set (e.g. :func:`~tangentscope.integrations.hf.causal_lm_probe`);
            ``None``: gate and population-risk telemetry only.
        every: probe every ``every`` optimizer steps (or a
            :class:`~tangentscope.dynamics.Schedule`); step 0 is always probed.
        log_every: telemetry every ``log_every`` steps (default: the trainer's
            ``logging_steps``; with ``logging_strategy="no"``, every probe step).
        topk, threshold, spectrum, dtype, entk_options: of the probe metrics.
        estimator: a :class:`~tangentscope.optim.PopulationRiskEstimator` already attached to
            the optimizer, or ``True`` to attach one (needs a ``GatedAdamW``). The batch loss
            it starts from is read from the model outputs' ``loss`` (HF models given
            ``labels``; trainers that compute the loss themselves, like TRL's, give only the
            estimate's change).
        record_dir, record_every: record the probe set's trajectory and every logged row to
            this run directory (``tangentscope app RUN_DIR`` opens it).

    Under distributed training only the main process probes and logs.
    """

    def __init__(self, trainer: Any = None, probe: Probe | None = None, *,
                 every: int | Schedule = 100, log_every: int | None = None, topk: int = 8,
                 threshold: float = 1e-3, spectrum: str = "auto",
                 estimator: PopulationRiskEstimator | bool | None = None,
                 record_dir: str | os.PathLike | None = None,
                 record_every: int | Schedule | None = None, dtype: torch.dtype | None = None,
                 entk_options: Mapping[str, Any] | None = None):
        if log_every is not None and (isinstance(log_every, bool) or not isinstance(log_every, int)
                                      or log_every < 1):
            raise ConfigError(f"log_every must be an integer >= 1 or None, got {log_every!r}")
        self.trainer = trainer
        self.log_every = log_every
        self.monitor = TrainingMonitor(probe, every=every, topk=topk, threshold=threshold,
                                       spectrum=spectrum, estimator=estimator,
                                       record_dir=record_dir, record_every=record_every,
                                       dtype=dtype, entk_options=entk_options, log=self._log)
        self._losses: list[Tensor] = []
        self._tap: Any = None
        self._lr: float | None = None
        self._active = False

    def attach(self, trainer: Any) -> Any:
        """Log through ``trainer`` and add this callback to it (if not there yet); returns
        ``self``."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    # -- trainer events -----------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if self.trainer is None:
            raise ConfigError(_NO_TRAINER)
        self._active = bool(state.is_world_process_zero)
        if not self._active or model is None:
            return
        self.monitor.start(model, optimizer, step=int(state.global_step),
                           total_steps=int(state.max_steps) if state.max_steps else None)
        if self.monitor.estimator is not None:
            self._tap = model.register_forward_hook(self._on_forward)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._active and self._losses:
            self.monitor.set_step_loss(torch.stack(self._losses).mean())
        self._losses = []

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._active:
            self._lr = self.monitor.current_lr()  # before the LR scheduler steps

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._active:
            return
        step = int(state.global_step)
        every = self.log_every or (int(state.logging_steps) if getattr(args, "logging_strategy",
                                                                       "steps") == "steps"
                                   and state.logging_steps else 0)
        tele = step % every == 0 if every else self.monitor.probe_due(step)
        self.monitor.after_step(step, telemetry=tele, lr=self._lr)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._active:
            return
        rest = self.monitor.telemetry()
        if rest:
            self.monitor.emit(rest, int(state.global_step))
        self.monitor.close()
        if self._tap is not None:
            self._tap.remove()
            self._tap = None
        self._active = False

    # -- internals ----------------------------------------------------------------------------
    def _on_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        loss = getattr(output, "loss", None)
        if module.training and isinstance(loss, Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach().float().reshape(()))

    def _log(self, metrics: dict[str, float], step: int) -> None:
        trainer = self.trainer
        if trainer is None:
            raise ConfigError(_NO_TRAINER)
        # Trainer.log resets control.should_log (CallbackHandler.on_log): keep the trainer's own
        # decision to log this step (its loss row) intact
        control = getattr(trainer, "control", None)
        flag = getattr(control, "should_log", None)
        trainer.log(dict(metrics))
        control = getattr(trainer, "control", None)
        if flag is not None and control is not None:
            control.should_log = flag
