"""The analytic jump in parameter space: solve the linearized flow of the top-``k`` eNTK modes
in closed form and move the network there.

The essay: "dominant eigenmodes of the evolving kernel equilibrate exponentially fast … a path
to analytically jump to the final network state". :func:`~tangentscope.dynamics.flow.analytic_jump`
predicts *outputs* at ``t = ∞`` from a frozen kernel; this module moves the *parameters*.

Notation (docs/notation.md): outputs ``u = U_S(w)`` ``(n, p)`` ≅ ``(N,)``, output gradient
``g``, loss Hessian blocks ``B``, kernel ``K = J D Jᵀ`` (``D`` a diagonal preconditioner, the
identity for gradient descent). Linearize the network at ``w₀`` (``u ≈ u₀ + J Δw``) and the
loss at ``u₀`` (Gauss–Newton: ``g(u) ≈ g₀ + B (u − u₀)``). The flow ``ẇ = −D Jᵀ g`` then gives
``ż = g₀ − B K z`` for ``z(t) = ∫₀ᵗ g``, and ``Δw(t) = −D Jᵀ z(t)``, ``Δu(t) = −K z(t)``.
With ``C = B^{1/2}`` (blockwise) and ``g₀ = C a`` (``g₀`` lies in ``range B`` for squared loss
and for cross-entropy, whose blocks annihilate only the all-ones vector that ``g₀`` is
orthogonal to), ``z = C ζ`` with ``ζ̇ = a − S ζ``, ``S = C K C`` symmetric PSD:

    ζ(t) = Σ_j ψ_j · φ_t(λ_j) · ψ_jᵀ a,     φ_t(λ) = (1 − e^{−λ t})/λ     (φ_∞ = 1/λ),

summed over the top-``k`` eigenpairs ``(λ_j, ψ_j)`` of ``S`` (block Lanczos, matrix-free:
``S v = C J D Jᵀ C v`` by one VJP and one JVP per vector; the ``N × N`` kernel is never
formed). Modes with ``λ_j = 0`` move neither the outputs nor the parameters, so the truncation
to ``k`` modes is the only approximation of the linearized flow. Squared loss
(``B = I/n``): ``Δw = −D Jᵀ V diag((1 − e^{−λ_K t/n})/λ_K) Vᵀ r₀`` with ``λ_K`` the kernel's
eigenvalues and ``r₀ = u₀ − y`` — at ``t = ∞`` the min-norm (in the ``D⁻¹`` metric) least-squares
step in the top-``k`` subspace, i.e. a Gauss–Newton step there; ``damping = μ`` replaces
``1/λ`` by ``1/(λ + μ)`` (Levenberg–Marquardt in the same subspace).

The jump to ``t = ∞`` divides by ``λ_j``: for a kernel whose spectrum decays fast (smooth
inputs, few dimensions) the small modes ask for parameter moves far outside the linear regime.
A finite ``t`` (``φ_t(λ) ≤ t``) or damping (``1/(λ + μ) ≤ 1/μ``) bounds them;
:class:`JumpSchedule` takes the time as a *horizon* ``λ_1 t`` (modes within a factor ``horizon``
of the top eigenvalue equilibrate).

How far the real network lands from the linearized prediction is measured, not assumed:
:class:`ParameterJump` carries the linearized outputs (``predicted_outputs``;
:func:`linearized_outputs` on other inputs, e.g. a test set), and :func:`displacement_error`
compares them with the network's outputs after :func:`apply_jump`.

Pieces: :class:`JumpSubspace` (the top-``k`` modes at the current parameters; each jump from it
costs one VJP and one JVP), :func:`parameter_jump` (one jump), :func:`apply_jump`,
:class:`JumpSchedule` (jump every ``m`` optimizer steps), :class:`LevenbergMarquardt` (damped
Gauss–Newton steps in the same subspace with Nielsen's damping rule, the standard second-order
alternative).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError
from ..kernels.operator import EntkOperator, lanczos_topk
from ..kernels.precondition import adam_preconditioner
from ..losses import OutputLoss, get_loss, hessian_matvec, sqrt_blocks

__all__ = ["ParameterJump", "JumpSubspace", "parameter_jump", "apply_jump",
           "linearized_outputs", "displacement_error", "JumpRecord", "JumpSchedule", "LMStep",
           "LevenbergMarquardt"]


@dataclasses.dataclass(frozen=True)
class ParameterJump:
    """A parameter update from the closed-form linearized flow of the top-``k`` modes.

    Attributes:
        delta: ``name -> Δw`` shaped like each trainable parameter.
        t: the flow time jumped to (``inf`` for the end point), in the loss's time units
            (``τ = Σ lr`` for plain gradient descent on ``Φ``).
        eigenvalues: ``(k,)`` eigenvalues ``λ_j`` of ``S = C K C``, descending.
        coefficients: ``(k,)`` ``ψ_jᵀ a``, the output gradient's weight on each mode.
        residuals: ``(k,)`` Lanczos residuals ``‖S ψ − λ ψ‖``.
        loss_before: ``Φ(u₀)``.
        outputs_before: ``(n, p)`` outputs ``u₀`` at the parameters the jump starts from.
        predicted_outputs: ``(n, p)`` linearized outputs ``u₀ + J Δw``.
        predicted_loss: ``Φ`` of ``predicted_outputs``.
        damping: ``μ`` (0: the flow; > 0: Levenberg–Marquardt at ``t = ∞``).
        matvecs: kernel-vector products used (each one VJP + one JVP over the set): the
            Lanczos ones of the subspace plus the jump's own ``Jᵀ z`` / ``J Δw`` pair.
    """

    delta: Mapping[str, Tensor]
    t: float
    eigenvalues: Tensor
    coefficients: Tensor
    residuals: Tensor
    loss_before: float
    outputs_before: Tensor
    predicted_outputs: Tensor
    predicted_loss: float
    damping: float
    matvecs: int

    @property
    def k(self) -> int:
        """Number of modes used."""
        return int(self.eigenvalues.shape[0])

    def norm(self) -> float:
        """``‖Δw‖₂`` over all parameters."""
        return math.sqrt(sum(float(d.double().pow(2).sum()) for d in self.delta.values()))






RANK_TOL = 1e-10  # eigenvalues below RANK_TOL · λ_max count as the kernel's null space


def _phi(lam: Tensor, t: float, damping: float) -> Tensor:
    """``(1 − e^{−λt})/λ`` (``t`` finite) or ``1/(λ + μ)`` (``t = ∞``, ``0`` on the numerical
    null space ``λ ≤ RANK_TOL · λ_max``: those modes move neither outputs nor parameters)."""
    if math.isinf(t):
        cut = RANK_TOL * float(lam.max()) if lam.numel() else 0.0
        den = lam + damping
        return torch.where(lam > cut, 1.0 / den.clamp_min(torch.finfo(lam.dtype).tiny),
                           torch.zeros_like(lam))
    x = lam * t
    small = x.abs() < 1e-8
    return torch.where(small, torch.full_like(lam, t),
                       -torch.expm1(-x) / torch.where(small, torch.ones_like(lam), lam))


def _check_time(t: float, damping: float) -> None:
    if not (t > 0):
        raise ConfigError(f"t must be a positive flow time (math.inf for the end point), got {t}")
    if not (damping >= 0 and math.isfinite(damping)):
        raise ConfigError(f"damping must be a finite number >= 0, got {damping}")
    if damping and not math.isinf(t):
        raise ConfigError("damping (Levenberg–Marquardt) applies to the t = inf jump; pass "
                          "t=math.inf or damping=0")


class JumpSubspace:
    """The top-``k`` eigenmodes of ``S = C K C`` at the model's current parameters.

    Built once (block Lanczos, matrix-free); every :meth:`jump` from it — any time ``t``, any
    damping ``μ`` — then costs one VJP and one JVP. The parameters are copied when it is built,
    so the jumps stay those *from* that point even after the model has moved (a rejected
    Levenberg–Marquardt trial retries from the same subspace).

    Args:
        model: the network, deterministic in its current mode (dropout off, BatchNorm in
            eval mode: call ``model.eval()``; the kernels refuse otherwise).
        x: training inputs ``(n, ...)``; y: targets (``(n, p)`` for squared loss, class indices
            ``(n,)`` for cross-entropy).
        loss: ``'squared'``, ``'cross_entropy'`` or an :class:`~tangentscope.losses.OutputLoss`.
        k: number of eigenmodes of ``S`` (``1 ≤ k ≤ N``).
        precondition: diagonal ``D`` (dict or flat tensor, as :func:`tangentscope.entk`), e.g.
            :func:`tangentscope.adam_preconditioner`; ``None`` for gradient descent.
        dtype: compute dtype (default the parameters'); float64 for reference runs.
        chunk_size: examples per VJP/JVP chunk (bounds activation memory).
        tol, max_iter, seed: block-Lanczos controls (see
            :func:`~tangentscope.kernels.operator.lanczos_topk`).

    Attributes:
        eigenvalues: ``(k,)`` ``λ_j(S)`` (clamped at 0), descending; ``vectors``: ``(N, k)``.
        residuals: ``(k,)`` Lanczos residuals; ``coefficients``: ``(k,)`` ``ψ_jᵀ a``.
        outputs: ``(n, p)`` ``u₀``; ``loss_before``: ``Φ(u₀)``.
        matvecs: kernel-vector products spent by Lanczos.

    Raises:
        ConfigError: ``k`` out of range.
        ShapeError: targets that do not match the outputs.
    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, *,
                 loss: str | OutputLoss = "squared", k: int = 32, precondition: Any = None,
                 dtype: torch.dtype | None = None, chunk_size: int | None = None,
                 tol: float = 1e-8, max_iter: int | None = None, seed: int = 0):
        self.lossf = get_loss(loss)
        params = {name: q.detach().clone() for name, q in model.named_parameters()
                  if q.requires_grad}
        self.op = op = EntkOperator(model, x, params=params, precondition=precondition,
                                    dtype=dtype, chunk_size=chunk_size)
        n, p = op.n, op.p
        N = n * p
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N:
            raise ConfigError(f"k must be an integer in [1, N = n·p = {N}], got {k!r}")
        with torch.no_grad():
            u0 = op.fm.apply(op.fm.params, op.x)
        self.y = y.to(u0.dtype) if torch.as_tensor(y).is_floating_point() else y
        g0 = self.lossf.grad(u0, self.y)
        if g0.shape != u0.shape:
            raise ShapeError(f"loss gradient has shape {tuple(g0.shape)} for outputs "
                             f"{tuple(u0.shape)}")
        B = self.lossf.hessian(u0, self.y)
        self._C = C = sqrt_blocks(B)
        a = hessian_matvec(sqrt_blocks(B, pinv=True), g0.reshape(N, 1))[:, 0]

        def s_matvec(V: Tensor) -> Tensor:
            return hessian_matvec(C, op.matvec(hessian_matvec(C, V)))

        eig = lanczos_topk(s_matvec, N, k, dtype=op.dtype, device=op.fm.device, tol=tol,
                           max_iter=max_iter, seed=seed)
        self.eigenvalues = eig.values.clamp_min(0)
        self.vectors = eig.vectors
        self.residuals = eig.residuals
        self.coefficients = eig.vectors.T @ a
        self.outputs = u0
        self.loss_before = float(self.lossf.value(u0, self.y))
        self.matvecs = op.matvecs
        self.n, self.p = n, p

    @property
    def k(self) -> int:
        """Number of modes."""
        return int(self.eigenvalues.shape[0])

    def jump(self, t: float = math.inf, damping: float = 0.0) -> ParameterJump:
        """The jump of the linearized flow of these modes to time ``t`` (``math.inf``: its end
        point; with ``damping = μ > 0`` the Levenberg–Marquardt step ``1/(λ + μ)``).

        Raises:
            ConfigError: a non-positive ``t``, a negative ``damping``, damping with finite ``t``.
        """
        _check_time(t, damping)
        op, n, p = self.op, self.n, self.p
        lam = self.eigenvalues
        zeta = self.vectors @ (_phi(lam, t, damping) * self.coefficients)
        z = hessian_matvec(self._C, zeta[:, None])[:, 0].reshape(n, p)
        tangent = op.vjp(z)                     # Jᵀ z, parameter-shaped
        if op.D is not None:
            tangent = {name: v * op.D[name] for name, v in tangent.items()}
        delta = {name: -v for name, v in tangent.items()}
        pred = self.outputs + op.jvp(delta).reshape(n, p)      # u₀ + J Δw (one JVP)
        return ParameterJump(
            delta=delta, t=float(t), eigenvalues=lam, coefficients=self.coefficients,
            residuals=self.residuals, loss_before=self.loss_before, outputs_before=self.outputs,
            predicted_outputs=pred, predicted_loss=float(self.lossf.value(pred, self.y)),
            damping=float(damping), matvecs=self.matvecs + 1)


