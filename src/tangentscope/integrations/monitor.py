"""The framework-free core of the training callbacks: gate telemetry, the population-risk
estimate, eNTK probes and an optional recorded trajectory (symbols: docs/notation.md).

:class:`TrainingMonitor` is what :class:`tangentscope.integrations.hf.TangentscopeCallback` and
:class:`tangentscope.integrations.lightning.TangentscopeCallback` drive; in a plain loop drive it
yourself::

    probe = Probe(x_probe, y_probe)                       # a few fixed examples
    mon = TrainingMonitor(probe, every=50, log=TensorBoardLogger("runs/tb").log)
    mon.start(model, opt, total_steps=1000)               # step 0: the reference kernel
    for step in range(1, 1001):
        loss = loss_fn(model(x), y); loss.backward()
        mon.set_step_loss(loss)                           # only for the population-risk estimate
        opt.step(); opt.zero_grad()
        mon.after_step(step)                              # logs what is due at this step
    mon.close()

What is logged (keys; a logger may add its own prefix, e.g. Hugging Face's ``train/``):

- ``gate/fraction/<group>`` — mean gate value over the group's coordinates, averaged over the
  optimizer steps since the last log (hard gate: the fraction of coordinates updated); the group
  is the param group's ``"name"`` or its index. ``gate/skipped_steps`` — steps skipped for
  non-finite gradients so far. Needs a gated optimizer
  (:class:`~tangentscope.optim.GatedAdamW`, :func:`~tangentscope.optim.gate`), read through its
  step observer; wrappers (Accelerate's ``AcceleratedOptimizer``, Lightning's
  ``LightningOptimizer``) are unwrapped by :func:`unwrap_optimizer`.
- ``poprisk/estimate``, ``poprisk/change``, ``poprisk/self_influence`` — the
  :class:`~tangentscope.optim.PopulationRiskEstimator`'s ``first_order`` population-loss
  estimate, its change since step 0, and the last step's self-influence correction.
- on the probe set, every ``every`` steps: ``entk/eig/<i>`` (the ``topk`` largest eigenvalues of
  the stacked probe eNTK ``K``, ``(n p, n p)``), ``entk/trace`` (``tr K / (n p)``),
  ``entk/effective_rank`` (``(Σλ)²/Σλ²``), ``channel/rank`` (modes with
  ``λ_j > threshold · λ_max``), ``channel/residual_fraction`` and
  ``reservoir/residual_fraction`` (the share of ``‖g‖²``, ``g = ∇_u Φ`` of the probe loss, in
  the channel and in the rest), ``entk/motion`` (``1 −`` the kernel alignment
  ``⟨K_0, K_t⟩_F/(‖K_0‖_F‖K_t‖_F)`` with the first probe), ``entk/motion_step`` (the same against
  the previous probe) and ``probe/loss``.

The probe kernel is the plain ``J Jᵀ`` of the current weights; the channel of the *integrated*
kernel ``W_S`` is an analysis of a recorded trajectory (``record_dir=``: a
:class:`~tangentscope.dynamics.KernelRecorder` on the probe set, opened with
``tangentscope app RUN_DIR`` or :meth:`~tangentscope.KernelTrajectory.load`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import eval_mode
from ..dynamics import KernelRecorder, Schedule, every, kernel_alignment, split_channels
from ..errors import ConfigError, ShapeError
from ..io import RunDir
from ..kernels import entk, entk_topk, flatten_kernel
from ..losses import OutputLoss, get_loss
from ..optim import PopulationRiskEstimator, StepInfo

__all__ = ["Probe", "ProbeModule", "TrainingMonitor", "probe_metrics", "unwrap_optimizer"]

LogFn = Callable[[dict[str, float], int], Any]
SPECTRA = ("auto", "dense", "topk")
DENSE_LIMIT = 2048  # largest n·p for which ``spectrum="auto"`` forms the probe kernel


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside trainer wrappers (``.optimizer`` of Accelerate's
    ``AcceleratedOptimizer``, ``._optimizer`` of Lightning's ``LightningOptimizer``), stopping at
    the first object with a step observer (a tangentscope optimizer) or without a wrapped one."""
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        if hasattr(optimizer, "register_step_observer"):
            return optimizer
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or not hasattr(inner, "param_groups"):
            return optimizer
        optimizer = inner
    return optimizer


