"""The population-risk gate as small functions: the functional core of :mod:`.adamw`, whose
reference (single-tensor) step is the chain :func:`gated_adamw_step_` of these transforms.

Notation (docs/notation.md, docs/gate.md). One parameter coordinate ``k``; a gradient *estimate*
``ĝ = Σ_i c_i`` built from ``b`` i.i.d. contributions ``c_i`` (per-example or per-microbatch
gradients of the loss that was back-propagated, so ``ĝ`` is ``p.grad``):

* ``S1 = Σ_i c_i`` and ``S2 = Σ_i c_i²`` (elementwise) are what a statistics source collects;
* ``ν = Var[ĝ]`` is estimated without bias by :func:`noise_variance`
  ``ν̂ = (b·S2 − S1²)/(b − 1)`` — in the units of ``p.grad²`` whatever the loss reduction
  (mean or sum), because it is the variance *of the estimate the optimizer steps with*;
* for a mean-reduced loss ``ĝ = μ`` (the batch mean of per-example gradients) and
  ``ν̂ = s²/b`` with ``s²`` the *unbiased* per-example sample variance;
* the leave-one-out held-out decrease (docs/gate.md, eq. LOO) is
  :func:`loo_decrease` ``A = S1² − ν̂ = b(S1² − S2)/(b − 1) = (1/(b(b−1)))·Σ_{i≠j} g_i g_j``
  (``g_i = b c_i``): each example held out against the mean of the other ``b − 1``.

The gate on coordinate ``k`` (:func:`snr_gate`, threshold ``τ``):

* hard: ``1[ĝ² > τ ν̂]`` — ``τ = 1`` is the exact leave-one-out rule ``A > 0``, which is the
  seeds' ``μ² > σ²/(b−1)`` with ``σ²`` the biased (``1/b``) variance; the reading note's form
  (``σ²`` unbiased) is ``τ = b/(b−1)``;
* soft: ``max(0, 1 − τ ν̂/ĝ²)`` — the diagonal step scale that minimizes the expected
  first-order-plus-curvature population loss of a calibrated step (docs/gate.md, "soft gate");
  it is positive exactly where the hard gate is 1.

Streaming (no per-example information, only one ``ĝ_t`` per step): the EMA of squared
deviations ``d_t = ĝ_t − m̂_{t−1}`` from the bias-corrected EMA mean estimates
``E[d²] = ν · f_n`` with :func:`deviation_inflation` ``f_n = 1 + (1−β)(1+βⁿ)/((1+β)(1−βⁿ))``
(``n`` gradients in the mean; ``f_1 = 2``, ``f_∞ = 2/(1+β)``); dividing by ``f_n`` makes the
streaming ``ν̂`` an estimate of the *same* ``ν`` as the exact sources, so the same ``τ`` applies.

Everything here is elementwise on tensors of any shape; functions ending in ``_`` update
their first argument in place (optimizer state) and return it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = [
    "GateMode", "Placement", "PLACEMENTS", "noise_variance", "loo_decrease", "snr_gate",
    "gate_from_sums", "deviation_inflation", "streaming_noise_", "decay_weights_",
    "adam_moments_", "adam_denominator", "adam_apply_", "adam_direction", "adam_self_influence",
    "gated_adamw_step_", "gated_adamw_delta", "check_gate_args",
]

GateMode = Literal["hard", "soft"]
Placement = Literal["update", "grad", "moments"]
PLACEMENTS: tuple[str, ...] = ("update", "grad", "moments")


def check_gate_args(gate: bool | str, threshold: float, gate_on: str) -> GateMode | None:
    """Validate gate settings; return ``'hard'``, ``'soft'`` or ``None`` (gate off).

    Raises:
        ConfigError: unknown ``gate``/``gate_on`` or a threshold that is not a finite number
            ``≥ 0``.
    """
    if gate is True:
        mode: GateMode | None = "hard"
    elif gate is False or gate is None:
        mode = None
    elif gate in ("hard", "soft"):
        mode = gate  # type: ignore[assignment]
    else:
        raise ConfigError(f"gate must be True/False, 'hard' or 'soft', got {gate!r}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or \
            not math.isfinite(threshold) or threshold < 0:
        raise ConfigError(f"threshold must be a finite number >= 0 (1.0 = leave-one-out exact; "
                          f"b/(b-1) = the reading note's unbiased form), got {threshold!r}")
    if gate_on not in PLACEMENTS:
        raise ConfigError(f"gate_on must be one of {PLACEMENTS} (see docs/gate.md), got "
                          f"{gate_on!r}")
    return mode


# -- the statistic --------------------------------------------------------------------------------
def _check_count(count: int, who: str) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise ConfigError(f"{who} needs at least 2 contributions (an integer count; the "
                          f"variance of one sample is undefined), got {count!r}; use a batch "
                          "of >= 2")



def noise_variance(grad_sum: Tensor, grad_sq_sum: Tensor, count: int) -> Tensor:
    """Unbiased estimate of ``Var[Σ_i c_i]`` from ``b = count`` i.i.d. contributions.

    Args:
        grad_sum: ``S1 = Σ_i c_i``, any shape (units of ``p.grad``).
        grad_sq_sum: ``S2 = Σ_i c_i²``, same shape.
        count: ``b ≥ 2``.

    Returns:
        ``ν̂ = (b S2 − S1²)/(b − 1)`` clamped at 0 (rounding), same shape, units ``p.grad²``.

    Raises:
        ConfigError: ``count < 2`` (the variance of one sample is undefined).
    """
    _check_count(count, "noise_variance")
    return ((count * grad_sq_sum - grad_sum * grad_sum) / (count - 1)).clamp_(min=0)


def loo_decrease(grad_sum: Tensor, grad_sq_sum: Tensor, count: int) -> Tensor:
    """Leave-one-out held-out decrease per coordinate, ``A = S1² − ν̂ = b(S1² − S2)/(b−1)``.

    For a mean-reduced loss this is ``(1/b) Σ_i g_i · ḡ_{−i}``: the first-order decrease of
    example ``i``'s loss (per unit step ``η D_k``) from a step along the mean gradient of the
    *other* ``b − 1`` examples, averaged over ``i``. Its expectation is ``(E g)²`` exactly.
    """
    _check_count(count, "loo_decrease")
    return count * (grad_sum * grad_sum - grad_sq_sum) / (count - 1)


def snr_gate(signal: Tensor, noise_var: Tensor, threshold: float = 1.0,
             mode: GateMode = "hard") -> Tensor:
    """The per-coordinate gate from a gradient estimate and its noise variance.

    Args:
        signal: the gradient estimate ``ĝ`` (any shape).
        noise_var: ``ν̂ = Var[ĝ]`` estimate, same shape (units ``ĝ²``).
        threshold: ``τ ≥ 0``; ``1`` = leave-one-out exact; larger is stricter.
        mode: ``'hard'`` → ``1[ĝ² > τ ν̂]``; ``'soft'`` → ``max(0, 1 − τ ν̂ / ĝ²)``
            (0 where ``ĝ = 0``).

    Returns:
        Gate values in ``[0, 1]``, dtype of ``signal`` (a new tensor).
    """
    if mode == "hard":
        if threshold == 0:
            return (signal != 0).to(signal.dtype)
        # ν̂ − ĝ²/τ < 0, in one temporary
        return torch.addcmul(noise_var, signal, signal, value=-1.0 / threshold).lt_(0)
    if mode == "soft":
        ratio = torch.div(noise_var, signal * signal).mul_(-threshold).add_(1)
        return ratio.clamp_(min=0).nan_to_num_(nan=0.0)   # ĝ = 0: −∞ → 0, 0/0 → 0
    raise ConfigError(f"gate mode must be 'hard' or 'soft', got {mode!r}")


def gate_from_sums(grad_sum: Tensor, grad_sq_sum: Tensor, count: int, threshold: float = 1.0,
                   mode: GateMode = "hard") -> Tensor:
    """:func:`snr_gate` from a source's sums: ``ĝ = S1``, ``ν̂ = noise_variance(S1, S2, b)``.

    With ``threshold = 1`` the hard gate equals ``1[loo_decrease > 0]`` = ``1[S1² > S2]``.
    """
    return snr_gate(grad_sum, noise_variance(grad_sum, grad_sq_sum, count), threshold, mode)


# -- streaming ----------------------------------------------------------------------------------
def deviation_inflation(beta: float, n: int) -> float:
    """``E[(ĝ_t − m̂_{t−1})²] / ν`` for i.i.d. ``ĝ`` and an EMA mean of ``n ≥ 1`` gradients.

    ``m̂`` is the bias-corrected EMA ``(1−β) Σ_j β^j ĝ_{t−1−j} / (1 − βⁿ)``, whose variance is
    ``ν (1−β)(1+βⁿ)/((1+β)(1−βⁿ))``; the deviation adds ``ν``. (A drifting mean adds its lag²
    on top: the streaming gate is then stricter than the exact one.)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"deviation_inflation needs an integer n >= 1 gradients in the mean, "
                          f"got {n!r}; call it once the mean holds a gradient")
    if beta == 0.0:
        return 2.0
    bn = beta ** n
    return 1.0 + (1 - beta) * (1 + bn) / ((1 + beta) * (1 - bn))


