"""The soft reservoir's boundary: the spectrum of ``W_S`` near the channel/reservoir cut.

Under squared loss (``B = b I``) the eigenvalues ``σ_j = 2b λ_j(W_S(s, T))`` lie in ``[0, 1]``
(docs/notation.md): 1 is a fully fitted direction, 0 an untouched one (the reservoir). The
essay's reservoir is *soft*: there is no exact null space, and the reading note asks how the
**gap** between the lowest channel eigenvalue and the highest reservoir eigenvalue scales with
width, depth and training length. Here the gap is measured, not assumed:

- :func:`reservoir_gap` — gap statistics of one spectrum (:class:`ReservoirGap`): the ratio
  of the eigenvalues on either side of a cut, the largest consecutive ratio anywhere (the
  natural boundary, if there is one), and the *band occupancy* — the fraction of modes in the
  soft band ``σ ∈ [lo, hi]`` (0 for a hard split);
- :func:`band_fractions` — the share of a vector's energy below, inside and above the band
  (e.g. the label noise: the part inside the band is the part that is only partly fitted);
- :func:`frozen_gramian_spectrum` — the frozen-kernel prediction ``σ_j = 1 − e^{−2bμ_jτ}``
  (gradient flow) or ``1 − (1 − η b μ_j)^{2t}`` (gradient descent) from the eigenvalues
  ``μ_j`` of ``K_SS``: what the gap would be if the kernel did not move;
- :func:`slq_band_fraction` — the band occupancy from a stochastic-Lanczos density (for ``N``
  too large for an eigen-decomposition);
- :func:`gap_timeline` — all of the above for the growing windows ``[s, t_k]`` of a recorded
  run, with the label noise's test displacement ``−G_Q(t_k, s) g_noise`` (one pass), and
  optionally the SLQ band estimate beside the exact one.

Why the band: for a frozen kernel the band ``σ ∈ [0.1, 0.9]`` holds the kernel eigenvalues
``μ ∈ [0.053, 1.15]/(bτ)`` — a window of 1.34 decades that slides down the kernel spectrum as
``1/τ``. A spectrum with a real gap leaves it empty for most ``τ``; a power-law spectrum never
does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from ..linalg import SpectralDensity, slq_density
from .channels import label_noise_gradients, split_channels
from .operators import Discretization, accumulate_operators
from .trajectory import KernelTrajectory

__all__ = ["ReservoirGap", "reservoir_gap", "band_fractions", "frozen_gramian_spectrum",
           "slq_band_fraction", "GapTimeline", "gap_timeline"]

Band = tuple[float, float]


def _check_band(band: Band, cut: float) -> None:
    lo, hi = band
    if not (0 < lo < hi < 1) or not 0 < cut < 1:
        raise ConfigError(f"band must be 0 < lo < hi < 1 and cut in (0, 1) (fractions of the "
                          f"saturation value), got band={band}, cut={cut}")


def _normalized(eigenvalues: Any, saturation: float | None) -> np.ndarray:
    lam = np.sort(np.asarray(torch.as_tensor(eigenvalues, dtype=torch.float64).cpu(),
                             dtype=float).reshape(-1))[::-1]
    if lam.size == 0:
        raise ShapeError("reservoir_gap needs at least one eigenvalue")
    if saturation is None:
        saturation = max(float(lam[0]), 1e-300)
    if not (saturation > 0 and math.isfinite(saturation)):
        raise ConfigError(f"saturation must be a positive number (1/(2b) for squared loss), "
                          f"got {saturation!r}")
    return lam / saturation


@dataclasses.dataclass(frozen=True)
class ReservoirGap:
    """Gap statistics of one spectrum ``σ_1 ≥ … ≥ σ_N`` (normalized to the saturation value).

    Attributes:
        size: ``N``.
        cut: the channel is ``σ > cut`` (default 0.5: half the loss of that direction
            dissipated).
        rank: channel dimension at the cut.
        edge_channel: ``σ_rank``, the smallest channel eigenvalue (NaN for an empty channel).
        edge_reservoir: ``σ_{rank+1}``, the largest reservoir eigenvalue (0 for an empty
            reservoir).
        gap_ratio: ``edge_channel / edge_reservoir`` (``inf`` when the reservoir is null to
            rounding, NaN for an empty channel).
        log_gap: ``log10(gap_ratio)`` (decades).
        max_log_gap: the largest ``log10(σ_j / σ_{j+1})`` over consecutive pairs both above
            the rounding floor ``σ_1 N ε`` — the natural boundary, wherever it is; ``inf``
            when some (not all) eigenvalues are at or below the floor (a null space).
        max_gap_rank: the channel dimension of a cut at that largest ratio (for ``inf``: the
            number of eigenvalues above the floor).
        band: ``(lo, hi)``; band_count: modes with ``lo ≤ σ ≤ hi``; band_fraction: their share
            of ``N`` (0 = hard split, every mode fitted or untouched).
        effective_rank: ``(Σσ)² / Σσ²`` (participation ratio).
    """

    size: int
    cut: float
    rank: int
    edge_channel: float
    edge_reservoir: float
    gap_ratio: float
    log_gap: float
    max_log_gap: float
    max_gap_rank: int
    band: Band
    band_count: int
    band_fraction: float
    effective_rank: float

    def summary(self) -> dict[str, float]:
        """The scalar fields (``band`` as ``band_lo``/``band_hi``)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "band"}
        d["band_lo"], d["band_hi"] = self.band
        return d


