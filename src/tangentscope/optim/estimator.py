"""Validation-free population-risk estimate (docs/estimator.md; symbols: docs/notation.md).

Each optimizer step moves the weights by ``Δw = F(ĝ)``, a function of the batch gradient
estimate ``ĝ`` (``p.grad``). To first order the *population* loss changes by ``∇R · Δw``.
Estimating ``∇R`` by ``ĝ`` itself is biased: ``Δw`` was built from the same batch
(self-influence). Holding each example out against the other ``b − 1`` (as the gate does) and
expanding ``F`` to first order around ``ĝ`` gives, per coordinate (docs/estimator.md):

    ΔR̂ = ĝ · Δw − Σ_k J_k ν̂_k,          J_k = ∂Δw_k/∂ĝ_k,   ν̂ = Var[ĝ] estimate.

For SGD (``J = −η``) this is ``−η Σ_k (ĝ_k² − ν̂_k)``: the leave-one-out decrease of
:func:`~tangentscope.optim.transforms.loo_decrease`. For (gated) AdamW ``J`` is the diagonal
derivative of the actual update, ``m̂/(√v̂+ε)`` with ``v̂``'s dependence, times the gate and
``−lr`` (:func:`~tangentscope.optim.transforms.adam_self_influence`).

Accumulated from the first batch's loss ``L_0`` (unbiased at initialization), the increments
give population-loss curves:

* ``first_order``: ``L_0 + Σ_t ΔR̂_t`` — the estimator as specified;
* ``measured``: ``L_0 + Σ_t [(L_B(w_{t+1}) − L_B(w_t)) − Σ_k J_k ν̂_k]`` — the batch's *measured*
  loss change (curvature included; needs the batch loss after the step, one extra forward)
  with the same self-influence correction;
* ``train_first_order``: ``L_0 + Σ_t ĝ·Δw`` — the uncorrected (training-loss) prediction, the
  baseline the correction is measured against.

What it cannot see: after the first epoch a training example's gradient at ``w_t`` is not a
held-out gradient any more (``w_t`` was fit to it in earlier steps), and only the current
step's self-influence is removed. How close the curves come to a real held-out curve is
measured, not assumed (``tangentscope run poprisk-estimate``).

Usage::

    opt = GatedAdamW(model.parameters(), lr=1e-3, gate=False, stats=PerExampleStats(model))
    est = PopulationRiskEstimator(opt)
    for x, y in loader:
        loss = loss_fn(model(x), y); loss.backward()
        est.observe(loss)                   # the batch loss before the step
        opt.step(); opt.zero_grad()
        if est.should_stop(patience=200): break
    curve = est.curve()                     # PopulationRiskCurve (numpy arrays)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from torch import Tensor

from ..errors import ConfigError, ShapeError
from ._common import StepInfo, check_number
from .adamw import GatedAdamW

__all__ = ["PopulationRiskEstimator", "PopulationRiskCurve", "predicted_change",
           "stopping_step", "curve_agreement"]


def predicted_change(grad: Tensor, delta: Tensor, noise_var: Tensor, self_influence: Tensor
                     ) -> Tensor:
    """``ΔR̂ = ĝ·Δw − Σ_k J_k ν̂_k`` for one tensor (or flattened parameters).

    Args:
        grad: ``ĝ``, the gradient the step was computed from (units: loss / parameter).
        delta: ``Δw``, the step actually applied.
        noise_var: ``ν̂ = Var[ĝ]`` estimate, same shape.
        self_influence: ``J = ∂Δw/∂ĝ`` (diagonal), same shape.

    Returns:
        Scalar predicted change of the population loss (loss units), float64.
    """
    return (grad.double() * delta.double()).sum() - (self_influence.double() *
                                                     noise_var.double()).sum()


def _scalar(x: Tensor | float, what: str = "loss") -> float:
    if isinstance(x, Tensor) and x.numel() == 1:
        return float(x.detach())
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    raise ConfigError(f"the {what} must be a scalar (a Python number or a one-element tensor: "
                      f"pass loss, the batch mean), got {type(x).__name__}"
                      f"{' of shape ' + str(tuple(x.shape)) if isinstance(x, Tensor) else ''}")


def _curve(values: Any, name: str) -> np.ndarray:
    try:
        out = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a 1-D sequence of numbers (pass a curve such as "
                          f"PopulationRiskCurve.estimate), got {type(values).__name__}") from None
    if out.ndim != 1:
        raise ShapeError(f"{name} must be a 1-D curve, got shape {out.shape}; pass one curve")
    return out


@dataclasses.dataclass(frozen=True)
class PopulationRiskCurve:
    """Population-loss estimates along a run; index ``t`` is *after* ``t`` steps.

    Attributes:
        steps: ``(T+1,)`` 0..T.
        estimate: ``(T+1,)`` the ``first_order`` estimate (loss units).
        measured: ``(T+1,)`` the curvature-including variant (NaN where a step lacked the
            after-step batch loss).
        train_first_order: ``(T+1,)`` the uncorrected first-order training-loss prediction.
        self_influence: ``(T,)`` per-step correction ``−Σ J ν̂`` (≥ 0 for a descent step).
        batch_loss: ``(T,)`` observed batch losses before each step (NaN if not observed).
        has_noise: ``(T,)`` whether the step had a noise estimate (streaming: not the first).
    """

    steps: np.ndarray
    estimate: np.ndarray
    measured: np.ndarray
    train_first_order: np.ndarray
    self_influence: np.ndarray
    batch_loss: np.ndarray
    has_noise: np.ndarray


def stopping_step(curve: np.ndarray, *, patience: int, min_delta: float = 0.0,
                  start: int = 0) -> tuple[int, int]:
    """Early stopping on a curve: stop once ``patience`` points pass without a new minimum
    lower than the best by more than ``min_delta``.

    Args:
        curve: ``(T,)`` values (lower is better), NaN entries are skipped.
        patience: points without improvement before stopping (≥ 1).
        min_delta: required improvement (same units as ``curve``).
        start: ignore indices before this one (warm-up).

    Returns:
        ``(stop_index, best_index)``: where the rule stops (``T − 1`` if it never does) and the
        best point seen by then — the checkpoint it would restore.
    """
    check_number("patience", patience, low=1, integer=True)
    check_number("min_delta", min_delta)
    check_number("start", start, integer=True)
    curve = _curve(curve, "curve")
    best_i, best = -1, np.inf
    for i in range(start, len(curve)):
        v = curve[i]
        if not np.isfinite(v):
            continue
        if v < best - min_delta or best_i < 0:
            best_i, best = i, v
        elif i - best_i >= patience:
            return i, best_i
    return len(curve) - 1, max(best_i, 0)


def curve_agreement(estimate: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation of two curves sampled at the same points (pairs with a
    non-finite value are dropped; ties ranked by order). NaN with fewer than 3 pairs or a
    constant curve."""
    e, r = _curve(estimate, "estimate"), _curve(real, "real")
    if e.shape != r.shape:
        raise ShapeError(f"curve_agreement compares curves sampled at the same points, got "
                         f"{e.shape[0]} and {r.shape[0]} points; pass curves of one length")
    ok = np.isfinite(e) & np.isfinite(r)
    e, r = e[ok], r[ok]
    if e.size < 3 or np.ptp(e) == 0 or np.ptp(r) == 0:
        return {"pearson": float("nan"), "spearman": float("nan"), "points": int(e.size)}
    rank = lambda v: np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(float)
    return {"pearson": float(np.corrcoef(e, r)[0, 1]),
            "spearman": float(np.corrcoef(rank(e), rank(r))[0, 1]), "points": int(e.size)}


