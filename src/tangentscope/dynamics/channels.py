"""Signal channel and reservoir: the eigen-split of the integrated eNTK ``W_S``.

With ``W_S = Σ_j λ_j ψ_j ψ_jᵀ`` (descending), the *signal channel* is the span of the modes with
large ``λ_j`` (training dissipated loss there) and the *reservoir* the rest (the essay's soft
``ker W_S``). Theorem (docs/notation.md): ``ker W_S ⊆ ker G_Q``; quantitatively, by Cauchy–Schwarz,
``‖G_Q ψ_j‖² ≤ λ_j · ∫‖K_QQ‖₂ dτ`` — a mode's test visibility is at most ``√λ_j`` times a
constant of the run. Everything here is measured, not assumed:

- :func:`split_channels` — the split (relative or absolute threshold, or the largest spectral
  gap) and the energy of any vectors (residual, labels, known label noise) in each part;
- :func:`mode_visibility` — ``‖G_Q ψ_j‖`` for every mode, with the bound;
- :func:`noise_transfer` — the benign-overfitting check: where the label noise sits and the
  test displacement it causes through ``G_Q``;
- :func:`channel_timeline` — the channel of ``W_S(s, t)`` as ``t`` grows.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from ..losses import get_loss
from .operators import Discretization, accumulate_operators
from .trajectory import KernelTrajectory

__all__ = ["VectorEnergy", "ChannelSplit", "split_channels", "Visibility", "mode_visibility",
           "NoiseTransfer", "noise_transfer", "label_noise_gradients", "ChannelTimeline",
           "channel_timeline"]

SplitMode = Literal["relative", "absolute", "gap"]


@dataclasses.dataclass(frozen=True)
class VectorEnergy:
    """Squared norm of a vector in each part of the split.

    Attributes:
        total: ``‖v‖²``.
        channel: ``‖Π_channel v‖²``; ``reservoir``: ``‖Π_reservoir v‖²``.
        per_mode: ``(N,)`` ``⟨ψ_j, v⟩²`` in the split's mode order (summed over columns of v).
    """

    total: float
    channel: float
    reservoir: float
    per_mode: np.ndarray

    @property
    def channel_fraction(self) -> float:
        return self.channel / self.total if self.total > 0 else float("nan")

    @property
    def reservoir_fraction(self) -> float:
        return self.reservoir / self.total if self.total > 0 else float("nan")

    def summary(self) -> dict[str, float]:
        return {"total": self.total, "channel_fraction": self.channel_fraction,
                "reservoir_fraction": self.reservoir_fraction}

    def as_dict(self) -> dict[str, float]:
        """Deprecated name of :meth:`summary` (warns; will be removed)."""
        warnings.warn("VectorEnergy.as_dict() is now .summary() (same dict)", FutureWarning,
                      stacklevel=2)
        return self.summary()


@dataclasses.dataclass(frozen=True)
class ChannelSplit:
    """The channel/reservoir split of a symmetric PSD operator (usually ``W_S``).

    Attributes:
        eigenvalues: ``(N,)`` descending; ``eigenvectors``: ``(N, N)`` columns ``ψ_j``.
        channel: indices of the channel modes (the first ``rank``); ``reservoir``: the rest.
        cut: the eigenvalue threshold actually used (channel: ``λ_j > cut``).
        mode: ``'relative'``, ``'absolute'`` or ``'gap'``.
        gap: ``λ_min(channel) / λ_max(reservoir)`` (``inf`` for an empty reservoir or one that
            is null to rounding, ``λ ≤ N ε λ_max``).
        energies: name → :class:`VectorEnergy` of the vectors passed to :func:`split_channels`.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    channel: np.ndarray
    reservoir: np.ndarray
    cut: float
    mode: str
    gap: float
    energies: Mapping[str, VectorEnergy]

    @property
    def rank(self) -> int:
        """Dimension of the signal channel."""
        return len(self.channel)

    def energy(self, v: Tensor) -> VectorEnergy:
        """Energy of ``v`` (``(N,)``, ``(n, p)`` or ``(N, c)`` columns) in channel and reservoir."""
        V = self.eigenvectors
        x = torch.as_tensor(v, dtype=V.dtype).reshape(V.shape[0], -1)
        per = ((V.T @ x) ** 2).sum(1)
        r = self.rank
        return VectorEnergy(float((x ** 2).sum()), float(per[:r].sum()), float(per[r:].sum()),
                            per.numpy())

    def quadratic_form(self, v: Tensor) -> float:
        """``vᵀ W v = Σ_j λ_j ⟨ψ_j, v⟩²`` (for ``W_S``: the loss dissipated along ``v``)."""
        e = self.energy(v)
        return float((self.eigenvalues.numpy() * e.per_mode).sum())

    def project(self, v: Tensor, part: Literal["channel", "reservoir"] = "channel") -> Tensor:
        """``Π v`` onto the channel or the reservoir (same shape as ``v``)."""
        if part not in ("channel", "reservoir"):
            raise ConfigError(f"part must be 'channel' or 'reservoir', got {part!r}")
        V = self.eigenvectors
        x = torch.as_tensor(v, dtype=V.dtype)
        B = V[:, :self.rank] if part == "channel" else V[:, self.rank:]
        return (B @ (B.T @ x.reshape(V.shape[0], -1))).reshape(x.shape)


