"""The propagator ``P_g``, the integrated eNTK ``W_S`` and the test transfer operator ``G_Q``.

On a window ``[s, T]`` of a :class:`~tangentscope.dynamics.trajectory.KernelTrajectory`
(docs/notation.md; ``N = n p``, everything in the stacked output space)::

    ∂_τ P = −B K_SS P,  P(s, s) = I          g(τ) = P_g(τ, s) g(s)
    W_S(s, T) = ∫_s^T P_gᵀ K_SS P_g dτ       Φ(s) − Φ(T) = g(s)ᵀ W_S g(s)
    G_Q(T, s) = ∫_s^T K_QS P_g dτ            U_Q(T) − U_Q(s) = −G_Q g(s)

Between snapshots ``k`` and ``k+1`` (time step ``h = τ_{k+1} − τ_k``) the kernel is
interpolated and each discretization gives three maps — the interval propagator ``E``, its
contribution ``M`` to ``W`` and ``F`` to ``G`` — so that ``P ← E P``, ``W ← W + Pᵀ M P``,
``G ← G + F P``:

- ``"exp"``: ``K_SS, B, K_QS`` held at their left-snapshot values; ``E = exp(−h B K)`` and the
  integrals exactly. Exact for gradient *flow* whenever the kernel is constant between
  snapshots (a linear model under squared loss: exact at any snapshot spacing).
- ``"midpoint"``: the same with the two endpoint snapshots averaged (exponential midpoint rule):
  second order in ``h`` for a smoothly varying kernel.
- ``"gd"``: the recorded optimizer steps ``η_1..η_k`` taken with the left kernel,
  ``E = Π(I − η_j B K)``, ``W``-increments ``η_j K − (η_j²/2) K B K`` (the exact one-step decrease
  of a quadratic loss). Exact for full-batch gradient *descent* on a linear model under squared
  loss, at any snapshot spacing and any learning-rate schedule.
- ``"euler"``: the first-order rule of docs/notation.md with one step of size ``h``:
  ``E = I − h B K``, ``M = h K``, ``F = h K_QS``. Converges as ``O(h)``.

``exp``, ``midpoint`` and multi-step ``gd`` use one symmetric eigen-decomposition per interval.
For ``B = b I`` (squared loss) ``E``, ``M`` and ``F/K_QS`` are diagonal in the eigenbasis of ``K``.
For any other PSD ``B`` (cross-entropy: singular blocks), with ``C = B^{1/2}`` (blockwise) and
``S = C K C = V diag(λ) Vᵀ``, every function of ``B K`` is ``f(BK) = f(0) + C V diag(ψ) Vᵀ C K``
for a scalar ``ψ(λ)``, so no ``B⁻¹`` and no non-symmetric matrix exponential is needed.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from ..losses import hessian_matvec, sqrt_blocks
from .trajectory import KernelTrajectory

__all__ = ["DISCRETIZATIONS", "WindowOperators", "IdentityResiduals", "accumulate_operators",
           "window_operators", "propagator", "integrated_entk", "dissipation_gramian",
           "transfer_operator", "identity_residuals"]

Discretization = Literal["exp", "midpoint", "gd", "euler"]
DISCRETIZATIONS = ("exp", "midpoint", "gd", "euler")


# -- scalar functions of one eigenvalue --------------------------------------------------------
def _phi1(x: Tensor) -> Tensor:
    """``(1 − e^{−x})/x`` (→ 1 at 0), accurate for all ``x ≥ 0``."""
    small = x < 0.05
    xs = torch.where(small, torch.ones_like(x), x)
    series = 1 - x / 2 + x ** 2 / 6 - x ** 3 / 24 + x ** 4 / 120 - x ** 5 / 720 + x ** 6 / 5040
    return torch.where(small, series, -torch.expm1(-xs) / xs)


def _phi2(x: Tensor) -> Tensor:
    """``(x − 1 + e^{−x})/x²`` (→ 1/2 at 0), accurate for all ``x ≥ 0``."""
    small = x < 0.05
    xs = torch.where(small, torch.ones_like(x), x)
    series = (0.5 - x / 6 + x ** 2 / 24 - x ** 3 / 120 + x ** 4 / 720 - x ** 5 / 5040
              + x ** 6 / 40320)
    return torch.where(small, series, (xs + torch.expm1(-xs)) / xs ** 2)


def _scalars_exp(lam: Tensor, h: float) -> tuple[Tensor, Tensor, Tensor]:
    """``ψ, w, q`` for ``E = e^{−hA}``, ``M = ∫ e^{−σAᵀ} K e^{−σA}``, ``F = K_QS ∫ e^{−σA}``."""
    x = h * lam
    return -h * _phi1(x), -2 * h * h * _phi2(2 * x), -h * h * _phi2(x)


def _scalars_gd(lam: Tensor, etas: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
    """``ψ, w, q`` for the steps ``η_j`` with ``e_j = Π_{i≤j}(1 − η_i λ)`` (recursions avoid
    dividing by ``λ``: ``ψ_j = (e_j − 1)/λ = ψ_{j−1} − η_j e_{j−1}``)."""
    e, psi = torch.ones_like(lam), torch.zeros_like(lam)
    w, q = torch.zeros_like(lam), torch.zeros_like(lam)
    for eta in etas.tolist():
        w = w + eta * psi * (e + 1) - 0.5 * eta * eta * e * e
        q = q + eta * psi
        psi = psi - eta * e
        e = e * (1 - eta * lam)
    return psi, w, q


# -- one interval --------------------------------------------------------------------------------




def _diag_scalars(scheme: str, lamK: Tensor, b: float, etas: np.ndarray
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """For ``B = b I``, with ``K = V diag(λ) Vᵀ``: ``E, M, F/K_QS`` are ``V diag(e|m|f) Vᵀ``.

    ``exp``: ``e = e^{−x}``, ``m = h λ φ₁(2x)``, ``f = h φ₁(x)`` with ``x = h b λ``; ``gd``:
    ``m = Σ_j η_j e_{j−1}² λ (1 − η_j b λ / 2)``, ``f = Σ_j η_j e_{j−1}`` — no cancellation.
    """
    lam = b * lamK
    if scheme != "gd":
        h = float(etas.sum())
        x = h * lam
        return torch.exp(-x), h * lamK * _phi1(2 * x), h * _phi1(x)
    e, m, f = torch.ones_like(lam), torch.zeros_like(lam), torch.zeros_like(lam)
    for eta in etas.tolist():
        m = m + eta * e * e * lamK * (1 - 0.5 * eta * lam)
        f = f + eta * e
        e = e * (1 - eta * lam)
    return e, m, f


def _scalar_hessian(B: Tensor) -> float | None:
    b = float(B[0, 0, 0])
    eye = torch.eye(B.shape[1], dtype=B.dtype)
    return b if torch.equal(B, b * eye.expand_as(B)) else None


class _Interval:
    """The maps ``E, M, F`` of one interval, applied to a block of columns ``X`` ``(N, k)``.

    Three paths: ``fast`` (``euler`` and one-step ``gd``: products with ``K`` only), ``diag``
    (``B = b I``, e.g. squared loss: everything diagonal in the eigenbasis of ``K``) and the
    general one (any PSD ``B``, through ``S = C K C``).
    """

    def __init__(self, scheme: str, K: Tensor, B: Tensor, KQ: Tensor | None, etas: np.ndarray):
        self.K, self.B, self.KQ = K, B, KQ
        self.h = float(etas.sum())
        self.scheme = scheme
        self.path = "fast" if scheme == "euler" or (scheme == "gd" and len(etas) <= 1) else None
        if self.path == "fast":
            return
        b = _scalar_hessian(B)
        if b is not None:
            self.path = "diag"
            lamK, V = torch.linalg.eigh(0.5 * (K + K.T))
            self.V = V
            self.e, self.m, self.f = _diag_scalars(scheme, lamK.clamp_min(0), b, etas)
            self.KQV = None if KQ is None else KQ @ V
            return
        self.path = "general"
        C = sqrt_blocks(B)
        CK = hessian_matvec(C, K)
        lam, V = torch.linalg.eigh(hessian_matvec(C, CK.T.contiguous()))
        lam = lam.clamp_min(0)
        self.C, self.V = C, V
        self.psi, self.w, self.q = (_scalars_gd(lam, etas) if scheme == "gd"
                                    else _scalars_exp(lam, self.h))
        self.KQCV = None if KQ is None else hessian_matvec(C, KQ.T.contiguous()).T @ V

    def apply(self, X: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(E X, Xᵀ M X, F X)``."""
        h, K, KQ = self.h, self.K, self.KQ
        if self.path == "diag":
            Y = self.V.T @ X
            FX = None if self.KQV is None else self.KQV @ (self.f[:, None] * Y)
            return self.V @ (self.e[:, None] * Y), Y.T @ (self.m[:, None] * Y), FX
        KX = K @ X
        if self.path == "fast":
            BKX = hessian_matvec(self.B, KX)
            # Xᵀ M X with M = hK (euler) or hK − (h²/2) K B K (gd), K symmetric: one product
            Z = h * X if self.scheme == "euler" else h * X - 0.5 * h * h * BKX
            return X - h * BKX, KX.T @ Z, None if KQ is None else h * (KQ @ X)
        Y = self.V.T @ hessian_matvec(self.C, KX)                      # Vᵀ C K X
        EX = X + hessian_matvec(self.C, self.V @ (self.psi[:, None] * Y))
        dW = h * (KX.T @ X) + Y.T @ (self.w[:, None] * Y)      # Xᵀ (hK + K C V w Vᵀ C K) X
        FX = None if KQ is None else h * (KQ @ X) + self.KQCV @ (self.q[:, None] * Y)
        return EX, dW, FX