def streaming_noise_(dev_sq: Tensor, grad: Tensor, mean: Tensor, mean_scale: float,
                     noise_beta: float, inflation: float) -> Tensor:
    """One EMA step of the noise state: ``s ← β s + (1−β) (ĝ − m̂)² / f``, ``m̂ = c·mean``.

    Args:
        dev_sq: the state ``s`` (updated in place).
        grad: ``ĝ_t``.
        mean: EMA of the *previous* gradients (not bias-corrected) and ``mean_scale`` its bias
            correction ``1/(1 − β_mⁿ)``, so that ``m̂_{t−1} = mean_scale · mean``.
        noise_beta: ``β`` of the noise EMA.
        inflation: :func:`deviation_inflation` of the mean's EMA.

    Returns:
        ``dev_sq``; the noise estimate is ``s / (1 − βⁿˢ)`` after ``nˢ`` updates.
    """
    d = torch.sub(grad, mean, alpha=mean_scale)
    return dev_sq.mul_(noise_beta).addcmul_(d, d, value=(1 - noise_beta) / inflation)


# -- Adam, written out ----------------------------------------------------------------------------
# The in-place transforms below, chained by :func:`gated_adamw_step_`, are the reference step of
# ``GatedAdamW`` (its single-tensor kernel runs exactly this chain); with the gate off they are
# ``torch.optim.AdamW``'s single-tensor step op for op, hence bit for bit.
def decay_weights_(param: Tensor, lr: float, weight_decay: float) -> Tensor:
    """Decoupled weight decay in place: ``w ← w (1 − lr·λ)`` (never gated)."""
    return param.mul_(1 - lr * weight_decay)


