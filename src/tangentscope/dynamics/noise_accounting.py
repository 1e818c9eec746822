"""The first-order accounting of label noise's test cost, with a moving kernel.

A known label noise ``ε = y − y_clean`` changes the output gradient at the start of a window by
``g_noise`` (:func:`~tangentscope.dynamics.label_noise_gradients`; squared loss: ``−ε/n``); the
theory's first-order prediction of what it does to the test outputs at ``T`` is
``−G_Q(T, s) g_noise`` (docs/notation.md, "The operators of a training window"). The "truth" is
a counterfactual: the same initialization trained on the clean labels (the twin), whose test
outputs differ by ``ΔU_Q = U_Q^noisy(T) − U_Q^clean(T)``.

Each run obeys its own identity ``U_Q(T) − U_Q(0) = −G_Q g(0)`` and both start from the same
outputs, so, exactly (up to each run's identity residual),

    ΔU_Q = −G_Q^noisy g_noise − (G_Q^noisy − G_Q^clean) g_clean.

The first term is the accounting; the second — how the noise changed the way the *signal* is
transferred, i.e. how much the kernel path depends on the labels — is what it leaves out. It is
zero for a model linear in its parameters (the path does not depend on the labels: the
accounting is exact however far the kernel moves) and is what ``O(1)`` kernel motion can make
large. :func:`noise_accounting` measures it when the twin was recorded too.

The standard alternatives are the same prediction with a *frozen* kernel (the lazy / NTK
account): ``−G_Q^K g_noise`` where ``G_Q^K`` is the transfer operator of a run whose kernel
stays at ``K`` — the initial kernel ``K(0)`` (linearized training: this equals the test-output
difference of the linearized model trained on ``y`` and on ``y_clean``), the final ``K(T)``,
the path average ``K̄``. They use the recorded time steps and the same discretization as the
path, so on a model linear in its parameters all four coincide with ``ΔU_Q``.

Every prediction is scored against ``ΔU_Q`` (relative error, correlation) and by the test error
and MSE left after subtracting it from the noisy run's test outputs (to compare with the twin's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from .channels import label_noise_gradients
from .label_noise import classification_error
from .linearized import path_average_kernel
from .operators import Discretization, window_operators
from .trajectory import KernelTrajectory

__all__ = ["PREDICTORS", "DisplacementCheck", "NoiseAccounting", "frozen_transfer",
           "noise_accounting"]

#: The predictions :func:`noise_accounting` can score: the recorded path's ``G_Q`` and three
#: frozen-kernel alternatives (``twin``, the clean run's ``G_Q``, is added when it is recorded).
PREDICTORS = ("path", "initial", "final", "average")


@dataclasses.dataclass(frozen=True)
class DisplacementCheck:
    """One prediction ``d̂`` ``(m, p)`` of the noise's test displacement against the actual ``d``.

    Attributes:
        rel_error: ``‖d̂ − d‖ / ‖d‖``.
        corr: Pearson correlation of the entries of ``d̂`` and ``d``.
        rms: RMS of ``d̂``.
        test_error_without: classification error of ``U_Q^noisy(T) − d̂`` (NaN without labels).
        test_mse_without: mean squared error of ``U_Q^noisy(T) − d̂`` against the clean test
            targets (NaN without them).
    """

    rel_error: float
    corr: float
    rms: float
    test_error_without: float
    test_mse_without: float


@dataclasses.dataclass(frozen=True)
class NoiseAccounting:
    """:func:`noise_accounting` of one run.

    Attributes:
        actual: ``(m, p)`` ``ΔU_Q = U_Q^noisy(T) − U_Q^clean(T)``.
        actual_rms: its RMS.
        predictions: predictor → ``(m, p)`` predicted displacement.
        checks: predictor → :class:`DisplacementCheck`.
        test_error_noisy, test_error_twin: probe classification errors of the two runs (NaN
            without labels); ``test_mse_noisy``, ``test_mse_twin``: probe MSEs (NaN without
            targets).
        path_change: ``(m, p)`` ``−(G_Q^noisy − G_Q^clean) g_clean``, the part of ``ΔU_Q`` the
            first-order accounting leaves out, or ``None`` without a recorded twin.
        closure_error: ``‖ΔU_Q − (−G_Q^noisy g_noise) − path_change‖ / ‖ΔU_Q‖`` (the two runs'
            identity residuals; NaN without a twin).
    """

    actual: np.ndarray
    actual_rms: float
    predictions: Mapping[str, np.ndarray]
    checks: Mapping[str, DisplacementCheck]
    test_error_noisy: float
    test_error_twin: float
    test_mse_noisy: float = float("nan")
    test_mse_twin: float = float("nan")
    path_change: np.ndarray | None = None
    closure_error: float = float("nan")

    def summary(self) -> dict[str, float]:
        """Flat ``{<predictor>_<field>: value}`` plus the run's own numbers."""
        out = {"actual_rms": self.actual_rms, "probe_test_error": self.test_error_noisy,
               "probe_test_error_twin": self.test_error_twin,
               "probe_test_mse": self.test_mse_noisy, "probe_test_mse_twin": self.test_mse_twin,
               "closure_error": self.closure_error,
               "path_change_rms": float("nan") if self.path_change is None
               else float(np.sqrt((self.path_change ** 2).mean()))}
        out["path_change_fraction"] = (out["path_change_rms"] / self.actual_rms
                                       if self.actual_rms > 0 else float("nan"))
        for name, c in self.checks.items():
            for f in dataclasses.fields(c):
                out[f"{name}_{f.name}"] = float(getattr(c, f.name))
        return out