class PopulationRiskEstimator:
    """Accumulates the per-step predicted population-loss change of a ``GatedAdamW`` run.

    Args:
        optimizer: a :class:`~tangentscope.optim.GatedAdamW` (``gate=False`` for plain AdamW);
            the estimator attaches as a step observer (``register_step_observer(...,
            needs_terms=True)``): while attached, steps take the reference kernel and compute
            ``Δw`` and ``J`` (about two extra parameter-sized passes).
        initial_loss: ``L_0``; default: the first :meth:`observe`'d batch loss.

    Raises:
        ConfigError: another optimizer type (the update's Jacobian must be known).
    """

    def __init__(self, optimizer: Any, *, initial_loss: float | None = None):
        if not isinstance(optimizer, GatedAdamW):
            raise ConfigError("PopulationRiskEstimator needs a GatedAdamW (use gate=False for "
                              "plain AdamW): the estimate needs the Jacobian of the actual "
                              f"update, got {type(optimizer).__name__}")
        self._l0 = None if initial_loss is None else _scalar(initial_loss, "initial_loss")
        self.optimizer = optimizer
        self._handle: Any = optimizer.register_step_observer(self._on_step, needs_terms=True)
        self._dot: list[float] = []
        self._self: list[float] = []
        self._noise: list[bool] = []
        self._before: list[float] = []
        self._after: list[float] = []
        self._pending_before: float | None = None

    def detach(self) -> None:
        """Stop receiving steps (the optimizer returns to its fast path)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def observe(self, loss: Tensor | float) -> None:
        """Record the current batch's loss at ``w_t`` (call before ``opt.step()``)."""
        self._pending_before = _scalar(loss)
        if self._l0 is None:
            self._l0 = self._pending_before

    def observe_after(self, loss: Tensor | float) -> None:
        """Record the *same* batch's loss at ``w_{t+1}`` (after ``opt.step()``; one extra
        forward) for the ``measured`` curve."""
        if not self._dot:
            raise ConfigError("observe_after() comes after opt.step(); no step recorded yet")
        self._after[-1] = _scalar(loss)

    def _on_step(self, optimizer: Any, info: StepInfo) -> None:
        """The step observer: accumulate one step's terms (skipped steps add nothing)."""
        if info.skipped or info.terms is None:
            return
        terms = info.terms
        dot = float(sum(t.grad_dot_delta for t in terms)) if terms else 0.0
        si = float(sum(t.self_influence for t in terms)) if terms else 0.0
        self._dot.append(dot)
        self._self.append(-si)
        self._noise.append(bool(terms) and all(bool(t.has_noise) for t in terms))
        self._before.append(np.nan if self._pending_before is None else self._pending_before)
        self._after.append(np.nan)
        self._pending_before = None

    @property
    def num_steps(self) -> int:
        return len(self._dot)

    def curve(self) -> PopulationRiskCurve:
        """The curves so far (see :class:`PopulationRiskCurve`)."""
        T = len(self._dot)
        l0 = 0.0 if self._l0 is None else self._l0
        dot = np.asarray(self._dot, dtype=float)
        si = np.asarray(self._self, dtype=float)
        before = np.asarray(self._before[:T], dtype=float)
        after = np.asarray(self._after[:T], dtype=float)
        zero = np.zeros(1)
        return PopulationRiskCurve(
            steps=np.arange(T + 1),
            estimate=l0 + np.concatenate([zero, np.cumsum(dot + si)]),
            measured=l0 + np.concatenate([zero, np.cumsum((after - before) + si)]),
            train_first_order=l0 + np.concatenate([zero, np.cumsum(dot)]),
            self_influence=si, batch_loss=before,
            has_noise=np.asarray(self._noise, dtype=bool))

    def should_stop(self, *, patience: int, min_delta: float = 0.0, start: int = 0) -> bool:
        """The early-stopping rule (:func:`stopping_step`) on the ``first_order`` estimate:
        True once ``patience`` steps passed without a new minimum."""
        est = self.curve().estimate
        _, best = stopping_step(est, patience=patience, min_delta=min_delta, start=start)
        return len(est) - 1 - best >= patience
