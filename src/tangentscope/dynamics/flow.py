"""Output-space gradient flow with a frozen kernel.

With the kernel frozen at ``K_SS`` (train) and ``K_QS`` (test × train), training outputs ``u``
``(n, p)`` and test outputs ``U_Q`` ``(m, p)`` obey (docs/notation.md)::

    u̇ = −K_SS g,    ġ = −B K_SS g,    U̇_Q = −K_QS g,    g = ∇_u Φ(u),  B = ∇²_u Φ(u).

- :func:`squared_loss_flow` — the closed form for squared loss in the eigenbasis
  ``K_SS = V Λ Vᵀ``: with ``Φ = ‖u − y‖²/(2n)``, ``r(t) = V e^{−Λ t/n} Vᵀ r(0)`` and
  ``U_Q(t) = U_Q(0) − K_QS V φ_t(Λ) Vᵀ r(0)`` with ``φ_t(λ) = (1 − e^{−λ t/n})/λ`` (``→ t/n`` at
  λ = 0). At ``t = ∞`` (the "analytic jump") ``φ = 1/λ`` on the range of ``K_SS`` and 0 on its
  kernel — exact, because ``K_SS v = 0`` implies ``J_Sᵀ v = 0`` and so ``K_QS v = 0``. Also the
  discrete full-batch gradient-descent form (step ``η``): ``e^{−λ t/n}`` becomes ``(1 − ηλ/n)^k``.
- :func:`integrate_flow` — any output loss (cross-entropy, custom) by an adaptive
  Dormand–Prince (RK45) solve, in the kernel's dtype.

Kernels may be given as ``(n, n, p, p)`` blocks or as stacked ``(n p, n p)`` matrices.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ShapeError
from ..kernels.entk import flatten_kernel
from ..losses import OutputLoss, get_loss

__all__ = ["FlowSolution", "squared_loss_flow", "integrate_flow", "analytic_jump",
           "eigh_kernel"]


@dataclasses.dataclass(frozen=True)
class FlowSolution:
    """Outputs along a frozen-kernel flow.

    Attributes:
        t: ``(T,)`` times (continuous) or step counts (discrete GD); may contain ``inf``.
        u: ``(T, n, p)`` training outputs.
        loss: ``(T,)`` training loss ``Φ(u(t))``.
        U_Q: ``(T, m, p)`` test outputs, or ``None`` without a cross-kernel.
        modes: ``(T, n p)`` residual coefficients ``Vᵀ r(t)`` in the eigenbasis of ``K_SS``
            (squared loss only), eigenvalues descending.
        eigenvalues: ``(n p,)`` eigenvalues of ``K_SS``, descending (squared loss only).
    """

    t: Tensor
    u: Tensor
    loss: Tensor
    U_Q: Tensor | None = None
    modes: Tensor | None = None
    eigenvalues: Tensor | None = None


def _stacked(K: Tensor, name: str) -> Tensor:
    if K.dim() == 4:
        return flatten_kernel(K)
    if K.dim() != 2:
        raise ShapeError(f"{name} must be (n, n, p, p) or stacked 2-d, got {tuple(K.shape)}")
    return K


def _check(K_SS: Tensor, u0: Tensor, K_QS: Tensor | None, U_Q0: Tensor | None
           ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    K = _stacked(K_SS, "K_SS")
    u0 = u0[:, None] if u0.dim() == 1 else u0
    n, p = u0.shape
    if K.shape != (n * p, n * p):
        raise ShapeError(f"K_SS is {tuple(K.shape)} (stacked) but u0 is {(n, p)}: need "
                         f"({n * p}, {n * p})")
    if (K_QS is None) != (U_Q0 is None):
        raise ShapeError("pass both K_QS and U_Q0 (test outputs at t = 0), or neither")
    KQ = None
    if K_QS is not None and U_Q0 is not None:
        KQ = _stacked(K_QS, "K_QS")
        U_Q0 = U_Q0[:, None] if U_Q0.dim() == 1 else U_Q0
        if U_Q0.shape[1] != p or KQ.shape != (U_Q0.shape[0] * p, n * p):
            raise ShapeError(f"K_QS is {tuple(KQ.shape)} (stacked) and U_Q0 is "
                             f"{tuple(U_Q0.shape)}; need ({U_Q0.shape[0] * p}, {n * p}) and "
                             f"(m, {p})")
    return K, u0, KQ, U_Q0


def eigh_kernel(K: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of a symmetric stacked kernel, eigenvalues *descending*.

    The kernel is symmetrized first; eigenvalues below zero by rounding are kept as they are
    (callers decide what counts as zero).

    Returns:
        ``(λ (N,), V (N, N))`` with ``K ≈ V diag(λ) Vᵀ``.
    """
    K = _stacked(K, "K")
    lam, V = torch.linalg.eigh(0.5 * (K + K.T))
    return lam.flip(0), V.flip(1)