def reservoir_gap(eigenvalues: Any, *, saturation: float | None = None, cut: float = 0.5,
                  band: Band = (0.1, 0.9)) -> ReservoirGap:
    """Gap statistics of the spectrum of ``W_S`` (or of any PSD operator).

    Args:
        eigenvalues: ``(N,)`` eigenvalues (any order).
        saturation: the value a fully fitted direction reaches (``1/(2b)`` for ``W_S`` under
            squared loss, ``n/2`` for ``Φ`` of docs/notation.md); default the largest eigenvalue.
        cut: channel threshold as a fraction of ``saturation``.
        band: the soft band ``(lo, hi)`` as fractions of ``saturation``.

    Raises:
        ConfigError: a band or cut outside ``(0, 1)``, or a non-positive saturation.
        ShapeError: no eigenvalues.
    """
    _check_band(band, cut)
    s = _normalized(eigenvalues, saturation)
    N = s.size
    floor = max(float(s[0]), 0.0) * N * np.finfo(float).eps
    rank = int((s > cut).sum())
    edge_c = float(s[rank - 1]) if rank else float("nan")
    edge_r = float(max(s[rank], 0.0)) if rank < N else 0.0
    if rank == 0:
        ratio = float("nan")
    else:
        ratio = edge_c / edge_r if edge_r > floor else float("inf")
    live = int((s > floor).sum())
    if 0 < live < N:                             # a null space to rounding: an infinite gap
        max_lg, max_rank = float("inf"), live
    elif live >= 2:                              # pairs (i, i+1), both above the floor
        lg = np.log10(s[:live - 1] / s[1:live])
        i = int(np.argmax(lg))
        max_lg, max_rank = float(lg[i]), i + 1
    else:
        max_lg, max_rank = 0.0, live
    lo, hi = band
    count = int(((s >= lo) & (s <= hi)).sum())
    pos = np.clip(s, 0.0, None)
    er = float(pos.sum() ** 2 / (pos ** 2).sum()) if (pos ** 2).sum() > 0 else 0.0
    return ReservoirGap(N, cut, rank, edge_c, edge_r, ratio,
                        float(np.log10(ratio)) if ratio > 0 else float("nan"), max_lg, max_rank,
                        (float(lo), float(hi)), count, count / N, er)


def band_fractions(eigenvalues: Any, per_mode: Any, *, saturation: float | None = None,
                   band: Band = (0.1, 0.9)) -> dict[str, float]:
    """The share of a vector's energy in the reservoir (``σ < lo``), the soft band and the
    fitted channel (``σ > hi``).

    Args:
        eigenvalues: ``(N,)`` eigenvalues, in the same order as ``per_mode``.
        per_mode: ``(N,)`` the vector's energy ``⟨ψ_j, v⟩²`` per mode (e.g.
            ``ChannelSplit.energy(v).per_mode``).
        saturation, band: as :func:`reservoir_gap`.

    Returns:
        ``{'below': …, 'band': …, 'above': …}`` (summing to 1; NaN for a zero vector).
    """
    _check_band(band, 0.5)
    lam = np.asarray(torch.as_tensor(eigenvalues, dtype=torch.float64).cpu(), dtype=float)
    e = np.asarray(per_mode, dtype=float).reshape(-1)
    if lam.shape != e.shape:
        raise ShapeError(f"{lam.size} eigenvalues but {e.size} per-mode energies")
    sat = saturation if saturation is not None else max(float(lam.max()), 1e-300)
    s = lam / sat
    tot = float(e.sum())
    if tot <= 0:
        return {"below": float("nan"), "band": float("nan"), "above": float("nan")}
    lo, hi = band
    return {"below": float(e[s < lo].sum() / tot),
            "band": float(e[(s >= lo) & (s <= hi)].sum() / tot),
            "above": float(e[s > hi].sum() / tot)}


