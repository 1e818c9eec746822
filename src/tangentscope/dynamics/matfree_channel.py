"""Channel, reservoir, spectra and identities of a window, matrix-free (nothing ``N × N``).

On :class:`~tangentscope.dynamics.matfree.MatrixFreeOperators` (``docs/notation.md``):

- :func:`gramian_topk` — the top-``k`` eigenpairs of ``W_S(s, T)`` (block Lanczos or
  randomized Nyström; each product is a forward + adjoint sweep) as a
  :class:`MatrixFreeChannel`; :func:`kernel_topk` — those of ``K_SS(t)``;
- :func:`gramian_density`, :func:`kernel_density` — stochastic Lanczos quadrature densities,
  the shape of the soft reservoir at any ``N``;
- :func:`vector_report` — for given vectors ``ξ`` (label noise, clean targets, ``g(s)``): the
  channel energy ``ξᵀ W_S ξ``, the test visibility ``‖G_Q ξ‖`` with its Cauchy–Schwarz bound,
  and (given a channel) the share of ``‖ξ‖²`` in the computed channel and in the rest;
- :func:`mode_visibility_matfree` — ``‖G_Q ψ_j‖`` of the channel's modes;
- :func:`identity_residuals_matfree` — ``Φ(s) − Φ(T)`` vs ``g(s)ᵀ W_S g(s)``, ``ΔU_Q`` vs
  ``−G_Q g(s)`` and ``g(T)`` vs ``P_g g(s)`` for every end snapshot, one forward sweep of one
  column; :func:`noise_gradients` splits ``g(s)`` into clean and label-noise parts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from ..linalg import (
    Eigenpairs,
    SpectralDensity,
    default_block_size,
    lanczos_topk,
    nystrom_topk,
    slq_density,
)
from .channels import VectorEnergy
from .matfree import Discretization, MatrixFreeOperators
from .matfree_path import KernelPath
from .operators import IdentityResiduals

__all__ = ["MatrixFreeChannel", "gramian_topk", "kernel_topk", "gramian_density",
           "kernel_density", "VectorReport", "vector_report", "mode_visibility_matfree",
           "identity_residuals_matfree", "noise_gradients"]


@dataclasses.dataclass(frozen=True)
class MatrixFreeChannel:
    """The leading modes ``ψ_1..ψ_r`` of a PSD operator (``W_S``) found matrix-free.

    Attributes:
        eigenvalues: ``(r,)`` descending; eigenvectors: ``(N, r)`` orthonormal columns.
        residuals: ``(r,)`` ``‖W ψ − λ ψ‖``.
        matvecs: operator columns spent; products: kernel products spent.
        seconds: wall time; method: ``'lanczos'`` or ``'nystrom'``; converged: tolerance met.

    The *computed channel* is ``span(ψ_1..ψ_r)``; its complement (the reservoir plus any
    channel modes beyond ``r``) is called the rest. ``energy`` splits a vector's ``‖ξ‖²``.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    matvecs: int
    products: int
    seconds: float
    method: str
    converged: bool

    @property
    def rank(self) -> int:
        return self.eigenvalues.shape[0]

    def energy(self, v: Tensor) -> VectorEnergy:
        """``‖ξ‖²`` split into the computed channel and the rest (``per_mode``: ``(r,)``
        ``⟨ψ_j, ξ⟩²`` summed over the columns of ``v``)."""
        V = self.eigenvectors
        x = torch.as_tensor(v, dtype=V.dtype, device=V.device).reshape(V.shape[0], -1)
        per = ((V.T @ x) ** 2).sum(1)
        total, ch = float((x ** 2).sum()), float(per.sum())
        return VectorEnergy(total, ch, max(total - ch, 0.0), per.cpu().numpy())

    def project(self, v: Tensor, part: Literal["channel", "rest"] = "channel") -> Tensor:
        """``Π ξ`` onto the computed channel or its complement (same shape as ``v``)."""
        if part not in ("channel", "rest"):
            raise ConfigError(f"part must be 'channel' or 'rest', got {part!r}")
        V = self.eigenvectors
        x = torch.as_tensor(v, dtype=V.dtype, device=V.device)
        x2 = x.reshape(V.shape[0], -1)
        pc = V @ (V.T @ x2)
        return (pc if part == "channel" else x2 - pc).reshape(x.shape)


