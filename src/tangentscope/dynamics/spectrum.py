"""Eigen-analysis of the kernel along a trajectory: spectra, rotation, spectral schedule.

- :func:`kernel_spectra` — eigenvalues of ``K_SS(t)`` and the residual energy per eigenvector
  ``⟨v_i(t), r(t)⟩²`` at every snapshot (the essay's demo, over time);
- :func:`kernel_alignment` and :func:`kernel_rotation` — how far the kernel moved from
  initialization: principal angles between top-``k`` eigenspaces and kernel alignment, on the
  centered, normalized Gram matrix (the essay's rotation surface);
- :func:`spectral_schedule` — when each mode's residual fell below a fraction of its start,
  against the frozen-kernel prediction ``ln(1/fraction) / (b λ_i)`` (squared loss ``B = b I``);
- :func:`kernel_motion` — how far the kernel moved in norm: ``‖K(t) − K(0)‖ / ‖K(0)‖`` in
  operator and Frobenius norm (the abstract's "the kernel evolves O(1) in operator norm"), for
  ``K_SS`` and ``K_QS``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from .trajectory import KernelTrajectory

__all__ = ["KernelSpectra", "kernel_spectra", "kernel_alignment", "KernelRotation",
           "kernel_rotation", "SpectralSchedule", "spectral_schedule", "residual",
           "KernelMotion", "kernel_motion", "relative_change"]


def residual(traj: KernelTrajectory, k: int) -> Tensor:
    """``(N,)`` residual ``u − y`` at snapshot ``k`` under squared loss (with ``y`` recorded);
    the output gradient ``g`` otherwise."""
    y = traj.data.get("y")
    if traj.meta.get("loss") == "squared" and y is not None:
        return (traj.u[k] - y.to(torch.float64).reshape(traj.u[k].shape)).reshape(-1)
    return traj.g[k].reshape(-1)


def _eigh_desc(K: Tensor) -> tuple[Tensor, Tensor]:
    lam, V = torch.linalg.eigh(0.5 * (K + K.T))
    return lam.flip(0), V.flip(1)


@dataclasses.dataclass(frozen=True)
class KernelSpectra:
    """Spectra of ``K_SS(t)``.

    Attributes:
        indices, steps, times: ``(S,)`` snapshots analysed.
        eigenvalues: ``(S, N)`` descending.
        residual_energy: ``(S, N)`` ``⟨v_i(t), r(t)⟩²`` (``r`` from :func:`residual`).
    """

    indices: np.ndarray
    steps: np.ndarray
    times: np.ndarray
    eigenvalues: np.ndarray
    residual_energy: np.ndarray


def kernel_spectra(traj: KernelTrajectory, every: int = 1) -> KernelSpectra:
    """Eigen-decompose ``K_SS`` at every ``every``-th snapshot (and the last)."""
    idx = _indices(len(traj), every)
    lams, ens = [], []
    for k in idx:
        lam, V = _eigh_desc(traj.kernel(k))
        lams.append(lam.numpy())
        ens.append(((V.T @ residual(traj, k)) ** 2).numpy())
    return KernelSpectra(np.array(idx), traj.steps[idx], traj.times[idx], np.array(lams),
                         np.array(ens))


def _indices(S: int, every: int) -> list[int]:
    if every < 1:
        raise ConfigError(f"every must be >= 1, got {every}")
    idx = list(range(0, S, every))
    return idx if idx[-1] == S - 1 else idx + [S - 1]


def _center(K: Tensor, p: int) -> Tensor:
    """``H K H`` with ``H = (I_n − 11ᵀ/n) ⊗ I_p`` (centering over examples, per output)."""
    n = K.shape[0] // p
    Kr = K.reshape(n, p, n, p)
    Kr = Kr - Kr.mean(0, keepdim=True)
    Kr = Kr - Kr.mean(2, keepdim=True)
    return Kr.reshape(K.shape)


def kernel_alignment(K1: Tensor, K2: Tensor, *, centered: bool = False, p: int = 1) -> float:
    """``⟨K1, K2⟩_F / (‖K1‖_F ‖K2‖_F)`` of two stacked kernels (1 = same up to scale).

    Args:
        centered: center both over examples first (centered kernel alignment, CKA).
        p: outputs per example (for the centering).
    """
    K1, K2 = torch.as_tensor(K1, dtype=torch.float64), torch.as_tensor(K2, dtype=torch.float64)
    if K1.shape != K2.shape or K1.dim() != 2:
        raise ShapeError(f"kernels must be stacked matrices of equal shape, got "
                         f"{tuple(K1.shape)} and {tuple(K2.shape)}")
    if centered:
        K1, K2 = _center(K1, p), _center(K2, p)
    den = float(torch.linalg.norm(K1) * torch.linalg.norm(K2))
    return float((K1 * K2).sum()) / den if den > 0 else float("nan")


@dataclasses.dataclass(frozen=True)
class KernelRotation:
    """Rotation of the kernel's top-``k`` eigenspace relative to a reference snapshot.

    Attributes:
        indices, steps, times: ``(S,)`` snapshots analysed.
        reference: the reference snapshot index.
        subspace_angles: ``(S, k)`` principal angles (radians, ascending) between the top-``k``
            eigenspaces at ``t`` and at the reference.
        mode_angles: ``(S, k)`` angle between eigenvector ``v_i(t)`` and the reference top-``k``
            eigenspace (the rotation surface).
        eigenvalue_ratio: ``(S, k)`` ``λ_i(t)/λ_i(ref)`` of the normalized kernels.
        alignment: ``(S,)`` kernel alignment with the reference kernel.
        centered: whether kernels were centered.
    """

    indices: np.ndarray
    steps: np.ndarray
    times: np.ndarray
    reference: int
    subspace_angles: np.ndarray
    mode_angles: np.ndarray
    eigenvalue_ratio: np.ndarray
    alignment: np.ndarray
    centered: bool


def kernel_rotation(traj: KernelTrajectory, k: int = 10, *, reference: int = 0,
                    centered: bool = True, every: int = 1) -> KernelRotation:
    """Principal angles, per-mode angles and alignment of ``K_SS(t)`` against ``K_SS(ref)``,
    on the centered (optional) and Frobenius-normalized kernels."""
    N = traj.N
    if not 1 <= k <= N:
        raise ConfigError(f"k must be in [1, N = {N}], got {k}")

    def prep(K: Tensor) -> Tensor:
        K = _center(K, traj.p) if centered else K
        nrm = torch.linalg.norm(K)
        return K / nrm if nrm > 0 else K

    K0 = prep(traj.kernel(reference))
    lam0, V0 = _eigh_desc(K0)
    V0, lam0 = V0[:, :k], lam0[:k]
    idx = _indices(len(traj), every)
    sub, modes, ratio, align = [], [], [], []
    for i in idx:
        Kt = prep(traj.kernel(i))
        lam, V = _eigh_desc(Kt)
        O = V0.T @ V[:, :k]
        s = torch.linalg.svdvals(O).clamp(-1, 1)
        sub.append(torch.arccos(s).flip(0).numpy())
        modes.append(torch.arccos(torch.linalg.norm(O, dim=0).clamp(-1, 1)).numpy())
        ratio.append((lam[:k] / torch.where(lam0.abs() > 0, lam0, torch.ones_like(lam0))).numpy())
        align.append(float((Kt * K0).sum()))
    return KernelRotation(np.array(idx), traj.steps[idx], traj.times[idx], reference,
                          np.array(sub), np.array(modes), np.array(ratio), np.array(align),
                          centered)


@dataclasses.dataclass(frozen=True)
class SpectralSchedule:
    """When each mode of a fixed basis was learned.

    Attributes:
        eigenvalues: ``(k,)`` the basis' eigenvalues (descending).
        times: ``(S,)`` snapshot times.
        coefficients: ``(S, k)`` ``|⟨v_i, r(t)⟩|``.
        learned_time: ``(k,)`` first time ``|c_i(t)| ≤ fraction · |c_i(0)|`` (NaN: never, or a
            mode with no initial residual).
        predicted_time: ``(k,)`` frozen-kernel prediction ``ln(1/fraction)/(b λ_i)`` for a
            loss Hessian ``B = b I`` at the start (else ``None``).
        fraction: the threshold.
        rank_correlation: Spearman correlation of eigenvalue and learned time over learned modes
            (−1: strictly larger eigenvalues first).
    """

    eigenvalues: np.ndarray
    times: np.ndarray
    coefficients: np.ndarray
    learned_time: np.ndarray
    predicted_time: np.ndarray | None
    fraction: float
    rank_correlation: float


def spectral_schedule(traj: KernelTrajectory, basis: str | tuple[Tensor, Tensor] = "initial", *,
                      k: int | None = None, fraction: float = 0.1) -> SpectralSchedule:
    """Track the residual in a fixed eigenbasis and record when each mode was learned.

    Args:
        basis: ``'initial'`` / ``'final'`` (eigenvectors of ``K_SS`` at the first/last snapshot)
            or ``(eigenvalues (k,), vectors (N, k))``, e.g. of ``W_S`` from a ChannelSplit.
        k: number of leading modes (default all).
        fraction: a mode counts as learned once its residual is below ``fraction`` × its start.
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"fraction must be in (0, 1), got {fraction}")
    if isinstance(basis, str):
        if basis not in ("initial", "final"):
            raise ConfigError(f"basis must be 'initial', 'final' or (eigenvalues, vectors), got "
                              f"{basis!r}")
        lam, V = _eigh_desc(traj.kernel(0 if basis == "initial" else -1))
    else:
        lam, V = (torch.as_tensor(a, dtype=torch.float64) for a in basis)
    if V.shape[0] != traj.N:
        raise ShapeError(f"basis vectors have {V.shape[0]} rows, the trajectory N = {traj.N}")
    k = V.shape[1] if k is None else k
    lam, V = lam[:k], V[:, :k]
    C = torch.stack([(V.T @ residual(traj, i)).abs() for i in range(len(traj))]).numpy()
    c0 = C[0]
    live = c0 > 1e-6 * c0.max() if c0.max() > 0 else np.zeros_like(c0, dtype=bool)
    below = fraction * c0[None, :] >= C
    learned = np.full(k, np.nan)
    for i in np.nonzero(live)[0]:
        hit = np.nonzero(below[:, i])[0]
        if hit.size:
            learned[i] = traj.times[hit[0]]
    b = traj.hessian_scale(0)
    lam_np = lam.numpy()
    pred = None
    if b is not None and b > 0:
        with np.errstate(divide="ignore"):
            pred = np.where(lam_np > 0, math.log(1 / fraction) / (b * np.clip(lam_np, 1e-300,
                                                                               None)), np.inf)
    ok = ~np.isnan(learned)
    rho = _spearman(lam_np[ok], learned[ok]) if ok.sum() >= 3 else float("nan")
    return SpectralSchedule(lam_np, traj.times.copy(), C, learned, pred, fraction, rho)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