def parameter_jump(model: nn.Module, x: Tensor, y: Tensor, *, loss: str | OutputLoss = "squared",
                   k: int = 32, t: float = math.inf, precondition: Any = None,
                   damping: float = 0.0, dtype: torch.dtype | None = None,
                   chunk_size: int | None = None, tol: float = 1e-8, max_iter: int | None = None,
                   seed: int = 0) -> ParameterJump:
    """The parameter update that jumps the linearized flow of the top-``k`` modes to time ``t``.

    Args:
        model, x, y, loss, k, precondition, dtype, chunk_size, tol, max_iter, seed: as
            :class:`JumpSubspace`.
        t: flow time to jump to; ``math.inf`` for the end point of the linearized flow.
        damping: ``μ ≥ 0``; with ``t = ∞`` a Levenberg–Marquardt step ``1/(λ + μ)``.

    Returns:
        the :class:`ParameterJump` (not applied: see :func:`apply_jump`).

    Raises:
        ConfigError: ``k`` out of range, non-positive ``t``, negative ``damping``, damping with
            finite ``t`` (all before any kernel work).
        ShapeError: targets that do not match the outputs.
    """
    _check_time(t, damping)
    return JumpSubspace(model, x, y, loss=loss, k=k, precondition=precondition, dtype=dtype,
                        chunk_size=chunk_size, tol=tol, max_iter=max_iter,
                        seed=seed).jump(t, damping)


