"""Label noise through the signal channel and the reservoir (squared loss).

Where a known label noise goes in one recorded run, and at ``t = ∞`` for a frozen kernel:

- :func:`dissipated_fraction` — the *soft* channel fraction of a vector under squared loss,
  ``2b · vᵀ W_S v / ‖v‖²`` ∈ [0, 1] (``B = b I``): the share of that direction's loss that
  training dissipated (no threshold);
- :func:`noise_channel_analysis` — the channel/reservoir bookkeeping of known label noise on a
  recorded run, with identity residuals, as one frozen :class:`NoiseChannelReport`;
- :func:`min_norm_noise_transfer` — the same at ``t = ∞`` for a frozen kernel (min-norm fit);
- :func:`classification_error` — the error rate of stacked outputs (sign or argmax).

Why ``2b vᵀWv/‖v‖² ≤ 1``: under squared loss ``ġ = −b K g``, so
``d‖g‖²/dτ = −2b gᵀKg`` and ``‖P_g(T,s) v‖² = ‖v‖² − 2b vᵀ W_S v`` for any kernel path; the
eigenvalues of ``2b W_S`` lie in ``[0, 1]``, with 1 meaning "fully fitted" and 0 "untouched"
(the reservoir). :func:`noise_channel_analysis` therefore cuts the channel at a fraction
``threshold`` of the saturation value ``1/(2b) = n/2`` rather than relative to ``λ_max``.
Symbols: docs/notation.md ("The operators of a training window").
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from .channels import ChannelSplit, label_noise_gradients, noise_transfer, split_channels
from .flow import squared_loss_flow
from .operators import Discretization, accumulate_operators, identity_residuals, window_operators
from .trajectory import KernelTrajectory

__all__ = ["classification_error", "dissipated_fraction", "NoiseChannelReport",
           "noise_channel_analysis", "min_norm_noise_transfer"]


def classification_error(U: Tensor, labels: Tensor) -> float:
    """Error rate of outputs ``U`` ``(n, p)``: sign for ``p = 1`` (class 1 ↔ positive), argmax
    otherwise."""
    U = U.reshape(U.shape[0], -1)
    pred = (U[:, 0] > 0).long() if U.shape[1] == 1 else U.argmax(1)
    return float((pred != labels.reshape(-1).to(pred.device)).float().mean())


def dissipated_fraction(W: Tensor, v: Tensor, b: float) -> float:
    """``2b · vᵀ W v / ‖v‖²`` — the share of the loss along direction ``v`` that the window
    dissipated (squared loss with ``B = b I``; ``b = 1/n`` for ``Φ`` of docs/notation.md). In
    ``[0, 1]`` up to discretization error; 0 for the reservoir, 1 for a fully fitted direction.
    """
    v = torch.as_tensor(v, dtype=torch.float64).reshape(-1)
    W = torch.as_tensor(W, dtype=torch.float64)
    if W.shape != (v.numel(), v.numel()):
        raise ShapeError(f"W is {tuple(W.shape)} but v has {v.numel()} entries")
    nv = float(v @ v)
    return 2 * b * float(v @ (W @ v)) / nv if nv > 0 else float("nan")


@dataclasses.dataclass(frozen=True)
class NoiseChannelReport:
    """Where the label noise went in one recorded run (window: the whole run).

    Attributes:
        channel_rank: dimension of the signal channel (``2b λ_j(W_S) > threshold``).
        threshold: the cut, as a fraction of the saturation value ``1/(2b)``.
        noise_channel_fraction, clean_channel_fraction: energy fractions of the noise part
            ``g_noise`` and the clean part ``g_clean`` of ``g(0)`` in the channel.
        noise_dissipated, clean_dissipated: their soft fractions (:func:`dissipated_fraction`).
        noise_test_rms: RMS over test outputs of ``−G_Q g_noise`` (the test displacement the
            noise causes); ``noise_test_rms_reservoir``: the part from the reservoir.
        noise_displacement: ``(m, p)`` that displacement ``−G_Q g_noise`` itself.
        signal_test_rms: RMS of ``−G_Q g_clean``.
        test_error: clean test error of the network; ``test_error_without_noise``: of the test
            outputs with ``−G_Q g_noise`` removed (first-order counterfactual).
        test_mse, test_mse_without_noise: the same as mean squared errors.
        dissipation_error, displacement_error, gradient_error: identity residuals of the window
            (the identities of docs/notation.md, relative errors; how far to trust the numbers
            above).
        eigenvalues: ``(N,)`` eigenvalues of ``2b W_S`` (descending).
        noise_per_mode: ``(N,)`` ``⟨ψ_j, g_noise⟩² / ‖g_noise‖²``; ``clean_per_mode`` likewise.
        timeline_times: ``(K,)`` times of a channel timeline (may be empty);
            ``timeline_noise``/``timeline_clean``: ``(K,)`` soft fractions of the noise and
            clean parts dissipated by then (``2b vᵀ W_S(0, t) v/‖v‖²``).
    """

    channel_rank: int
    threshold: float
    noise_channel_fraction: float
    clean_channel_fraction: float
    noise_dissipated: float
    clean_dissipated: float
    noise_test_rms: float
    noise_test_rms_reservoir: float
    noise_displacement: np.ndarray
    signal_test_rms: float
    test_error: float
    test_error_without_noise: float
    test_mse: float
    test_mse_without_noise: float
    dissipation_error: float
    displacement_error: float
    gradient_error: float
    eigenvalues: np.ndarray
    noise_per_mode: np.ndarray
    clean_per_mode: np.ndarray
    timeline_times: np.ndarray
    timeline_noise: np.ndarray
    timeline_clean: np.ndarray

    def summary(self) -> dict[str, float]:
        """The scalar fields (for a results table)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not isinstance(getattr(self, f.name), np.ndarray)}

    def scalars(self) -> dict[str, float]:
        """Deprecated name of :meth:`summary` (warns; will be removed)."""
        warnings.warn("NoiseChannelReport.scalars() is now .summary() (same dict)", FutureWarning,
                      stacklevel=2)
        return self.summary()