def gramian_topk(ops: MatrixFreeOperators, k: int, *, method: str = "lanczos",
                 tol: float = 1e-6, block_size: int | None = None, seed: int = 0,
                 oversample: int = 10, power_iters: int = 1, max_basis: int | None = None,
                 start: Tensor | None = None) -> MatrixFreeChannel:
    """Top-``k`` eigenpairs of ``W_S(s, T)`` without forming it.

    Args:
        ops: the window's operators.
        k: number of modes.
        method: ``'lanczos'`` (:func:`~tangentscope.linalg.lanczos_topk`, stops at
            ``‖Wψ − λψ‖ ≤ tol λ_1``) or ``'nystrom'`` (a fixed ``power_iters + 2`` products of
            ``k + oversample`` columns; read the residuals).
        tol, block_size, max_basis, start: Lanczos options (``block_size`` default
            :func:`~tangentscope.linalg.default_block_size`).
        oversample, power_iters: Nyström options.

    Returns:
        :class:`MatrixFreeChannel`.
    """
    t0, p0 = time.perf_counter(), ops.path.products

    def mv(V: Tensor) -> Tensor:
        return ops.integrated_entk(V)

    common: dict[str, Any] = {"dtype": ops.path.dtype, "device": ops.path.device, "seed": seed}
    if method == "lanczos":
        r = lanczos_topk(mv, ops.N, k, tol=tol, block_size=block_size or default_block_size(k),
                         max_basis=max_basis, start=start, **common)
    elif method == "nystrom":
        r = nystrom_topk(mv, ops.N, k, oversample=oversample, power_iters=power_iters, **common)
    else:
        raise ConfigError(f"method must be 'lanczos' or 'nystrom', got {method!r}")
    return MatrixFreeChannel(r.values, r.vectors, r.residuals, r.matvecs,
                             ops.path.products - p0, time.perf_counter() - t0, method,
                             r.converged)


def kernel_topk(path: KernelPath, snapshot: int, k: int, *, tol: float = 1e-8,
                block_size: int | None = None, seed: int = 0,
                max_basis: int | None = None) -> Eigenpairs:
    """Top-``k`` eigenpairs of ``K_SS(t)`` at a snapshot (block Lanczos on kernel products)."""
    return lanczos_topk(lambda V: path.kernel_matvec(snapshot, V), path.N, k, tol=tol,
                        block_size=block_size or default_block_size(k), seed=seed,
                        max_basis=max_basis, dtype=path.dtype, device=path.device)


def gramian_density(ops: MatrixFreeOperators, *, probes: int = 8, steps: int = 30,
                    seed: int = 0) -> SpectralDensity:
    """SLQ spectral density of ``W_S(s, T)`` (``steps`` sweeps of ``probes`` columns)."""
    return slq_density(ops.integrated_entk, ops.N, probes=probes, steps=steps, seed=seed,
                       dtype=ops.path.dtype, device=ops.path.device)


def kernel_density(path: KernelPath, snapshot: int, *, probes: int = 8, steps: int = 60,
                   seed: int = 0) -> SpectralDensity:
    """SLQ spectral density of ``K_SS(t)`` at a snapshot."""
    return slq_density(lambda V: path.kernel_matvec(snapshot, V), path.N, probes=probes,
                       steps=steps, seed=seed, dtype=path.dtype, device=path.device)


