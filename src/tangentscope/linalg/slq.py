"""Spectral densities by stochastic Lanczos quadrature (SLQ; Ubaru, Chen & Saad 2017; the method
PyHessian uses for Hessian spectra).

For a unit probe ``v``, ``m`` Lanczos steps give ``T_m = Y diag(θ) Yᵀ``; the nodes ``θ_j`` and
weights ``τ_j² = (Y_{0j})²`` form the ``m``-point Gauss quadrature of ``v``'s spectral measure
``μ_v = Σ_i (v·q_i)² δ_{λ_i}``, exact for polynomials of degree ``≤ 2m − 1``. With Rademacher
probes ``E[v vᵀ] = I/N``, so the average over probes estimates the eigenvalue density
``(1/N) Σ_i δ_{λ_i}``: ``tr f(A) ≈ N · mean_l Σ_j τ_{lj}² f(θ_{lj})``. Probes run in lockstep,
one block product per step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import ShapeError
from .krylov import LockstepLanczos

__all__ = ["SpectralDensity", "slq_density", "dense_density"]


@dataclasses.dataclass(frozen=True)
class SpectralDensity:
    """Quadrature nodes and weights of a spectral density estimate.

    Attributes:
        nodes: ``(probes, m)`` Ritz values ``θ_{lj}`` (padding has weight 0).
        weights: ``(probes, m)`` ``τ_{lj}²``, each row sums to 1.
        n: dimension ``N`` of the operator.
        matvecs: single-vector products spent.
    """

    nodes: Tensor
    weights: Tensor
    n: int
    matvecs: int = 0

    @property
    def probes(self) -> int:
        return self.nodes.shape[0]

    def trace(self, f: Callable[[Tensor], Tensor]) -> float:
        """Estimate of ``tr f(A) = Σ_i f(λ_i)`` (``f`` elementwise on a tensor)."""
        return float(self.n * (self.weights * f(self.nodes)).sum(1).mean())

    def fraction_below(self, x: float) -> float:
        """Estimated fraction of eigenvalues ``≤ x``."""
        return float((self.weights * (self.nodes <= x)).sum(1).mean())

    def density(self, grid: Tensor, sigma: float | None = None) -> Tensor:
        """Gaussian-broadened density on ``grid`` ``(G,)`` (integrates to 1 over the line).

        Args:
            grid: evaluation points ``(G,)``.
            sigma: broadening (default: 1/100 of the node range).
        """
        t, w = self.nodes.reshape(-1), self.weights.reshape(-1) / self.probes
        if sigma is None:
            sigma = max(float(t.max() - t.min()) / 100, 1e-300)
        z = (grid.to(t.dtype)[:, None] - t[None, :]) / sigma
        return (w[None, :] * torch.exp(-0.5 * z * z)).sum(1) / (sigma * math.sqrt(2 * math.pi))

    def log_density(self, grid: Tensor, sigma: float = 0.1, floor: float = 0.0) -> Tensor:
        """Density of ``log10 λ`` on ``grid`` ``(G,)`` (decades), Gaussian-broadened by
        ``sigma`` decades, for the nodes ``λ > floor`` (mass of the others is left out): the
        shape of a spectrum spanning many decades (a soft reservoir)."""
        t, w = self.nodes.reshape(-1), self.weights.reshape(-1) / self.probes
        keep = t > max(floor, 1e-300)
        lt, lw = torch.log10(t[keep]), w[keep]
        z = (grid.to(t.dtype)[:, None] - lt[None, :]) / sigma
        return (lw[None, :] * torch.exp(-0.5 * z * z)).sum(1) / (sigma * math.sqrt(2 * math.pi))


def slq_density(matvec: Callable[[Tensor], Tensor], n: int, *, probes: int = 10,
                steps: int = 40, seed: int = 0, dtype: torch.dtype = torch.float64,
                device: torch.device | str = "cpu",
                reorthogonalize: bool = True, start: Tensor | None = None) -> SpectralDensity:
    """SLQ estimate of the spectral density of a symmetric operator.

    Args:
        matvec: ``V (n, b) -> A V (n, b)``.
        n: dimension ``N``.
        probes: number of Rademacher probes (run together as one block).
        steps: Lanczos steps per probe (``m``; clipped to ``n``).
        seed: probe seed.
        reorthogonalize: full reorthogonalization (memory ``steps · N · probes`` floats);
            without it, ghost copies of converged Ritz values can appear (weights stay valid).
        start: ``(n, b)`` given probe vectors instead of ``probes`` Rademacher ones (each is
            normalized): the Gauss quadrature of each vector's own spectral measure (e.g. the
            share of a vector's ``‖v‖²`` above an eigenvalue cut, ``fraction_below`` per row).

    Returns:
        :class:`SpectralDensity`.

    Raises:
        ShapeError: ``probes`` or ``steps`` below 1.
    """
    if probes < 1 or steps < 1:
        raise ShapeError(f"probes and steps must be >= 1, got {probes}, {steps}")
    if start is not None:
        if start.dim() != 2 or start.shape[0] != n or start.shape[1] < 1:
            raise ShapeError(f"start must be (n, b) with n = {n}, got {tuple(start.shape)}")
        V = (start / start.norm(dim=0, keepdim=True)).to(dtype)
        probes = V.shape[1]
    else:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        V = (torch.randint(0, 2, (n, probes), generator=gen) * 2 - 1).to(dtype) / math.sqrt(n)
    lz = LockstepLanczos(matvec, V.to(device), reorthogonalize=reorthogonalize)
    for _ in range(min(steps, n)):
        if not bool(lz.active.any()):
            break
        lz.step()
    m = int(lz.dim.max())
    nodes = torch.zeros(probes, m, dtype=dtype)
    weights = torch.zeros(probes, m, dtype=dtype)
    for d in torch.unique(lz.dim).tolist():
        cols = torch.nonzero(lz.dim == d).flatten()
        theta, Y = torch.linalg.eigh(lz.tridiagonal(cols))
        nodes[cols.cpu(), :d] = theta.cpu()
        weights[cols.cpu(), :d] = (Y[:, 0, :] ** 2).cpu()
    return SpectralDensity(nodes, weights, n, lz.matvecs)


def dense_density(A: Tensor) -> SpectralDensity:
    """Brute-force twin: the exact density ``(1/N) Σ δ_{λ_i}`` of a dense symmetric matrix as a
    one-probe :class:`SpectralDensity` (nodes = eigenvalues, weights = ``1/N``)."""
    lam = torch.linalg.eigvalsh(0.5 * (A + A.T))
    N = lam.shape[0]
    return SpectralDensity(lam[None, :], torch.full((1, N), 1.0 / N, dtype=lam.dtype), N, N)