def split_channels(W: Tensor, *, threshold: float | None = None, mode: SplitMode = "relative",
                   vectors: Mapping[str, Tensor] | None = None) -> ChannelSplit:
    """Split output-gradient space into signal channel and reservoir.

    Args:
        W: ``(N, N)`` symmetric PSD operator (``W_S``, or a kernel ``K_SS``).
        threshold: ``mode='relative'``: channel is ``λ_j > threshold · λ_max`` (default 1e-3);
            ``'absolute'``: ``λ_j > threshold`` (required); ``'gap'``: ignored.
        mode: ``'relative'``, ``'absolute'`` or ``'gap'`` (cut at the largest ratio
            ``λ_j / λ_{j+1}`` of consecutive eigenvalues, those below the rounding level
            ``N ε λ_max`` counted as that level: an exactly singular ``W`` splits at its rank).
        vectors: name → vector (``(N,)`` or ``(n, p)``) whose energy to split, e.g.
            ``{'residual': g, 'labels': y, 'noise': ε}``.

    Raises:
        ShapeError: ``W`` is not square.
        ConfigError: unknown mode, or ``'absolute'`` without a threshold.
    """
    W = torch.as_tensor(W, dtype=torch.float64)
    if W.dim() != 2 or W.shape[0] != W.shape[1]:
        raise ShapeError(f"W must be a square (N, N) matrix, got {tuple(W.shape)}")
    lam, V = torch.linalg.eigh(0.5 * (W + W.T))
    lam, V = lam.flip(0), V.flip(1)
    top = max(float(lam[0]), 0.0)
    floor = top * W.shape[0] * torch.finfo(torch.float64).eps
    if mode == "relative":
        cut = (1e-3 if threshold is None else threshold) * top
    elif mode == "absolute":
        if threshold is None:
            raise ConfigError("mode='absolute' needs threshold= (an eigenvalue of W)")
        cut = float(threshold)
    elif mode == "gap":
        r = min(int((lam > floor).sum()), len(lam) - 1)     # consecutive pairs (j, j+1)
        if r == 0:
            cut = floor
        else:
            j = int(torch.argmax(lam[:r] / lam[1:r + 1].clamp_min(floor)))
            cut = max(float(lam[j + 1]), floor)
    else:
        raise ConfigError(f"mode must be 'relative', 'absolute' or 'gap', got {mode!r}")
    rank = int((lam > cut).sum())
    res_max = float(lam[rank]) if rank < len(lam) else 0.0
    if rank == 0:
        gap = float("nan")
    else:
        gap = float(lam[rank - 1]) / res_max if res_max > floor else float("inf")
    split = ChannelSplit(lam, V, np.arange(rank), np.arange(rank, len(lam)), float(cut), mode,
                         gap, {})
    energies = {k: split.energy(v) for k, v in (vectors or {}).items()}
    return dataclasses.replace(split, energies=energies)