def _rank_tol(lam: Tensor) -> float:
    return float(lam.abs().max()) * lam.shape[0] * torch.finfo(lam.dtype).eps


def squared_loss_flow(K_SS: Tensor, u0: Tensor, y: Tensor, *, t: Sequence[float] | Tensor | None
                      = None, steps: Sequence[int] | Tensor | None = None, lr: float | None = None,
                      K_QS: Tensor | None = None, U_Q0: Tensor | None = None,
                      reduction: str = "mean") -> FlowSolution:
    """Closed-form frozen-kernel dynamics under squared loss.

    Give either continuous times ``t`` (gradient flow; ``float('inf')`` allowed) or ``steps``
    with ``lr`` (full-batch gradient descent ``w ← w − lr ∇_w Φ``, exact for a model that is
    linear in its parameters).

    Args:
        K_SS: train kernel ``(n, n, p, p)`` or ``(n p, n p)``.
        u0: ``(n, p)`` (or ``(n,)``) training outputs at time 0.
        y: targets, same shape as ``u0``.
        t: times; ``Φ = ‖u − y‖²/(2n)`` so the mode of eigenvalue λ decays as ``e^{−λ t/n}``.
        steps, lr: discrete gradient-descent steps and learning rate.
        K_QS: cross-kernel ``(m, n, p, p)`` or ``(m p, n p)``; with ``U_Q0`` ``(m, p)``.
        reduction: ``"mean"`` (``Φ`` divides by n; default) or ``"sum"``.

    Returns:
        :class:`FlowSolution` (``modes`` and ``eigenvalues`` filled).
    """
    K, u0, KQ, U_Q0 = _check(K_SS, u0, K_QS, U_Q0)
    n, p = u0.shape
    y = (y[:, None] if y.dim() == 1 else y).to(u0.dtype)
    if y.shape != u0.shape:
        raise ShapeError(f"y has shape {tuple(y.shape)}, u0 has {tuple(u0.shape)}")
    scale = 1.0 / n if reduction == "mean" else 1.0
    lam, V = eigh_kernel(K.to(u0.dtype))
    lam = lam.clamp_min(0.0)
    tol = _rank_tol(lam)
    pos = lam > tol
    c0 = V.T @ (u0 - y).reshape(-1)
    if (t is None) == (steps is None):
        raise ShapeError("give exactly one of t= (gradient flow) or steps= with lr= (GD)")
    if steps is not None:
        if lr is None or lr <= 0:
            raise ShapeError("discrete steps= need a positive lr=")
        ts = torch.as_tensor(steps, dtype=u0.dtype).reshape(-1)
        if (ts < 0).any() or (ts != ts.round()).any():
            raise ShapeError("steps must be non-negative integers")
        a = lr * scale * lam  # per-step contraction 1 - a
        decay = torch.stack([(1 - a) ** k for k in ts])                  # (T, N)
        # phi = Σ_{j<k} lr·scale·(1−a)^j = (1 − (1−a)^k)/λ on λ>0, and k·lr·scale on λ=0
        lin = ts[:, None] * lr * scale
    else:
        ts = torch.as_tensor(t, dtype=u0.dtype).reshape(-1)
        if (ts < 0).any():
            raise ShapeError("times must be non-negative")
        finite = torch.isfinite(ts)
        tt = torch.where(finite, ts, torch.zeros_like(ts))
        decay = torch.exp(-tt[:, None] * scale * lam[None, :])
        decay = torch.where(finite[:, None], decay, torch.where(pos, 0.0, 1.0)[None, :]
                            .to(decay.dtype).expand_as(decay))
        lin = torch.where(finite, tt * scale, torch.zeros_like(tt))[:, None]
    modes = decay * c0[None, :]                                           # (T, N)
    r = modes @ V.T                                                       # (T, N)
    u = (r.reshape(len(ts), n, p) + y[None])
    loss = 0.5 * scale * (r ** 2).sum(1)
    U_Q = None
    if KQ is not None and U_Q0 is not None:
        safe = torch.where(pos, lam, torch.ones_like(lam))
        phi = torch.where(pos[None, :], (1 - decay) / safe[None, :], lin.expand_as(decay))
        if steps is None:
            phi = torch.where(torch.isfinite(ts)[:, None], phi, torch.where(
                pos, 1 / safe, 0.0)[None, :].to(phi.dtype).expand_as(phi))
        # U_Q(t) = U_Q0 − K_QS V diag(phi_t) Vᵀ r0 ;  K_QS V is (m p, N)
        KQV = KQ.to(u0.dtype) @ V
        U_Q = U_Q0[None] - (KQV[None] * (phi * c0[None, :])[:, None, :]).sum(-1).reshape(
            len(ts), -1, p)
    return FlowSolution(ts, u, loss, U_Q, modes, lam)


