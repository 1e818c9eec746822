"""The empirical neural tangent kernel ``K(x1, x2) = J(x1) D J(x2)ᵀ``.

Shapes: ``x1`` is ``(n1, ...)``, ``x2`` is ``(n2, ...)``, the model has ``p`` outputs. The full
kernel is returned as ``(n1, n2, p, p)`` with ``K[i, j, a, b] = ∂f_a(x1_i)/∂w · D · ∂f_b(x2_j)/∂w``;
``trace_outputs=True`` returns ``(n1, n2)`` with ``Σ_a K[i, j, a, a]``. The stacked ``(n1 p, n2 p)``
matrix of ``docs/notation.md`` (row ``i*p + a``) is :func:`flatten_kernel` of the 4-d kernel.

Implementations (:class:`Implementation`, the ``implementation=`` argument), one table of
self-contained backends (each its cost model and its compute, over the shared planner
``_plan``):

- ``"structured"`` — for Linear / Conv / Embedding / LayerNorm / ... layers, the kernel block is
  built from layer-input and output-sensitivity Gram matrices without forming the Jacobian
  (neural-tangents' STRUCTURED_DERIVATIVES idea); the default wherever it applies.
- ``"jacobian"`` — per-example Jacobians by ``vmap(jacrev)``, contracted with one matmul.
- ``"ntvp"`` — NTK-vector products: ``vjp`` gives ``J(x2)ᵀ e``, ``jvp`` gives ``J(x1)(·)``.
- ``"loop"`` — plain autograd, one example at a time (no ``vmap``): slow, but works for models
  that ``torch.func`` cannot transform (data-dependent Python control flow, ``.item()``,
  recurrent layers).

``"auto"`` picks one (:func:`select_implementation` says which and why); :func:`estimate_memory`
runs the same choice and cost model. For spectra of kernels too large to form, use
:class:`tangentscope.kernels.operator.EntkOperator` and
:func:`tangentscope.kernels.operator.entk_topk` (matrix-free Lanczos).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, TypedDict

import torch
from torch import Tensor

from ..errors import NonFiniteError, ShapeError, TangentscopeError, UnsupportedModelError
from . import _jacobian, _loop, _ntvp, structured
from ._plan import (
    Request,
    WorkFn,
    fit_chunk,
    output_bytes,
    plan_chunks,
    prepare,
    probe,
    resolve_preconditioner,
)
from .structured import StructuredPlan, structured_plan

__all__ = ["entk", "flatten_kernel", "unflatten_kernel", "estimate_memory", "IMPLEMENTATIONS",
           "Implementation", "ImplementationChoice", "MemoryEstimate", "select_implementation",
           "resolve_preconditioner"]


class Implementation(str, enum.Enum):
    """The eNTK implementations (neural-tangents' ``NtkImplementation``); a plain string such
    as ``"jacobian"`` is accepted wherever a member is."""

    AUTO = "auto"
    STRUCTURED = "structured"
    JACOBIAN = "jacobian"
    NTVP = "ntvp"
    LOOP = "loop"


IMPLEMENTATIONS = ("structured", "jacobian", "ntvp", "loop")


@dataclasses.dataclass(frozen=True)
class ImplementationChoice:
    """Which backend an :func:`entk` call runs, and why.

    Attributes:
        implementation: the backend that runs (``"structured"``, ``"jacobian"``, ``"ntvp"``,
            ``"loop"``).
        requested: what was asked for (``"auto"`` or a backend).
        reason: why this backend, in words.
        coverage: fraction of the trainable scalars in layers the structured path factors
            (None when the structured analysis was not run).
        generic: parameter name → why it is not factored (goes through the Jacobian path).
        plan: the structured plan (when it was computed; it is passed down to the backend).
    """

    implementation: str
    requested: str
    reason: str
    coverage: float | None = None
    generic: Mapping[str, str] = dataclasses.field(default_factory=dict)
    plan: StructuredPlan | None = dataclasses.field(default=None, repr=False, compare=False)


class MemoryEstimate(TypedDict):
    """Bytes an :func:`entk` call needs (:func:`estimate_memory`)."""

    output: int
    working: int
    total: int
    chunk_size: int
    implementation: str
    budget: int
    fits: bool


# -- the backend table ---------------------------------------------------------------------------
class _Backend(NamedTuple):
    cost: Callable[[Request, ImplementationChoice], WorkFn]
    compute: Callable[[Request, int, ImplementationChoice], Tensor | dict[str, Tensor]]


def _plan_of(choice: ImplementationChoice) -> StructuredPlan:
    assert choice.plan is not None, "the structured backend needs the plan of its choice"
    return choice.plan


_BACKENDS: dict[str, _Backend] = {
    "structured": _Backend(lambda r, ch: structured.cost(r, _plan_of(ch)),
                           lambda r, c, ch: structured.compute(r, c, _plan_of(ch))),
    "jacobian": _Backend(lambda r, ch: _jacobian.cost(r), lambda r, c, ch: _jacobian.compute(r, c)),
    "ntvp": _Backend(lambda r, ch: _ntvp.cost(r), lambda r, c, ch: _ntvp.compute(r, c)),
    "loop": _Backend(lambda r, ch: _loop.cost(r), lambda r, c, ch: _loop.compute(r, c)),
}


def _parse(implementation: Any) -> str:
    try:
        return Implementation(implementation).value
    except ValueError:
        raise ShapeError(f"implementation must be one of {('auto', *IMPLEMENTATIONS)}, got "
                         f"{implementation!r}: use one of them (or an Implementation member)"
                         ) from None


def _choose(req: Request, impl: str, thorough: bool = True) -> ImplementationChoice:
    """The implementation choice for a checked request (``impl`` already parsed).

    ``thorough`` also records the forward on two examples to confirm the structured plan
    (:func:`entk` skips it and checks its first chunk instead, falling back from ``"auto"``).
    """
    rnn = req.fm.recurrent
    if rnn and impl in ("structured", "jacobian"):
        raise UnsupportedModelError(
            f"{rnn[0]} is a recurrent layer (nn.LSTM/GRU/RNN), whose fused kernels "
            f"torch.func.vmap cannot batch, so implementation={impl!r} cannot run: use "
            "implementation='loop' (plain autograd; 'auto' picks it) or 'ntvp'.")
    if impl == "auto" and rnn:
        return ImplementationChoice(
            "loop", impl, f"recurrent layers ({', '.join(rnn[:3])}) cannot be batched by "
            "torch.func.vmap: plain autograd, one example at a time")
    if impl not in ("auto", "structured"):
        return ImplementationChoice(impl, impl, "requested")
    try:
        plan = structured_plan(req.fm, req.x1, req.groups)
        dependent = structured.batch_dependence(req.fm, plan, req.x1) if thorough else None
    except (RuntimeError, TypeError, ValueError, TangentscopeError) as e:
        if impl == "structured":
            probe(req)  # the model's own failure, as a clear error
            raise
        return ImplementationChoice("jacobian", impl, "the structured analysis failed ("
                                    f"{str(e).splitlines()[0]}): Jacobian contraction")
    cov, gen = plan.coverage, dict(plan.generic)
    if impl == "structured":
        return ImplementationChoice("structured", impl, "requested", cov, gen, plan)
    if dependent:
        return _fallback(dependent, cov, gen)
    if plan.blocks and cov >= structured.COVERAGE:
        return ImplementationChoice(
            "structured", impl, f"supported layers hold {cov:.1%} of the trainable parameters "
            f"(at least {structured.COVERAGE:.0%}): Gram matrices of layer inputs and "
            "sensitivities" + (f", {len(gen)} generic parameter(s) through the Jacobian path"
                               if gen else ""), cov, gen, plan)
    return ImplementationChoice(
        "jacobian", impl, f"supported layers hold only {cov:.1%} of the trainable parameters "
        f"(under {structured.COVERAGE:.0%}): Jacobian contraction", cov, gen)


def _fallback(why: str, coverage: float | None, generic: Mapping[str, str]
              ) -> ImplementationChoice:
    return ImplementationChoice("jacobian", "auto", f"{why} (data-dependent control flow, "
                                "which the structured path cannot plan): Jacobian contraction",
                                coverage, generic)


def select_implementation(model: Any, x1: Tensor, x2: Tensor | None = None, *,
                          params: Mapping[str, Tensor] | None = None,
                          implementation: Implementation | str = "auto",
                          trace_outputs: bool = False, groups: Any = None,
                          precondition: Mapping[str, Tensor] | Tensor | None = None,
                          dtype: torch.dtype | None = None,
                          memory_budget: int | str | None = None,
                          chunk_size: int | None = None,
                          show_progress: bool = False) -> ImplementationChoice:
    """Which backend :func:`entk` with these arguments runs, and why (no kernel computed).

    Args: as :func:`entk`.

    Returns:
        an :class:`ImplementationChoice`: the backend, the reason, the structured coverage and
        the parameters left to the generic path (with why).

    Raises:
        the input errors of :func:`entk`; UnsupportedModelError when the requested backend
        cannot run this model (the message names one that can).
    """
    impl = _parse(implementation)
    req = prepare(model, x1, x2, params=params, trace_outputs=trace_outputs, groups=groups,
                  precondition=precondition, dtype=dtype, memory_budget=memory_budget,
                  chunk_size=chunk_size, show_progress=show_progress)
    req = probe(req)
    return _choose(req, impl)


# -- public API -------------------------------------------------------------------------------
def entk(model: Any, x1: Tensor, x2: Tensor | None = None, *,
         params: Mapping[str, Tensor] | None = None,
         implementation: Implementation | str = "auto",
         trace_outputs: bool = False,
         groups: Any = None,
         precondition: Mapping[str, Tensor] | Tensor | None = None,
         dtype: torch.dtype | None = None,
         memory_budget: int | str | None = None,
         chunk_size: int | None = None,
         show_progress: bool = False) -> Tensor | dict[str, Tensor]:
    """Empirical NTK of ``model`` between ``x1`` and ``x2`` (``x2=None`` means ``x1``).

    Args:
        model: an ``nn.Module`` (parameters with ``requires_grad`` are differentiated; buffers
            are constants; dropout/BatchNorm must be in eval mode), a function
            ``fn(params, x) -> (batch, p)`` together with ``params``, or a
            :class:`~tangentscope.kernels.functional.FunctionalModel`.
        x1: inputs, shape ``(n1, ...)``.
        x2: inputs, shape ``(n2, ...)``; default ``x1`` (then symmetry is exploited).
        params: parameters for a function model, or a subset of a module's to differentiate.
        implementation: an :class:`Implementation`: ``"auto"`` (structured where supported
            layers — Linear, Conv1d/2d, Embedding, LayerNorm/RMSNorm/GroupNorm, eval BatchNorm,
            registered rules — hold at least half of the parameters, the others going through
            jacobian; loop for recurrent layers; else jacobian; see
            :func:`select_implementation`), ``"structured"``, ``"jacobian"``, ``"ntvp"`` or
            ``"loop"``.
        trace_outputs: return ``Σ_a K[..., a, a]`` with shape ``(n1, n2)``.
        groups: ``None`` for one kernel; ``'layer'``, ``'param'``, a callable ``name -> group``
            or a mapping ``group -> [names]`` for per-group blocks ``J_g D_g J_gᵀ`` (their sum is
            the full kernel), returned as a dict.
        precondition: diagonal ``D ≥ 0`` — a dict ``name -> tensor`` shaped like each
            parameter, or a flat vector of length ``P`` in ``params`` order. Gives ``J D Jᵀ``
            (e.g. the Adam preconditioner from :func:`tangentscope.adam_preconditioner`).
        dtype: compute in this floating dtype (e.g. ``torch.float64``); default the parameters'.
        memory_budget: bytes (or ``'4G'``) the computation may use; default half the available
            RAM (``TANGENTSCOPE_MEMORY_BUDGET`` overrides). Chunks are sized to fit it.
        chunk_size: force the number of examples per chunk.
        show_progress: a progress bar over chunks.

    Returns:
        ``(n1, n2, p, p)`` or ``(n1, n2)`` tensor; a dict of them when ``groups`` is given.

    Raises:
        KernelTooLargeError: the kernel or its smallest working set does not fit the budget
            (the message names the matrix-free and chunking options).
        ShapeError: inputs with mismatched feature shapes, or empty; an unknown implementation.
        ConfigError: a non-floating ``dtype``, a bad ``memory_budget``, a negative
            preconditioner.
        UnsupportedModelError: dropout/BatchNorm in training mode, a stochastic forward,
            examples that interact within the batch, or a model ``torch.func`` cannot transform
            (the message names ``implementation="loop"`` where that works).
        NonFiniteError: the kernel contains NaN/Inf.
    """
    impl = _parse(implementation)
    req = prepare(model, x1, x2, params=params, trace_outputs=trace_outputs, groups=groups,
                  precondition=precondition, dtype=dtype, memory_budget=memory_budget,
                  chunk_size=chunk_size, show_progress=show_progress)
    choice = _choose(req, impl, thorough=False)
    # the structured plan's recording ran the model already; the other backends probe it
    req = structured.confirm(req, choice.plan) if choice.plan is not None else probe(req)
    try:
        K = _run(req, choice)
    except structured.DataDependentForward:
        if impl != "auto":
            raise
        choice = _fallback("chunks record other layer calls than the forward on one "
                           "example", choice.coverage, choice.generic)
        K = _run(probe(req), choice)
    for k in (K.values() if isinstance(K, dict) else [K]):
        # a sum is finite iff every entry is (barring overflow of the sum itself): cheap first
        if not torch.isfinite(k.sum()) and not torch.isfinite(k).all():
            raise NonFiniteError("the eNTK contains NaN/Inf: the model's outputs or gradients "
                                 "are not finite at these parameters/inputs (check for overflow; "
                                 "try dtype=torch.float64)")
    return K


def _run(req: Request, choice: ImplementationChoice) -> Tensor | dict[str, Tensor]:
    backend = _BACKENDS[choice.implementation]
    c = plan_chunks(req, backend.cost(req, choice))
    try:
        return backend.compute(req, c, choice)
    except RuntimeError as e:
        raise _unsupported(e, choice.implementation) from e


def _unsupported(e: RuntimeError, impl: str) -> Exception:
    """A clear error for a model a backend could not transform (or ``e`` itself)."""
    msg = str(e)
    first = msg.splitlines()[0] if msg else type(e).__name__
    if "random" in msg and ("vmap" in msg or "randomness" in msg):
        return UnsupportedModelError(
            f"the model draws random numbers in forward ({first}): the eNTK of a stochastic "
            "network is not defined. Make forward deterministic (model.eval(), dropout p=0).")
    if impl != "loop" and ("vmap" in msg or "functorch" in msg or ".item()" in msg
                           or "data-dependent" in msg):
        return UnsupportedModelError(
            f"torch.func could not transform this model ({first}). Use "
            "implementation='loop' (plain autograd, slower), or remove data-dependent "
            "control flow / in-place ops on inputs from forward().")
    return e


def estimate_memory(model: Any, x1: Tensor, x2: Tensor | None = None, *,
                    params: Mapping[str, Tensor] | None = None,
                    implementation: Implementation | str = "auto",
                    trace_outputs: bool = False, groups: Any = None,
                    precondition: Mapping[str, Tensor] | Tensor | None = None,
                    dtype: torch.dtype | None = None,
                    memory_budget: int | str | None = None,
                    chunk_size: int | None = None,
                    show_progress: bool = False) -> MemoryEstimate:
    """Estimated bytes of :func:`entk` with the same arguments: the same implementation choice
    and cost model, at the chunk size ``entk`` would use (nothing is computed or allocated
    beyond probing the model on two examples).

    Args: as :func:`entk`. ``chunk_size`` forces the chunk; otherwise it is the largest that
        fits ``memory_budget`` (one example when none fits, then ``fits`` is False).

    Returns:
        a :class:`MemoryEstimate` dict: ``output`` (the kernel), ``working`` (per chunk),
        ``total``, ``chunk_size``, ``implementation`` (the backend ``entk`` would run),
        ``budget`` and ``fits`` (``total ≤ budget``: ``entk`` would run rather than refuse).
    """
    impl = _parse(implementation)
    req = prepare(model, x1, x2, params=params, trace_outputs=trace_outputs, groups=groups,
                  precondition=precondition, dtype=dtype, memory_budget=memory_budget,
                  chunk_size=chunk_size, show_progress=show_progress)
    req = probe(req)
    choice = _choose(req, impl)
    work = _BACKENDS[choice.implementation].cost(req, choice)
    out = output_bytes(req)
    c = req.chunk_size or fit_chunk(req, out, work) or 1
    w = work(min(c, req.n1), min(c, req.n2))
    return MemoryEstimate(output=out, working=w, total=out + w, chunk_size=c,
                          implementation=choice.implementation, budget=req.budget,
                          fits=out + w <= req.budget)


def flatten_kernel(K: Tensor) -> Tensor:
    """``(n1, n2, p, p)`` → the stacked ``(n1 p, n2 p)`` matrix (row ``i*p + a``)."""
    if K.dim() == 2:
        return K
    if K.dim() != 4:
        raise ShapeError(f"expected a (n1, n2, p, p) kernel, got shape {tuple(K.shape)}: pass "
                         "the 4-d output of entk")
    n1, n2, p, q = K.shape
    return K.permute(0, 2, 1, 3).reshape(n1 * p, n2 * q)


def unflatten_kernel(M: Tensor, p: int) -> Tensor:
    """Inverse of :func:`flatten_kernel`: ``(n1 p, n2 p)`` → ``(n1, n2, p, p)``."""
    if M.dim() != 2 or M.shape[0] % p or M.shape[1] % p:
        raise ShapeError(f"cannot unflatten shape {tuple(M.shape)} with p={p}: pass a 2-d "
                         "matrix whose both dimensions are multiples of p")
    return M.reshape(M.shape[0] // p, p, M.shape[1] // p, p).permute(0, 2, 1, 3)