@dataclasses.dataclass(frozen=True, eq=False)
class Probe:
    """A fixed set of examples the eNTK is measured on.

    Attributes:
        inputs: ``(n, ...)`` model inputs (moved to the model's device when used).
        targets: ``(n, ...)`` targets of ``loss`` (``None``: zeros, for losses that ignore them).
        loss: the output-space loss ``Φ`` whose gradient ``g = ∇_u Φ`` is split into channel
            and reservoir (``"squared"``, ``"cross_entropy"`` or an ``OutputLoss``).
        output: ``output(model, inputs) -> (n, p)`` outputs the kernel is taken of; ``None``:
            ``model(inputs)`` (a tensor whose first dimension is the batch, flattened).
    """

    inputs: Tensor
    targets: Tensor | None = None
    loss: str | OutputLoss = "squared"
    output: Callable[[nn.Module, Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, Tensor) or self.inputs.dim() == 0 or \
                self.inputs.shape[0] < 2:
            raise ShapeError("Probe.inputs must be a tensor of >= 2 examples (n, ...), got "
                             f"{getattr(self.inputs, 'shape', type(self.inputs).__name__)}")
        if self.targets is not None and (not isinstance(self.targets, Tensor)
                                         or self.targets.shape[:1] != self.inputs.shape[:1]):
            raise ShapeError("Probe.targets must be a tensor with one row per input (n, ...)")
        get_loss(self.loss)  # an unknown loss name fails here, not at the first probe


class ProbeModule(nn.Module):
    """``model`` with ``probe.output`` as its forward, so that the kernel functions and the
    recorder see a module returning ``(n, p)`` outputs (it shares ``model``'s parameters)."""

    def __init__(self, model: nn.Module, output: Callable[[nn.Module, Tensor], Tensor] | None):
        super().__init__()
        self.model = model
        self._output = output

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x) if self._output is None else self._output(self.model, x)


