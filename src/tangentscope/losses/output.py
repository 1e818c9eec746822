"""Losses in output space: ``Φ(u)``, ``g = ∇_u Φ`` and ``B = ∇²_u Φ``.

Shapes follow the kernel's: outputs ``u`` are ``(n, p)``; ``g`` is ``(n, p)``; ``B`` is block
diagonal and returned as its blocks ``(n, p, p)`` (use :func:`dense_hessian` for the stacked
``(n p, n p)`` matrix, row ``i*p + a``). ``Φ`` averages over the ``n`` examples
(``reduction="mean"``, the convention of ``docs/notation.md``) or sums them
(``reduction="sum"``).

- :class:`SquaredLoss`: ``Φ = ‖u − y‖² / (2n)``, ``g = (u − y)/n``, ``B = I/n``.
- :class:`SoftmaxCrossEntropy`: ``Φ = −(1/n) Σ_i log softmax(u_i)[y_i]``,
  ``g_i = (softmax(u_i) − e_{y_i})/n``, ``B_i = (diag(π_i) − π_i π_iᵀ)/n``.
- :class:`PerExampleLoss`: any ``ℓ(u_i, y_i)`` convex in ``u_i``; ``g``, ``B`` by autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

import torch
from torch import Tensor
from torch.func import grad, hessian, vmap

from ..errors import ShapeError

__all__ = ["OutputLoss", "SquaredLoss", "SoftmaxCrossEntropy", "PerExampleLoss", "get_loss",
           "dense_hessian", "hessian_matvec", "sqrt_blocks"]

Reduction = Literal["mean", "sum"]


class OutputLoss(Protocol):
    """A loss as a function of stacked outputs ``u`` ``(n, p)`` and targets ``y``."""

    name: str
    reduction: Reduction

    def value(self, u: Tensor, y: Tensor) -> Tensor: ...          # scalar Φ
    def grad(self, u: Tensor, y: Tensor) -> Tensor: ...           # (n, p)
    def hessian(self, u: Tensor, y: Tensor) -> Tensor: ...        # (n, p, p) blocks of B


def _as_2d(u: Tensor) -> Tensor:
    if u.dim() == 1:
        return u[:, None]
    if u.dim() != 2:
        raise ShapeError(f"outputs u must be (n, p) (or (n,) for p = 1), got {tuple(u.shape)}")
    return u


def _scale(n: int, reduction: Reduction) -> float:
    if reduction not in ("mean", "sum"):
        raise ShapeError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return 1.0 / n if reduction == "mean" else 1.0


class SquaredLoss:
    """``Φ = Σ_i ‖u_i − y_i‖² / (2n)`` (``mean``) or ``/2`` (``sum``)."""

    name = "squared"

    def __init__(self, reduction: Reduction = "mean"):
        self.reduction = reduction
        _scale(1, reduction)

    def _ry(self, u: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        u = _as_2d(u)
        y = _as_2d(y).to(u.dtype)
        if y.shape != u.shape:
            raise ShapeError(f"targets y have shape {tuple(y.shape)}, outputs u have "
                             f"{tuple(u.shape)}: squared loss needs them equal")
        return u, y

    def value(self, u: Tensor, y: Tensor) -> Tensor:
        u, y = self._ry(u, y)
        return 0.5 * _scale(u.shape[0], self.reduction) * ((u - y) ** 2).sum()

    def grad(self, u: Tensor, y: Tensor) -> Tensor:
        u, y = self._ry(u, y)
        return (u - y) * _scale(u.shape[0], self.reduction)

    def hessian(self, u: Tensor, y: Tensor) -> Tensor:
        u, _ = self._ry(u, y)
        n, p = u.shape
        eye = torch.eye(p, dtype=u.dtype, device=u.device)
        return eye.expand(n, p, p) * _scale(n, self.reduction)

    def __repr__(self) -> str:
        return f"SquaredLoss(reduction={self.reduction!r})"


class SoftmaxCrossEntropy:
    """Softmax cross-entropy in output space; targets are class indices ``(n,)`` or
    probabilities ``(n, p)``. (Named apart from torch's cross-entropy module: this object
    gives ``Φ``, ``g`` and ``B`` of stacked outputs, not a module.)"""

    name = "cross_entropy"

    def __init__(self, reduction: Reduction = "mean"):
        self.reduction = reduction
        _scale(1, reduction)

    def _targets(self, u: Tensor, y: Tensor) -> Tensor:
        u = _as_2d(u)
        if y.dim() == 1 and not y.is_floating_point():
            if y.shape[0] != u.shape[0]:
                raise ShapeError(f"{y.shape[0]} labels for {u.shape[0]} outputs")
            if (y < 0).any() or (y >= u.shape[1]).any():
                raise ShapeError(f"labels must lie in [0, {u.shape[1]}) for p = {u.shape[1]}")
            return torch.nn.functional.one_hot(y.long(), u.shape[1]).to(u.dtype)
        if y.shape != u.shape:
            raise ShapeError(f"cross-entropy targets must be class indices (n,) or "
                             f"probabilities {tuple(u.shape)}, got {tuple(y.shape)}")
        return y.to(u.dtype)

    def value(self, u: Tensor, y: Tensor) -> Tensor:
        u = _as_2d(u)
        t = self._targets(u, y)
        return -_scale(u.shape[0], self.reduction) * (t * torch.log_softmax(u, -1)).sum()

    def grad(self, u: Tensor, y: Tensor) -> Tensor:
        u = _as_2d(u)
        t = self._targets(u, y)
        return (torch.softmax(u, -1) * t.sum(-1, keepdim=True) - t) * _scale(u.shape[0],
                                                                             self.reduction)

    def hessian(self, u: Tensor, y: Tensor) -> Tensor:
        u = _as_2d(u)
        t = self._targets(u, y)
        pi = torch.softmax(u, -1)
        w = t.sum(-1)[:, None, None]  # 1 for proper targets
        blocks = torch.diag_embed(pi) - pi[:, :, None] * pi[:, None, :]
        return blocks * w * _scale(u.shape[0], self.reduction)

    def __repr__(self) -> str:
        return f"SoftmaxCrossEntropy(reduction={self.reduction!r})"


class PerExampleLoss:
    """Any per-example loss ``ℓ(u_i, y_i) -> scalar``, convex in ``u_i`` (your responsibility).

    ``Φ = (1/n) Σ_i ℓ(u_i, y_i)`` (or the sum); ``g`` and ``B`` blocks come from
    ``torch.func.grad`` / ``hessian`` vmapped over examples.

    Args:
        fn: ``fn(u_i (p,), y_i) -> scalar``, written with torch ops.
        reduction: ``"mean"`` or ``"sum"``.
        name: label for reports.
    """

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], reduction: Reduction = "mean",
                 name: str = "custom"):
        self.fn = fn
        self.reduction = reduction
        self.name = name
        _scale(1, reduction)

    def _check(self, u: Tensor, y: Tensor) -> Tensor:
        u = _as_2d(u)
        if y.shape[0] != u.shape[0]:
            raise ShapeError(f"{y.shape[0]} targets for {u.shape[0]} outputs")
        return u

    def value(self, u: Tensor, y: Tensor) -> Tensor:
        u = self._check(u, y)
        return vmap(self.fn)(u, y).sum() * _scale(u.shape[0], self.reduction)

    def grad(self, u: Tensor, y: Tensor) -> Tensor:
        u = self._check(u, y)
        return vmap(grad(self.fn))(u, y) * _scale(u.shape[0], self.reduction)

    def hessian(self, u: Tensor, y: Tensor) -> Tensor:
        u = self._check(u, y)
        return vmap(hessian(self.fn))(u, y) * _scale(u.shape[0], self.reduction)

    def __repr__(self) -> str:
        return f"PerExampleLoss({self.name!r}, reduction={self.reduction!r})"


def get_loss(loss: str | OutputLoss, reduction: Reduction = "mean") -> OutputLoss:
    """``'squared'``/``'mse'`` → :class:`SquaredLoss`; ``'cross_entropy'``/``'ce'`` →
    :class:`SoftmaxCrossEntropy`; an OutputLoss is returned unchanged."""
    if not isinstance(loss, str):
        return loss
    key = loss.lower().replace("-", "_")
    if key in ("squared", "mse", "square", "l2"):
        return SquaredLoss(reduction)
    if key in ("cross_entropy", "ce", "xent", "softmax"):
        return SoftmaxCrossEntropy(reduction)
    raise ShapeError(f"unknown loss {loss!r}: use 'squared', 'cross_entropy' or a PerExampleLoss")


def dense_hessian(blocks: Tensor) -> Tensor:
    """Block-diagonal ``(n, p, p)`` → stacked ``(n p, n p)`` (row ``i*p + a``)."""
    p = blocks.shape[1]
    return torch.diag(blocks[:, 0, 0]) if p == 1 else torch.block_diag(*blocks)


def hessian_matvec(blocks: Tensor, v: Tensor) -> Tensor:
    """``B v`` for block-diagonal ``B`` given as ``(n, p, p)``; ``v`` is ``(n p,)`` or
    ``(n p, k)``."""
    n, p, _ = blocks.shape
    if v.dim() == 1:
        return torch.einsum("iab,ib->ia", blocks, v.reshape(n, p)).reshape(-1)
    return (blocks @ v.reshape(n, p, -1)).reshape(n * p, -1)


#: blocks per batched ``eigh`` call: cuSOLVER's batched ``syev`` fails with
#: CUSOLVER_STATUS_INTERNAL_ERROR on 100,000 blocks of 10 × 10 (H200, torch 2.11; 50,000 ran)
EIGH_BATCH = 32_768


def eigh_blocks(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """``eigh`` of the symmetrized blocks ``(n, p, p)`` → ``(n, p)`` eigenvalues, ``(n, p, p)``
    eigenvectors, in batches of :data:`EIGH_BATCH` blocks (any ``n``, any device)."""
    sym = 0.5 * (blocks + blocks.mT)
    if sym.shape[0] <= EIGH_BATCH:
        return torch.linalg.eigh(sym)
    parts = [torch.linalg.eigh(c) for c in sym.split(EIGH_BATCH)]
    return torch.cat([lam for lam, _ in parts]), torch.cat([Q for _, Q in parts])


def sqrt_blocks(blocks: Tensor, pinv: bool = False) -> Tensor:
    """``B^{1/2}`` of PSD blocks ``(n, p, p)`` (rounding negatives clipped to 0), or with
    ``pinv=True`` the pseudo-inverse of ``B^{1/2}`` (eigenvalues below ``p·ε·λ_max`` dropped)."""
    lam, Q = eigh_blocks(blocks)
    lam = lam.clamp_min(0)
    root = lam.sqrt()
    if pinv:
        tol = float(lam.max()) * blocks.shape[-1] * torch.finfo(blocks.dtype).eps \
            if lam.numel() else 0.0
        root = torch.where(lam > tol, 1.0 / root.clamp_min(torch.finfo(blocks.dtype).tiny),
                           torch.zeros_like(root))
    return (Q * root[:, None, :]) @ Q.mT