@torch.no_grad()
def apply_jump(model: nn.Module, jump: ParameterJump, scale: float = 1.0) -> None:
    """Add ``scale · Δw`` to the model's parameters in place (dtype and device of each).

    Raises:
        ShapeError: the jump names a parameter the model does not have, or another shape.
    """
    named = dict(model.named_parameters())
    for name, d in jump.delta.items():
        if name not in named:
            raise ShapeError(f"the jump has a parameter {name!r} the model lacks: apply it to "
                             "the model it was computed for")
        q = named[name]
        if q.shape != d.shape:
            raise ShapeError(f"jump for {name!r} has shape {tuple(d.shape)}, the parameter has "
                             f"{tuple(q.shape)}")
        q.add_(d.to(dtype=q.dtype, device=q.device), alpha=scale)


def linearized_outputs(model: nn.Module, jump: ParameterJump, x: Tensor, *,
                       dtype: torch.dtype | None = None, chunk_size: int | None = None) -> Tensor:
    """``f(w, x) + J(x) Δw`` on other inputs (a test set): the jump's linearized prediction
    there. Call it *before* :func:`apply_jump`, at the parameters the jump starts from.

    Returns:
        ``(m, p)`` in ``dtype`` (default the parameters').
    """
    op = EntkOperator(model, x, params={name: q.detach() for name, q in model.named_parameters()
                                        if name in jump.delta},
                      dtype=dtype, chunk_size=chunk_size)
    with torch.no_grad():
        return op.fm.apply(op.fm.params, op.x) + op.jvp(dict(jump.delta))


