"""The page's model layer: a ReLU MLP trained on noisy 1-D regression, watched through its eNTK
spectrum.

One training recipe drives both the live page (:mod:`tangentscope.app`) and the headless run
(:func:`tangentscope.app.headless.run_headless`): full-batch training of
``mlp(1, width, depth, 1)`` (float64) on :func:`tangentscope.data.noisy_1d_regression`, squared
loss ``Φ = ‖u − y‖²/(2n)``. At every spectrum update the eNTK ``K_SS`` (``n × n``, p = 1) is
computed at the current parameters and decomposed, ``K_SS = Σ_i λ_i v_i v_iᵀ`` (λ descending),
and the residual ``r = u − y`` is projected on its eigenvectors: the *residual energy per
eigenvector* is ``|⟨v_i, r⟩|²`` (they sum to ``‖r‖² = 2nΦ``).

**Signal channel vs reservoir (the page's rule).** Under the frozen-kernel flow the residual
along ``v_i`` decays as ``exp(−λ_i t/n)``. A mode is in the *signal channel* once it has been
learned by the current training time, ``λ_i · t_eff / n > 1`` (its residual decayed by more than
a factor e); the others (``λ_i ≤ λ* = n / t_eff``) form the *reservoir*. ``t_eff`` is the
gradient-flow time the run has covered, measured from how the outputs actually moved: every step
adds the least-squares fit of ``Δu ≈ −Δt · K_SS g`` (:func:`flow_time_increment`), which is
``Δt = lr`` for plain gradient descent up to O(lr²) and gives Adam-type optimizers a clock in the
same units. ``K_SS g = J (Jᵀ g)`` is one Jacobian-vector product with the parameter gradient,
so the clock is exact at every step (no stale kernel).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor
from torch.func import functional_call

from .._utils import forward_ad_section
from ..data import noisy_1d_regression
from ..dynamics import split_channels
from ..errors import ConfigError, NonFiniteError
from ..kernels import entk
from ..models import mlp
from ..optim.spec import build_optimizer, parse_optimizer

__all__ = ["DemoConfig", "ControlError", "LIMITS", "validate_config", "available_optimizers",
           "DemoTrainer", "Snapshot", "channel_threshold", "reservoir_share",
           "flow_time_increment", "numerical_zero"]

DTYPE = torch.float64
DIVERGED = 1e8  # a loss this many times its initial value counts as diverged


# -- configuration and validation ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The demo's training recipe (the page's controls and the headless run).

    Attributes:
        n: training points, uniform on ``[-1, 1]``.
        noise: standard deviation of the Gaussian label noise.
        width: hidden width of the ReLU MLP.
        depth: number of hidden layers.
        lr: learning rate.
        optimizer: an optimizer spec the page offers (:data:`PAGE_OPTIMIZERS`): ``"adamw"``,
            ``"gated-streaming"`` (gated AdamW, streaming statistics) or ``"sgd"`` (full-batch
            gradient descent, no momentum); any spelling that
            :func:`~tangentscope.optim.spec.parse_optimizer` reads as one of them is accepted and
            stored canonically.
        seed: seeds the data and the initialization.
        max_steps: training stops (state ``done``) after this many steps.
        steps_per_update: training steps between two spectrum updates.
        weight_decay: decoupled weight decay of (gated) AdamW; ignored by SGD.
        n_test: evenly spaced clean test points on ``[-1, 1]``.
    """

    n: int = 64
    noise: float = 0.3
    width: int = 256
    depth: int = 2
    lr: float = 3e-3
    optimizer: str = "adamw"
    seed: int = 0
    max_steps: int = 3000
    steps_per_update: int = 10
    weight_decay: float = 0.0
    n_test: int = 256


@dataclasses.dataclass(frozen=True)
class Limit:
    """Allowed values of one control: a number range (``lo_open`` excludes ``lo``) or choices."""

    kind: str  # "int" | "float" | "choice"
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    help: str = ""

    def describe(self, choices: tuple[str, ...] = ()) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in choices)
        noun = "an integer" if self.kind == "int" else "a number"
        op = "<" if self.lo_open else "≤"
        return f"{noun} with {self.lo:g} {op} value ≤ {self.hi:g}"