def adam_moments_(exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, beta1: float, beta2: float,
                  increment: Tensor | None = None) -> None:
    """``m ← m + γ(1−β1)(g − m)``, ``v ← v + γ(1−β2)(g² − v)`` in place (``γ = 1`` if None).

    ``increment`` is the ``moments`` placement's gate ``γ`` (0 freezes a coordinate's moments).
    """
    if increment is None:
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    else:
        exp_avg.lerp_(grad, increment * (1 - beta1))
        exp_avg_sq.lerp_(grad * grad, increment * (1 - beta2))


def adam_denominator(exp_avg_sq: Tensor, step: int, beta2: float, eps: float,
                     out: Tensor | None = None) -> Tensor:
    """``√v / √(1−β2ᵗ) + ε`` (= ``√v̂ + ε``), in ``out`` if given (a work buffer)."""
    denom = torch.sqrt(exp_avg_sq) if out is None else torch.sqrt(exp_avg_sq, out=out)
    return denom.div_((1 - beta2 ** step) ** 0.5).add_(eps)


def adam_apply_(param: Tensor, exp_avg: Tensor, denom: Tensor, step: int, lr: float,
                beta1: float, gate: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """``w ← w − lr·γ·m̂/(√v̂+ε)`` in place (``m̂ = m/(1−β1ᵗ)``; ``γ = 1`` if None; ``out``: a
    work buffer for ``γ·m``)."""
    num = exp_avg if gate is None else torch.mul(exp_avg, gate, **({} if out is None
                                                                  else {"out": out}))
    return param.addcdiv_(num, denom, value=-(lr / (1 - beta1 ** step)))


def gated_adamw_step_(param: Tensor, grad: Tensor, state: dict[str, Tensor], *, lr: float,
                      beta1: float, beta2: float, eps: float, weight_decay: float,
                      gate: Tensor | None, gate_on: Placement,
                      work: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The reference gated-AdamW step for one tensor, in place: the chain
    ``add_decayed_weights → (gate) → scale_by_adam → (gate) → scale_by_lr``.

    The gate sits at ``gate_on``:

    * ``update``: moments take the raw ``g``; the Adam direction is multiplied by the gate;
    * ``grad``: the gradient entering the moments is ``γ ⊙ g`` (gated coordinates receive a
      zero gradient: their moments decay and momentum keeps moving them);
    * ``moments``: the moment increments *and* the direction are multiplied by ``γ`` (a hard
      gate skips coordinate ``k`` entirely this step: moments frozen, no move).

    Decoupled weight decay is never gated. ``state`` holds ``exp_avg``, ``exp_avg_sq`` and the
    already-incremented ``step``; ``param`` and the moments are updated in place. ``work``:
    two parameter-shaped buffers (the denominator and ``γ·m``), else new tensors. With
    ``gate=None`` this is ``torch.optim.AdamW``'s single-tensor step, op for op.

    Returns:
        ``param``.
    """
    step = int(state["step"])
    decay_weights_(param, lr, weight_decay)
    g = grad if gate is None or gate_on != "grad" else grad * gate
    adam_moments_(state["exp_avg"], state["exp_avg_sq"], g, beta1, beta2,
                  increment=gate if (gate is not None and gate_on == "moments") else None)
    denom = adam_denominator(state["exp_avg_sq"], step, beta2, eps,
                             out=None if work is None else work[0])
    direction_gate = gate if gate is not None and gate_on in ("update", "moments") else None
    return adam_apply_(param, state["exp_avg"], denom, step, lr, beta1, gate=direction_gate,
                       out=None if work is None else work[1])


def adam_direction(exp_avg: Tensor, exp_avg_sq: Tensor, step: int, beta1: float, beta2: float,
                   eps: float) -> Tensor:
    """``m̂ / (√v̂ + ε)`` with ``m̂ = m/(1−β1ᵗ)``, ``v̂ = v/(1−β2ᵗ)`` (a new tensor)."""
    bc1 = 1 - beta1 ** step
    bc2_sqrt = math.sqrt(1 - beta2 ** step)
    return (exp_avg / bc1) / (exp_avg_sq.sqrt() / bc2_sqrt + eps)


def adam_self_influence(exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, step: int,
                        beta1: float, beta2: float, eps: float, moment_gain: Tensor | float = 1.0
                        ) -> Tensor:
    """``∂(m̂/(√v̂+ε))/∂g`` per coordinate, after the moments took ``g`` (the diagonal of the
    update's Jacobian with respect to the current gradient; it includes ``v̂``'s dependence).

    ``∂m/∂g = γ(1−β1)`` and ``∂v/∂g = 2γ(1−β2)·grad`` with ``γ = moment_gain``:

    * ``update`` placement: ``γ = 1``, ``grad = g``;
    * ``moments``: ``γ`` = the gate, ``grad = g``;
    * ``grad``: ``γ`` = the gate, ``grad = γ g`` (the gradient the moments actually took), so
      ``∂v/∂g = 2γ²(1−β2)g`` exactly.

    The gate's own dependence on ``g`` is not included (it is piecewise constant for a hard
    gate).
    """
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    root = (exp_avg_sq / bc2).sqrt()
    den = root + eps
    dm = moment_gain * (1 - beta1) / bc1
    dv = moment_gain * 2 * (1 - beta2) * grad / bc2
    safe_root = torch.where(root > 0, root, torch.ones_like(root))
    return dm / den - (exp_avg / bc1) / (den * den) * torch.where(root > 0, dv / (2 * safe_root),
                                                                  torch.zeros_like(dv))


def gated_adamw_delta(param: Tensor, grad: Tensor, state: dict[str, Tensor], *, lr: float,
                      beta1: float, beta2: float, eps: float, weight_decay: float,
                      gate: Tensor | None, gate_on: Placement) -> Tensor:
    """``Δw`` of :func:`gated_adamw_step_` without applying it (``param`` is left unchanged;
    the moments in ``state`` are updated in place, ``state['step']`` already incremented)."""
    new = gated_adamw_step_(param.detach().clone(), grad, state, lr=lr, beta1=beta1,
                            beta2=beta2, eps=eps, weight_decay=weight_decay, gate=gate,
                            gate_on=gate_on)
    return new - param.detach()