def _intervals(traj: KernelTrajectory, start: int, stop: int, scheme: str
               ) -> Iterator[tuple[int, _Interval, float | None]]:
    """``(k, maps of [τ_k, τ_{k+1}], ∫‖K_QQ‖ dτ over it or None)`` for ``k = start .. stop − 1``."""
    gram = traj.test_gram_norm
    nxt = None
    for k in range(start, stop):
        cur = nxt if nxt is not None else (traj.kernel(k), traj.hessian(k), traj.cross_kernel(k))
        etas = traj.dts[k + 1]
        h = float(traj.times[k + 1] - traj.times[k])
        if etas.size == 0 or not np.isclose(etas.sum(), h, rtol=1e-9, atol=1e-15):
            etas = np.array([h])
        if scheme == "midpoint":
            nxt = (traj.kernel(k + 1), traj.hessian(k + 1), traj.cross_kernel(k + 1))
            K, B = 0.5 * (cur[0] + nxt[0]), 0.5 * (cur[1] + nxt[1])
            KQ = None if cur[2] is None or nxt[2] is None else 0.5 * (cur[2] + nxt[2])
            qq = None if gram is None else 0.5 * h * (gram[k] + gram[k + 1])
        else:
            K, B, KQ = cur
            qq = None if gram is None else h * gram[k]
        yield k, _Interval(scheme, K, B, KQ, etas), qq


