"""Krylov actions ``f(S)·B`` of a symmetric PSD operator on a block of columns, by Lanczos.

For each column ``b`` of ``B`` an independent Lanczos recurrence builds an orthonormal basis
``Q_m = [q_1 … q_m]`` of ``span{b, S b, …, S^{m−1} b}`` and the tridiagonal ``T_m = Q_mᵀ S Q_m``;
then ``f(S) b ≈ ‖b‖ Q_m f(T_m) e₁`` (exact for polynomials of degree ``< m``, and
spectrally accurate for smooth ``f`` such as ``e^{−hλ}`` and the φ-functions). All columns run
in lockstep, so every step is one ``matvec`` of a block (a batched kernel-vector product), and
several functions of the same ``S`` share one Krylov space. Full reorthogonalization (two
classical Gram–Schmidt passes) keeps ``Q_m`` orthonormal, so the successive-iterate test
``‖c_m − c_{m−1}‖ ≤ tol ‖c_m‖`` on the coefficient vectors ``c_m = ‖b‖ f(T_m) e₁`` measures the
actual change of the approximation.

Memory: the basis, ``(m + 1) · N · c`` floats for ``c`` columns run together; callers bound it
with ``column_chunk`` (columns processed in groups) and ``max_dim``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..errors import TangentscopeError

__all__ = ["KrylovConvergenceError", "KrylovInfo", "LockstepLanczos", "krylov_actions",
           "dense_function"]

Matvec = Callable[[Tensor], Tensor]
ScalarFn = Callable[[Tensor], Tensor]


class KrylovConvergenceError(TangentscopeError, ArithmeticError):
    """A Krylov action did not reach its tolerance within the allowed basis size."""


@dataclasses.dataclass(frozen=True)
class KrylovInfo:
    """How a :func:`krylov_actions` call went.

    Attributes:
        dims: ``(c,)`` Krylov dimension used for each column (0 for a zero column).
        matvecs: columns pushed through ``matvec`` (sum over steps of the active columns).
    """

    dims: Tensor
    matvecs: int

    @property
    def max_dim(self) -> int:
        return int(self.dims.max()) if self.dims.numel() else 0


class LockstepLanczos:
    """``c`` independent Lanczos recurrences of a symmetric ``S`` (one per column of ``B``).

    Args:
        matvec: ``X (N, c') -> S X (N, c')`` for any subset of columns.
        B: ``(N, c)`` start vectors (a zero column is finished at dimension 0).
        reorthogonalize: full reorthogonalization against the stored basis (else only the
            three-term recurrence; the basis is then not kept).
        breakdown: a column whose next residual norm is ``≤ breakdown · ‖T‖`` spans an invariant
            subspace: it is finished (the answer is exact there).
        max_dim: the most steps that will be taken (bounds the basis allocation).

    Attributes:
        dim: ``(c,)`` size of each column's tridiagonal so far (= its ``matvec`` count).
        active: ``(c,)`` columns that can still grow.
        alpha, beta: ``(c, cap)`` the tridiagonal's diagonal and off-diagonal
            (``beta[:, j]`` couples ``q_j`` and ``q_{j+1}``).
        beta0: ``(c,)`` ``‖b‖``.
    """

    def __init__(self, matvec: Matvec, B: Tensor, *, reorthogonalize: bool = True,
                 breakdown: float = 1e-13, max_dim: int | None = None):
        if B.dim() != 2:
            raise ValueError(f"B must be (N, c), got {tuple(B.shape)}")
        self.matvec, self.reorth, self.breakdown = matvec, reorthogonalize, breakdown
        self.N, self.c = B.shape
        self.capacity = min(self.N, max_dim or self.N) + 1
        self.dtype, self.device = B.dtype, B.device
        self.beta0 = B.norm(dim=0)
        self.active = self.beta0 > 0
        self.dim = torch.zeros(self.c, dtype=torch.long, device=B.device)
        cap = min(8, self.capacity)
        self.alpha = torch.zeros(self.c, cap, dtype=B.dtype, device=B.device)
        self.beta = torch.zeros(self.c, cap, dtype=B.dtype, device=B.device)
        q0 = (B / torch.where(self.active, self.beta0, torch.ones_like(self.beta0))).T
        self._prev = torch.zeros_like(q0)                     # (c, N) q_{j−1}
        self._cur = q0.contiguous()                           # (c, N) q_j
        self.Q: Tensor | None = None
        if self.reorth:
            self.Q = torch.zeros(self.c, cap, self.N, dtype=B.dtype, device=B.device)
            self.Q[:, 0] = q0
        self.j = 0                                            # index of the newest vector
        self.matvecs = 0
        self._scale = torch.zeros(self.c, dtype=B.dtype, device=B.device)

    def _grow(self) -> None:
        cap = self.alpha.shape[1]
        if self.j + 1 < cap:
            return
        new = min(2 * cap, self.capacity + 1)
        pad = torch.zeros(self.c, new - cap, dtype=self.dtype, device=self.device)
        self.alpha = torch.cat([self.alpha, pad], 1)
        self.beta = torch.cat([self.beta, pad], 1)
        if self.Q is not None:
            self.Q = torch.cat([self.Q, torch.zeros(self.c, new - cap, self.N, dtype=self.dtype,
                                                    device=self.device)], 1)

    def step(self) -> None:
        """One Lanczos step for every active column (one block ``matvec``)."""
        idx = torch.nonzero(self.active).flatten()
        if idx.numel() == 0:
            return
        every = idx.numel() == self.c
        j = self.j
        self._grow()
        q = self._cur if every else self._cur[idx]            # (a, N)
        w = self.matvec(q.T.contiguous()).T.to(self.dtype)     # (a, N)
        self.matvecs += int(idx.numel())
        a = (q * w).sum(1)
        w = w - a[:, None] * q
        if j > 0:
            w = w - self.beta[idx, j - 1][:, None] * (self._prev if every else self._prev[idx])
        if self.Q is not None:
            basis = self.Q[:, :j + 1] if every else self.Q[idx, :j + 1]   # (a, j+1, N)
            for _ in range(2):                                # twice is enough
                h = torch.bmm(basis, w[:, :, None])           # (a, j+1, 1)
                w = w - torch.bmm(h.transpose(1, 2), basis)[:, 0]
        b = w.norm(dim=1)
        self.alpha[idx, j] = a
        self.beta[idx, j] = b
        prev_b = self.beta[idx, j - 1] if j > 0 else torch.zeros_like(b)
        self._scale[idx] = torch.maximum(self._scale[idx], a.abs() + b + prev_b)
        self.dim[idx] = j + 1
        broke = b <= self.breakdown * self._scale[idx].clamp_min(1e-300)
        nxt = w / torch.where(broke, torch.ones_like(b), b)[:, None]
        nxt[broke] = 0
        self._prev = self._cur.clone()
        self._cur[idx] = nxt
        if self.Q is not None:
            self.Q[idx, j + 1] = nxt
        stop = broke | (self.dim[idx] >= self.N)
        self.active[idx[stop]] = False
        self.j += 1

    def tridiagonal(self, cols: Tensor) -> Tensor:
        """``T`` ``(len(cols), d, d)`` of columns that share the dimension ``d``."""
        d = int(self.dim[cols].max())
        T = torch.diag_embed(self.alpha[cols, :d])
        if d > 1:
            off = self.beta[cols, :d - 1]
            T = T + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
        return T

    def combine(self, coef: Tensor) -> Tensor:
        """``Σ_i coef[c, i] q_i`` per column → ``(N, c)``; ``coef`` is ``(c, d)`` (zero-padded)."""
        if self.Q is None:
            raise RuntimeError("combine() needs reorthogonalize=True (the basis is kept)")
        d = coef.shape[1]
        return torch.bmm(coef[:, None, :], self.Q[:, :d]).squeeze(1).T


def _coefficients(H: Tensor, s0: Tensor, fns: Sequence[ScalarFn]) -> list[Tensor]:
    """``f(H) s0`` for each ``f``: ``H`` ``(a, d, d)`` symmetric, ``s0`` ``(a, d)``; eigenvalues
    clamped at 0 (``S`` PSD)."""
    theta, Y = torch.linalg.eigh(H)
    theta = theta.clamp_min(0)
    z = torch.einsum("aji,aj->ai", Y, s0)                      # Yᵀ s0
    return [torch.einsum("aij,aj->ai", Y, f(theta) * z) for f in fns]


def krylov_actions(matvec: Matvec, B: Tensor, fns: Sequence[ScalarFn], *, tol: float = 1e-12,
                   max_dim: int | None = None, min_dim: int = 3,
                   column_chunk: int | None = None) -> tuple[list[Tensor], KrylovInfo]:
    """``[f(S) B for f in fns]`` for a symmetric PSD ``S`` given by its ``matvec``.

    Args:
        matvec: ``X (N, c') -> S X (N, c')``.
        B: ``(N, c)`` block of start vectors.
        fns: scalar functions ``f(λ)`` (elementwise on a tensor of eigenvalues ``λ ≥ 0``).
        tol: stop a column when every ``f``'s coefficient vector changes by
            ``≤ tol · ‖c_m‖`` (relative) on two consecutive steps, or its space is invariant.
        max_dim: Krylov basis cap per column (default ``min(N, 256)``).
        min_dim: never stop before this dimension (unless the space is invariant).
        column_chunk: run at most this many columns together (bounds the basis memory to
            ``(max_dim + 1) · N · column_chunk`` floats).

    Returns:
        ``(results, info)``: one ``(N, c)`` tensor per ``f``, and :class:`KrylovInfo`.

    Raises:
        KrylovConvergenceError: a column did not converge within ``max_dim``.
    """
    N, c = B.shape
    cap = min(N, max_dim or 256)
    chunk = max(1, min(column_chunk or c, c)) if c else 1
    outs = [torch.zeros_like(B) for _ in fns]
    dims = torch.zeros(c, dtype=torch.long)
    mv = 0
    for s in range(0, c, chunk):
        res, d, n_mv = _actions_block(matvec, B[:, s:s + chunk], fns, tol, cap, min_dim)
        for o, x in zip(outs, res):
            o[:, s:s + chunk] = x
        dims[s:s + chunk] = d.cpu()
        mv += n_mv
    return outs, KrylovInfo(dims, mv)


def _actions_block(matvec: Matvec, B: Tensor, fns: Sequence[ScalarFn], tol: float, cap: int,
                   min_dim: int) -> tuple[list[Tensor], Tensor, int]:
    c = B.shape[1]
    lz = LockstepLanczos(matvec, B, max_dim=cap)
    final = [torch.zeros(c, cap, dtype=B.dtype, device=B.device) for _ in fns]
    last: list[Tensor] | None = None                           # rows follow `pending` order
    streak = torch.zeros(c, dtype=torch.long, device=B.device)
    pending = lz.active.clone()                                # not yet converged
    while bool(pending.any()):
        lz.step()
        cols = torch.nonzero(pending).flatten()
        d = int(lz.dim[cols].max())
        s0 = torch.zeros(cols.numel(), d, dtype=B.dtype, device=B.device)
        s0[:, 0] = lz.beta0[cols]
        coefs = _coefficients(lz.tridiagonal(cols), s0, fns)
        ok = torch.full((cols.numel(),), last is not None, dtype=torch.bool, device=B.device)
        if last is not None:
            for cf, prev in zip(coefs, last):
                diff = (cf - torch.nn.functional.pad(prev, (0, 1))).norm(dim=1)
                ok &= diff <= tol * cf.norm(dim=1).clamp_min(1e-300)
        streak[cols] = torch.where(ok, streak[cols] + 1, torch.zeros_like(streak[cols]))
        exact = ~lz.active[cols]                               # invariant space, or d = N
        conv = ((streak[cols] >= 2) & (d >= min_dim)) | exact
        if d >= cap and not bool(conv.all()):
            bad = int((~conv).sum())
            raise KrylovConvergenceError(
                f"the Krylov action did not converge for {bad} of {c} columns within "
                f"max_dim={cap} Lanczos vectors (tol={tol:g}): raise the Krylov cap "
                "(krylov_max_dim=), shorten the intervals (more snapshots: a smaller h·λ_max "
                "needs fewer vectors), or loosen the tolerance (krylov_tol=; with float32 "
                "products use >= 1e-6)")
        done = cols[conv]
        for f, cf in zip(final, coefs):
            f[done, :d] = cf[conv]
        pending[done] = False
        lz.active[done] = False
        last = [cf[~conv] for cf in coefs]
    dmax = max(int(lz.dim.max()), 1)
    return [lz.combine(f[:, :dmax]) for f in final], lz.dim.clone(), lz.matvecs


def dense_function(S: Tensor, f: ScalarFn) -> Tensor:
    """Brute-force twin: ``f(S)`` ``(N, N)`` of a symmetric PSD matrix by ``eigh``
    (eigenvalues clamped at 0)."""
    lam, V = torch.linalg.eigh(0.5 * (S + S.T))
    return (V * f(lam.clamp_min(0))) @ V.T