def _squared_b(traj: KernelTrajectory) -> float:
    if traj.meta.get("loss") != "squared":
        raise ConfigError("the channel fractions are normalized for squared loss (B = I/n); "
                          f"this trajectory was recorded with loss={traj.meta.get('loss')!r}. "
                          "Record with loss='squared' or use split_channels directly")
    B0 = traj.hessian(0)
    return float(B0[0, 0, 0])


def noise_channel_analysis(traj: KernelTrajectory, y_clean: Tensor, y_test: Tensor,
                           labels_test: Tensor, *, threshold: float = 0.5,
                           discretization: Discretization = "exp",
                           timeline: int = 0) -> NoiseChannelReport:
    """Split ``g(0) = g_clean + g_noise`` and follow both through ``W_S`` and ``G_Q``.

    Args:
        traj: a run recorded with squared loss and a test/probe set.
        y_clean: ``(n, p)`` clean training targets (the recorded ``y`` holds the noisy ones).
        y_test: ``(m, p)`` clean test targets of the recorded probe set; ``labels_test``:
            ``(m,)`` their classes.
        threshold: channel cut as a fraction of the saturation value (``0.5``: a direction is in
            the channel once training dissipated half of its loss).
        discretization: of the operators (see :mod:`.operators`).
        timeline: also compute the soft fractions at this many windows ``[0, t_k]`` (0: none).

    Raises:
        ConfigError: not squared loss, or no test set.
    """
    b = _squared_b(traj)
    if traj.U_Q is None:
        raise ConfigError("noise_channel_analysis needs a recorded test/probe set "
                          "(KernelRecorder(..., x_test=...))")
    if not 0 < threshold < 1:
        raise ConfigError(f"threshold is a fraction of the saturation value, in (0, 1); got "
                          f"{threshold}")
    ops = window_operators(traj, discretization=discretization)
    assert ops.G is not None
    g_clean, g_noise = label_noise_gradients(traj, y_clean)
    sp: ChannelSplit = split_channels(ops.W, threshold=threshold / (2 * b), mode="absolute",
                                      vectors={"noise": g_noise, "clean": g_clean})
    nt = noise_transfer(sp, ops.G, g_noise, g_clean, U_Q_final=traj.U_Q[-1], y_test=y_test)
    U = traj.U_Q[-1]
    signal = -(ops.G @ g_clean)
    ir = identity_residuals(traj, discretization=discretization).summary()
    en, ec = sp.energies["noise"], sp.energies["clean"]
    tt, tn, tc = _soft_timeline(traj, g_noise, g_clean, b, timeline, discretization)
    s = nt.summary()
    return NoiseChannelReport(
        channel_rank=sp.rank, threshold=threshold,
        noise_channel_fraction=en.channel_fraction, clean_channel_fraction=ec.channel_fraction,
        noise_dissipated=dissipated_fraction(ops.W, g_noise, b),
        clean_dissipated=dissipated_fraction(ops.W, g_clean, b),
        noise_test_rms=s["noise_test_rms"], noise_test_rms_reservoir=s["noise_test_rms_reservoir"],
        noise_displacement=nt.displacement.reshape(U.shape).numpy(),
        signal_test_rms=float(signal.pow(2).mean().sqrt()),
        test_error=classification_error(U, labels_test),
        test_error_without_noise=classification_error(
            U - nt.displacement.reshape(U.shape), labels_test),
        test_mse=s["test_mse"], test_mse_without_noise=s["test_mse_without_noise"],
        dissipation_error=ir["dissipation_error"],
        displacement_error=ir.get("displacement_error", float("nan")),
        gradient_error=ir["gradient_error"],
        eigenvalues=(2 * b * sp.eigenvalues).numpy(),
        noise_per_mode=en.per_mode / max(en.total, 1e-300),
        clean_per_mode=ec.per_mode / max(ec.total, 1e-300),
        timeline_times=tt, timeline_noise=tn, timeline_clean=tc)