def frozen_gramian_spectrum(kernel_eigenvalues: Any, b: float, time: float, *,
                            lr: float | None = None) -> np.ndarray:
    """Normalized spectrum of ``W_S(0, τ)`` if the kernel stayed at ``K_SS`` (squared loss).

    Gradient flow: ``σ_j = 1 − e^{−2 b μ_j τ}``. Gradient descent with step ``lr`` (``t = τ/lr``
    steps): ``σ_j = 1 − (1 − lr b μ_j)^{2t}`` — exact for a linear model.

    Args:
        kernel_eigenvalues: ``(N,)`` eigenvalues ``μ_j`` of ``K_SS`` (negative ones are clipped).
        b: the loss-Hessian scale (``1/n``).
        time: training time ``τ``.
        lr: the GD step, for the discrete form.

    Returns:
        ``(N,)`` ``σ_j`` in the input order.
    """
    mu = np.clip(np.asarray(torch.as_tensor(kernel_eigenvalues, dtype=torch.float64).cpu(),
                            dtype=float), 0.0, None)
    if not (b > 0 and time >= 0):
        raise ConfigError(f"need b > 0 and time >= 0, got b={b}, time={time}")
    if lr is None:
        return -np.expm1(-2 * b * mu * time)
    t = int(round(time / lr))
    return 1.0 - (1.0 - lr * b * mu) ** (2 * t)


def slq_band_fraction(density: SpectralDensity, *, saturation: float,
                      band: Band = (0.1, 0.9)) -> float:
    """Band occupancy from a stochastic-Lanczos density of ``W_S`` (estimated fraction of
    eigenvalues with ``lo ≤ λ/saturation ≤ hi``)."""
    _check_band(band, 0.5)
    t, w = density.nodes / saturation, density.weights
    inside = (t >= band[0]) & (t <= band[1])
    return float((w * inside).sum(1).mean())


# -- along a recorded run ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GapTimeline:
    """Gap statistics and the label noise's fate for the growing windows ``[s, t_k]``.

    Attributes:
        stops, steps, times: ``(K,)`` end snapshots, their optimizer steps and training times.
        gaps: ``K`` :class:`ReservoirGap` of ``2b W_S(s, t_k)``.
        frozen_gaps: ``K`` :class:`ReservoirGap` of the frozen-kernel prediction from
            ``K_SS(s)`` (:func:`frozen_gramian_spectrum`: the GD form for the ``gd``
            discretization with equal steps, the flow form otherwise — the form the measured
            operators reduce to when the kernel does not move).
        noise_bands: ``K`` :func:`band_fractions` of ``g_noise``.
        noise_dissipated: ``(K,)`` ``2b g_noiseᵀ W g_noise / ‖g_noise‖²`` (fraction fitted).
        noise_displacement: ``(K, m, p)`` ``−G_Q(t_k, s) g_noise``.
        spectra: ``(K, N)`` the normalized spectra (descending).
        slq_band: ``(K,)`` the band occupancy estimated by stochastic Lanczos quadrature
            from products with ``W_S`` alone (:func:`slq_band_fraction`; the estimate used
            where ``N`` is too large for a decomposition), beside the exact
            ``gaps[k].band_fraction``; NaN when not asked for.
    """

    stops: np.ndarray
    steps: np.ndarray
    times: np.ndarray
    gaps: Sequence[ReservoirGap]
    frozen_gaps: Sequence[ReservoirGap]
    noise_bands: Sequence[Mapping[str, float]]
    noise_dissipated: np.ndarray
    noise_displacement: np.ndarray
    spectra: np.ndarray
    slq_band: np.ndarray


