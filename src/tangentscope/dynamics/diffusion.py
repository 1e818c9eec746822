"""Drift vs diffusion: split each SGD step into named parts (its population part, its minibatch
noise, …) and follow each part in output space.

The abstract: "within the signal channel, minibatch SGD ensures that coherent population
signal accumulates via fast linear drift, while idiosyncratic memorization is suppressed into a
slow, diffusive random walk". For a step ``δw = −η ĝ_B`` on a minibatch ``B`` (plain SGD, so
the step is linear in the gradient), with ``ḡ`` the population gradient (full batch, or a large
pool drawn from the data distribution):

    δw = −η ḡ  +  (−η (ĝ_B − ḡ))  =  drift  +  noise,

and each part moves the probe outputs by ``J δw`` (one JVP; docs/notation.md). Summed over
steps, ``D(t) = Σ_{s≤t} J_s δw_drift(s)`` and ``R(t) = Σ_{s≤t} J_s δw_noise(s)``; projected on
channel modes ``V`` (e.g. the top eigenvectors of ``W_S`` or ``K_SS``) the claim reads
``‖Vᵀ D(t)‖ ∝ t`` and ``‖Vᵀ R(t)‖ ∝ √t``. More than two parts may be followed
(:meth:`DriftNoiseSplit.observe_parts`: e.g. population, training-set idiosyncrasy
``ĝ_S − ḡ`` and minibatch noise ``ĝ_B − ĝ_S``).

Two statistics separate drift from diffusion:

- :func:`scaling_exponent` — the log–log slope of ``‖Vᵀ S(t)‖`` against ``t`` with its standard
  error (1: linear drift; 1/2: a random walk with stationary increments);
- :func:`random_walk_ratio` — ``Γ(t) = ‖Vᵀ S(t)‖² / Σ_{s≤t} ‖Vᵀ a_s‖²`` from the quadratic
  variation a :class:`DriftNoiseSplit` with a ``frame`` accumulates. ``E Γ = 1`` for any
  sequence of martingale increments (a random walk, whatever its step sizes), ``Γ = t`` for
  ``t`` equal increments (a straight drift): it tells diffusion from drift even where the step
  sizes change, which bends the log–log slopes.

:func:`random_walk_slope_null` gives the distribution of the fitted slope of a pure Gaussian
random walk on the same record grid (the null the OLS standard error understates).
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
           "project_curves", "frame_norms", "random_walk_ratio", "random_walk_slope_null"]


@dataclasses.dataclass(frozen=True)
class DriftNoiseCurves:
    """Cumulative output displacements of the parts of SGD steps.

    Attributes:
        steps: ``(T,)`` optimizer steps at which the sums were recorded.
        times: ``(T,)`` training time ``Σ η`` at those steps.
        parts: the part names, in the order they were first observed.
        sums: ``name -> (T, N)`` ``S(t) = Σ_{s≤t} J_s δw_part(s)`` on the probe set (stacked
            ``i·p + a``).
        param_norms: ``name -> (T,)`` ``‖Σ δw_part‖`` in parameter space.
        frame_sums: ``name -> (T, F)`` ``Fᵀ S(t)`` for the split's frame ``F`` (``(N, F)``;
            empty ``(T, 0)`` without a frame).
        frame_quad: ``name -> (T, F)`` the quadratic variation ``Σ_{s≤t} (Fᵀ a_s)²`` of the
            increments ``a_s = J_s δw_part(s)``, column by column.
    """

    steps: np.ndarray
    times: np.ndarray
    parts: tuple[str, ...]
    sums: Mapping[str, Tensor]
    param_norms: Mapping[str, np.ndarray]
    frame_sums: Mapping[str, Tensor]
    frame_quad: Mapping[str, Tensor]

    def _part(self, name: str) -> str:
        if name not in self.sums:
            raise ConfigError(f"no part {name!r} was observed; parts: {list(self.parts)}")
        return name

    @property
    def drift(self) -> Tensor:
        """``(T, N)`` the ``"drift"`` part's sums (:meth:`DriftNoiseSplit.observe`)."""
        return self.sums[self._part("drift")]

    @property
    def noise(self) -> Tensor:
        """``(T, N)`` the ``"noise"`` part's sums."""
        return self.sums[self._part("noise")]

    @property
    def drift_param_norm(self) -> np.ndarray:
        """``(T,)`` ``‖Σ δw_drift‖``."""
        return self.param_norms[self._part("drift")]

    @property
    def noise_param_norm(self) -> np.ndarray:
        """``(T,)`` ``‖Σ δw_noise‖``."""
        return self.param_norms[self._part("noise")]