def displacement_error(before: Tensor, predicted: Tensor, after: Tensor) -> float:
    """``‖after − predicted‖ / ‖predicted − before‖``: the jump's fidelity (0 = the network
    moved exactly as linearized; 1 = an error as large as the predicted move).

    Raises:
        ShapeError: the three output arrays differ in shape.
    """
    if not before.shape == predicted.shape == after.shape:
        raise ShapeError(f"outputs of shapes {tuple(before.shape)}, {tuple(predicted.shape)}, "
                         f"{tuple(after.shape)}: pass the same inputs' outputs")
    b, p, a = (v.detach().double() for v in (before, predicted, after))
    move = float((p - b).norm())
    return float((a - p).norm()) / move if move > 0 else float("nan")


def _save(model: nn.Module) -> dict[str, Tensor]:
    return {name: q.detach().clone() for name, q in model.named_parameters()}


@torch.no_grad()
def _restore(model: nn.Module, saved: Mapping[str, Tensor]) -> None:
    for name, q in model.named_parameters():
        q.copy_(saved[name])


@torch.no_grad()
def _outputs(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)


def _loss_value(lossf: OutputLoss, u: Tensor, y: Tensor) -> float:
    return float(lossf.value(u, y.to(u.dtype) if y.is_floating_point() else y))


