"""``P_g``, ``W_S`` and ``G_Q`` of a window as linear maps on blocks ``V`` ``(N, k)``, matrix-free.

The same discretizations as :mod:`tangentscope.dynamics.operators` (``docs/notation.md``): per
interval ``[τ_i, τ_{i+1}]`` (step ``h``, optimizer steps ``η_1..η_J``) three maps ``E_i``
(propagator), ``M_i`` (its ``W``-increment) and ``F_i`` (its ``G``-increment), with
``C = B^{1/2}`` (blockwise; ``√b I`` for ``B = b I``) and ``S = C K C``::

    E X = X + C ψ(S) C K X        M X = K (h X + C w(S) C K X)     F X = K_QS (h X + C q(S) C K X)

(``exp``: ``ψ = −h φ₁(hλ)``, ``w = −2h² φ₂(2hλ)``, ``q = −h² φ₂(hλ)`` with the left snapshot;
``midpoint``: the same with both endpoints averaged; ``gd``: the polynomial scalars of the
recorded steps; ``euler`` and one-step ``gd``: ``E = I − h B K`` and products with ``K`` only).
The three functions of ``S`` act on the same start block ``C K X``, so they share one Lanczos
space (:func:`tangentscope.linalg.krylov_actions`). Then::

    P_g(T, s) V = E_{T−1} ⋯ E_s V                          (forward sweep)
    G_Q(T, s) V = Σ_i F_i X_i,   Vᵀ W_S V = Σ_i X_iᵀ M_i X_i   (same forward sweep, X_i = P_i V)
    W_S(s, T) V = Σ_i P_iᵀ M_i X_i = Z_s,   Z_i = M_i X_i + E_iᵀ Z_{i+1}   (adjoint sweep)

with ``Eᵀ Z = Z + K C ψ(S) C Z``. Nothing ``N × N`` is formed.

Cost, in kernel products ``K·x`` (one column through :class:`KernelPath`; doubled for
``midpoint``) per interval and column, with ``m`` the Krylov dimension (adaptive, typically
10–60, growing like ``√(h λ_max(S))``): ``P_g V`` and ``Vᵀ W V``: ``1 + m``; ``G_Q V``: ``2 + m``
(one product is test-side); ``W_S V``: ``(2 + m)`` forward ``+ (1 + m)`` adjoint; ``euler`` and
one-step ``gd``: 1–2 and 1.

Memory (planned before any work, :meth:`MatrixFreeOperators.plan`): the adjoint sweep needs
every ``M_i X_i``: ``strategy='store'`` keeps them (``T · N · k`` floats, the fastest);
``'recompute'`` keeps only the states at segment starts and recomputes each segment once
(``(T/L + L) · N · k`` with ``L ≈ √T``, one extra forward sweep); plus the Lanczos basis
``(m_max + 1) · N · k_chunk`` (columns are run in chunks ``k_chunk`` chosen to fit) and about ten
``N × k`` work blocks. A window that fits neither way is refused with
:class:`~tangentscope.errors.KernelTooLargeError` naming what to change.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .._utils import default_memory_budget, format_bytes, parse_bytes
from ..errors import ConfigError, KernelTooLargeError, ShapeError
from ..linalg import krylov_actions, phi1, phi2
from ..losses import hessian_matvec, sqrt_blocks
from .matfree_path import KernelPath

__all__ = ["DISCRETIZATIONS", "SweepPlan", "SweepResult", "SweepStep", "MatrixFreeOperators"]

Discretization = Literal["exp", "midpoint", "gd", "euler"]
DISCRETIZATIONS = ("exp", "midpoint", "gd", "euler")
Strategy = Literal["auto", "store", "recompute"]
ScalarFn = Callable[[Tensor], Tensor]


# -- scalar functions of one interval --------------------------------------------------------------
def _exp_scalars(h: float) -> tuple[ScalarFn, ScalarFn, ScalarFn]:
    return ((lambda lam: -h * phi1(h * lam)), (lambda lam: -2 * h * h * phi2(2 * h * lam)),
            (lambda lam: -h * h * phi2(h * lam)))


def _gd_scalars(etas: np.ndarray) -> tuple[ScalarFn, ScalarFn, ScalarFn]:
    """``ψ, w, q`` of the steps ``η_j``: ``e_j = Π_{i≤j}(1 − η_i λ)``, ``ψ_j = (e_j − 1)/λ`` by
    recursion (no division by ``λ``)."""
    steps = [float(e) for e in etas]

    def run(lam: Tensor, which: int) -> Tensor:
        e, psi = torch.ones_like(lam), torch.zeros_like(lam)
        w, q = torch.zeros_like(lam), torch.zeros_like(lam)
        for eta in steps:
            w = w + eta * psi * (e + 1) - 0.5 * eta * eta * e * e
            q = q + eta * psi
            psi = psi - eta * e
            e = e * (1 - eta * lam)
        return (psi, w, q)[which]

    return (lambda lam: run(lam, 0)), (lambda lam: run(lam, 1)), (lambda lam: run(lam, 2))






def _scalar_hessian(B: Tensor) -> float | None:
    b = float(B[0, 0, 0])
    eye = torch.eye(B.shape[1], dtype=B.dtype, device=B.device)
    return b if torch.equal(B, b * eye.expand_as(B)) else None


class _Interval:
    """The maps ``E, M, F`` (and ``Eᵀ``) of one interval as block actions (module docstring)."""

    def __init__(self, path: KernelPath, k: int, scheme: str, etas: np.ndarray, h: float,
                 krylov: dict[str, float | int | None]):
        self.path, self.h, self.krylov = path, h, krylov
        self.snaps = (k, k + 1) if scheme == "midpoint" else (k,)
        B = path.hessian(k)
        if scheme == "midpoint":
            B = 0.5 * (B + path.hessian(k + 1))
        self.scheme = scheme
        self.fast = scheme == "euler" or (scheme == "gd" and len(etas) <= 1)
        b = _scalar_hessian(B)
        self.b, self.B = b, B
        self.C = None if b is not None or self.fast else sqrt_blocks(B)
        self.dims: list[int] = []
        if not self.fast:
            self.fns = _gd_scalars(etas) if scheme == "gd" else _exp_scalars(h)

    def S(self, Y: Tensor) -> Tensor:
        """``S Y = C K C Y``."""
        return self.Cmul(self.K(self.Cmul(Y)))

    def K(self, X: Tensor) -> Tensor:
        out = self.path.kernel_matvec(self.snaps[0], X)
        if len(self.snaps) == 2:
            out = 0.5 * (out + self.path.kernel_matvec(self.snaps[1], X))
        return out

    def pair(self, X: Tensor | None, Xq: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        a, q = self.path.kernel_pair(self.snaps[0], X, Xq)
        if len(self.snaps) == 2:
            a2, q2 = self.path.kernel_pair(self.snaps[1], X, Xq)
            a = None if a is None or a2 is None else 0.5 * (a + a2)
            q = None if q is None or q2 is None else 0.5 * (q + q2)
        return a, q

    def Bmul(self, X: Tensor) -> Tensor:
        return self.b * X if self.b is not None else hessian_matvec(self.B, X)

    def Cmul(self, X: Tensor) -> Tensor:
        if self.b is not None:
            return math.sqrt(max(self.b, 0.0)) * X
        assert self.C is not None
        return hessian_matvec(self.C, X)

    def _actions(self, start: Tensor, which: tuple[int, ...]) -> list[Tensor]:
        res, info = krylov_actions(self.S, start, [self.fns[i] for i in which],
                                   tol=float(self.krylov["tol"] or 1e-12),
                                   max_dim=int(self.krylov["max_dim"] or 0) or None,
                                   column_chunk=int(self.krylov["chunk"] or 0) or None)
        self.dims.append(info.max_dim)
        return res

    def forward(self, X: Tensor, *, need_M: bool, need_F: bool, need_quad: bool
                ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """``(E X, M X, F X, Xᵀ M X)`` (the last three only where asked)."""
        h = self.h
        if self.fast:
            KX, KQX = self.pair(X, X if need_F else None)
            assert KX is not None
            BKX = self.Bmul(KX)
            Z = h * X if self.scheme == "euler" else h * X - 0.5 * h * h * BKX
            MX = None
            if need_M:
                MX = h * KX if self.scheme == "euler" else self.K(Z)
            quad = KX.T @ Z if need_quad else None
            return X - h * BKX, MX, None if KQX is None else h * KQX, quad
        KX = self.K(X)
        b0 = self.Cmul(KX)
        which = (0,) + ((1,) if need_M or need_quad else ()) + ((2,) if need_F else ())
        res = dict(zip(which, self._actions(b0, which)))
        EX = X + self.Cmul(res[0])
        quad = h * (KX.T @ X) + b0.T @ res[1] if need_quad else None
        MX = FX = None
        if need_M or need_F:
            MX, FX = self.pair(h * X + self.Cmul(res[1]) if need_M else None,
                               h * X + self.Cmul(res[2]) if need_F else None)
        return EX, MX, FX, quad

    def adjoint(self, Z: Tensor) -> Tensor:
        """``Eᵀ Z``."""
        if self.fast:
            return Z - self.h * self.K(self.Bmul(Z))
        (r,) = self._actions(self.Cmul(Z), (0,))
        return Z + self.K(self.Cmul(r))


# -- plans and results -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SweepPlan:
    """The memory plan of a sweep with ``k`` columns over a window.

    Attributes:
        columns: ``k``; intervals: ``T``.
        strategy: ``'store'`` (keep every ``M_i X_i``) or ``'recompute'`` (segments of
            ``segment`` intervals recomputed in the adjoint sweep); ``'forward'`` when no
            adjoint sweep is needed.
        segment: intervals per recomputed segment (``T`` for ``'store'``).
        krylov_max_dim, krylov_chunk: Lanczos basis cap and columns run together.
        bytes: ``{'states', 'krylov', 'work', 'products', 'total'}`` planned bytes.
        budget: the memory budget it was planned against.
    """

    columns: int
    intervals: int
    strategy: str
    segment: int
    krylov_max_dim: int
    krylov_chunk: int
    bytes: dict[str, int]
    budget: int

    def describe(self) -> str:
        b = self.bytes
        return (f"{self.strategy} sweep, {self.columns} columns × {self.intervals} intervals: "
                f"states {format_bytes(b['states'])}, Krylov {format_bytes(b['krylov'])} "
                f"(max_dim {self.krylov_max_dim}, {self.krylov_chunk} columns at a time), work "
                f"{format_bytes(b['work'] + b['products'])}; total {format_bytes(b['total'])} of "
                f"{format_bytes(self.budget)}")


@dataclasses.dataclass(frozen=True)
class SweepResult:
    """What one sweep computed for a block ``V`` ``(N, k)`` (``None`` where not asked).

    Attributes:
        PV: ``(N, k)`` ``P_g(T, s) V``.
        GV: ``(m p, k)`` ``G_Q(T, s) V``.
        WV: ``(N, k)`` ``W_S(s, T) V``.
        VWV: ``(k, k)`` ``Vᵀ W_S V`` (symmetrized).
        products: kernel products spent; krylov_dims: Krylov dimension per Krylov call.
    """

    PV: Tensor | None
    GV: Tensor | None
    WV: Tensor | None
    VWV: Tensor | None
    products: int
    krylov_dims: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class SweepStep:
    """The growing window ``[s, τ_stop]`` after one more interval of :meth:`accumulate`.

    Attributes:
        stop: end snapshot; t_stop: its time.
        PV: ``(N, k)``; GV: ``(m p, k)`` or ``None``; VWV: ``(k, k)`` accumulated so far.
    """

    stop: int
    t_stop: float
    PV: Tensor
    GV: Tensor | None
    VWV: Tensor


class MatrixFreeOperators:
    """``P_g(T, s)``, ``W_S(s, T)``, ``G_Q(T, s)`` of a window of a :class:`KernelPath` as maps.

    Args:
        path: a :class:`~tangentscope.dynamics.matfree_path.KernelPath`.
        start, stop: snapshot indices ``s < T`` (default: the whole path; negative from the end).
        discretization: ``'exp'``, ``'midpoint'``, ``'gd'`` or ``'euler'`` (as the dense
            :func:`~tangentscope.dynamics.window_operators`).
        krylov_tol: relative tolerance of every Krylov action (default
            ``max(1e-12, 50 ε)`` of the path's product dtype: 1e-12 for float64 products, 6e-6
            for float32 ones).
        krylov_max_dim: Lanczos basis cap per column (default ``min(N, 128)``).
        memory_budget: bytes (or ``'4G'``) a sweep may use (default: half the free RAM).
        strategy: ``'auto'`` (store if it fits, else recompute), ``'store'`` or ``'recompute'``.

    Raises:
        ShapeError: not a window of the path.
        ConfigError: an unknown discretization or strategy.
    """

    def __init__(self, path: KernelPath, start: int = 0, stop: int | None = None, *,
                 discretization: Discretization = "exp", krylov_tol: float | None = None,
                 krylov_max_dim: int | None = None, memory_budget: int | str | None = None,
                 strategy: Strategy = "auto"):
        if discretization not in DISCRETIZATIONS:
            raise ConfigError(f"discretization must be one of {DISCRETIZATIONS}, got "
                              f"{discretization!r}")
        if strategy not in ("auto", "store", "recompute"):
            raise ConfigError(f"strategy must be 'auto', 'store' or 'recompute', got "
                              f"{strategy!r}")
        S = len(path)
        stop = S - 1 if stop is None else stop
        s, t = start % S if start < 0 else start, stop % S if stop < 0 else stop
        if not 0 <= s < t < S:
            raise ShapeError(f"window [{start}, {stop}] is not a window of snapshot indices: "
                             f"need 0 <= start < stop <= {S - 1} (the path has {S} snapshots)")
        self.path, self.start, self.stop = path, s, t
        self.discretization, self.strategy = discretization, strategy
        eps = torch.finfo(getattr(path, "compute_dtype", path.dtype)).eps
        self.krylov_tol = float(krylov_tol) if krylov_tol is not None else max(1e-12, 50 * eps)
        self.krylov_max_dim = min(path.N, krylov_max_dim or 128)
        self.budget = (default_memory_budget() if memory_budget is None
                       else parse_bytes(memory_budget))
        self.t_start, self.t_stop = float(path.times[s]), float(path.times[t])
        self.krylov_dims: list[int] = []

    # -- sizes and plans ---------------------------------------------------------------------------
    @property
    def N(self) -> int:
        return self.path.N

    @property
    def intervals(self) -> int:
        return self.stop - self.start

    def _steps(self, k: int) -> tuple[np.ndarray, float]:
        etas = np.asarray(self.path.dts[k + 1], dtype=float)
        h = float(self.path.times[k + 1] - self.path.times[k])
        if etas.size == 0 or not np.isclose(etas.sum(), h, rtol=1e-9, atol=1e-15):
            etas = np.array([h])
        return etas, h

    def plan(self, k: int, *, adjoint: bool = True) -> SweepPlan:
        """The memory plan for a block of ``k`` columns (``adjoint``: for ``W_S V``).

        Raises:
            KernelTooLargeError: no strategy fits the budget (the message says what to change).
        """
        item = torch.empty((), dtype=self.path.dtype).element_size()
        blk = self.N * k * item
        T = self.intervals
        work = 10 * blk + max(self.path.m * self.path.p, 1) * k * item * 3
        products = getattr(self.path, "product_bytes", lambda c: 0)(2 * k)
        options: list[tuple[str, int]] = []
        if not adjoint:
            options.append(("forward", 0))
        else:
            seg = max(1, math.ceil(math.sqrt(T)))
            if self.strategy in ("auto", "store"):
                options.append(("store", T * blk))
            if self.strategy in ("auto", "recompute"):
                options.append(("recompute", (math.ceil(T / seg) + seg) * blk))
        fast = self.discretization == "euler"
        for name, states in options:
            room = self.budget - states - work - products
            per_col = (self.krylov_max_dim + 1) * self.N * item * 2
            chunk = k if fast else min(k, room // per_col) if room > 0 else 0
            if chunk >= 1 or (fast and room > 0):
                kb = 0 if fast else chunk * per_col
                seg = T if name != "recompute" else max(1, math.ceil(math.sqrt(T)))
                return SweepPlan(k, T, name, seg, self.krylov_max_dim, max(int(chunk), 1),
                                 {"states": states, "krylov": kb, "work": work,
                                  "products": products, "total": states + kb + work + products},
                                 self.budget)
        need = options[-1][1] + work + products + (0 if fast else (self.krylov_max_dim + 1)
                                                   * self.N * item * 2)
        raise KernelTooLargeError(
            f"a {'W_S·V' if adjoint else 'forward'} sweep of {k} columns over {T} intervals "
            f"(N = {self.N}) needs at least {format_bytes(need)} but the memory budget is "
            f"{format_bytes(self.budget)}: pass fewer columns (k), a shorter window or fewer "
            "snapshots (path subsampling), a smaller krylov_max_dim, or raise memory_budget=")

    def _interval(self, k: int, chunk: int) -> _Interval:
        etas, h = self._steps(k)
        return _Interval(self.path, k, self.discretization, etas, h,
                         {"tol": self.krylov_tol, "max_dim": self.krylov_max_dim,
                          "chunk": chunk})

    def _block(self, V: Tensor) -> Tensor:
        V = torch.as_tensor(V)
        if V.dim() == 1:
            V = V[:, None]
        if V.dim() != 2 or V.shape[0] != self.N:
            raise ShapeError(f"V must be (N, k) or (N,) with N = {self.N}, got "
                             f"{tuple(V.shape)}")
        return V.to(dtype=self.path.dtype, device=self.path.device)

    def _need_test(self) -> None:
        if self.path.m == 0:
            raise ShapeError("the path has no test/probe set: record it with x_test= to get "
                             "G_Q")

    # -- sweeps ------------------------------------------------------------------------------------
    def accumulate(self, V: Tensor, *, transfer: bool = True) -> Iterator[SweepStep]:
        """``P_g V``, ``G_Q V`` and ``Vᵀ W_S V`` of the growing windows ``[s, s+1], ..., [s, T]``
        in one forward sweep (``transfer=False`` or no test set: ``GV`` is ``None``)."""
        X = self._block(V)
        plan = self.plan(X.shape[1], adjoint=False)
        want_G = transfer and self.path.m > 0
        G = (torch.zeros(self.path.m * self.path.p, X.shape[1], dtype=X.dtype,
                         device=X.device) if want_G else None)
        Q = torch.zeros(X.shape[1], X.shape[1], dtype=X.dtype, device=X.device)
        for k in range(self.start, self.stop):
            itv = self._interval(k, plan.krylov_chunk)
            EX, _, FX, quad = itv.forward(X, need_M=False, need_F=want_G, need_quad=True)
            assert quad is not None
            Q = Q + quad
            if G is not None and FX is not None:
                G = G + FX
            X = EX
            self.krylov_dims.extend(itv.dims)
            yield SweepStep(k + 1, float(self.path.times[k + 1]), X, G, 0.5 * (Q + Q.T))

    def apply(self, V: Tensor, *, propagate: bool = True, transfer: bool = False,
              quadratic: bool = False, gramian: bool = False) -> SweepResult:
        """Several maps of one block in one pass (the forward sweep is shared).

        Args:
            V: ``(N, k)`` (or ``(N,)``).
            propagate: ``P_g(T, s) V``; transfer: ``G_Q(T, s) V``; quadratic: ``Vᵀ W_S V``;
                gramian: ``W_S(s, T) V`` (adds the adjoint sweep).

        Raises:
            ShapeError: ``V`` of the wrong length, or ``transfer`` without a test set.
            KernelTooLargeError: the sweep does not fit the memory budget.
        """
        X0 = self._block(V)
        if transfer:
            self._need_test()
        c = X0.shape[1]
        plan = self.plan(c, adjoint=gramian)
        before, dims0 = self.path.products, len(self.krylov_dims)
        G = (torch.zeros(self.path.m * self.path.p, c, dtype=X0.dtype, device=X0.device)
             if transfer else None)
        Q = torch.zeros(c, c, dtype=X0.dtype, device=X0.device) if quadratic else None
        ks = list(range(self.start, self.stop))
        store = gramian and plan.strategy == "store"
        seg_starts: dict[int, Tensor] = {}
        Ys: dict[int, Tensor] = {}
        X = X0
        for i, k in enumerate(ks):
            if gramian and not store and i % plan.segment == 0:
                seg_starts[i] = X
            itv = self._interval(k, plan.krylov_chunk)
            EX, MX, FX, quad = itv.forward(X, need_M=store, need_F=transfer,
                                           need_quad=quadratic)
            self.krylov_dims.extend(itv.dims)
            if store:
                assert MX is not None
                Ys[i] = MX
            if G is not None and FX is not None:
                G = G + FX
            if Q is not None and quad is not None:
                Q = Q + quad
            X = EX
        WV = None
        if gramian:
            WV = self._adjoint(ks, Ys, seg_starts, plan)
        return SweepResult(X if propagate else None, G, WV,
                           None if Q is None else 0.5 * (Q + Q.T), self.path.products - before,
                           tuple(self.krylov_dims[dims0:]))

    def _adjoint(self, ks: list[int], Ys: dict[int, Tensor], seg_starts: dict[int, Tensor],
                 plan: SweepPlan) -> Tensor:
        """``Z_s`` of ``Z_i = M_i X_i + E_iᵀ Z_{i+1}`` (stored or recomputed ``M_i X_i``)."""
        Z: Tensor | None = None
        T = len(ks)
        starts = sorted(seg_starts) if seg_starts else [0]
        segments = [(a, b) for a, b in zip(starts, [*starts[1:], T])]
        for a, b in reversed(segments):
            if seg_starts:                        # recompute this segment's M_i X_i
                X = seg_starts[a]
                Ys = {}
                for i in range(a, b):
                    itv = self._interval(ks[i], plan.krylov_chunk)
                    EX, MX, _, _ = itv.forward(X, need_M=True, need_F=False, need_quad=False)
                    self.krylov_dims.extend(itv.dims)
                    assert MX is not None
                    Ys[i] = MX
                    X = EX
            for i in range(b - 1, a - 1, -1):
                if Z is None:
                    Z = Ys.pop(i)
                else:
                    itv = self._interval(ks[i], plan.krylov_chunk)
                    Z = Ys.pop(i) + itv.adjoint(Z)
                    self.krylov_dims.extend(itv.dims)
        assert Z is not None
        return Z

    # -- the four maps -----------------------------------------------------------------------------
    def propagator(self, V: Tensor) -> Tensor:
        """``P_g(T, s) V`` ``(N, k)``: ``g(T) ≈ P_g g(s)``."""
        out = self.apply(V).PV
        assert out is not None
        return out

    def transfer(self, V: Tensor) -> Tensor:
        """``G_Q(T, s) V`` ``(m p, k)``: ``U_Q(T) − U_Q(s) ≈ −G_Q g(s)``."""
        out = self.apply(V, propagate=False, transfer=True).GV
        assert out is not None
        return out

    def integrated_entk(self, V: Tensor) -> Tensor:
        """``W_S(s, T) V`` ``(N, k)`` (forward + adjoint sweep)."""
        out = self.apply(V, propagate=False, gramian=True).WV
        assert out is not None
        return out

    def quadratic_form(self, V: Tensor) -> Tensor:
        """``Vᵀ W_S(s, T) V`` ``(k, k)`` by the forward sweep alone
        (``Φ(s) − Φ(T) ≈ g(s)ᵀ W_S g(s)``)."""
        out = self.apply(V, propagate=False, quadratic=True).VWV
        assert out is not None
        return out

    def test_gram_integral(self) -> float | None:
        """``∫_s^T ‖K_QQ‖₂ dτ`` with the window's quadrature (``None`` if unavailable)."""
        total = 0.0
        for k in range(self.start, self.stop):
            _, h = self._steps(k)
            a = self.path.test_gram_norm(k)
            if a is None:
                return None
            if self.discretization == "midpoint":
                b = self.path.test_gram_norm(k + 1)
                if b is None:
                    return None
                total += 0.5 * h * (a + b)
            else:
                total += h * a
        return total