LIMITS: dict[str, Limit] = {
    "n": Limit("int", 2, 512, help="training points"),
    "noise": Limit("float", 0.0, 5.0, help="label-noise standard deviation"),
    "width": Limit("int", 1, 2048, help="hidden width"),
    "depth": Limit("int", 1, 6, help="hidden layers"),
    "lr": Limit("float", 0.0, 10.0, lo_open=True, help="learning rate"),
    "optimizer": Limit("choice", help="optimizer"),
    "seed": Limit("int", 0, 2**31 - 1, help="data and initialization seed"),
    "max_steps": Limit("int", 1, 1_000_000, help="training steps"),
    "steps_per_update": Limit("int", 1, 1000, help="training steps per spectrum update"),
    "weight_decay": Limit("float", 0.0, 1.0, help="AdamW weight decay"),
    "n_test": Limit("int", 2, 4096, help="test points"),
}


class ControlError(ConfigError):
    """A control value out of range; ``field`` and ``allowed`` say which and what is allowed."""

    def __init__(self, field: str, message: str, allowed: dict[str, Any]):
        super().__init__(message)
        self.field = field
        self.allowed = allowed


#: The optimizers the page offers: optimizer spec (:mod:`tangentscope.optim.spec`) → label.
PAGE_OPTIMIZERS: dict[str, str] = {"adamw": "AdamW", "gated-streaming": "gated AdamW",
                                   "sgd": "SGD (full-batch GD)"}


def available_optimizers() -> dict[str, str]:
    """``spec name -> label`` of the optimizers the page offers (:data:`PAGE_OPTIMIZERS`)."""
    return dict(PAGE_OPTIMIZERS)


def _page_optimizer(value: Any) -> str | None:
    """The canonical spec text of ``value`` if it names an optimizer the page offers."""
    if not isinstance(value, str):
        return None
    try:
        name = str(parse_optimizer(value))
    except ConfigError:
        return None
    return name if name in PAGE_OPTIMIZERS else None


def allowed(field: str) -> dict[str, Any]:
    """The JSON description of a control's allowed values (for error replies and the page)."""
    lim = LIMITS[field]
    if lim.kind == "choice":
        return {"type": "choice", "choices": list(available_optimizers())}
    return {"type": lim.kind, "min": lim.lo, "max": lim.hi, "min_exclusive": lim.lo_open}


def _coerce(field: str, value: Any) -> Any:
    if field not in LIMITS:
        raise ControlError(field, f"unknown control {field!r}; known controls: "
                           f"{', '.join(LIMITS)}", {"type": "unknown"})
    lim = LIMITS[field]
    if lim.kind == "choice":
        name = _page_optimizer(value)
        if name is None:
            choices = tuple(available_optimizers())
            raise ControlError(field, f"{field} must be {lim.describe(choices)}, got {value!r}",
                               allowed(field))
        return name
    bad = ControlError(field, f"{field} ({lim.help}) must be {lim.describe()}, got {value!r}",
                       allowed(field))
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad
    try:
        num = float(value)
    except ValueError:
        raise bad from None
    assert lim.lo is not None and lim.hi is not None    # a number control has both bounds
    if not math.isfinite(num) or num > lim.hi or num < lim.lo or (lim.lo_open and num == lim.lo):
        raise bad
    if lim.kind == "int":
        if num != int(num):
            raise bad
        return int(num)
    return num


def validate_config(updates: Mapping[str, Any], base: DemoConfig | None = None) -> DemoConfig:
    """``base`` (default :class:`DemoConfig`) with ``updates`` applied, every value checked.

    Accepts numbers, or strings holding numbers (form fields); rejects booleans, NaN/Inf,
    non-integers for integer fields and unknown names.

    Raises:
        ControlError: the first bad field, with a message naming it, its allowed range and how
            to fix it; nothing is applied.
    """
    if not isinstance(updates, Mapping):
        raise ControlError("", f"controls must be a JSON object of name: value, got "
                           f"{type(updates).__name__}", {"type": "object"})
    clean = {k: _coerce(str(k), v) for k, v in updates.items()}
    return dataclasses.replace(base or DemoConfig(), **clean)