def _soft_timeline(traj: KernelTrajectory, g_noise: Tensor, g_clean: Tensor, b: float,
                   points: int, discretization: Discretization
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Soft fractions ``2b vᵀ W_S(0, t_k) v/‖v‖²`` for about ``points`` end snapshots,
    log-spaced in training time."""
    if points <= 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    S = len(traj)
    t = traj.times
    targets = np.geomspace(max(t[1] - t[0], 1e-12), t[-1] - t[0], points) + t[0]
    keep = {int(min(np.searchsorted(t, v), S - 1)) for v in targets} - {0}
    tt, tn, tc = [], [], []
    for ops in accumulate_operators(traj, discretization=discretization):
        if ops.stop in keep:
            tt.append(ops.t_stop)
            tn.append(dissipated_fraction(ops.W, g_noise, b))
            tc.append(dissipated_fraction(ops.W, g_clean, b))
    return np.array(tt), np.array(tn), np.array(tc)


def min_norm_noise_transfer(K_SS: Tensor, K_QS: Tensor, noise: Tensor, *,
                            rtol: float = 1e-10) -> dict[str, float]:
    """Label noise under the ``t = ∞`` frozen-kernel flow (the minimum-norm fit).

    At ``t = ∞`` under squared loss ``2b W_S`` is the projector onto ``range(K_SS)`` and the
    noise ``ε = y − y_clean`` moves the test outputs by ``K_QS K_SS⁺ ε``
    (:func:`~tangentscope.dynamics.flow.analytic_jump`).

    Args:
        K_SS: ``(N, N)`` stacked kernel; ``K_QS``: ``(m p, N)``.
        noise: ``(N,)`` or ``(n, p)`` label noise ``ε``.
        rtol: eigenvalues below ``rtol · λ_max`` count as the null space.

    Returns:
        ``channel_fraction`` (``‖Π_range ε‖²/‖ε‖²``), ``test_rms`` (RMS of the displacement
        ``K_QS K_SS⁺ ε``),
        ``min_eigenvalue`` (smallest eigenvalue above the cut) and ``rank``.
    """
    eps = torch.as_tensor(noise, dtype=torch.float64).reshape(-1, 1)
    K = torch.as_tensor(K_SS, dtype=torch.float64)
    sp = split_channels(K, threshold=rtol, mode="relative", vectors={"noise": eps})
    zero = torch.zeros_like(eps)
    jump = squared_loss_flow(K, zero, eps, t=[math.inf], K_QS=torch.as_tensor(
        K_QS, dtype=torch.float64), U_Q0=torch.zeros(K_QS.shape[0], 1, dtype=torch.float64))
    assert jump.U_Q is not None
    lam = sp.eigenvalues
    return {"channel_fraction": sp.energies["noise"].channel_fraction,
            "test_rms": float(jump.U_Q[-1].pow(2).mean().sqrt()),
            "min_eigenvalue": float(lam[sp.rank - 1]) if sp.rank else float("nan"),
            "rank": sp.rank}