def _window(traj: KernelTrajectory, start: int, stop: int | None, scheme: str
            ) -> tuple[int, int]:
    if scheme not in DISCRETIZATIONS:
        raise ConfigError(f"discretization must be one of {DISCRETIZATIONS}, got {scheme!r}")
    S = len(traj)
    stop = S - 1 if stop is None else stop
    s, t = start % S if start < 0 else start, stop % S if stop < 0 else stop
    if not 0 <= s < t < S:
        raise ShapeError(f"window [{start}, {stop}] is not a window of snapshot indices: need "
                         f"0 <= start < stop <= {S - 1} (the trajectory has {S} snapshots)")
    return s, t


# -- matrices ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WindowOperators:
    """``P_g(T, s)``, ``W_S(s, T)`` and ``G_Q(T, s)`` of one window.

    Attributes:
        start, stop: snapshot indices ``s < T``.
        t_start, t_stop: their training times.
        P: ``(N, N)`` propagator ``P_g(T, s)``.
        W: ``(N, N)`` integrated eNTK ``W_S(s, T)`` (symmetric PSD up to the discretization).
        G: ``(m p, N)`` test transfer operator ``G_Q(T, s)``, or ``None`` without a test set.
        test_gram_integral: ``∫_s^T ‖K_QQ‖₂ dτ`` (same quadrature), for the bound
            ``‖G ψ‖² ≤ ψᵀ W ψ · ∫‖K_QQ‖`` (Cauchy–Schwarz), or ``None``.
        discretization: the scheme used.
    """

    start: int
    stop: int
    t_start: float
    t_stop: float
    P: Tensor
    W: Tensor
    G: Tensor | None
    test_gram_integral: float | None
    discretization: str