@dataclasses.dataclass(frozen=True)
class JumpRecord:
    """One jump of a :class:`JumpSchedule` (or one Levenberg–Marquardt trial), measured.

    Attributes:
        step: optimizer steps counted when it was taken.
        t: flow time jumped to (``inf`` with damping).
        loss_before: ``Φ`` before; predicted_loss: ``Φ`` of the linearized outputs;
            loss_after: ``Φ`` of the network after the move.
        accepted: whether the move was kept (a guarded schedule or LM reverts a loss increase).
        displacement_error: :func:`displacement_error` on the training inputs.
        norm: ``‖Δw‖``; matvecs: kernel-vector products it used.
    """

    step: int
    t: float
    loss_before: float
    predicted_loss: float
    loss_after: float
    accepted: bool
    displacement_error: float
    norm: float
    matvecs: int


def _try(model: nn.Module, jump: ParameterJump, x: Tensor, y: Tensor, lossf: OutputLoss,
         step: int, guard: bool) -> JumpRecord:
    """Apply ``jump``, measure it, and revert it when ``guard`` and the loss went up."""
    saved = _save(model) if guard else None
    apply_jump(model, jump)
    u = _outputs(model, x)
    after = _loss_value(lossf, u, y)
    ok = math.isfinite(after) and (not guard or after < jump.loss_before)
    if saved is not None and not ok:
        _restore(model, saved)
    err = displacement_error(jump.outputs_before, jump.predicted_outputs,
                             u.to(jump.predicted_outputs.dtype))
    return JumpRecord(step, jump.t, jump.loss_before, jump.predicted_loss, after,
                      ok or saved is None, err, jump.norm(), jump.matvecs)