# -- vectors -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VectorReport:
    """What a window did with one vector ``ξ`` ``(N,)``.

    Attributes:
        norm2: ``‖ξ‖²``.
        energy: ``ξᵀ W_S ξ`` (for ``ξ = g(s)``: the loss dissipated, ``Φ(s) − Φ(T)``).
        visibility: ``‖G_Q ξ‖`` (NaN without a test set).
        bound: ``√(ξᵀ W_S ξ · ∫‖K_QQ‖ dτ)`` ≥ ``visibility`` (NaN if the test Gram norm is
            unavailable).
        channel_fraction, rest_fraction: shares of ``‖ξ‖²`` in the given channel and in its
            complement (NaN without a channel).
        dissipated_fraction: ``2b ξᵀ W_S ξ / ‖ξ‖²`` for a loss Hessian ``B = b I`` at ``s``
            (squared loss: in ``[0, 1]``, 1 = fully fitted), else NaN.
    """

    norm2: float
    energy: float
    visibility: float
    bound: float
    channel_fraction: float
    rest_fraction: float
    dissipated_fraction: float

    def summary(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def _columns(vectors: Mapping[str, Tensor], N: int, like: Tensor) -> Tensor:
    cols = []
    for name, v in vectors.items():
        x = torch.as_tensor(v).reshape(-1)
        if x.shape[0] != N:
            raise ShapeError(f"vector {name!r} has {x.shape[0]} entries, the stacked output "
                             f"space has N = {N} (pass (n, p) or (N,))")
        cols.append(x.to(dtype=like.dtype, device=like.device))
    return torch.stack(cols, 1)


def vector_report(ops: MatrixFreeOperators, vectors: Mapping[str, Tensor], *,
                  channel: MatrixFreeChannel | None = None,
                  test_gram: bool = True) -> dict[str, VectorReport]:
    """Channel energy, test visibility and channel share of each vector, in one forward sweep.

    Args:
        ops: the window's operators.
        vectors: name → ``(N,)`` or ``(n, p)`` vector.
        channel: a :class:`MatrixFreeChannel` of the same window for the shares.
        test_gram: compute ``∫‖K_QQ‖`` for the bound (one top eigenvalue of ``K_QQ`` per
            snapshot on a checkpoint path).

    Returns:
        name → :class:`VectorReport`.
    """
    if not vectors:
        return {}
    X = _columns(vectors, ops.N, torch.empty(0, dtype=ops.path.dtype, device=ops.path.device))
    has_q = ops.path.m > 0
    res = ops.apply(X, propagate=False, transfer=has_q, quadratic=True)
    assert res.VWV is not None
    energy = torch.diagonal(res.VWV)
    vis = (res.GV.norm(dim=0) if res.GV is not None
           else torch.full_like(energy, float("nan")))
    gram = ops.test_gram_integral() if (has_q and test_gram) else None
    H = ops.path.hessian(ops.start)
    b = float(H[0, 0, 0])
    scalar = torch.equal(H, b * torch.eye(H.shape[1], dtype=H.dtype,
                                          device=H.device).expand_as(H))
    out = {}
    for j, name in enumerate(vectors):
        n2 = float((X[:, j] ** 2).sum())
        e = float(energy[j])
        ch = rest = float("nan")
        if channel is not None:
            en = channel.energy(X[:, j])
            ch, rest = en.channel_fraction, en.reservoir_fraction
        out[name] = VectorReport(
            n2, e, float(vis[j]), float(np.sqrt(max(e, 0.0) * gram)) if gram is not None
            else float("nan"), ch, rest, 2 * b * e / n2 if scalar and n2 > 0 else float("nan"))
    return out


def mode_visibility_matfree(ops: MatrixFreeOperators, channel: MatrixFreeChannel) -> Tensor:
    """``‖G_Q ψ_j‖`` ``(r,)`` for the channel's modes (one forward sweep of ``r`` columns)."""
    return ops.transfer(channel.eigenvectors).norm(dim=0)


# -- identities ----------------------------------------------------------------------------------
def _rel(err: float, ref: float) -> float:
    return err / ref if ref > 0 else (0.0 if err == 0 else float("inf"))


def identity_residuals_matfree(path: KernelPath, start: int = 0, stop: int | None = None, *,
                               discretization: Discretization = "exp",
                               **options: Any) -> IdentityResiduals:
    """Matrix-free twin of :func:`~tangentscope.dynamics.identity_residuals`: the identities
    ``Φ(s) − Φ(T) = g(s)ᵀ W g(s)``, ``U_Q(T) − U_Q(s) = −G g(s)`` and ``g(T) = P g(s)`` for
    every end snapshot ``T`` in ``(s, stop]``, from one forward sweep of the column ``g(s)``.

    Args:
        path, start, stop, discretization: the window (as :class:`MatrixFreeOperators`).
        options: forwarded to :class:`MatrixFreeOperators` (``krylov_tol``, ...).
    """
    ops = MatrixFreeOperators(path, start, stop, discretization=discretization, **options)
    s = ops.start
    g0 = path.gradient(s).reshape(-1, 1)
    has_q = path.m > 0
    U0 = path.U_Q(s)
    rows = []
    for step in ops.accumulate(g0, transfer=has_q):
        T = step.stop
        actual = path.loss(s) - path.loss(T)
        d = float(step.VWV[0, 0])
        gT, gs = path.gradient(T).reshape(-1), g0[:, 0]
        g_err = _rel(float((step.PV[:, 0] - gT).norm()), float((gT - gs).norm()))
        disp = float("nan")
        UT = path.U_Q(T)
        if has_q and step.GV is not None and U0 is not None and UT is not None:
            dU = (UT - U0).reshape(-1)
            disp = _rel(float((dU + step.GV[:, 0]).norm()), float(dU.norm()))
        rows.append((T, actual, d, _rel(abs(d - actual), abs(actual)), disp, g_err))
    a = list(zip(*rows))
    stops = np.array(a[0])
    return IdentityResiduals(
        start=s, stops=stops, times=np.asarray(path.times)[stops],
        dissipation_actual=np.array(a[1]), dissipation_predicted=np.array(a[2]),
        dissipation_error=np.array(a[3]),
        displacement_error=np.array(a[4], dtype=float) if has_q else None,
        gradient_error=np.array(a[5]), discretization=discretization)


def noise_gradients(path: KernelPath, y_clean: Tensor, start: int = 0,
                    loss: Any = None) -> tuple[Tensor, Tensor]:
    """``(g_clean, g_noise)`` ``(N,)`` each: ``g_clean = ∇_u Φ(u(s); y_clean)`` and
    ``g_noise = g(s) − g_clean`` (squared loss: ``−ε/n`` for label noise ``ε``).

    Args:
        path: the run; y_clean: clean targets (as the loss takes them).
        loss: the ``OutputLoss`` (default: the path's ``loss_fn``).

    Raises:
        ConfigError: the path does not know its loss and none was given.
    """
    fn = loss if loss is not None else getattr(path, "loss_fn", None)
    if fn is None:
        raise ConfigError("pass loss= (the path does not carry its loss function)")
    y = torch.as_tensor(y_clean, device=path.device)
    y = y.to(path.dtype) if y.is_floating_point() else y
    g_clean = fn.grad(path.u(start), y).reshape(-1)
    return g_clean, path.gradient(start).reshape(-1) - g_clean