class DriftNoiseSplit:
    """Accumulate the split of SGD steps into parts, one :meth:`observe` (two parts) or
    :meth:`observe_parts` (any named parts) per step.

    Args:
        model: the network being trained (its current parameters are read at each step).
        x_probe: inputs ``(n, ...)`` whose outputs the displacements are measured on (the
            training set, for the channel of ``W_S``).
        frame: optional ``(N, F)`` output-space directions (``N = n p``) along which the
            quadratic variation of every part's increments is accumulated (column by column):
            e.g. ``[V | Z | e]``, an orthonormal mode basis ``V``, random directions ``Z`` and a
            label-noise direction ``e``. A subspace spanned by orthonormal columns ``c`` of it
            then has ``‖·‖² = Σ_c frame_sums²`` and quadratic variation ``Σ_c frame_quad``
            (:func:`frame_norms`).
        record_at: steps at which to store the cumulative sums (default: every step).
        dtype: dtype of the JVPs and the sums (default the parameters').
        chunk_size: examples per JVP chunk.

    The displacement of each step is taken with the Jacobian at the parameters *before* the
    step (call :meth:`observe` before ``optimizer.step()``), exactly like the first-order
    output change of that step.

    Raises:
        ShapeError: a ``frame`` that is not a matrix.
    """

    def __init__(self, model: nn.Module, x_probe: Tensor, *, frame: Tensor | None = None,
                 record_at: Sequence[int] | np.ndarray | None = None,
                 dtype: torch.dtype | None = None, chunk_size: int | None = None):
        if frame is not None and frame.dim() != 2:
            raise ShapeError(f"frame must be an (N, F) matrix of output-space directions, got "
                             f"shape {tuple(frame.shape)}")
        self.model, self.x, self.frame = model, x_probe, frame
        self.dtype, self.chunk_size = dtype, chunk_size
        self.record_at = None if record_at is None else {int(s) for s in record_at}
        self.step = 0
        self.time = 0.0
        self.parts: list[str] = []
        self._S: dict[str, Tensor] = {}
        self._W: dict[str, dict[str, Tensor]] = {}
        self._C: dict[str, Tensor] = {}
        self._Q: dict[str, Tensor] = {}
        self._rows: list[tuple[int, float, dict[str, Tensor], dict[str, float],
                               dict[str, Tensor], dict[str, Tensor]]] = []

    def observe(self, grad_batch: Mapping[str, Tensor], grad_population: Mapping[str, Tensor],
                lr: float) -> None:
        """Account one SGD step ``δw = −lr · grad_batch`` as ``drift = −lr · grad_population``
        plus ``noise = −lr · (grad_batch − grad_population)``.

        Args:
            grad_batch: ``name -> ĝ_B``, the minibatch gradient the step uses (e.g. ``p.grad``
                after ``loss.backward()``), for the model's trainable parameters.
            grad_population: ``name -> ḡ`` (same names and shapes), the population gradient.
            lr: the step's learning rate.

        Raises:
            ShapeError: names or shapes that do not match.
            ConfigError: a negative or non-finite learning rate.
        """
        if set(grad_batch) != set(grad_population):
            raise ShapeError("grad_batch and grad_population must name the same parameters; "
                             f"got {sorted(grad_batch)[:3]} vs {sorted(grad_population)[:3]}")
        noise = {k: grad_batch[k].detach() - grad_population[k].detach().to(grad_batch[k].dtype)
                 for k in grad_batch}
        self.observe_parts({"drift": grad_population, "noise": noise}, lr)

    def observe_parts(self, parts: Mapping[str, Mapping[str, Tensor]], lr: float) -> None:
        """Account one SGD step whose gradient is ``Σ_c parts[c]``: part ``c`` moves the
        parameters by ``−lr · parts[c]`` (the parts are not checked to sum to the step).

        Args:
            parts: ``part name -> (parameter name -> gradient part)``; every step must name the
                same parts, each the model's trainable parameters.
            lr: the step's learning rate.

        Raises:
            ShapeError: parameter names or shapes that do not match, or parts that differ from
                the earlier steps'.
            ConfigError: a negative or non-finite learning rate, or no part.
        """
        if not (lr >= 0 and math.isfinite(lr)):
            raise ConfigError(f"lr must be a finite number >= 0, got {lr!r}")
        if not parts:
            raise ConfigError("observe_parts needs at least one part")
        if self.parts and list(parts) != self.parts:
            raise ShapeError(f"every step must name the same parts {self.parts}, got "
                             f"{list(parts)}")
        names = set(next(iter(parts.values())))
        for pn, g in parts.items():
            if set(g) != names:
                raise ShapeError("every part must name the same parameters; part "
                                 f"{pn!r} has {sorted(g)[:3]} vs {sorted(names)[:3]}")
        op = EntkOperator(self.model, self.x, params={k: v for k, v in
                                                     self.model.named_parameters()
                                                     if k in names},
                          dtype=self.dtype, chunk_size=self.chunk_size)
        dtype = op.dtype
        if set(op.fm.params) != names:
            raise ShapeError(f"the parts name parameters the model does not train: "
                             f"{sorted(names - set(op.fm.params))[:3]}")
        F = None if self.frame is None else self.frame.to(dtype)
        if F is not None and F.shape[0] != op.n * op.p:
            raise ShapeError(f"frame has {F.shape[0]} rows, the probe output space has "
                             f"{op.n * op.p}")
        for pn, g in parts.items():
            step = {}
            for k, v in op.fm.params.items():
                if g[k].shape != v.shape:
                    raise ShapeError(f"gradient part {pn!r} for {k!r} has shape "
                                     f"{tuple(g[k].shape)}, the parameter {tuple(v.shape)}")
                step[k] = -lr * g[k].detach().to(dtype)
            with torch.no_grad():
                a = op.jvp(step).reshape(-1)
            self._S[pn] = a if pn not in self._S else self._S[pn] + a
            w = self._W.setdefault(pn, {})
            for k in step:
                w[k] = step[k] if k not in w else w[k] + step[k]
            if F is not None:
                c = F.T @ a
                self._C[pn] = c if pn not in self._C else self._C[pn] + c
                self._Q[pn] = c * c if pn not in self._Q else self._Q[pn] + c * c
        if not self.parts:
            self.parts = list(parts)
        self.step += 1
        self.time += lr
        if self.record_at is None or self.step in self.record_at:
            empty = torch.zeros(0, dtype=dtype)
            self._rows.append((self.step, self.time,
                               {p: s.clone() for p, s in self._S.items()},
                               {p: _norm(w) for p, w in self._W.items()},
                               {p: self._C[p].clone() if p in self._C else empty
                                for p in self.parts},
                               {p: self._Q[p].clone() if p in self._Q else empty
                                for p in self.parts}))

    def curves(self) -> DriftNoiseCurves:
        """The recorded cumulative sums.

        Raises:
            ConfigError: nothing recorded yet.
        """
        if not self._rows:
            raise ConfigError("no step recorded yet: call observe() once per SGD step (and "
                              "include the steps you want in record_at)")
        steps, times, S, W, C, Q = zip(*self._rows)
        parts = tuple(self.parts)
        return DriftNoiseCurves(
            np.array(steps), np.array(times), parts,
            {p: torch.stack([s[p] for s in S]) for p in parts},
            {p: np.array([w[p] for w in W]) for p in parts},
            {p: torch.stack([c[p] for c in C]) for p in parts},
            {p: torch.stack([q[p] for q in Q]) for p in parts})