def frozen_transfer(traj: KernelTrajectory, K: Tensor, K_QS: Tensor, *,
                    discretization: Discretization = "gd") -> Tensor:
    """``G_Q(T, 0)`` ``(m p, N)`` of a run with the time steps and loss Hessian of ``traj`` but
    the kernel frozen at ``(K (N, N), K_QS (m p, N))``.

    With ``K = K(0)`` and ``discretization='gd'`` this is the linearized model's test transfer:
    ``U_Q^lin(T) − U_Q(0) = −G g(0)`` for full-batch gradient descent with the recorded steps.
    A constant kernel makes ``gd``, ``exp`` and ``midpoint`` independent of the snapshot
    spacing, so one interval holding every step is used; ``euler`` keeps the recorded spacing.
    """
    K = torch.as_tensor(K, dtype=torch.float64)
    KQ = torch.as_tensor(K_QS, dtype=torch.float64)
    N, S = traj.N, len(traj)
    if K.shape != (N, N) or KQ.shape != (traj.m * traj.p, N):
        raise ShapeError(f"K is {tuple(K.shape)} and K_QS {tuple(KQ.shape)}; this trajectory "
                         f"needs ({N}, {N}) and ({traj.m * traj.p}, {N})")
    idx = list(range(S)) if discretization == "euler" else [0, S - 1]
    dts = [np.zeros(0)] + [np.concatenate(traj.dts[a + 1:b + 1]) for a, b in zip(idx, idx[1:])]
    B = traj.hessian(0)
    zero_u, zero_q = torch.zeros(traj.n, traj.p), torch.zeros(traj.m, traj.p)
    frozen = KernelTrajectory.from_arrays(
        traj.times[idx], [K] * len(idx), [zero_u] * len(idx), [zero_u] * len(idx),
        [B] * len(idx), [0.0] * len(idx), K_QS=[KQ] * len(idx), U_Q=[zero_q] * len(idx),
        steps=[int(traj.steps[i]) for i in idx], dts=dts)
    G = window_operators(frozen, discretization=discretization).G
    assert G is not None
    return G


def _check(pred: np.ndarray, actual: np.ndarray, UQ: np.ndarray, labels: Tensor | None,
           y_test: Tensor | None) -> DisplacementCheck:
    a, d = actual.reshape(-1), pred.reshape(-1)
    na = float(np.linalg.norm(a))
    rel = float(np.linalg.norm(d - a)) / na if na > 0 else float("nan")
    corr = float(np.corrcoef(d, a)[0, 1]) if d.std() > 0 and a.std() > 0 else float("nan")
    U = torch.as_tensor(UQ - pred)
    return DisplacementCheck(rel, corr, float(np.sqrt((d ** 2).mean())), _err(U, labels),
                             _mse(U, y_test))


def _err(U: Tensor, labels: Tensor | None) -> float:
    return float("nan") if labels is None else classification_error(U, labels)


def _mse(U: Tensor, y_test: Tensor | None) -> float:
    if y_test is None:
        return float("nan")
    yt = torch.as_tensor(y_test, dtype=torch.float64).reshape(U.shape)
    return float((U.to(torch.float64) - yt).pow(2).mean())


def _same_start(traj: KernelTrajectory, twin: KernelTrajectory) -> None:
    if twin.N != traj.N or twin.m != traj.m or twin.U_Q is None or traj.U_Q is None:
        raise ShapeError("the twin trajectory must have the noisy run's training and probe "
                         "sets (same n, p, m, with a probe)")
    if not (torch.allclose(twin.u[0], traj.u[0], rtol=1e-9, atol=1e-12)
            and torch.allclose(twin.U_Q[0], traj.U_Q[0], rtol=1e-9, atol=1e-12)):
        raise ConfigError("the twin trajectory does not start from the noisy run's outputs: "
                          "train it from the same initialization (load the initial state_dict)")
    if not np.isclose(twin.times[-1] - twin.times[0], traj.times[-1] - traj.times[0],
                      rtol=1e-9):
        raise ConfigError("the twin trajectory covers a different training time: train it with "
                          "the same optimizer, learning rate and number of steps")


