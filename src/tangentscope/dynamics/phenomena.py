"""Shared machinery of the phenomena experiments: benign overfitting, double descent, implicit bias.

The operators themselves (``W_S``, ``G_Q``, channel split, noise transfer, spectral schedule) live
in :mod:`.operators`, :mod:`.channels` and :mod:`.spectrum`; this module adds what the three
experiments need on top of them:

- :func:`make_optimizer` / :func:`train_network` — one small full-batch or minibatch training
  loop (squared or cross-entropy loss; GD, Adam or the gated AdamW) that a
  :class:`~tangentscope.dynamics.recorder.KernelRecorder` can watch;
- :func:`random_features` — a two-layer net whose first layer is frozen (a model that is linear
  in its trainable parameters: constant eNTK, exact operators);
- :func:`dissipated_fraction` — the *soft* channel fraction of a vector under squared loss:
  ``2b · vᵀ W_S v / ‖v‖²`` ∈ [0, 1] (``B = b I``), the share of that direction's loss that
  training dissipated (no threshold);
- :func:`noise_channel_analysis` — the channel/reservoir bookkeeping of known label noise on a
  recorded run, with identity residuals, as one frozen :class:`NoiseChannelReport`;
- :func:`min_norm_noise_transfer` — the same at ``t = ∞`` for a frozen kernel (min-norm fit);
- :func:`linearized_comparison` — a trained network against its linearization (the closed-form
  kernel regression of the initial eNTK) at the same step and at ``t = ∞``.

Why ``2b vᵀWv/‖v‖² ≤ 1``: under squared loss ``ġ = −b K g``, so
``d‖g‖²/dτ = −2b gᵀKg`` and ``‖P_g(T,s) v‖² = ‖v‖² − 2b vᵀ W_S v`` for any kernel path; the
eigenvalues of ``2b W_S`` lie in ``[0, 1]``, with 1 meaning "fully fitted" and 0 "untouched"
(the reservoir). :func:`noise_channel_analysis` therefore cuts the channel at a fraction
``threshold`` of the saturation value ``1/(2b) = n/2`` rather than relative to ``λ_max``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError
from .channels import (ChannelSplit, label_noise_gradients, noise_transfer,
                       split_channels)
from .flow import squared_loss_flow
from .operators import Discretization, identity_residuals, window_operators
from .recorder import Schedule, logspaced
from .trajectory import KernelTrajectory

__all__ = ["OPTIMIZERS", "make_optimizer", "train_network", "TrainHistory", "snapshot_schedule",
           "gd_step_size", "random_features", "param_vector",
           "classification_error", "dissipated_fraction", "NoiseChannelReport",
           "noise_channel_analysis", "min_norm_noise_transfer", "LinearizedComparison",
           "linearized_comparison", "path_average_kernel", "minnorm_rel_errors", "run_cells",
           "seed_stats"]

OPTIMIZERS = ("gd", "adam", "gated", "gated_streaming")
LossName = Literal["squared", "cross_entropy"]


# -- training --------------------------------------------------------------------------------------
def make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """``'gd'`` (plain SGD, no momentum), ``'adam'`` (``torch.optim.Adam``), ``'gated'``
    (:class:`~tangentscope.optim.GatedAdamW`, exact per-example statistics, no weight decay) or
    ``'gated_streaming'`` (its streaming statistics). The gated ones with ``gate=False`` equal
    ``'adam'``.

    Raises:
        ConfigError: an unknown name or a non-positive learning rate.
    """
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"learning rate must be a positive number, got {lr!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "gd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name in ("gated", "gated_streaming"):
        from ..optim import GatedAdamW, PerExampleStats

        stats: Any = PerExampleStats(model) if name == "gated" else "streaming"
        return GatedAdamW(params, lr=lr, weight_decay=0.0, stats=stats)
    raise ConfigError(f"unknown optimizer {name!r}; one of {OPTIMIZERS}")


@dataclasses.dataclass(frozen=True)
class TrainHistory:
    """Losses and errors logged during :func:`train_network`.

    Attributes:
        steps: ``(L,)`` optimizer steps at which the row was logged.
        train_loss: ``(L,)`` full-batch training loss ``Φ``.
        train_error: ``(L,)`` error against the observed (possibly noisy) labels.
        test_error: ``(L,)`` error on the clean test labels (NaN without a test set).
        seconds: wall time of training (logging excluded).
    """

    steps: np.ndarray
    train_loss: np.ndarray
    train_error: np.ndarray
    test_error: np.ndarray
    seconds: float

    def first_zero_error_step(self) -> int | None:
        """The first logged step with zero training error (``None``: never interpolated)."""
        hit = np.nonzero(self.train_error == 0)[0]
        return int(self.steps[hit[0]]) if hit.size else None


def classification_error(U: Tensor, labels: Tensor) -> float:
    """Error rate of outputs ``U`` ``(n, p)``: sign for ``p = 1`` (class 1 ↔ positive), argmax
    otherwise."""
    U = U.reshape(U.shape[0], -1)
    pred = (U[:, 0] > 0).long() if U.shape[1] == 1 else U.argmax(1)
    return float((pred != labels.reshape(-1).to(pred.device)).float().mean())


def _loss_fn(loss: LossName) -> Callable[[Tensor, Tensor], Tensor]:
    if loss == "squared":
        return lambda out, y: 0.5 * (out - y).pow(2).sum(1).mean()
    if loss == "cross_entropy":
        return lambda out, y: nn.functional.cross_entropy(out, y)
    raise ConfigError(f"loss must be 'squared' or 'cross_entropy', got {loss!r}")


def train_network(model: nn.Module, x: Tensor, y: Tensor, labels: Tensor,
                  optimizer: torch.optim.Optimizer, steps: int, *, loss: LossName = "squared",
                  batch_size: int | None = None, seed: int = 0, x_test: Tensor | None = None,
                  labels_test: Tensor | None = None, log_every: int = 0,
                  stop_at_zero_error: bool = False,
                  on_log: Callable[[int, dict[str, float]], None] | None = None) -> TrainHistory:
    """Train ``model`` on ``(x, y)``; log full-batch loss and errors every ``log_every`` steps.

    The loss on a batch ``b`` is ``Φ_b = Σ_{i∈b} ‖u_i − y_i‖²/(2|b|)`` (squared; SPEC.md's ``Φ``,
    so a :class:`KernelRecorder` needs ``loss_scale=1``) or the mean cross-entropy.

    Args:
        model: the network (``(n, d) → (n, p)``).
        x: ``(n, d)`` inputs; ``y``: targets (``(n, p)`` floats for squared loss, ``(n,)``
            class indices for cross-entropy); ``labels``: ``(n,)`` observed labels for the error.
        optimizer: e.g. from :func:`make_optimizer` (a recorder may be attached to it).
        steps: optimizer steps.
        batch_size: ``None`` or ``>= n`` → full batch; else reshuffled minibatches per epoch.
        seed: seed of the minibatch order.
        x_test, labels_test: clean test set for the logged test error.
        log_every: log every this many steps (0: only at the start and the end).
        stop_at_zero_error: stop at the first logged step with zero training error.
        on_log: ``fn(step, row)`` after each log.

    Raises:
        ShapeError: inputs and targets of different lengths.
    """
    n = x.shape[0]
    if y.shape[0] != n or labels.shape[0] != n:
        raise ShapeError(f"x has {n} rows but y has {y.shape[0]} and labels {labels.shape[0]}")
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, got {steps}")
    lossf = _loss_fn(loss)
    full = batch_size is None or batch_size >= n
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(n, generator=gen), 0
    rows: list[tuple[int, float, float, float]] = []

    def log(step: int) -> bool:
        with torch.no_grad():
            out = model(x)
            row = (step, float(lossf(out, y)), classification_error(out, labels),
                   float("nan") if x_test is None or labels_test is None
                   else classification_error(model(x_test), labels_test))
        rows.append(row)
        if on_log is not None:
            on_log(step, {"train_loss": row[1], "train_error": row[2], "test_error": row[3]})
        return stop_at_zero_error and row[2] == 0.0

    import time

    elapsed, t0 = 0.0, time.perf_counter()
    done = log(0)
    for step in range(1, steps + 1):
        if done:
            break
        t0 = time.perf_counter()
        if full:
            xb, yb = x, y
        else:
            assert batch_size is not None
            if pos + batch_size > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos:pos + batch_size]
            pos += batch_size
            xb, yb = x[idx], y[idx]
        optimizer.zero_grad(set_to_none=True)
        lossf(model(xb), yb).backward()
        optimizer.step()
        elapsed += time.perf_counter() - t0
        if (log_every and step % log_every == 0) or step == steps:
            done = log(step)
    a = np.array(rows, dtype=float)
    return TrainHistory(a[:, 0].astype(int), a[:, 1], a[:, 2], a[:, 3], elapsed)


def gd_step_size(model: nn.Module, x: Tensor, lr_scale: float = 1.0) -> float:
    """``lr_scale · n / λ_max(K_SS)`` at the current parameters: gradient descent on
    ``Φ = ‖u − y‖²/(2n)`` is stable for ``lr_scale < 2`` while the kernel stays put."""
    from ..kernels.entk import entk, flatten_kernel

    if not (lr_scale > 0 and math.isfinite(lr_scale)):
        raise ConfigError(f"lr_scale must be a positive number, got {lr_scale!r}")
    K = flatten_kernel(entk(model, x, dtype=torch.float64))
    lam = float(torch.linalg.eigvalsh(0.5 * (K + K.T))[-1])
    return lr_scale * x.shape[0] / lam


def snapshot_schedule(total_steps: int, every_k: int, num_log: int = 20) -> Schedule:
    """Snapshots every ``every_k`` steps plus about ``num_log`` log-spaced ones (dense early,
    where the kernel and the Adam preconditioner move fastest)."""
    if every_k < 1:
        raise ConfigError(f"snapshot interval must be >= 1 step, got {every_k}")
    log = logspaced(max(total_steps, 1), num_log).steps if num_log > 0 else frozenset()
    return Schedule(every=every_k, steps=frozenset(log))


def random_features(in_dim: int, width: int, out_dim: int, *, activation: str = "relu",
                    seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """``x ↦ W₂ σ(W₁ x + b₁)/√width`` with ``W₁, b₁ ~ N(0, 1/in_dim)`` frozen (random features)
    and only the readout ``W₂`` (zero-initialized, no bias) trainable.

    The model is linear in its trainable parameters, so its eNTK ``σ(·)σ(·)ᵀ/width`` is constant
    and gradient descent from zero converges to the minimum-norm interpolant when
    ``width ≥ n``.
    """
    from ..models.mlp import _ACTIVATIONS

    if activation not in _ACTIVATIONS or activation == "sin":
        raise ConfigError(f"activation must be one of {sorted(set(_ACTIVATIONS) - {'sin'})}")
    g = torch.Generator().manual_seed(seed)
    first = nn.Linear(in_dim, width)
    with torch.no_grad():
        first.weight.copy_(torch.randn(width, in_dim, generator=g) / math.sqrt(in_dim))
        first.bias.copy_(torch.randn(width, generator=g) / math.sqrt(in_dim))
    first.requires_grad_(False)
    readout = nn.Linear(width, out_dim, bias=False)
    nn.init.zeros_(readout.weight)
    act = _ACTIVATIONS[activation]
    assert act is not None

    class _Scale(nn.Module):
        def forward(self, h: Tensor) -> Tensor:  # noqa: D102
            return h / math.sqrt(width)

    return nn.Sequential(first, act(), _Scale(), readout).to(dtype)


# -- channel bookkeeping of label noise -----------------------------------------------------------
def dissipated_fraction(W: Tensor, v: Tensor, b: float) -> float:
    """``2b · vᵀ W v / ‖v‖²`` — the share of the loss along direction ``v`` that the window
    dissipated (squared loss with ``B = b I``; ``b = 1/n`` for SPEC.md's ``Φ``). In ``[0, 1]``
    up to discretization error; 0 for the reservoir, 1 for a fully fitted direction."""
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
            (SPEC.md identities, relative errors; how far to trust the numbers above).
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

    def scalars(self) -> dict[str, float]:
        """The scalar fields (for a results table)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not isinstance(getattr(self, f.name), np.ndarray)}


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
    ir = identity_residuals(traj, discretization=discretization).final()
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
    from .operators import accumulate_operators

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