def gap_timeline(traj: KernelTrajectory, y_clean: Tensor, stops: Sequence[int], *,
                 start: int = 0, discretization: Discretization = "exp", cut: float = 0.5,
                 band: Band = (0.1, 0.9), slq_probes: int = 0, slq_steps: int = 30,
                 slq_seed: int = 0) -> GapTimeline:
    """:func:`reservoir_gap`, :func:`band_fractions` of the label noise and ``−G_Q g_noise``
    for the windows ``[start, k]``, ``k ∈ stops`` (one pass over the run; one ``N × N``
    eigen-decomposition per stop).

    Args:
        traj: a run recorded with squared loss and a test/probe set.
        y_clean: ``(n, p)`` clean training targets (the recorded ``y`` holds the noisy ones).
        stops: end snapshots (indices ``> start``).
        start: the window start ``s``.
        discretization, cut, band: as :func:`~tangentscope.dynamics.window_operators` and
            :func:`reservoir_gap`.
        slq_probes, slq_steps, slq_seed: also estimate the band occupancy by SLQ with this
            many Rademacher probes and Lanczos steps (0 probes: not done).

    Raises:
        ConfigError: not squared loss, no test set, or a stop outside the run.
    """
    b = traj.hessian_scale(start)
    if traj.meta.get("loss") != "squared" or b is None:
        raise ConfigError("gap_timeline normalizes W_S by the squared loss' saturation value "
                          "1/(2b); record the run with loss='squared'")
    if traj.U_Q is None:
        raise ConfigError("gap_timeline needs a recorded test/probe set "
                          "(KernelRecorder(..., x_test=...)) for −G_Q g_noise")
    S = len(traj)
    if not 0 <= start < S - 1:
        raise ConfigError(f"start={start} is not a snapshot index with a later snapshot "
                          f"(the trajectory has {S})")
    bad = [k for k in stops if not -S <= int(k) < S]
    if bad:
        raise ConfigError(f"stops {bad} are outside the run's {S} snapshots (use indices "
                          f"-{S} .. {S - 1})")
    want = sorted({int(k) % S for k in stops})
    if not want or want[0] <= start:
        raise ConfigError(f"stops must be snapshot indices after start={start}, got {stops}")
    g_noise = label_noise_gradients(traj, y_clean, start)[1]
    mu = torch.linalg.eigvalsh(0.5 * (traj.kernel(start) + traj.kernel(start).T))
    etas = np.concatenate([np.asarray(d, dtype=float) for d in traj.dts[start + 1:]])
    equal = etas.size > 0 and np.allclose(etas, etas[0], rtol=1e-12)
    lr = float(etas[0]) if discretization == "gd" and equal else None
    sat = 1.0 / (2 * b)
    rows: list[dict[str, Any]] = []
    for ops in accumulate_operators(traj, start, want[-1], discretization=discretization):
        if ops.stop not in want:
            continue
        sp = split_channels(ops.W, threshold=cut * sat, mode="absolute",
                            vectors={"noise": g_noise})
        assert ops.G is not None
        e = sp.energies["noise"]
        n2 = float(g_noise.pow(2).sum())
        rows.append({
            "stop": ops.stop, "gap": reservoir_gap(sp.eigenvalues, saturation=sat, cut=cut,
                                                   band=band),
            "frozen": reservoir_gap(frozen_gramian_spectrum(mu, b, ops.t_stop - ops.t_start,
                                                            lr=lr), saturation=1.0, cut=cut,
                                    band=band),
            "bands": band_fractions(sp.eigenvalues, e.per_mode, saturation=sat, band=band),
            "dissipated": 2 * b * sp.quadratic_form(g_noise) / n2 if n2 > 0 else float("nan"),
            "disp": (-(ops.G @ g_noise)).reshape(traj.m, traj.p).numpy(),
            "spectrum": (sp.eigenvalues / sat).numpy(),
            "slq": float("nan") if slq_probes <= 0 else slq_band_fraction(
                slq_density(ops.W.__matmul__, traj.N, probes=slq_probes, steps=slq_steps,
                            seed=slq_seed), saturation=sat, band=band)})
    idx = np.array([r["stop"] for r in rows])
    return GapTimeline(idx, traj.steps[idx], traj.times[idx], [r["gap"] for r in rows],
                       [r["frozen"] for r in rows], [r["bands"] for r in rows],
                       np.array([r["dissipated"] for r in rows]),
                       np.stack([r["disp"] for r in rows]),
                       np.stack([r["spectrum"] for r in rows]),
                       np.array([r["slq"] for r in rows]))