# -- test visibility -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Visibility:
    """Per-mode test visibility ``‖G_Q ψ_j‖`` against ``λ_j(W_S)``.

    Attributes:
        eigenvalues: ``(N,)`` ``λ_j`` (descending); ``visibility``: ``(N,)`` ``‖G_Q ψ_j‖``.
        bound: ``(N,)`` ``√(max(λ_j, 0) ∫‖K_QQ‖ dτ)`` or ``None`` (needs the test Gram norm).
        rank: channel dimension of the split used.
    """

    eigenvalues: np.ndarray
    visibility: np.ndarray
    bound: np.ndarray | None
    rank: int

    def summary(self) -> dict[str, float]:
        """Headline numbers: largest reservoir vs channel visibility, the bound's worst ratio,
        and the log-log slope of visibility against eigenvalue (1/2 where the bound is tight)."""
        vis, lam, r = self.visibility, self.eigenvalues, self.rank
        ch = float(vis[:r].max()) if r else float("nan")
        res = float(vis[r:].max()) if r < len(vis) else 0.0
        out = {"max_channel_visibility": ch, "max_reservoir_visibility": res,
               "reservoir_to_channel_visibility": res / ch if ch > 0 else float("nan")}
        if self.bound is not None:
            ok = self.bound > 0
            out["max_bound_ratio"] = float((vis[ok] / self.bound[ok]).max()) if ok.any() else 0.0
        pos = (lam > lam[0] * 1e-12) & (vis > 0)
        if pos.sum() >= 3:
            out["loglog_slope"] = float(np.polyfit(np.log(lam[pos]), np.log(vis[pos]), 1)[0])
        return out


def mode_visibility(split: ChannelSplit, G: Tensor, test_gram_integral: float | None = None
                    ) -> Visibility:
    """``‖G_Q ψ_j‖`` for every eigenvector ``ψ_j`` of the split (and the Cauchy–Schwarz bound).

    Args:
        split: a split of ``W_S(s, T)``.
        G: ``(m p, N)`` ``G_Q(T, s)`` of the same window.
        test_gram_integral: ``∫_s^T ‖K_QQ‖₂ dτ`` (``WindowOperators.test_gram_integral``).
    """
    G = torch.as_tensor(G, dtype=torch.float64)
    if G.shape[1] != split.eigenvectors.shape[0]:
        raise ShapeError(f"G is {tuple(G.shape)} but the split is of an N = "
                         f"{split.eigenvectors.shape[0]} operator")
    vis = torch.linalg.norm(G @ split.eigenvectors, dim=0).numpy()
    lam = split.eigenvalues.numpy()
    bound = None if test_gram_integral is None else np.sqrt(np.clip(lam, 0, None)
                                                            * test_gram_integral)
    return Visibility(lam, vis, bound, split.rank)


# -- benign overfitting ----------------------------------------------------------------------
def label_noise_gradients(traj: KernelTrajectory, y_clean: Tensor, start: int = 0
                          ) -> tuple[Tensor, Tensor]:
    """Split ``g(s)`` into a clean part and a label-noise part.

    ``g_clean = ∇_u Φ(u(s); y_clean)`` and ``g_noise = g(s) − g_clean`` (for squared loss
    ``−ε/n`` with ``ε = y − y_clean``). Both ``(N,)``.
    """
    loss = get_loss(traj.meta.get("loss", "squared"))
    y = torch.as_tensor(y_clean)
    y = y.to(torch.float64) if y.is_floating_point() else y
    g_clean = loss.grad(traj.u[start], y).reshape(-1)
    return g_clean, traj.g[start].reshape(-1) - g_clean


@dataclasses.dataclass(frozen=True)
class NoiseTransfer:
    """Where the label noise sits, and the test displacement it causes through ``G_Q``.

    Attributes:
        noise: :class:`VectorEnergy` of the noise part of ``g(s)``; ``clean``: of the clean part.
        displacement: ``(m p,)`` ``−G_Q g_noise``: the test-output change caused by the noise.
        displacement_channel, displacement_reservoir: its parts from the channel and the
            reservoir components of ``g_noise``.
        test_mse, test_mse_without_noise: test MSE of ``U_Q(T)`` against ``y_test`` and of
            ``U_Q(T)`` minus ``displacement`` (first-order counterfactual), or NaN.
        noise_fitted, clean_fitted: fraction of each part's own loss ``‖v‖²/(2b)`` that the
            window dissipated, ``2b vᵀ W v / ‖v‖²`` (loss Hessian ``B = b I``; else NaN). At
            interpolation this is 1: a fitted vector is, necessarily, in the top of the channel.
    """

    noise: VectorEnergy
    clean: VectorEnergy
    displacement: Tensor
    displacement_channel: Tensor
    displacement_reservoir: Tensor
    test_mse: float
    test_mse_without_noise: float
    noise_fitted: float = float("nan")
    clean_fitted: float = float("nan")

    def summary(self) -> dict[str, float]:
        def rms(v: Tensor) -> float:
            return float(v.pow(2).mean().sqrt())

        return {"noise_reservoir_fraction": self.noise.reservoir_fraction,
                "clean_reservoir_fraction": self.clean.reservoir_fraction,
                "noise_test_rms": rms(self.displacement),
                "noise_test_rms_channel": rms(self.displacement_channel),
                "noise_test_rms_reservoir": rms(self.displacement_reservoir),
                "test_mse": self.test_mse, "test_mse_without_noise": self.test_mse_without_noise,
                "noise_test_mse": self.test_mse - self.test_mse_without_noise,
                "noise_fitted": self.noise_fitted, "clean_fitted": self.clean_fitted}