def analytic_jump(K_SS: Tensor, u0: Tensor, y: Tensor, *, K_QS: Tensor | None = None,
                  U_Q0: Tensor | None = None) -> FlowSolution:
    """``t = ∞`` of :func:`squared_loss_flow`: interpolation on the range of ``K_SS`` and test
    outputs ``U_Q0 − K_QS K_SS⁺ (u0 − y)`` (the kernel-regression / min-norm prediction)."""
    return squared_loss_flow(K_SS, u0, y, t=[math.inf], K_QS=K_QS, U_Q0=U_Q0)


# Dormand–Prince 5(4) tableau.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
      (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
      (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
      (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def integrate_flow(K_SS: Tensor, u0: Tensor, y: Tensor, t: Sequence[float] | Tensor, *,
                   loss: str | OutputLoss = "squared", K_QS: Tensor | None = None,
                   U_Q0: Tensor | None = None, rtol: float = 1e-9, atol: float = 1e-12,
                   max_steps: int = 1_000_000) -> FlowSolution:
    """Solve ``u̇ = −K_SS g(u)``, ``U̇_Q = −K_QS g(u)`` numerically for any output loss.

    Adaptive Dormand–Prince RK45 with error control on ``u``; outputs are reported at the
    requested (finite, non-decreasing) times ``t``.

    Args:
        K_SS, u0, K_QS, U_Q0: as :func:`squared_loss_flow`.
        y: targets (class indices for cross-entropy).
        t: report times, starting at or after 0.
        loss: ``'squared'``, ``'cross_entropy'`` or an OutputLoss.
        rtol, atol: local error tolerances.
    """
    K, u0, KQ, U_Q0 = _check(K_SS, u0, K_QS, U_Q0)
    lossf = get_loss(loss)
    n, p = u0.shape
    ts = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    if not torch.isfinite(ts).all() or (ts < 0).any() or (ts.diff() < 0).any():
        raise ShapeError("t must be finite, non-negative and non-decreasing "
                         "(use analytic_jump for t = ∞ under squared loss)")
    K = K.to(u0.dtype)
    KQ = KQ.to(u0.dtype) if KQ is not None else None

    def rhs(u: Tensor) -> Tensor:
        return -(K @ lossf.grad(u, y).reshape(-1)).reshape(n, p)

    def rhs_q(u: Tensor) -> Tensor:
        assert KQ is not None
        return -(KQ @ lossf.grad(u, y).reshape(-1)).reshape(-1, p)

    us, UQs = [], []
    cur_t, u = 0.0, u0.clone()
    UQ = U_Q0.clone() if U_Q0 is not None else None
    lam_max = float(torch.linalg.matrix_norm(K, ord=2))
    h = min(1.0, 0.1 / max(lam_max / n, 1e-12))
    n_steps = 0
    for target in ts.tolist():
        while cur_t < target:
            h = min(h, target - cur_t)
            k = [rhs(u)]
            kq = [rhs_q(u)] if UQ is not None else []
            for i in range(1, 7):
                ui = u + h * sum(a * kk for a, kk in zip(_A[i], k))
                k.append(rhs(ui))
                if UQ is not None:
                    kq.append(rhs_q(ui))
            u5 = u + h * sum(b * kk for b, kk in zip(_B5, k))
            u4 = u + h * sum(b * kk for b, kk in zip(_B4, k))
            scale_ = atol + rtol * torch.maximum(u.abs(), u5.abs())
            err = float(((u5 - u4) / scale_).pow(2).mean().sqrt())
            n_steps += 1
            if n_steps > max_steps:
                raise RuntimeError(f"integrate_flow: more than {max_steps} steps; loosen rtol")
            if err <= 1.0:
                if UQ is not None:
                    UQ = UQ + h * sum(b * kk for b, kk in zip(_B5, kq))
                u = u5
                cur_t += h
            h *= min(5.0, max(0.2, 0.9 * (1.0 / max(err, 1e-16)) ** 0.2))
        us.append(u.clone())
        if UQ is not None:
            UQs.append(UQ.clone())
    U = torch.stack(us)
    losses = torch.stack([lossf.value(ui, y) for ui in U])
    return FlowSolution(ts.to(u0.dtype), U, losses, torch.stack(UQs) if UQs else None)