# -- kernel motion ---------------------------------------------------------------------------
def relative_change(A: Tensor, A0: Tensor, ord: str | int = 2) -> float:
    """``‖A − A0‖ / ‖A0‖`` of two matrices (``ord=2``: operator norm, the largest singular
    value; ``'fro'``: Frobenius). NaN when ``A0 = 0``."""
    A, A0 = torch.as_tensor(A, dtype=torch.float64), torch.as_tensor(A0, dtype=torch.float64)
    if A.shape != A0.shape or A.dim() != 2:
        raise ShapeError(f"need two matrices of equal shape, got {tuple(A.shape)} and "
                         f"{tuple(A0.shape)}")
    if ord not in (2, "fro"):
        raise ConfigError(f"ord must be 2 (operator norm) or 'fro', got {ord!r}")
    den = float(torch.linalg.matrix_norm(A0, ord=ord))
    return float(torch.linalg.matrix_norm(A - A0, ord=ord)) / den if den > 0 else float("nan")


@dataclasses.dataclass(frozen=True)
class KernelMotion:
    """How far ``K_SS(t)`` (and ``K_QS(t)``) moved from a reference snapshot.

    Attributes:
        indices, steps, times: ``(S,)`` snapshots analysed.
        reference: the reference snapshot index.
        operator: ``(S,)`` ``‖K(t) − K(ref)‖₂ / ‖K(ref)‖₂``.
        frobenius: ``(S,)`` the same in Frobenius norm.
        top_eigenvalue_ratio: ``(S,)`` ``λ_max(K(t)) / λ_max(K(ref))`` (growth of the scale).
        alignment: ``(S,)`` uncentered kernel alignment with ``K(ref)`` (1 = same up to scale).
        cross_operator: ``(S,)`` ``‖K_QS(t) − K_QS(ref)‖₂ / ‖K_QS(ref)‖₂``, or ``None``.
    """

    indices: np.ndarray
    steps: np.ndarray
    times: np.ndarray
    reference: int
    operator: np.ndarray
    frobenius: np.ndarray
    top_eigenvalue_ratio: np.ndarray
    alignment: np.ndarray
    cross_operator: np.ndarray | None

    def summary(self) -> dict[str, float]:
        """The last snapshot's numbers."""
        out = {"kernel_motion": float(self.operator[-1]),
               "kernel_motion_fro": float(self.frobenius[-1]),
               "kernel_scale_ratio": float(self.top_eigenvalue_ratio[-1]),
               "kernel_alignment": float(self.alignment[-1])}
        if self.cross_operator is not None:
            out["cross_kernel_motion"] = float(self.cross_operator[-1])
        return out