def accumulate_operators(traj: KernelTrajectory, start: int = 0, stop: int | None = None, *,
                         discretization: Discretization = "exp") -> Iterator[WindowOperators]:
    """Operators of the growing windows ``[s, s+1], [s, s+2], ..., [s, T]`` (one pass).

    Cost per interval: one ``N × N`` eigen-decomposition (``exp``, ``midpoint``, multi-step ``gd``)
    plus three ``N × N`` matrix products when ``B = b I`` (five otherwise); ``euler`` and
    one-step ``gd`` need two products and no decomposition. Memory: a handful of ``N × N``
    matrices (kernels are loaded one or two at a time).

    Yields:
        :class:`WindowOperators` for each ``[start, k]``, ``k = start+1 .. stop``.
    """
    s, t = _window(traj, start, stop, discretization)
    N = traj.N
    P = torch.eye(N, dtype=torch.float64)
    W = torch.zeros(N, N, dtype=torch.float64)
    G = None if traj.U_Q is None else torch.zeros(traj.m * traj.p, N, dtype=torch.float64)
    qq = None if traj.test_gram_norm is None else 0.0
    for k, itv, dq in _intervals(traj, s, t, discretization):
        EX, dW, FX = itv.apply(P)
        W = W + dW
        if G is not None and FX is not None:
            G = G + FX
        if qq is not None and dq is not None:
            qq += dq
        P = EX
        yield WindowOperators(s, k + 1, float(traj.times[s]), float(traj.times[k + 1]), P,
                              0.5 * (W + W.T), G, qq, discretization)


def window_operators(traj: KernelTrajectory, start: int = 0, stop: int | None = None, *,
                     discretization: Discretization = "exp") -> WindowOperators:
    """``P_g(T, s)``, ``W_S(s, T)`` and ``G_Q(T, s)`` for snapshot indices ``s = start`` and
    ``T = stop`` (default: the last snapshot). See :func:`accumulate_operators` for costs.

    Raises:
        ShapeError: not a window (``0 <= start < stop < len(traj)``).
        ConfigError: an unknown discretization.
    """
    # the last of the growing windows (the window is validated, so there is at least one)
    return collections.deque(accumulate_operators(traj, start, stop,
                                                  discretization=discretization), maxlen=1)[0]


def propagator(traj: KernelTrajectory, start: int = 0, stop: int | None = None, *,
               discretization: Discretization = "exp") -> Tensor:
    """``P_g(T, s)`` ``(N, N)``: ``g(T) ≈ P_g g(s)``."""
    return window_operators(traj, start, stop, discretization=discretization).P


def integrated_entk(traj: KernelTrajectory, start: int = 0, stop: int | None = None, *,
                    discretization: Discretization = "exp") -> Tensor:
    """The integrated eNTK ``W_S(s, T)`` ``(N, N)`` (the paper's "cumulative dissipation
    Gramian"): ``Φ(s) − Φ(T) ≈ g(s)ᵀ W_S g(s)``."""
    return window_operators(traj, start, stop, discretization=discretization).W


def dissipation_gramian(traj: KernelTrajectory, start: int = 0, stop: int | None = None, *,
                        discretization: Discretization = "exp") -> Tensor:
    """Deprecated name of :func:`integrated_entk` (warns; will be removed)."""
    warnings.warn("dissipation_gramian is now integrated_entk (same arguments, same result)",
                  FutureWarning, stacklevel=2)
    return integrated_entk(traj, start, stop, discretization=discretization)


def transfer_operator(traj: KernelTrajectory, start: int = 0, stop: int | None = None, *,
                      discretization: Discretization = "exp") -> Tensor:
    """The test transfer operator ``G_Q(T, s)`` ``(m p, N)``: ``U_Q(T) − U_Q(s) ≈ −G_Q g(s)``.

    Raises:
        ShapeError: the trajectory has no test set (record with ``x_test=``).
    """
    if traj.U_Q is None:
        raise ShapeError("the trajectory has no test/probe set: record it with "
                         "KernelRecorder(..., x_test=...) to get G_Q")
    G = window_operators(traj, start, stop, discretization=discretization).G
    assert G is not None
    return G