# -- implicit bias -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LinearizedComparison:
    """A trained network against the closed-form flow of its initial eNTK.

    Attributes:
        test_rel_error: ``‖U_Q − U_Q^lin‖ / ‖U_Q − U_Q(0)‖`` at the same step (how much of the
            learned test function the linearized model misses); ``train_rel_error`` likewise.
        minnorm_rel_error: the same against the ``t = ∞`` minimum-norm interpolant of the
            initial kernel (``U_Q(0) − K_QS K_SS⁺ (u_0 − y)``).
        test_agreement: fraction of test points where network and linearization agree in class.
        kernel_distance: ``‖K_T − K_0‖_F / ‖K_0‖_F`` (0 = lazy).
        param_distance: ``‖w_T − w_0‖``; ``minnorm_param_distance``: ``√(r₀ᵀ K_0⁺ r₀)``, the
            parameter norm of the linearized minimum-norm interpolating update;
            ``linearized_param_distance``: ``‖Δw‖`` of the linearized model after the same
            steps, ``√(Σ_i c_i² (1 − (1 − η b λ_i)^T)² / λ_i)`` with ``c = Vᵀ r₀``.
    """

    test_rel_error: float
    train_rel_error: float
    minnorm_rel_error: float
    test_agreement: float
    kernel_distance: float
    param_distance: float
    minnorm_param_distance: float
    linearized_param_distance: float