def noise_accounting(traj: KernelTrajectory, y_clean: Tensor, U_Q_twin: Tensor | None = None,
                     *, twin: KernelTrajectory | None = None, labels_test: Tensor | None = None,
                     y_test: Tensor | None = None, discretization: Discretization = "gd",
                     predictors: Sequence[str] = PREDICTORS) -> NoiseAccounting:
    """Score ``−G_Q g_noise`` and frozen-kernel predictions of the noise's test displacement.

    Args:
        traj: the noisy run (squared loss, with a test/probe set); window: the whole run.
        y_clean: ``(n, p)`` clean training targets.
        U_Q_twin: ``(m, p)`` the clean-trained twin's probe outputs at the end (same
            initialization, optimizer and steps); default: the last snapshot of ``twin``.
        twin: the twin's own recorded trajectory (optional): adds the predictor ``'twin'``
            (``−G_Q^clean g_noise``) and the decomposition ``path_change`` / ``closure_error``.
        labels_test: ``(m,)`` probe labels for the classification errors.
        y_test: ``(m, p)`` clean probe targets for the MSEs.
        discretization: of every ``G_Q`` (``'gd'``, the default, is exact for full-batch
            gradient descent on a model linear in its parameters; see
            :mod:`tangentscope.dynamics.operators`).
        predictors: a subset of :data:`PREDICTORS`.

    Raises:
        ConfigError: not squared loss, no test set, an unknown predictor, no twin outputs, or a
            twin that did not start from the same outputs or ran for a different time.
        ShapeError: ``U_Q_twin`` not ``(m, p)``, or a twin of other sizes.
    """
    bad = [p for p in predictors if p not in PREDICTORS]
    if bad:
        raise ConfigError(f"unknown predictor(s) {bad}; choose from {PREDICTORS}")
    if traj.meta.get("loss") != "squared":
        raise ConfigError("noise_accounting compares against frozen-kernel flows of squared "
                          "loss; record the run with loss='squared'")
    if traj.U_Q is None:
        raise ConfigError("noise_accounting needs a recorded test/probe set (x_test=)")
    if twin is not None:
        _same_start(traj, twin)
    if U_Q_twin is None:
        if twin is None or twin.U_Q is None:
            raise ConfigError("pass the twin's probe outputs U_Q_twin= or its trajectory twin=")
        U_Q_twin = twin.U_Q[-1]
    UQT = traj.U_Q[-1]
    tw = torch.as_tensor(U_Q_twin, dtype=torch.float64)
    if tw.shape != UQT.shape:
        raise ShapeError(f"U_Q_twin is {tuple(tw.shape)}, the probe outputs are "
                         f"{tuple(UQT.shape)}")
    actual = (UQT - tw).numpy()
    yc = torch.as_tensor(y_clean, dtype=torch.float64).reshape(traj.n, traj.p)
    g_clean, g_noise = label_noise_gradients(traj, yc)
    G_path = None
    preds: dict[str, np.ndarray] = {}
    names = list(predictors) + (["twin"] if twin is not None else [])
    for name in names:
        if name in ("path", "twin"):
            G = window_operators(traj if name == "path" else twin,  # type: ignore[arg-type]
                                 discretization=discretization).G
            if name == "path":
                G_path = G
        else:
            if name == "average":
                K, KQ = path_average_kernel(traj)
            else:
                k = 0 if name == "initial" else -1
                K, KQ_ = traj.kernel(k), traj.cross_kernel(k)
                assert KQ_ is not None
                KQ = KQ_
            G = frozen_transfer(traj, K, KQ, discretization=discretization)
        assert G is not None
        preds[name] = (-(G @ g_noise)).reshape(UQT.shape).numpy()
    change, closure = None, float("nan")
    if twin is not None:
        if G_path is None:
            G_path = window_operators(traj, discretization=discretization).G
        G_twin = window_operators(twin, discretization=discretization).G
        assert G_path is not None and G_twin is not None
        change = (-((G_path - G_twin) @ g_clean)).reshape(UQT.shape).numpy()
        first = (-(G_path @ g_noise)).reshape(UQT.shape).numpy()
        na = float(np.linalg.norm(actual))
        closure = float(np.linalg.norm(actual - first - change)) / na if na > 0 else float("nan")
    UQn = UQT.numpy()
    checks = {k: _check(v, actual, UQn, labels_test, y_test) for k, v in preds.items()}
    return NoiseAccounting(actual, float(np.sqrt((actual ** 2).mean())), preds, checks,
                           _err(UQT, labels_test), _err(tw, labels_test),
                           _mse(UQT, y_test), _mse(tw, y_test), change, closure)