# -- identities along a trajectory (vectors only) ------------------------------------------------
@dataclasses.dataclass(frozen=True)
class IdentityResiduals:
    """How well the operators reproduce the recorded run, for windows ``[s, T_k]``.

    Attributes:
        start: the start snapshot ``s``.
        stops: ``(K,)`` end snapshots ``T_k``; ``times`` their training times.
        dissipation_actual: ``(K,)`` ``Φ(s) − Φ(T_k)`` from the recorded losses.
        dissipation_predicted: ``(K,)`` ``g(s)ᵀ W_S(s, T_k) g(s)``.
        dissipation_error: ``(K,)`` ``|predicted − actual| / |actual|``.
        displacement_error: ``(K,)`` ``‖U_Q(T_k) − U_Q(s) + G_Q g(s)‖ / ‖U_Q(T_k) − U_Q(s)‖``
            (``None`` without a test set).
        gradient_error: ``(K,)`` ``‖P_g g(s) − g(T_k)‖ / ‖g(T_k) − g(s)‖``.
        discretization: the scheme used.
    """

    start: int
    stops: np.ndarray
    times: np.ndarray
    dissipation_actual: np.ndarray
    dissipation_predicted: np.ndarray
    dissipation_error: np.ndarray
    displacement_error: np.ndarray | None
    gradient_error: np.ndarray
    discretization: str

    def summary(self) -> dict[str, float]:
        """The errors of the whole window ``[s, T]`` as plain numbers."""
        out = {"dissipation_error": float(self.dissipation_error[-1]),
               "gradient_error": float(self.gradient_error[-1]),
               "dissipation_actual": float(self.dissipation_actual[-1]),
               "dissipation_predicted": float(self.dissipation_predicted[-1])}
        if self.displacement_error is not None:
            out["displacement_error"] = float(self.displacement_error[-1])
        return out

    def final(self) -> dict[str, float]:
        """Deprecated name of :meth:`summary` (warns; will be removed)."""
        warnings.warn("IdentityResiduals.final() is now .summary() (same dict)", FutureWarning,
                      stacklevel=2)
        return self.summary()


def _rel(err: Tensor | float, ref: Tensor | float) -> float:
    e, r = float(err), float(ref)
    return e / r if r > 0 else (0.0 if e == 0 else float("inf"))


def identity_residuals(traj: KernelTrajectory, start: int = 0, stop: int | None = None, *,
                       discretization: Discretization = "exp") -> IdentityResiduals:
    """Check ``Φ(s) − Φ(T) = g(s)ᵀ W g(s)``, ``U_Q(T) − U_Q(s) = −G g(s)`` and
    ``g(T) = P g(s)`` against the recorded run for every end snapshot ``T`` in ``(s, stop]``.

    Only the vector ``g(s)`` is propagated (``O(N²)`` per interval besides the per-interval
    eigen-decomposition), so this is cheap even where the ``N × N`` operators are not; it equals
    the quadratic forms of :func:`window_operators` to rounding.
    """
    s, t = _window(traj, start, stop, discretization)
    g0 = traj.g[s].reshape(-1, 1)
    x, d, Gx = g0, 0.0, None
    rows = []
    for k, itv, _ in _intervals(traj, s, t, discretization):
        EX, dW, FX = itv.apply(x)
        d += float(dW)
        Gx = FX if Gx is None else (Gx + FX if FX is not None else Gx)
        x = EX
        T = k + 1
        actual = float(traj.loss[s] - traj.loss[T])
        g_err = _rel(torch.linalg.norm(x[:, 0] - traj.g[T].reshape(-1)),
                     torch.linalg.norm((traj.g[T] - traj.g[s]).reshape(-1)))
        disp = None
        if traj.U_Q is not None and Gx is not None:
            dU = (traj.U_Q[T] - traj.U_Q[s]).reshape(-1)
            disp = _rel(torch.linalg.norm(dU + Gx[:, 0]), torch.linalg.norm(dU))
        rows.append((T, actual, d, _rel(abs(d - actual), abs(actual)), disp, g_err))
    a = list(zip(*rows))
    return IdentityResiduals(
        start=s, stops=np.array(a[0]), times=traj.times[list(a[0])], dissipation_actual=np.array(
            a[1]), dissipation_predicted=np.array(a[2]), dissipation_error=np.array(a[3]),
        displacement_error=None if traj.U_Q is None else np.array(a[4], dtype=float),
        gradient_error=np.array(a[5]), discretization=discretization)