def linearized_comparison(K0: Tensor, KQ0: Tensor, u0: Tensor, UQ0: Tensor, y: Tensor,
                          uT: Tensor, UQT: Tensor, *, steps: int, lr: float, KT: Tensor,
                          param_distance: float, reduction: str = "mean"
                          ) -> LinearizedComparison:
    """Compare the network after ``steps`` full-batch GD steps of size ``lr`` (squared loss) with
    the linearized model after the same steps (:func:`squared_loss_flow`, discrete form) and
    with the minimum-norm interpolant (``t = ∞``).

    Args:
        K0: ``(N, N)`` eNTK at initialization; ``KQ0``: ``(m p, N)`` its cross-kernel; ``KT``:
            the eNTK at the end.
        u0, UQ0: ``(n, p)``, ``(m, p)`` outputs at initialization; ``uT``, ``UQT`` at the end.
        y: ``(n, p)`` targets.
        param_distance: ``‖w_T − w_0‖`` of the network.
    """
    f64 = torch.float64
    K0, KQ0, KT = (torch.as_tensor(a, dtype=f64) for a in (K0, KQ0, KT))
    u0, UQ0, y, uT, UQT = (torch.as_tensor(a, dtype=f64).reshape(a.shape[0], -1)
                           for a in (u0, UQ0, y, uT, UQT))
    lin = squared_loss_flow(K0, u0, y, steps=[steps], lr=lr, K_QS=KQ0, U_Q0=UQ0,
                            reduction=reduction)
    inf = squared_loss_flow(K0, u0, y, t=[math.inf], K_QS=KQ0, U_Q0=UQ0)
    assert lin.U_Q is not None and inf.U_Q is not None

    def rel(a: Tensor, b: Tensor, ref: Tensor) -> float:
        d = float(torch.linalg.norm(ref))
        return float(torch.linalg.norm(a - b)) / d if d > 0 else float("nan")

    same = ((UQT[:, 0] > 0) == (lin.U_Q[-1][:, 0] > 0)) if UQT.shape[1] == 1 else (
        UQT.argmax(1) == lin.U_Q[-1].argmax(1))
    r0 = (u0 - y).reshape(-1)
    lam, V = torch.linalg.eigh(0.5 * (K0 + K0.T))
    keep = lam > lam.max() * lam.numel() * torch.finfo(f64).eps
    c = V[:, keep].T @ r0
    scale = 1.0 / u0.shape[0] if reduction == "mean" else 1.0
    fitted = 1 - (1 - lr * scale * lam[keep]) ** steps
    return LinearizedComparison(
        test_rel_error=rel(UQT, lin.U_Q[-1], UQT - UQ0),
        train_rel_error=rel(uT, lin.u[-1], uT - u0),
        minnorm_rel_error=rel(UQT, inf.U_Q[-1], UQT - UQ0),
        test_agreement=float(same.float().mean()),
        kernel_distance=float(torch.linalg.norm(KT - K0) / torch.linalg.norm(K0)),
        param_distance=float(param_distance),
        minnorm_param_distance=float((c.pow(2) / lam[keep]).sum().sqrt()),
        linearized_param_distance=float((c.pow(2) * fitted.pow(2) / lam[keep]).sum().sqrt()))