def _norm(d: Mapping[str, Tensor]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in d.values()))


def project_curves(curves: DriftNoiseCurves, V: Tensor, parts: Sequence[str] = ("drift", "noise")
                   ) -> tuple[np.ndarray, ...]:
    """``‖Vᵀ S_part(t)‖`` per recorded step, one array per name in ``parts`` (default
    ``(‖Vᵀ D(t)‖, ‖Vᵀ R(t)‖)``), for orthonormal modes ``V`` ``(N, k)`` (a single direction
    ``(N,)`` is normalized and used as one mode).

    Raises:
        ShapeError: ``V`` does not live in the probe output space.
        ConfigError: a part that was not observed.
    """
    first = curves.sums[curves._part(parts[0])] if parts else None
    if first is None:
        return ()
    V = V.to(first.dtype)
    if V.dim() == 1:
        V = (V / V.norm().clamp_min(torch.finfo(V.dtype).tiny))[:, None]
    if V.shape[0] != first.shape[1]:
        raise ShapeError(f"modes have {V.shape[0]} rows, the probe output space has "
                         f"{first.shape[1]}")
    return tuple((curves.sums[curves._part(p)] @ V).norm(dim=1).cpu().numpy() for p in parts)


def frame_norms(curves: DriftNoiseCurves, part: str, columns: Sequence[int] | np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """``(‖S‖, Σ‖a‖²)`` per recorded step in the span of frame ``columns`` (orthonormal columns
    of the split's frame): the norm of the cumulative displacement and its quadratic variation.

    Raises:
        ConfigError: an unobserved part, no frame, or a column outside the frame.
    """
    C = curves.frame_sums[curves._part(part)]
    Q = curves.frame_quad[part]
    cols = np.asarray(columns, dtype=int).reshape(-1)
    if C.shape[1] == 0:
        raise ConfigError("the split had no frame: pass DriftNoiseSplit(..., frame=F) to "
                          "accumulate the quadratic variation")
    if cols.size == 0 or cols.min() < 0 or cols.max() >= C.shape[1]:
        raise ConfigError(f"frame columns must be a non-empty subset of [0, {C.shape[1]}), got "
                          f"{cols[:5].tolist()}")
    idx = torch.as_tensor(cols)
    norm = C[:, idx].pow(2).sum(1).sqrt().cpu().numpy()
    quad = Q[:, idx].sum(1).cpu().numpy()
    return norm, quad


def random_walk_ratio(norm: Sequence[float] | np.ndarray, quad: Sequence[float] | np.ndarray
                      ) -> np.ndarray:
    """``Γ = ‖S‖² / Σ‖a‖²``: 1 in expectation for martingale increments (diffusion), the number
    of steps for equal increments (linear drift); NaN where the quadratic variation is 0."""
    n, q = np.asarray(norm, dtype=float), np.asarray(quad, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(q > 0, n * n / np.where(q > 0, q, 1.0), np.nan)


@dataclasses.dataclass(frozen=True)
class ScalingFit:
    """``log y = slope · log t + intercept`` by least squares.

    Attributes:
        slope: the fitted exponent.
        stderr: its standard error (ordinary least squares; optimistic when residuals are
            correlated along one run: prefer the spread over seeds, or
            :func:`random_walk_slope_null`).
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


def random_walk_slope_null(steps: Sequence[int] | np.ndarray, dim: int, *, draws: int = 400,
                           seed: int = 0) -> np.ndarray:
    """Fitted log–log slopes of ``‖S(t)‖`` for ``draws`` pure Gaussian random walks in
    ``R^dim`` (i.i.d. ``N(0, I)`` increments), read at the recorded ``steps``: the null
    distribution of :func:`scaling_exponent` for diffusion on the same grid (its mean is near
    1/2; its spread is what one realization's slope can do by chance).

    Returns:
        ``(draws,)`` slopes.

    Raises:
        ConfigError: fewer than 3 distinct positive steps, ``dim < 1`` or ``draws < 1``.
    """
    st = np.unique(np.asarray(steps, dtype=int))
    st = st[st > 0]
    if st.size < 3 or dim < 1 or draws < 1:
        raise ConfigError(f"random_walk_slope_null needs >= 3 positive steps, dim >= 1 and "
                          f"draws >= 1; got {st.size} steps, dim={dim}, draws={draws}")
    rng = np.random.default_rng(seed)
    gaps = np.diff(np.concatenate([[0], st]))
    # the walk read at the recorded steps: independent Gaussian jumps of variance gap
    jumps = rng.standard_normal((draws, st.size, dim)) * np.sqrt(gaps)[None, :, None]
    norms = np.linalg.norm(np.cumsum(jumps, axis=1), axis=2)
    lx = np.log(st.astype(float))
    A = np.stack([lx, np.ones_like(lx)], 1)
    coef, *_ = np.linalg.lstsq(A, np.log(np.maximum(norms, 1e-300)).T, rcond=None)
    return np.asarray(coef[0], dtype=float)