class JumpSchedule:
    """Jump every ``every`` optimizer steps and let the optimizer handle the rest.

    Register it as a step post-hook (``optimizer.register_step_post_hook(schedule.hook)``) or
    call ``schedule.after_step()`` after each ``optimizer.step()``. Each jump recomputes the
    top-``k`` modes at the current parameters on ``(x, y)``; the optimizer's own state
    (Adam's moments) is left as it is. Every jump is measured (:attr:`history`).

    Args:
        model, x, y, loss, k, t, damping, dtype, chunk_size, tol, max_iter: as
            :func:`parameter_jump`.
        every: optimizer steps between jumps (``≥ 1``).
        horizon: instead of ``t``, the dimensionless ``λ_1 t`` (``t = horizon / λ_1(S)`` at
            each jump: modes within a factor ``horizon`` of the top one equilibrate).
        guard: revert a jump that raised the training loss (the optimizer goes on from where
            it was).
        optimizer: when given and Adam-like, jumps use its ``J D Jᵀ`` preconditioner
            (``precondition='adam'``); ``precondition=None`` forces plain ``J Jᵀ``.

    Attributes:
        steps: optimizer steps counted; jumps: the :class:`ParameterJump` s taken (kept,
            reverted or not); history: one :class:`JumpRecord` per jump.

    Raises:
        ConfigError: ``every < 1``, an unknown ``precondition``, ``'adam'`` without the
            optimizer, ``horizon`` not a positive number or given with a finite ``t``.
    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, *, every: int,
                 loss: str | OutputLoss = "squared", k: int = 32, t: float = math.inf,
                 horizon: float | None = None, damping: float = 0.0, guard: bool = False,
                 optimizer: torch.optim.Optimizer | None = None,
                 precondition: str | None = None, dtype: torch.dtype | None = None,
                 chunk_size: int | None = None, tol: float = 1e-8,
                 max_iter: int | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"every must be an integer >= 1, got {every!r}")
        if precondition not in (None, "adam"):
            raise ConfigError(f"precondition must be None or 'adam', got {precondition!r}")
        if precondition == "adam" and optimizer is None:
            raise ConfigError("precondition='adam' needs the optimizer= whose state gives D")
        if horizon is not None:
            if not (horizon > 0 and math.isfinite(horizon)):
                raise ConfigError(f"horizon must be a finite number > 0, got {horizon!r}")
            if not math.isinf(t) or damping:
                raise ConfigError("pass either horizon= (t = horizon/λ_1) or t=/damping=, "
                                  "not both")
        _check_time(t, damping)
        self.model, self.x, self.y, self.every = model, x, y, every
        self.loss, self.lossf = loss, get_loss(loss)
        self.k, self.t, self.horizon, self.damping = k, t, horizon, damping
        self.guard, self.tol, self.max_iter = guard, tol, max_iter
        self.dtype, self.chunk_size = dtype, chunk_size
        self.optimizer, self.precondition = optimizer, precondition
        self.steps = 0
        self.jumps: list[ParameterJump] = []
        self.history: list[JumpRecord] = []

    def hook(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        """``register_step_post_hook`` signature."""
        self.after_step()

    def after_step(self) -> ParameterJump | None:
        """Count one optimizer step; jump when due. Returns the jump taken, if any."""
        self.steps += 1
        if self.steps % self.every:
            return None
        return self.jump_now()

    def jump_now(self) -> ParameterJump:
        """Jump at the current parameters (without counting a step)."""
        D = None
        if self.precondition == "adam":
            assert self.optimizer is not None
            D = adam_preconditioner(self.optimizer, self.model)
        sub = JumpSubspace(self.model, self.x, self.y, loss=self.loss, k=self.k,
                           precondition=D, dtype=self.dtype, chunk_size=self.chunk_size,
                           tol=self.tol, max_iter=self.max_iter)
        top = float(sub.eigenvalues[0])
        if self.horizon is not None and top > 0:
            jump = sub.jump(self.horizon / top)
        else:
            jump = sub.jump(self.t, self.damping)
        self.history.append(_try(self.model, jump, self.x, self.y, self.lossf, self.steps,
                                 self.guard))
        self.jumps.append(jump)
        return jump


@dataclasses.dataclass(frozen=True)
class LMStep:
    """One :meth:`LevenbergMarquardt.step`.

    Attributes:
        accepted: a trial lowered the loss (else the parameters are unchanged).
        damping: the ``μ`` of the last trial.
        loss_before, loss_after: ``Φ`` before and after the step.
        predicted_loss: ``Φ`` of the last trial's linearized outputs.
        gain_ratio: ``ρ = (Φ_before − Φ_after)/(Φ_before − Φ_predicted)`` of the last trial.
        trials: the trials measured (one :class:`JumpRecord` each).
        matvecs: kernel-vector products (Lanczos once, plus one pair per trial).
        forwards: forward passes over the set (one per trial).
    """

    accepted: bool
    damping: float
    loss_before: float
    loss_after: float
    predicted_loss: float
    gain_ratio: float
    trials: tuple[JumpRecord, ...]
    matvecs: int
    forwards: int


class LevenbergMarquardt:
    """Levenberg–Marquardt (damped Gauss–Newton) in the top-``k`` eNTK subspace.

    Each :meth:`step` builds the :class:`JumpSubspace` at the current parameters and tries
    ``Δw = −Jᵀ C V diag(1/(λ + μ)) Vᵀ a``; with the gain ratio ``ρ`` (actual over linearized
    decrease) a trial with ``ρ > 0`` is kept and ``μ ← μ · max(1/3, 1 − (2ρ − 1)³)``, ``ν ← 2``;
    otherwise it is undone and ``μ ← ν μ``, ``ν ← 2ν`` (Nielsen's rule, as in Madsen, Nielsen &
    Tingleff, *Methods for non-linear least squares problems*, 2004), up to ``max_trials``
    trials, each one VJP + one JVP + one forward pass.

    Args:
        model, x, y, loss, k, dtype, chunk_size, tol, max_iter: as :class:`JumpSubspace`.
        damping: the first ``μ`` relative to the first subspace's ``λ_1(S)``.
        max_trials: trials per step before giving up (parameters unchanged).

    Raises:
        ConfigError: ``damping`` not a finite number > 0 or ``max_trials < 1``.
    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, *,
                 loss: str | OutputLoss = "squared", k: int = 32, damping: float = 1e-3,
                 max_trials: int = 10, dtype: torch.dtype | None = None,
                 chunk_size: int | None = None, tol: float = 1e-8, max_iter: int | None = None):
        if not (damping > 0 and math.isfinite(damping)):
            raise ConfigError(f"damping must be a finite number > 0 (relative to λ_1), got "
                              f"{damping!r}")
        if isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 1:
            raise ConfigError(f"max_trials must be an integer >= 1, got {max_trials!r}")
        self.model, self.x, self.y, self.loss = model, x, y, loss
        self.lossf = get_loss(loss)
        self.k, self.relative_damping, self.max_trials = k, float(damping), max_trials
        self.dtype, self.chunk_size, self.tol, self.max_iter = dtype, chunk_size, tol, max_iter
        self.mu: float | None = None
        self.nu = 2.0
        self.steps = 0

    def state_dict(self) -> dict[str, Any]:
        """``μ``, ``ν`` and the step count (with the model's parameters, a full checkpoint)."""
        return {"mu": self.mu, "nu": self.nu, "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.mu, self.nu, self.steps = state["mu"], float(state["nu"]), int(state["steps"])

    def step(self) -> LMStep:
        """One damped Gauss–Newton step (see the class docstring)."""
        sub = JumpSubspace(self.model, self.x, self.y, loss=self.loss, k=self.k,
                           dtype=self.dtype, chunk_size=self.chunk_size, tol=self.tol,
                           max_iter=self.max_iter)
        if self.mu is None:
            top = float(sub.eigenvalues[0])
            self.mu = self.relative_damping * (top if top > 0 else 1.0)
        trials: list[JumpRecord] = []
        rho = float("nan")
        jump = None
        self.steps += 1
        for _ in range(self.max_trials):
            jump = sub.jump(math.inf, damping=self.mu)
            rec = _try(self.model, jump, self.x, self.y, self.lossf, self.steps, guard=True)
            trials.append(rec)
            predicted = rec.loss_before - rec.predicted_loss
            rho = (rec.loss_before - rec.loss_after) / predicted if predicted > 0 \
                else float("nan")
            if rec.accepted:
                self.mu *= max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3) if math.isfinite(rho) \
                    else 1.0
                self.nu = 2.0
                break
            self.mu *= self.nu
            self.nu *= 2.0
        assert jump is not None
        last = trials[-1]
        return LMStep(last.accepted, float(jump.damping), sub.loss_before,
                      last.loss_after if last.accepted else sub.loss_before,
                      last.predicted_loss, rho, tuple(trials), sub.matvecs + len(trials),
                      len(trials))
