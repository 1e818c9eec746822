"""Drift vs diffusion: split each SGD step into its population part and its minibatch noise,
and follow both in output space.

The abstract: "within the signal channel, minibatch SGD ensures that coherent population
signal accumulates via fast linear drift, while idiosyncratic memorization is suppressed into a
slow, diffusive random walk". For a step ``δw = −η ĝ_B`` on a minibatch ``B`` (plain SGD, so
the step is linear in the gradient), with ``ḡ`` the population gradient (full batch, or a large
pool drawn from the data distribution):

    δw = −η ḡ  +  (−η (ĝ_B − ḡ))  =  drift  +  noise,

and each part moves the probe outputs by ``J δw`` (one JVP; docs/notation.md). Summed over
steps, ``D(t) = Σ_{s≤t} J_s δw_drift(s)`` and ``R(t) = Σ_{s≤t} J_s δw_noise(s)``; projected on
channel modes ``V`` (e.g. the top eigenvectors of ``W_S``) the claim reads
``‖Vᵀ D(t)‖ ∝ t`` and ``‖Vᵀ R(t)‖ ∝ √t``. :func:`scaling_exponent` fits the log–log slope with
its standard error; whether the claim holds is measured (``tangentscope run drift-diffusion``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError
from ..kernels.operator import EntkOperator

__all__ = ["DriftNoiseCurves", "DriftNoiseSplit", "ScalingFit", "scaling_exponent",
           "project_curves"]


@dataclasses.dataclass(frozen=True)
class DriftNoiseCurves:
    """Cumulative output displacements of the drift and noise parts of SGD steps.

    Attributes:
        steps: ``(T,)`` optimizer steps at which the sums were recorded.
        times: ``(T,)`` training time ``Σ η`` at those steps.
        drift: ``(T, N)`` ``D(t) = Σ J δw_drift`` on the probe set (stacked ``i·p + a``).
        noise: ``(T, N)`` ``R(t) = Σ J δw_noise``.
        drift_param_norm: ``(T,)`` ``‖Σ δw_drift‖`` in parameter space.
        noise_param_norm: ``(T,)`` ``‖Σ δw_noise‖``.
    """

    steps: np.ndarray
    times: np.ndarray
    drift: Tensor
    noise: Tensor
    drift_param_norm: np.ndarray
    noise_param_norm: np.ndarray


class DriftNoiseSplit:
    """Accumulate the drift/noise split of SGD steps, one :meth:`observe` per step.

    Args:
        model: the network being trained (its current parameters are read at each step).
        x_probe: inputs ``(n, ...)`` whose outputs the displacements are measured on (the
            training set, for the channel of ``W_S``).
        record_at: steps at which to store the cumulative sums (default: every step).
        dtype: dtype of the JVPs and the sums (default the parameters').
        chunk_size: examples per JVP chunk.

    The displacement of each step is taken with the Jacobian at the parameters *before* the
    step (call :meth:`observe` before ``optimizer.step()``), exactly like the first-order
    output change of that step.
    """

    def __init__(self, model: nn.Module, x_probe: Tensor, *,
                 record_at: Sequence[int] | None = None, dtype: torch.dtype | None = None,
                 chunk_size: int | None = None):
        self.model, self.x = model, x_probe
        self.dtype, self.chunk_size = dtype, chunk_size
        self.record_at = None if record_at is None else {int(s) for s in record_at}
        self.step = 0
        self.time = 0.0
        self._D: Tensor | None = None
        self._R: Tensor | None = None
        self._wd: dict[str, Tensor] = {}
        self._wn: dict[str, Tensor] = {}
        self._rows: list[tuple[int, float, Tensor, Tensor, float, float]] = []

    def observe(self, grad_batch: Mapping[str, Tensor], grad_population: Mapping[str, Tensor],
                lr: float) -> None:
        """Account one SGD step ``δw = −lr · grad_batch``.

        Args:
            grad_batch: ``name -> ĝ_B``, the minibatch gradient the step uses (e.g. ``p.grad``
                after ``loss.backward()``), for the model's trainable parameters.
            grad_population: ``name -> ḡ`` (same names and shapes), the population gradient.
            lr: the step's learning rate.

        Raises:
            ShapeError: names or shapes that do not match.
            ConfigError: a negative or non-finite learning rate.
        """
        if not (lr >= 0 and math.isfinite(lr)):
            raise ConfigError(f"lr must be a finite number >= 0, got {lr!r}")
        if set(grad_batch) != set(grad_population):
            raise ShapeError("grad_batch and grad_population must name the same parameters; "
                             f"got {sorted(grad_batch)[:3]} vs {sorted(grad_population)[:3]}")
        op = EntkOperator(self.model, self.x, params={k: v for k, v in
                                                     self.model.named_parameters()
                                                     if k in grad_batch},
                          dtype=self.dtype, chunk_size=self.chunk_size)
        dtype = op.dtype
        drift = {k: -lr * grad_population[k].detach().to(dtype) for k in op.fm.params}
        noise = {k: -lr * (grad_batch[k].detach().to(dtype) - grad_population[k].detach().to(dtype))
                 for k in op.fm.params}
        for k, v in op.fm.params.items():
            if drift[k].shape != v.shape:
                raise ShapeError(f"gradient for {k!r} has shape {tuple(drift[k].shape)}, the "
                                 f"parameter {tuple(v.shape)}")
        with torch.no_grad():
            du_d = op.jvp(drift).reshape(-1)
            du_n = op.jvp(noise).reshape(-1)
        self._D = du_d if self._D is None else self._D + du_d
        self._R = du_n if self._R is None else self._R + du_n
        for k in drift:
            self._wd[k] = drift[k] if k not in self._wd else self._wd[k] + drift[k]
            self._wn[k] = noise[k] if k not in self._wn else self._wn[k] + noise[k]
        self.step += 1
        self.time += lr
        if self.record_at is None or self.step in self.record_at:
            self._rows.append((self.step, self.time, self._D.clone(), self._R.clone(),
                               _norm(self._wd), _norm(self._wn)))

    def curves(self) -> DriftNoiseCurves:
        """The recorded cumulative sums.

        Raises:
            ConfigError: nothing recorded yet.
        """
        if not self._rows:
            raise ConfigError("no step recorded yet: call observe() once per SGD step (and "
                              "include the steps you want in record_at)")
        steps, times, D, R, wd, wn = zip(*self._rows)
        return DriftNoiseCurves(np.array(steps), np.array(times), torch.stack(D),
                                torch.stack(R), np.array(wd), np.array(wn))


def _norm(d: Mapping[str, Tensor]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in d.values()))


def project_curves(curves: DriftNoiseCurves, V: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(‖Vᵀ D(t)‖, ‖Vᵀ R(t)‖)`` per recorded step for orthonormal modes ``V`` ``(N, k)``
    (a single direction ``(N,)`` is normalized and used as one mode).

    Raises:
        ShapeError: ``V`` does not live in the probe output space.
    """
    V = V.to(curves.drift.dtype)
    if V.dim() == 1:
        V = (V / V.norm().clamp_min(torch.finfo(V.dtype).tiny))[:, None]
    if V.shape[0] != curves.drift.shape[1]:
        raise ShapeError(f"modes have {V.shape[0]} rows, the probe output space has "
                         f"{curves.drift.shape[1]}")
    d = (curves.drift @ V).norm(dim=1).cpu().numpy()
    r = (curves.noise @ V).norm(dim=1).cpu().numpy()
    return d, r


@dataclasses.dataclass(frozen=True)
class ScalingFit:
    """``log y = slope · log t + intercept`` by least squares.

    Attributes:
        slope: the fitted exponent.
        stderr: its standard error (ordinary least squares; optimistic when residuals are
            correlated along one run: prefer the spread over seeds).
        intercept: the fitted intercept.
        n: points used (positive ``t`` and ``y`` only).
    """

    slope: float
    stderr: float
    intercept: float
    n: int

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """``slope ± z · stderr``."""
        return self.slope - z * self.stderr, self.slope + z * self.stderr


def scaling_exponent(t: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray
                     ) -> ScalingFit:
    """The log–log slope of ``y`` against ``t`` (drift: 1; diffusion: 1/2).

    Raises:
        ConfigError: fewer than 3 positive points.
    """
    ta, ya = np.asarray(t, dtype=float), np.asarray(y, dtype=float)
    keep = (ta > 0) & (ya > 0) & np.isfinite(ta) & np.isfinite(ya)
    if keep.sum() < 3:
        raise ConfigError(f"a scaling fit needs >= 3 points with t > 0 and y > 0, got "
                          f"{int(keep.sum())}")
    lx, ly = np.log(ta[keep]), np.log(ya[keep])
    A = np.stack([lx, np.ones_like(lx)], 1)
    coef, *_ = np.linalg.lstsq(A, ly, rcond=None)
    resid = ly - A @ coef
    dof = max(int(keep.sum()) - 2, 1)
    s2 = float(resid @ resid) / dof
    cov = s2 * np.linalg.inv(A.T @ A)
    return ScalingFit(float(coef[0]), float(math.sqrt(max(cov[0, 0], 0.0))), float(coef[1]),
                      int(keep.sum()))