def kernel_motion(traj: KernelTrajectory, *, reference: int = 0, every: int = 1
                  ) -> KernelMotion:
    """Relative change of ``K_SS`` (and ``K_QS``) from snapshot ``reference`` at every
    ``every``-th snapshot (and the last).

    Raises:
        ConfigError: ``every < 1`` or a reference outside the run.
    """
    S = len(traj)
    if not -S <= reference < S:
        raise ConfigError(f"reference must be a snapshot index in [0, {S}), got {reference}")
    ref = reference % S
    K0 = traj.kernel(ref)
    Q0 = traj.cross_kernel(ref)
    top0 = float(torch.linalg.eigvalsh(0.5 * (K0 + K0.T))[-1])
    idx = _indices(S, every)
    op, fro, top, al, cr = [], [], [], [], []
    for k in idx:
        K = traj.kernel(k)
        op.append(relative_change(K, K0, 2))
        fro.append(relative_change(K, K0, "fro"))
        top.append(float(torch.linalg.eigvalsh(0.5 * (K + K.T))[-1]) / top0
                   if top0 > 0 else float("nan"))
        al.append(kernel_alignment(K, K0))
        Q = traj.cross_kernel(k)
        if Q0 is not None and Q is not None:
            cr.append(relative_change(Q, Q0, 2))
    return KernelMotion(np.array(idx), traj.steps[idx], traj.times[idx], ref, np.array(op),
                        np.array(fro), np.array(top), np.array(al),
                        np.array(cr) if Q0 is not None else None)