def path_average_kernel(traj: KernelTrajectory) -> tuple[Tensor, Tensor]:
    """Time-averaged ``(K̄_SS (N, N), K̄_QS (m p, N))`` over the recorded path (trapezoid rule
    in training time ``τ``): the feature metric of the "realized path"."""
    if traj.U_Q is None:
        raise ConfigError("path_average_kernel needs a recorded test/probe set")
    t = traj.times
    T = float(t[-1] - t[0])
    if len(traj) < 2 or T <= 0:
        raise ShapeError("path_average_kernel needs at least two snapshots at distinct times")
    K = torch.zeros(traj.N, traj.N, dtype=torch.float64)
    KQ = torch.zeros(traj.m * traj.p, traj.N, dtype=torch.float64)
    prev = (traj.kernel(0), traj.cross_kernel(0))
    for k in range(1, len(traj)):
        cur = (traj.kernel(k), traj.cross_kernel(k))
        h = float(t[k] - t[k - 1]) / (2 * T)
        K += h * (prev[0] + cur[0])
        KQ += h * (prev[1] + cur[1])  # type: ignore[operator]
        prev = cur
    return K, KQ


def minnorm_rel_errors(traj: KernelTrajectory, y: Tensor) -> dict[str, float]:
    """Relative distance of the final test outputs to the ``t = ∞`` minimum-norm interpolant
    ``U_Q(0) − K_QS K_SS⁺ (u(0) − y)`` computed with the initial (``minnorm_init``), final
    (``minnorm_final``) and path-averaged (``minnorm_path``) eNTK, each as
    ``‖U_Q(T) − Û_Q‖ / ‖U_Q(T) − U_Q(0)‖``."""
    from .flow import analytic_jump

    if traj.U_Q is None:
        raise ConfigError("minnorm_rel_errors needs a recorded test/probe set")
    y = torch.as_tensor(y, dtype=torch.float64).reshape(traj.n, traj.p)
    UQ0, UQT = traj.U_Q[0], traj.U_Q[-1]
    ref = float(torch.linalg.norm(UQT - UQ0))
    kernels = {"minnorm_init": (traj.kernel(0), traj.cross_kernel(0)),
               "minnorm_final": (traj.kernel(-1), traj.cross_kernel(-1)),
               "minnorm_path": path_average_kernel(traj)}
    out = {}
    for name, (K, KQ) in kernels.items():
        jump = analytic_jump(K, traj.u[0], y, K_QS=KQ, U_Q0=UQ0)
        assert jump.U_Q is not None
        out[f"{name}_rel_error"] = float(torch.linalg.norm(UQT - jump.U_Q[-1])) / ref
    return out