# -- the math shown on the page --------------------------------------------------------------
def channel_threshold(t_eff: float, n: int) -> float:
    """``λ* = n / t_eff``: modes with ``λ > λ*`` are learned (signal channel); ``inf`` at t = 0."""
    return n / t_eff if t_eff > 0 else math.inf


def reservoir_share(eigenvalues: np.ndarray, energies: np.ndarray, threshold: float) -> float:
    """Share of ``Σ energies`` on the reservoir modes ``{i : λ_i ≤ threshold}`` (NaN if 0)."""
    total = float(np.sum(energies))
    return float(np.sum(energies[eigenvalues <= threshold])) / total if total > 0 else math.nan


def numerical_zero(eigenvalues: np.ndarray | Tensor) -> float:
    """``λ_max · N · eps(float64)``: eigenvalues below it are zero up to rounding (plots floor
    them here)."""
    lam = np.asarray(eigenvalues, dtype=float)
    return max(float(np.abs(lam).max()), 1e-300) * lam.shape[0] * float(np.finfo(np.float64).eps)


def flow_time_increment(u_before: Tensor, u_after: Tensor, Kg: Tensor) -> float:
    """Gradient-flow time ``Δt`` that best explains one step: ``argmin ‖Δu + Δt K g‖²``.

    Args:
        u_before, u_after: stacked training outputs before and after the step.
        Kg: ``K_SS g`` at ``u_before`` (``g = ∇_u Φ``), same shape.

    Returns:
        ``−⟨Δu, K g⟩ / ‖K g‖²`` (0 when ``K g = 0``); equals ``lr`` for one gradient-descent step
        on a model linear in its parameters.
    """
    kg = Kg.reshape(-1)
    den = float(kg @ kg)
    if den == 0.0:
        return 0.0
    return -float((u_after - u_before).reshape(-1) @ kg) / den