def noise_transfer(split: ChannelSplit, G: Tensor, g_noise: Tensor, g_clean: Tensor, *,
                   U_Q_final: Tensor | None = None, y_test: Tensor | None = None,
                   hessian_scale: float | None = None) -> NoiseTransfer:
    """The benign-overfitting check on a window ``[s, T]``.

    Args:
        split: split of ``W_S(s, T)``.
        G: ``(m p, N)`` ``G_Q(T, s)``.
        g_noise, g_clean: ``(N,)`` parts of ``g(s)`` (:func:`label_noise_gradients`).
        U_Q_final: ``(m, p)`` test outputs at ``T``; with ``y_test`` gives the MSE numbers.
        hessian_scale: ``b`` when the loss Hessian is ``b I`` (squared loss: ``1/n``), for the
            fitted fractions.
    """
    G = torch.as_tensor(G, dtype=torch.float64)
    gn = torch.as_tensor(g_noise, dtype=torch.float64).reshape(-1)
    d = -(G @ gn)
    d_ch = -(G @ split.project(gn, "channel"))
    mse = mse0 = float("nan")
    if U_Q_final is not None and y_test is not None:
        U = U_Q_final.reshape(-1).to(torch.float64)
        yt = torch.as_tensor(y_test, dtype=torch.float64).reshape(-1)
        mse = float((U - yt).pow(2).mean())
        mse0 = float((U - d - yt).pow(2).mean())
    def fitted(v: Tensor) -> float:
        nrm2 = float(v.pow(2).sum())
        if hessian_scale is None or nrm2 == 0:
            return float("nan")
        return 2 * hessian_scale * split.quadratic_form(v) / nrm2

    gc = torch.as_tensor(g_clean, dtype=torch.float64).reshape(-1)
    return NoiseTransfer(split.energy(gn), split.energy(gc), d, d_ch, d - d_ch, mse, mse0,
                         fitted(gn), fitted(gc))


# -- the channel as training proceeds --------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ChannelTimeline:
    """The split of ``W_S(s, t)`` for growing ``t``.

    Attributes:
        stops: ``(K,)`` end snapshots; ``times`` their training times.
        rank: ``(K,)`` channel dimension.
        top_eigenvalues: ``(K, r)`` the ``r`` largest eigenvalues of ``W_S(s, t)``.
        channel_fraction: name → ``(K,)`` fraction of each vector's energy in the channel.
    """

    stops: np.ndarray
    times: np.ndarray
    rank: np.ndarray
    top_eigenvalues: np.ndarray
    channel_fraction: Mapping[str, np.ndarray]


def channel_timeline(traj: KernelTrajectory, start: int = 0, stop: int | None = None, *,
                     vectors: Mapping[str, Tensor] | None = None, threshold: float | None = None,
                     mode: SplitMode = "relative", discretization: Discretization = "midpoint",
                     every: int = 1, top: int = 10) -> ChannelTimeline:
    """Split ``W_S(s, t_k)`` for ``t_k`` every ``every`` snapshots (one pass over the run, one
    ``N × N`` eigen-decomposition per kept ``t_k``)."""
    stops, times, ranks, tops = [], [], [], []
    fr: dict[str, list[float]] = {k: [] for k in (vectors or {})}
    for i, ops in enumerate(accumulate_operators(traj, start, stop,
                                                 discretization=discretization)):
        last = (stop is None and ops.stop == len(traj) - 1) or ops.stop == stop
        if (i + 1) % every and not last:
            continue
        sp = split_channels(ops.W, threshold=threshold, mode=mode, vectors=vectors)
        stops.append(ops.stop)
        times.append(ops.t_stop)
        ranks.append(sp.rank)
        lam = sp.eigenvalues.numpy()[:top]
        tops.append(np.pad(lam, (0, top - len(lam)), constant_values=np.nan))
        for k, e in sp.energies.items():
            fr[k].append(e.channel_fraction)
    return ChannelTimeline(np.array(stops), np.array(times), np.array(ranks), np.array(tops),
                           {k: np.array(v) for k, v in fr.items()})
