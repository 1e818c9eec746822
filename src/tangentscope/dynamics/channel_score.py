"""Per-parameter channel scores: each parameter's share of the integrated eNTK ``W_S``.

``W_S(s, T) = ∫_s^T P_gᵀ K_SS P_g dτ`` with ``K_SS = J D Jᵀ`` (``D`` the diagonal
preconditioner, ``I`` for gradient descent; docs/notation.md) splits exactly over parameters:
with ``j_k(τ) ∈ ℝ^N`` the column of ``J_S(τ)`` for parameter ``k``,

    W_S = Σ_k W^{(k)},   W^{(k)} = ∫_s^T D_k(τ) P_gᵀ j_k j_kᵀ P_g dτ,
    ψᵀ W_S ψ = ∫ ‖D^{1/2} J(τ)ᵀ P_g(τ, s) ψ‖² dτ = Σ_k ∫ D_k (J(τ)ᵀ P_g(τ, s) ψ)_k² dτ.

The **channel score** of parameter ``k`` for a block of probe vectors ``V = [v_1 … v_c]`` is

    s_k(V) = Σ_c ∫_s^T D_k(τ) (J(τ)ᵀ P_g(τ, s) v_c)_k² dτ,     Σ_k s_k(V) = tr(Vᵀ W_S V).

With ``V`` an orthonormal basis of the signal channel, ``s_k = tr(Π_channel W^{(k)})`` is the
parameter's contribution to the channel over the run; with Rademacher probes projected on the
channel (``V = Π Z / √c``) it is a Hutchinson estimate of the same; with ``V = g(s)`` it is
``∫ D_k (∂_k Φ)² dτ`` (``P_g g(s) = g(τ)``): the parameter's share of the loss dissipated.

What runs: at every snapshot ``τ_i`` the integrand ``f_k(τ_i) = Σ_c D_k (J(θ_i)ᵀ X_i)_{kc}²``
from the parameters ``θ_i`` recorded there (one batched VJP over the training set per block of
columns) and the propagated probes ``X_i = P_g(τ_i, s) V`` (:func:`propagated_probes`, from the
dense operators of a recorded run, or any other source), then a quadrature in ``τ`` over the
snapshots: ``'left'`` (``Σ h_i f(τ_i)``: with ``euler`` operators ``Σ_k s_k = tr(Vᵀ W_S V)``
exactly), ``'trapezoid'``, or ``'logmean'`` (default; ``h (f_i − f_{i+1}) / ln(f_i/f_{i+1})``,
exact for an integrand that decays exponentially between snapshots, as a fitted mode's does).
The totals ``Σ_k f_k(τ_i) = tr(X_iᵀ K_SS(τ_i) X_i)`` are returned, to check against the
operators.

Between sparse snapshots no rule on the snapshots alone is accurate (the integrand is a sum of
exponentials with rates spread over decades). :func:`frozen_kernel_channel_scores` integrates it
as the ``exp`` operators do: on ``[τ_i, τ_{i+1}]`` the kernel is frozen at ``K_SS(τ_i)`` (loss
Hessian ``b I``), so ``X(τ_i + δ) = e^{−b K δ} X_i`` and ``J = J(θ_i)``; the integral over ``δ``
runs on geometric panels (Gauss–Legendre on each, accurate for such sums at any rate), and
``Σ_k s_k`` equals ``tr(Vᵀ W_S V)`` of the ``exp`` operators to the quadrature's accuracy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from .._utils import eval_mode
from ..errors import ConfigError, ShapeError
from .operators import Discretization, accumulate_operators
from .trajectory import KernelTrajectory

__all__ = ["QUADRATURES", "ChannelScores", "channel_scores", "frozen_kernel_channel_scores",
           "propagated_probes"]

Quadrature = Literal["left", "trapezoid", "logmean"]
QUADRATURES = ("left", "trapezoid", "logmean")


@dataclasses.dataclass(frozen=True)
class ChannelScores:
    """Per-parameter channel scores of one run (see the module docstring).

    Attributes:
        scores: parameter name → tensor of its shape, ``s_k ≥ 0`` (float64).
        total: ``Σ_k s_k`` (≈ ``tr(Vᵀ W_S V)``).
        times: ``(S,)`` snapshot times used.
        integrand: ``(S,)`` ``Σ_k f_k(τ_i) = tr(X_iᵀ K_SS(τ_i) X_i)``.
        quadrature: the rule used.
    """

    scores: Mapping[str, Tensor]
    total: float
    times: np.ndarray
    integrand: np.ndarray
    quadrature: str

    def flat(self) -> Tensor:
        """All scores as one vector (in ``scores``' order)."""
        return torch.cat([v.reshape(-1) for v in self.scores.values()])


def _params_of(state: Any) -> Mapping[str, Tensor]:
    if isinstance(state, Mapping) and "params" in state and isinstance(state["params"], Mapping):
        return state["params"]
    if isinstance(state, Mapping):
        return state
    params = getattr(state, "params", None)        # a CheckpointState
    if isinstance(params, Mapping):
        return params
    raise ConfigError("a state must be a {name: tensor} dict, a capture_state() record or a "
                      "CheckpointState")


def _integrand(model: nn.Module, params: Mapping[str, Tensor], x: Tensor, X: Tensor,
               D: Mapping[str, Tensor] | None, chunk: int,
               weights: Tensor | None = None) -> dict[str, Tensor]:
    """``Σ_c w_c D (J(θ)ᵀ X_c)²`` per parameter for a block ``X`` ``(N, c)`` (``w = 1``)."""
    names = list(params)
    prm = {k: v.detach().to(torch.float64) for k, v in params.items()}
    frozen = {k: v.detach() for k, v in model.named_parameters() if k not in prm}
    bufs = dict(model.named_buffers())

    def f(p: dict[str, Tensor]) -> Tensor:
        return functional_call(model, ({**frozen, **p}, bufs), (x,), tie_weights=True)

    res = vjp(f, prm)
    out0, pull = res[0], res[1]
    n = out0.shape[0]
    pdim = out0.reshape(n, -1).shape[1]
    if X.shape[0] != n * pdim:
        raise ShapeError(f"probe blocks have {X.shape[0]} rows but the model has N = n p = "
                         f"{n} × {pdim} = {n * pdim} outputs on x")
    acc = {k: torch.zeros_like(prm[k]) for k in names}
    for c0 in range(0, X.shape[1], chunk):
        cot = X[:, c0:c0 + chunk].T.reshape(-1, *out0.shape).to(out0.dtype)
        g = vmap(pull)(cot)[0]
        w = None if weights is None else weights[c0:c0 + chunk].to(torch.float64)
        for k in names:
            sq = g[k].pow(2)
            acc[k] += sq.sum(0) if w is None else torch.tensordot(w, sq, dims=1)
    if D is not None:
        for k in names:
            acc[k] = acc[k] * D[k].to(acc[k])
    return acc


def _combine(fa: Tensor, fb: Tensor, h: float, rule: str) -> Tensor:
    if rule == "left":
        return h * fa
    if rule == "trapezoid":
        return 0.5 * h * (fa + fb)
    a, b = fa.clamp_min(0), fb.clamp_min(0)
    la, lb = torch.log(a.clamp_min(1e-300)), torch.log(b.clamp_min(1e-300))
    diff = la - lb
    close = diff.abs() < 1e-6
    lm = torch.where(close, 0.5 * (a + b), (a - b) / torch.where(close, torch.ones_like(diff),
                                                                 diff))
    return h * torch.where((a > 0) & (b > 0), lm, torch.zeros_like(a))


def channel_scores(model: nn.Module, states: Sequence[Any], x: Tensor,
                   times: Sequence[float] | np.ndarray,
                   blocks: Sequence[Tensor], *,
                   preconditioners: Sequence[Mapping[str, Tensor] | None] | None = None,
                   quadrature: Quadrature = "logmean", chunk_size: int = 16) -> ChannelScores:
    """``s_k(V) = Σ_c ∫ D_k (J(τ)ᵀ P_g(τ, s) v_c)_k² dτ`` for every parameter ``k``.

    Args:
        model: the network (its architecture; parameters come from ``states``). Products run
            in eval mode (every submodule's flag restored).
        states: per snapshot, the parameters: ``{name: tensor}``, a
            :func:`~tangentscope.dynamics.matfree_path.capture_state` record or a
            ``CheckpointState``; the names scored are those of the first state.
        x: ``(n, ...)`` training inputs.
        times: ``(S,)`` snapshot times ``τ_i`` (non-decreasing).
        blocks: per snapshot ``X_i = P_g(τ_i, s) V`` ``(N, c)`` (:func:`propagated_probes`).
        preconditioners: per snapshot ``{name: D}`` (Adam's ``J D Jᵀ``) or ``None``.
        quadrature: ``'left'``, ``'trapezoid'`` or ``'logmean'``.
        chunk_size: probe columns per batched VJP.

    Raises:
        ShapeError: lengths that differ, or blocks of the wrong height.
        ConfigError: an unknown quadrature, times that decrease, or fewer than two snapshots.
    """
    if quadrature not in QUADRATURES:
        raise ConfigError(f"quadrature must be one of {QUADRATURES}, got {quadrature!r}")
    S = len(states)
    t = np.asarray(times, dtype=float)
    if len(blocks) != S or t.shape != (S,) or (preconditioners is not None
                                                and len(preconditioners) != S):
        raise ShapeError(f"need one time, block (and preconditioner) per state: {S} states, "
                         f"{t.size} times, {len(blocks)} blocks")
    if S < 2 or np.any(np.diff(t) < 0):
        raise ConfigError("channel_scores needs at least two snapshots at non-decreasing times")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    x = torch.as_tensor(x)
    x = x.to(torch.float64) if x.is_floating_point() else x
    scores: dict[str, Tensor] | None = None
    prev: dict[str, Tensor] | None = None
    totals = []
    with eval_mode(model):
        for i in range(S):
            X = torch.as_tensor(blocks[i], dtype=torch.float64)
            X = X[:, None] if X.dim() == 1 else X
            D = None if preconditioners is None else preconditioners[i]
            cur = _integrand(model, _params_of(states[i]), x, X, D, chunk_size)
            totals.append(float(sum(v.sum() for v in cur.values())))
            if prev is not None:
                h = float(t[i] - t[i - 1])
                part = {k: _combine(prev[k], cur[k], h, quadrature) for k in cur}
                scores = part if scores is None else {k: scores[k] + part[k] for k in part}
            prev = cur
    assert scores is not None
    return ChannelScores(scores, float(sum(v.sum() for v in scores.values())), t,
                         np.array(totals), quadrature)


def _log_grid(h: float, rate: float, ratio: float, order: int = 4) -> tuple[Tensor, Tensor]:
    """Nodes in ``[0, h]`` and weights with ``Σ w_q f(δ_q) ≈ ∫_0^h f`` for sums of decaying
    exponentials of rates ``≤ rate``: Gauss–Legendre (``order`` points) on the panels
    ``[0, δ_1], [δ_1, r δ_1], [r δ_1, r² δ_1], …, [·, h]`` with ``δ_1 = min(h, 1/(4 rate))`` and
    ``r ≤ ratio`` (geometric panels: each exponential is smooth on the panels where it is not
    yet negligible)."""
    d1 = min(h, 1.0 / (4.0 * rate)) if rate > 0 else h
    q = max(1, int(math.ceil(math.log(h / d1) / math.log(ratio)))) if h > d1 * (1 + 1e-12) \
        else 0
    edges = [0.0, d1] + ([d1 * (h / d1) ** (j / q) for j in range(1, q + 1)] if q else [])
    gx, gw = np.polynomial.legendre.leggauss(order)
    nodes, weights = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        nodes.append(0.5 * (b - a) * gx + 0.5 * (a + b))
        weights.append(0.5 * (b - a) * gw)
    return (torch.as_tensor(np.concatenate(nodes)), torch.as_tensor(np.concatenate(weights)))


def frozen_kernel_channel_scores(model: nn.Module, traj: KernelTrajectory, states: Sequence[Any],
                                 x: Tensor, V: Tensor, *, start: int = 0,
                                 stop: int | None = None, ratio: float = 3.0,
                                 preconditioners: Sequence[Mapping[str, Tensor] | None]
                                 | None = None, chunk_size: int = 64) -> ChannelScores:
    """``s_k(V)`` over the window ``[τ_start, τ_stop]`` with the kernel frozen on each interval
    at its left snapshot, as the ``exp`` operators assume (see the module docstring): the
    probes are propagated here (``X_{i+1} = e^{−b K_i h_i} X_i``, one eigen-decomposition of
    ``K_SS(τ_i)`` per interval), so ``Σ_k s_k = tr(Vᵀ W_S V)`` to the quadrature's accuracy
    (:func:`_log_grid`; ``ratio=2`` gives about 1e-6 relative error per exponential).

    Args:
        model: the network (architecture); traj: the recorded run (loss Hessian ``b I``).
        states: per snapshot of ``traj``, the parameters (as for :func:`channel_scores`).
        x: ``(n, ...)`` the training inputs of the recording.
        V: ``(N, c)`` (or ``(N,)``) probes at ``τ_start``.
        ratio: growth factor of the geometric panels in ``δ`` (> 1; smaller is more accurate,
            each panel costs 4 evaluations of the integrand).
        preconditioners: per snapshot ``{name: D}`` for a recording of ``J D Jᵀ``, or ``None``.
        chunk_size: probe columns per batched VJP.

    Returns:
        :class:`ChannelScores` with ``times`` the snapshot times of the window, ``integrand``
        ``tr(X_iᵀ K_SS(τ_i) X_i)`` at each of them, and ``quadrature = 'frozen'``.

    Raises:
        ShapeError: ``V`` or ``states`` of the wrong size, or not a window.
        ConfigError: a loss Hessian that is not ``b I`` or ``ratio <= 1``.
    """
    S = len(traj)
    stop = S - 1 if stop is None else stop
    if not 0 <= start < stop < S:
        raise ShapeError(f"[{start}, {stop}] is not a window of the {S} snapshots")
    if len(states) != S or (preconditioners is not None and len(preconditioners) != S):
        raise ShapeError(f"need one state (and preconditioner) per snapshot: {S} snapshots, "
                         f"{len(states)} states")
    if not ratio > 1:
        raise ConfigError(f"ratio must be > 1, got {ratio}")
    X = torch.as_tensor(V, dtype=torch.float64)
    X = X[:, None] if X.dim() == 1 else X
    if X.dim() != 2 or X.shape[0] != traj.N:
        raise ShapeError(f"V must be (N, c) with N = {traj.N}, got {tuple(X.shape)}")
    x = torch.as_tensor(x)
    x = x.to(torch.float64) if x.is_floating_point() else x
    scores: dict[str, Tensor] | None = None
    totals = []
    with eval_mode(model):
        for i in range(start, stop):
            b = traj.hessian_scale(i)
            if b is None:
                raise ConfigError("frozen_kernel_channel_scores needs a loss Hessian b I "
                                  "(squared loss); use channel_scores with propagated_probes")
            K = traj.kernel(i)
            lam, U = torch.linalg.eigh(0.5 * (K + K.T))
            mu = b * lam.clamp_min(0)
            h = float(traj.times[i + 1] - traj.times[i])
            Y = U.T @ X
            totals.append(float((Y * (lam.clamp_min(0)[:, None] * Y)).sum()))
            D = None if preconditioners is None else preconditioners[i]
            if h > 0:
                nodes, w = _log_grid(h, 2.0 * float(mu.max()), ratio)
                c = X.shape[1]
                blocks = torch.cat([U @ (torch.exp(-mu * d)[:, None] * Y) for d in nodes], 1)
                part = _integrand(model, _params_of(states[i]), x, blocks, D, chunk_size,
                                  weights=w.repeat_interleave(c))
                scores = part if scores is None else {k: scores[k] + part[k] for k in part}
            X = U @ (torch.exp(-mu * h)[:, None] * Y)
    K = traj.kernel(stop)
    totals.append(float(torch.einsum("nc,nm,mc->", X, K, X)))
    if scores is None:
        scores = {k: torch.zeros_like(v, dtype=torch.float64)
                  for k, v in _params_of(states[start]).items()}
    return ChannelScores(scores, float(sum(v.sum() for v in scores.values())),
                         np.asarray(traj.times[start:stop + 1], dtype=float), np.array(totals),
                         "frozen")


def propagated_probes(traj: KernelTrajectory, V: Tensor, *, start: int = 0,
                      stop: int | None = None, discretization: Discretization = "exp"
                      ) -> list[Tensor]:
    """``X_i = P_g(τ_i, s) V`` at every snapshot ``i = start … stop`` of a recorded run (from
    the dense operators; ``X_start = V``).

    Args:
        traj: the recorded run.
        V: ``(N, c)`` (or ``(N,)``) probe vectors in the stacked output space.
        start, stop, discretization: the window and the scheme of
            :func:`~tangentscope.dynamics.accumulate_operators`.
    """
    V = torch.as_tensor(V, dtype=torch.float64)
    V = V[:, None] if V.dim() == 1 else V
    if V.dim() != 2 or V.shape[0] != traj.N:
        raise ShapeError(f"V must be (N, c) with N = {traj.N}, got {tuple(V.shape)}")
    out = [V]
    for ops in accumulate_operators(traj, start, stop, discretization=discretization):
        out.append(ops.P @ V)
    return out