# -- experiment bookkeeping -----------------------------------------------------------------------
def run_cells(rd: Any, cells: Iterable[tuple[str, Callable[[], tuple[dict, dict]]]], *,
              desc: str) -> dict[str, dict[str, Any]]:
    """Run ``key → fn() = (result, arrays)`` cells in order, skipping keys already in
    ``rd.cells()`` (resume); log each result to ``metrics.csv``, store its arrays as
    ``<key>/<name>`` in ``arrays.npz`` and the result in ``cells.jsonl``. Returns all results."""
    from .._utils import progress

    done = rd.cells()
    todo = list(cells)
    for key, fn in progress(todo, desc=desc, total=len(todo)):
        if key in done:
            continue
        res, arrays = fn()
        rd.log(**{k: v for k, v in res.items() if not isinstance(v, (list, dict))})
        rd.save_arrays(**{f"{key}/{k}": v for k, v in arrays.items()})
        rd.save_cell(key, res)
        done[key] = res
    return done


def seed_stats(records: Iterable[Mapping[str, Any]], keys: Iterable[str] | None = None
               ) -> dict[str, dict[str, float]]:
    """``{metric: {median, min, max, n}}`` over seeds of the finite numeric fields of
    ``records`` (all numeric fields when ``keys`` is None)."""
    recs = list(records)
    if keys is None:
        keys = [k for k, v in recs[0].items() if isinstance(v, (int, float))
                and not isinstance(v, bool)] if recs else []
    out = {}
    for k in keys:
        vals = [float(r[k]) for r in recs if isinstance(r.get(k), (int, float))
                and math.isfinite(float(r[k]))]
        if vals:
            out[k] = {"median": float(np.median(vals)), "min": min(vals), "max": max(vals),
                      "n": len(vals)}
    return out


def param_vector(params: Iterable[Tensor]) -> Tensor:
    """The trainable parameters as one flat float64 vector (for ``‖w_T − w_0‖``)."""
    return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params
                      if p.requires_grad])
