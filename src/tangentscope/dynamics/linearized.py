"""A trained network against its linearization (the closed-form flow of its initial eNTK).

- :func:`gd_step_size` — the gradient-descent step ``lr_scale · n / λ_max(K_SS)`` at the
  current parameters (stable for ``lr_scale < 2`` while the kernel stays put);
- :func:`linearized_comparison` — a trained network against its linearization at the same step
  and at ``t = ∞`` (the minimum-norm interpolant), as one :class:`LinearizedComparison`;
- :func:`path_average_kernel` — the time-averaged kernel of a recorded path;
- :func:`minnorm_rel_errors` — the final test outputs against the ``t = ∞`` minimum-norm
  interpolant of the initial, final and path-averaged eNTK.

Symbols: docs/notation.md ("Gradient flow in output space").
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError
from ..kernels import entk, flatten_kernel
from .flow import analytic_jump, squared_loss_flow
from .trajectory import KernelTrajectory

__all__ = ["gd_step_size", "LinearizedComparison", "linearized_comparison",
           "path_average_kernel", "minnorm_rel_errors"]


def gd_step_size(model: nn.Module, x: Tensor, lr_scale: float = 1.0) -> float:
    """``lr_scale · n / λ_max(K_SS)`` at the current parameters: gradient descent on
    ``Φ = ‖u − y‖²/(2n)`` is stable for ``lr_scale < 2`` while the kernel stays put."""
    if not (lr_scale > 0 and math.isfinite(lr_scale)):
        raise ConfigError(f"lr_scale must be a positive number, got {lr_scale!r}")
    K0 = entk(model, x, dtype=torch.float64)
    assert isinstance(K0, Tensor)           # no ``groups``: one kernel
    K = flatten_kernel(K0)
    lam = float(torch.linalg.eigvalsh(0.5 * (K + K.T))[-1])
    return lr_scale * x.shape[0] / lam


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


def linearized_comparison(K0: Tensor, KQ0: Tensor, u0: Tensor, U_Q0: Tensor, y: Tensor,
                          uT: Tensor, U_QT: Tensor, *, steps: int, lr: float, KT: Tensor,
                          param_distance: float, reduction: str = "mean"
                          ) -> LinearizedComparison:
    """Compare the network after ``steps`` full-batch GD steps of size ``lr`` (squared loss) with
    the linearized model after the same steps (:func:`squared_loss_flow`, discrete form) and
    with the minimum-norm interpolant (``t = ∞``).

    Args:
        K0: ``(N, N)`` eNTK at initialization; ``KQ0``: ``(m p, N)`` its cross-kernel; ``KT``:
            the eNTK at the end.
        u0, U_Q0: ``(n, p)``, ``(m, p)`` outputs at initialization; ``uT``, ``U_QT`` at the end.
        y: ``(n, p)`` targets.
        param_distance: ``‖w_T − w_0‖`` of the network.
    """
    f64 = torch.float64
    K0, KQ0, KT = (torch.as_tensor(a, dtype=f64) for a in (K0, KQ0, KT))
    u0, U_Q0, y, uT, U_QT = (torch.as_tensor(a, dtype=f64).reshape(a.shape[0], -1)
                           for a in (u0, U_Q0, y, uT, U_QT))
    lin = squared_loss_flow(K0, u0, y, steps=[steps], lr=lr, K_QS=KQ0, U_Q0=U_Q0,
                            reduction=reduction)
    inf = squared_loss_flow(K0, u0, y, t=[math.inf], K_QS=KQ0, U_Q0=U_Q0)
    assert lin.U_Q is not None and inf.U_Q is not None

    def rel(a: Tensor, b: Tensor, ref: Tensor) -> float:
        d = float(torch.linalg.norm(ref))
        return float(torch.linalg.norm(a - b)) / d if d > 0 else float("nan")

    same = ((U_QT[:, 0] > 0) == (lin.U_Q[-1][:, 0] > 0)) if U_QT.shape[1] == 1 else (
        U_QT.argmax(1) == lin.U_Q[-1].argmax(1))
    r0 = (u0 - y).reshape(-1)
    lam, V = torch.linalg.eigh(0.5 * (K0 + K0.T))
    keep = lam > lam.max() * lam.numel() * torch.finfo(f64).eps
    c = V[:, keep].T @ r0
    scale = 1.0 / u0.shape[0] if reduction == "mean" else 1.0
    fitted = 1 - (1 - lr * scale * lam[keep]) ** steps
    return LinearizedComparison(
        test_rel_error=rel(U_QT, lin.U_Q[-1], U_QT - U_Q0),
        train_rel_error=rel(uT, lin.u[-1], uT - u0),
        minnorm_rel_error=rel(U_QT, inf.U_Q[-1], U_QT - U_Q0),
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
    if traj.U_Q is None:
        raise ConfigError("minnorm_rel_errors needs a recorded test/probe set")
    y = torch.as_tensor(y, dtype=torch.float64).reshape(traj.n, traj.p)
    U_Q0, U_QT = traj.U_Q[0], traj.U_Q[-1]
    ref = float(torch.linalg.norm(U_QT - U_Q0))
    kernels = {"minnorm_init": (traj.kernel(0), traj.cross_kernel(0)),
               "minnorm_final": (traj.kernel(-1), traj.cross_kernel(-1)),
               "minnorm_path": path_average_kernel(traj)}
    out = {}
    for name, (K, KQ) in kernels.items():
        jump = analytic_jump(K, traj.u[0], y, K_QS=KQ, U_Q0=U_Q0)
        assert jump.U_Q is not None
        out[f"{name}_rel_error"] = float(torch.linalg.norm(U_QT - jump.U_Q[-1])) / ref
    return out