@contextlib.contextmanager
def _quiet_vmap() -> Iterator[None]:
    """Silence torch's "performance drop ... batching rule" notices inside the block (vmap
    falling back to a loop for an op such as CPU flash attention): nothing a user of the probe
    can act on, and pytest turns warnings into errors."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"There is a performance drop because",
                                category=UserWarning)
        yield


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def _compute_dtype(model: nn.Module, dtype: torch.dtype | None) -> torch.dtype | None:
    if dtype is not None:
        return dtype
    p = next(model.parameters(), None)
    return torch.float32 if p is not None and p.dtype in (torch.float16, torch.bfloat16) else None


def probe_metrics(module: nn.Module, probe: Probe, *, topk: int = 8, threshold: float = 1e-3,
                  spectrum: str = "auto", reference: Tensor | None = None,
                  previous: Tensor | None = None, dtype: torch.dtype | None = None,
                  entk_options: Mapping[str, Any] | None = None
                  ) -> tuple[dict[str, float], Tensor]:
    """The probe metrics of :class:`TrainingMonitor` for ``module`` (a :class:`ProbeModule`).

    Args:
        module: returns ``(n, p)`` outputs for ``probe.inputs``.
        probe: the probe set.
        topk: eigenvalues logged.
        threshold: channel modes have ``λ_j > threshold · λ_max``.
        spectrum: ``"dense"`` (form ``K`` with :func:`tangentscope.entk`), ``"topk"``
            (:func:`tangentscope.entk_topk`, matrix-free; needs forward-mode AD through the
            model) or ``"auto"`` (dense up to ``n p = 2048``).
        reference, previous: earlier results (the second return value) for the kernel motion.
        dtype: compute dtype (default the parameters'; float32 for half-precision models).
        entk_options: passed to :func:`tangentscope.entk` (``implementation``,
            ``memory_budget``, ...).

    Returns:
        ``(metrics, state)``: the metrics, and the kernel ``(N, N)`` (dense) or the top
        eigenpairs ``(N, k)`` scaled by ``√λ`` (top-k) to pass back as ``reference``/``previous``.
    """
    if spectrum not in SPECTRA:
        raise ConfigError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")
    with _quiet_vmap():
        return _probe_metrics(module, probe, topk, threshold, spectrum, reference, previous,
                              dtype, entk_options)


def _probe_metrics(module: nn.Module, probe: Probe, topk: int, threshold: float, spectrum: str,
                   reference: Tensor | None, previous: Tensor | None, dtype: torch.dtype | None,
                   entk_options: Mapping[str, Any] | None) -> tuple[dict[str, float], Tensor]:
    loss = get_loss(probe.loss)
    dev = _device(module)
    x = probe.inputs.to(dev)
    dt = _compute_dtype(module, dtype)
    with eval_mode(module):
        with torch.no_grad():
            u = module(x.to(dt) if dt is not None and x.is_floating_point() else x)
        u = u.reshape(u.shape[0], -1).double()
        y = _targets(probe.targets, u)
        g = loss.grad(u, y).reshape(-1).cpu()
        N = u.numel()
        dense = spectrum == "dense" or (spectrum == "auto" and N <= DENSE_LIMIT)
        if dense:
            K = entk(module, x, dtype=dt, **dict(entk_options or {}))
            assert isinstance(K, Tensor)
            K = flatten_kernel(K).detach().double().cpu()
            lam, V = torch.linalg.eigh(0.5 * (K + K.T))
            lam, V = lam.flip(0), V.flip(1)
            state = K
        else:
            k = min(max(topk, 1), N)
            ep = entk_topk(module, x, k, dtype=dt)
            lam, V = ep.values.detach().double().cpu(), ep.vectors.detach().double().cpu()
            state = V * lam.clamp_min(0).sqrt()
    out: dict[str, float] = {f"entk/eig/{i}": float(v) for i, v in enumerate(lam[:topk])}
    pos = lam.clamp_min(0)
    total = float(pos.sum())
    if dense:
        out["entk/trace"] = total / N
        out["entk/effective_rank"] = total ** 2 / float((pos ** 2).sum()) if total > 0 else 0.0
    top = float(lam[0]) if len(lam) else 0.0
    rank = int((lam > threshold * max(top, 0.0)).sum())
    out["channel/rank"] = float(rank)
    gg = float(g @ g)
    if gg > 0:
        if dense:
            split = split_channels(state, threshold=threshold, vectors={"g": g})
            frac = split.energies["g"].channel_fraction
        else:
            frac = float(((V[:, :rank].T @ g) ** 2).sum()) / gg
        frac = min(max(frac, 0.0), 1.0)
        out["channel/residual_fraction"] = frac
        out["reservoir/residual_fraction"] = 1.0 - frac
    if probe.targets is not None:
        out["probe/loss"] = float(loss.value(u, y))
    for name, other in (("entk/motion", reference), ("entk/motion_step", previous)):
        if other is not None and other.shape == state.shape:
            out[name] = 1.0 - (kernel_alignment(other, state) if dense
                               else _lowrank_alignment(other, state))
    return out, state


def _targets(targets: Tensor | None, u: Tensor) -> Tensor:
    """Targets shaped for the loss: zeros without targets, float ``(n, p)`` regression targets,
    integer class labels as they are."""
    if targets is None:
        return torch.zeros_like(u)
    t = targets.to(u.device)
    return t.reshape(u.shape[0], -1).to(u.dtype) if t.is_floating_point() else t


def _lowrank_alignment(A: Tensor, B: Tensor) -> float:
    """Kernel alignment of ``A Aᵀ`` and ``B Bᵀ`` (top-k factors) without forming them."""
    num = float(((A.T @ B) ** 2).sum())
    den = float(torch.linalg.norm(A.T @ A) * torch.linalg.norm(B.T @ B))
    return num / den if den > 0 else float("nan")


class TrainingMonitor:
    """Gate telemetry, the population-risk estimate, probe eNTK metrics and an optional
    recorded trajectory for any training loop (see the module docstring for the keys).

    Args:
        probe: the probe set (``None``: no eNTK metrics and no recording).
        every: probe every ``every`` optimizer steps (an ``int`` or a
            :class:`~tangentscope.dynamics.Schedule`); step 0 is always probed (the reference
            for ``entk/motion``).
        topk: eigenvalues logged per probe.
        threshold: relative channel cut (``λ_j > threshold · λ_max``).
        spectrum: ``"auto"``, ``"dense"`` or ``"topk"`` (see :func:`probe_metrics`).
        estimator: a :class:`~tangentscope.optim.PopulationRiskEstimator` attached to the
            optimizer, or ``True`` to attach one at :meth:`start` (needs a ``GatedAdamW``; while
            attached, steps take the reference kernel).
        record_dir: also record a :class:`~tangentscope.dynamics.KernelRecorder` trajectory of
            the probe set to ``record_dir/trajectory`` and every logged row to
            ``record_dir/metrics.csv`` (a run directory ``tangentscope app`` opens).
        record_every: snapshot schedule of the recording (default: ``every``).
        dtype: compute dtype of the probe kernels (default the parameters', float32 for
            half-precision models); the recording is float64 unless given.
        entk_options: passed to :func:`tangentscope.entk` (and the recorder).
        log: ``log(metrics, step)`` for every row (e.g. :meth:`TensorBoardLogger.log`,
            ``wandb.log``); the callbacks pass their trainer's loggers.

    Raises:
        ConfigError: a bad ``every``/``topk``/``threshold``/``spectrum``, or ``record_dir``
            without a probe.
    """

    def __init__(self, probe: Probe | None = None, *, every: int | Schedule = 100, topk: int = 8,
                 threshold: float = 1e-3, spectrum: str = "auto",
                 estimator: PopulationRiskEstimator | bool | None = None,
                 record_dir: str | os.PathLike | None = None,
                 record_every: int | Schedule | None = None, dtype: torch.dtype | None = None,
                 entk_options: Mapping[str, Any] | None = None, log: LogFn | None = None):
        if probe is not None and not isinstance(probe, Probe):
            raise ConfigError(f"probe must be a Probe(inputs, targets, ...), got "
                              f"{type(probe).__name__}")
        self.schedule = _schedule(every, "every")
        self.record_schedule = (self.schedule if record_every is None
                                else _schedule(record_every, "record_every"))
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ConfigError(f"topk must be an integer >= 1, got {topk!r}")
        if not (isinstance(threshold, (int, float)) and 0 <= threshold < 1):
            raise ConfigError(f"threshold is a fraction of λ_max in [0, 1), got {threshold!r}")
        if spectrum not in SPECTRA:
            raise ConfigError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")
        if record_dir is not None and probe is None:
            raise ConfigError("record_dir records the probe set's trajectory: pass probe= too")
        self.probe, self.topk, self.threshold, self.spectrum = probe, topk, threshold, spectrum
        self.estimator_option = estimator
        self.estimator: PopulationRiskEstimator | None = None
        self.record_dir = None if record_dir is None else Path(record_dir)
        self.dtype, self.entk_options, self.log_fn = dtype, dict(entk_options or {}), log
        self.optimizer: Any = None
        self.module: ProbeModule | None = None
        self.recorder: KernelRecorder | None = None
        self.run_dir: RunDir | None = None
        self.history: list[tuple[int, dict[str, float]]] = []
        self._ref: Tensor | None = None
        self._prev: Tensor | None = None
        self._handle: Any = None
        self._gate: dict[int, list[Any]] = {}
        self._names: list[str] = []
        self._observed = 0      # optimizer steps (skipped ones included) since the last telemetry
        self._est_steps = 0     # estimator steps at the last telemetry
        self._started = False

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, model: nn.Module, optimizer: Any = None, *, step: int = 0,
              total_steps: int | None = None, probe: bool = True) -> dict[str, float]:
        """Attach to ``model`` and ``optimizer`` (wrappers are unwrapped) and take the first
        probe. Returns (and logs) the step-``step`` metrics.

        Raises:
            ConfigError: ``estimator=True`` without a ``GatedAdamW``, or a ``record_dir``
                that already holds a recording.
        """
        if self._started:
            raise ConfigError("this TrainingMonitor is already started; create one per run")
        self._started = True
        self.optimizer = unwrap_optimizer(optimizer)
        self._attach_gate()
        if self.estimator_option is True:
            self.estimator = PopulationRiskEstimator(self.optimizer)
        elif isinstance(self.estimator_option, PopulationRiskEstimator):
            self.estimator = self.estimator_option
        if self.probe is not None:
            self.module = ProbeModule(model, self.probe.output)
        if self.record_dir is not None:
            self._start_recording(total_steps, step)
        return self.after_step(step, force=probe) if probe else {}

    def close(self) -> None:
        """Detach the observer and finish the recording (a last snapshot at the current step)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.recorder is not None:
            with _quiet_vmap():
                self.recorder.close()
            self.recorder = None
        if self.run_dir is not None:
            self.run_dir.set_status("complete")

    # -- per step -----------------------------------------------------------------------------
    def set_step_loss(self, loss: Tensor | float) -> None:
        """The batch loss of the step about to be taken (for the population-risk estimate; call
        before ``optimizer.step()``)."""
        if self.estimator is not None:
            self.estimator.observe(loss)

    def probe_due(self, step: int) -> bool:
        return self.probe is not None and self.schedule.due(step)

    def after_step(self, step: int, *, telemetry: bool = False, force: bool = False,
                   lr: float | None = None) -> dict[str, float]:
        """Call after optimizer step ``step``: advances the recording and computes the probe
        metrics if due (or ``force``); with ``telemetry``, adds :meth:`telemetry`. Logs the row
        (when not empty) and returns it.

        Args:
            lr: the learning rate of the step just taken, for the recording's training time
                (default: read from the optimizer, right for a loop whose LR scheduler steps
                after this call).
        """
        while self.recorder is not None and self.recorder.step_count < step:
            with _quiet_vmap():
                self.recorder.step(lr=self._lr() if lr is None else lr)
        row: dict[str, float] = {}
        if self.module is not None and self.probe is not None and (force or
                                                                   self.probe_due(step)):
            metrics, state = probe_metrics(
                self.module, self.probe, topk=self.topk, threshold=self.threshold,
                spectrum=self.spectrum, reference=self._ref, previous=self._prev,
                dtype=self.dtype, entk_options=self.entk_options)
            self._ref = state if self._ref is None else self._ref
            self._prev = state
            row.update(metrics)
        if telemetry:
            row.update(self.telemetry())
        if row:
            self.emit(row, step)
        return row

    def telemetry(self) -> dict[str, float]:
        """Gate and population-risk metrics over the steps since the last call (``{}`` when
        there is neither a gated optimizer nor an estimator)."""
        out: dict[str, float] = {}
        for i, (passed, numel) in sorted(self._gate.items()):
            if numel:
                out[f"gate/fraction/{self._names[i]}"] = float(passed) / numel
        self._gate = {}
        if self._handle is not None and self._observed:
            out["gate/skipped_steps"] = float(getattr(self.optimizer, "skipped_steps", 0))
        self._observed = 0
        est = self.estimator
        if est is not None and est.num_steps > self._est_steps:
            self._est_steps = est.num_steps
            c = est.curve()
            out["poprisk/estimate"] = float(c.estimate[-1])
            out["poprisk/change"] = float(c.estimate[-1] - c.estimate[0])
            out["poprisk/self_influence"] = float(c.self_influence[-1])
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def current_lr(self) -> float | None:
        """The first param group's learning rate (``None`` without an optimizer)."""
        return self._lr()

    def emit(self, row: Mapping[str, float], step: int) -> None:
        """Log ``row`` at ``step`` (history, ``record_dir/metrics.csv``, the ``log`` function)."""
        row = dict(row)
        self.history.append((step, row))
        if self.run_dir is not None:
            self.run_dir.log(step=step, **row)
        if self.log_fn is not None:
            self.log_fn(row, step)

    # -- internals ----------------------------------------------------------------------------
    def _attach_gate(self) -> None:
        opt = self.optimizer
        if opt is None or not hasattr(opt, "register_step_observer"):
            return
        self._names = [str(g.get("name", i)) for i, g in enumerate(opt.param_groups)]
        self._handle = opt.register_step_observer(self._on_step)

    def _on_step(self, optimizer: Any, info: StepInfo) -> None:
        self._observed += 1
        if info.skipped:
            return
        while len(self._names) < len(info.groups):  # a group added during training
            self._names.append(str(len(self._names)))
        for g in info.groups:
            if g.passed is None:
                continue
            acc = self._gate.setdefault(g.index, [0.0, 0])
            acc[0] = acc[0] + g.passed.detach()  # stays on the device: one sync per log
            acc[1] += g.numel

    def _lr(self) -> float | None:
        if self.optimizer is None or not getattr(self.optimizer, "param_groups", None):
            return None
        return float(self.optimizer.param_groups[0]["lr"])

    def _start_recording(self, total_steps: int | None, step: int) -> None:
        assert self.record_dir is not None and self.module is not None and self.probe is not None
        tdir = self.record_dir / "trajectory"
        if (tdir / "trajectory.json").exists():
            raise ConfigError(f"{tdir} already holds a recorded trajectory; choose a new "
                              "record_dir for this run")
        x = self.probe.inputs.to(_device(self.module))
        y = self.probe.targets if self.probe.targets is not None else torch.zeros(x.shape[0], 1)
        opt = self.optimizer if hasattr(self.optimizer, "param_groups") else None
        if opt is None:
            raise ConfigError("record_dir needs the optimizer (its learning rate sets the "
                              "recorded training time): pass it to start()")
        with _quiet_vmap():
            self.recorder = KernelRecorder(
                self.module, x, y.to(x.device), loss=self.probe.loss, optimizer=opt,
                schedule=self.record_schedule, run_dir=tdir, total_steps=total_steps,
                dtype=self.dtype or torch.float64, attach=False, step=step, verbose=False,
                entk_options=self.entk_options)
        self.run_dir = RunDir.create(self.record_dir, None, meta={"kind": "monitor"},
                                     exist_ok=True)


def _schedule(value: int | Schedule, name: str) -> Schedule:
    if isinstance(value, Schedule):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1 (steps between probes) or a Schedule "
                          f"(tangentscope.dynamics.every/logspaced/at_steps), got {value!r}")
    return every(value)