# -- the trainer (the stateful shell) ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The state shown at one spectrum update (numpy arrays, float64).

    Attributes:
        step: training steps taken.
        t_eff: gradient-flow time covered (see module docstring).
        train_loss: ``Φ_S = ‖u − y‖²/(2n)`` on the noisy training labels.
        test_loss: ``‖U_Q − y_Q‖²/(2m)`` against the clean function on ``x_test``.
        eigenvalues: ``(n,)`` eNTK eigenvalues, descending.
        energies: ``(n,)`` residual energy ``|⟨v_i, r⟩|²`` in the same order.
        noise_energies: ``(n,)`` energy of the known label noise ``|⟨v_i, ε⟩|²`` (``y = f* + ε``).
        threshold: ``λ* = n / t_eff`` (``inf`` before training).
        reservoir_fraction: share of ``‖r‖²`` on modes with ``λ_i ≤ λ*``.
        fit: ``(n_test,)`` current predictions on ``x_test``.
        spectrum_seconds: wall time of the eNTK + eigendecomposition.
    """

    step: int
    t_eff: float
    train_loss: float
    test_loss: float
    eigenvalues: np.ndarray
    energies: np.ndarray
    noise_energies: np.ndarray
    threshold: float
    reservoir_fraction: float
    fit: np.ndarray
    spectrum_seconds: float


_BUILD_LOCK = threading.Lock()


class DemoTrainer:
    """Full-batch training of the demo MLP with the eNTK spectrum on request.

    Args:
        cfg: a validated :class:`DemoConfig`.
        implementation: the :func:`tangentscope.entk` implementation (``"auto"``: fastest).
    """

    def __init__(self, cfg: DemoConfig, *, implementation: str = "auto"):
        self.cfg = cfg
        self.implementation = implementation
        self.data = noisy_1d_regression(cfg.n, cfg.noise, n_test=cfg.n_test, seed=cfg.seed,
                                        dtype=DTYPE)
        with _BUILD_LOCK, torch.random.fork_rng():  # reproducible init even with many sessions
            torch.manual_seed(cfg.seed)
            self.model = mlp(1, cfg.width, cfg.depth, 1).to(DTYPE)
        self.optimizer = _build_optimizer(cfg, self.model)
        self.step = 0
        self.t_eff = 0.0
        self._last: tuple[Tensor, Tensor] | None = None  # (u, K g) of the previous step
        self._loss0: float | None = None

    def set_lr(self, lr: float) -> None:
        """Change the learning rate in place (the run continues)."""
        self.cfg = dataclasses.replace(self.cfg, lr=lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train(self, steps: int) -> float:
        """Take ``steps`` full-batch steps; return the last step's training loss.

        Raises:
            NonFiniteError: the loss became NaN/Inf or grew ``1e8``-fold over its initial value
                (the learning rate is too large).
        """
        x, y, n = self.data.x, self.data.y, self.cfg.n
        params = dict(self.model.named_parameters())
        loss = math.nan
        for _ in range(steps):
            u = self.model(x)
            if self._last is not None:
                self.t_eff += flow_time_increment(self._last[0], u.detach(), self._last[1])
            phi = 0.5 * ((u - y) ** 2).sum() / n
            loss = float(phi.detach())
            if self._loss0 is None:
                self._loss0 = loss
            if not math.isfinite(loss) or loss > DIVERGED * max(self._loss0, 1e-12):
                raise NonFiniteError(self.divergence_message())
            self.optimizer.zero_grad(set_to_none=True)
            phi.backward()
            # K g = J (Jᵀ g) and Jᵀ g is the parameter gradient: one forward-mode pass (forward
            # mode is process-global: serialized with every other thread's forward-mode section)
            with forward_ad_section(), torch.no_grad(), fwad.dual_level():
                dual = {k: fwad.make_dual(p.detach(), p.grad) for k, p in params.items()}
                Kg = fwad.unpack_dual(functional_call(self.model, dual, (x,))).tangent
            self._last = (u.detach(), Kg)
            self.optimizer.step()
            self.step += 1
        return loss

    def divergence_message(self) -> str:
        return (f"training diverged at step {self.step} (the loss blew up) with "
                f"lr={self.cfg.lr:g}: lower the learning rate and press reset (full-batch GD on "
                "this loss is stable only for lr < 2n/λ_max, shown with the spectrum)")

    def snapshot(self) -> Snapshot:
        """eNTK spectrum, residual energies and losses at the current parameters."""
        d, n = self.data, self.cfg.n
        with torch.no_grad():
            u = self.model(d.x)
            fit = self.model(d.x_test)
        t0 = time.perf_counter()
        K = entk(self.model, d.x, implementation=self.implementation)
        assert isinstance(K, Tensor)            # no ``groups``: one kernel
        thr = channel_threshold(self.t_eff, n)
        split = split_channels(K.reshape(n, n), threshold=thr, mode="absolute",
                               vectors={"residual": u - d.y, "noise": d.noise})
        seconds = time.perf_counter() - t0
        res, noise = split.energies["residual"], split.energies["noise"]
        return Snapshot(
            step=self.step, t_eff=self.t_eff,
            train_loss=float(0.5 * ((u - d.y) ** 2).sum() / n),
            test_loss=float(0.5 * ((fit - d.y_test) ** 2).mean()),
            eigenvalues=split.eigenvalues.numpy(), energies=res.per_mode,
            noise_energies=noise.per_mode, threshold=thr,
            reservoir_fraction=res.reservoir_fraction,
            fit=fit.reshape(-1).numpy(), spectrum_seconds=seconds)


def _build_optimizer(cfg: DemoConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``cfg.optimizer`` on ``model`` (weight decay: the AdamWs' only; SGD has none)."""
    spec = parse_optimizer(cfg.optimizer)
    wd = None if spec.rule == "sgd" else cfg.weight_decay
    return build_optimizer(spec, model, lr=cfg.lr, weight_decay=wd).optimizer
