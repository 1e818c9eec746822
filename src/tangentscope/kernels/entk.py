"""The empirical neural tangent kernel ``K(x1, x2) = J(x1) D J(x2)ᵀ``.

Shapes: ``x1`` is ``(n1, ...)``, ``x2`` is ``(n2, ...)``, the model has ``p`` outputs. The full
kernel is returned as ``(n1, n2, p, p)`` with ``K[i, j, a, b] = ∂f_a(x1_i)/∂w · D · ∂f_b(x2_j)/∂w``;
``trace_outputs=True`` returns ``(n1, n2)`` with ``Σ_a K[i, j, a, a]``. The stacked ``(n1 p, n2 p)``
matrix of ``docs/notation.md`` (row ``i*p + a``) is :func:`flatten_kernel` of the 4-d kernel.
``diagonal=True`` returns only the blocks ``K(x_i, x_i)``: ``(n, p, p)``, or ``(n,)`` traced.

**Output shapes.** A model's output for ``b`` examples may have any shape ``(b, *out)``; it is
flattened row-major (C order) to ``(b, p)``, ``p = prod(out)``: output index
``a = ravel_multi_index(idx, out)``, so ``K.reshape(n1, n2, *out, *out)`` restores the output
axes. Against neural-tangents' ``trace_axes`` (default ``(-1,)``): ``trace_outputs=False`` is
``trace_axes=()``, ``trace_outputs=True`` is tracing *every* output axis (``(-1,)`` for
``(b, k)`` outputs, NT's default there); tracing a subset of axes is a trace of the reshaped
full kernel (``docs/kernels.md``).

:func:`entk_fn` returns the kernel as a function ``(x1, x2=None, params=None) -> K``
(neural-tangents' ``empirical_ntk_fn``).

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

from .._utils import format_bytes, progress
from ..errors import (
    KernelTooLargeError,
    NonFiniteError,
    ShapeError,
    TangentscopeError,
    UnsupportedModelError,
)
from . import _jacobian, _loop, _ntvp, structured
from ._plan import (
    Request,
    WorkFn,
    _check_dtype,
    chunks,
    fit_chunk,
    flat_jac,
    output_bytes,
    plan_chunks,
    prepare,
    probe,
    resolve_budget,
    resolve_preconditioner,
)
from .structured import StructuredPlan, structured_plan

__all__ = ["entk", "entk_fn", "EntkFn", "flatten_kernel", "unflatten_kernel", "estimate_memory",
           "IMPLEMENTATIONS", "Implementation", "ImplementationChoice", "MemoryEstimate",
           "select_implementation", "resolve_preconditioner"]


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
                          diagonal: bool = False,
                          precondition: Mapping[str, Tensor] | Tensor | None = None,
                          dtype: torch.dtype | None = None,
                          memory_budget: int | str | None = None,
                          chunk_size: int | None = None,
                          show_progress: bool = False) -> ImplementationChoice:
    """Which backend :func:`entk` with these arguments runs, and why (no kernel computed).

    Args: as :func:`entk` (``diagonal`` does not change the choice).

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
         diagonal: bool = False,
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
            ``fn(params, x) -> (batch, *out)`` together with ``params``, or a
            :class:`~tangentscope.kernels.functional.FunctionalModel`. Outputs of any shape
            ``(batch, *out)`` are flattened row-major to ``(batch, p)``, ``p = prod(out)``
            (``K.reshape(n1, n2, *out, *out)`` restores the axes).
        x1: inputs, shape ``(n1, ...)``.
        x2: inputs, shape ``(n2, ...)``; default ``x1`` (then symmetry is exploited).
        params: parameters for a function model, or a subset of a module's to differentiate.
        implementation: an :class:`Implementation`: ``"auto"`` (structured where supported
            layers — Linear, Conv1d/2d, Embedding, LayerNorm/RMSNorm/GroupNorm, eval BatchNorm,
            ``torch.addmm`` (GPT-2's Conv1D), registered rules — hold at least half of the
            parameters, the others going through jacobian; loop for recurrent layers; else
            jacobian; see :func:`select_implementation`), ``"structured"``, ``"jacobian"``,
            ``"ntvp"`` or ``"loop"``.
        trace_outputs: return ``Σ_a K[..., a, a]`` with shape ``(n1, n2)`` (neural-tangents'
            ``trace_axes`` over every output axis; False is ``trace_axes=()``).
        diagonal: only the blocks ``K(x1_i, x1_i)`` — or ``K(x1_i, x2_i)`` when ``x2`` has as
            many examples — shape ``(n, p, p)``, ``(n,)`` traced: O(n) memory (NT's
            ``diagonal_axes=(0,)``). Chunks of at most 256 examples (``"jacobian"``,
            ``"loop"``: per-example Jacobians contracted with themselves) or 32 (``"structured"``,
            ``"ntvp"``: the chunk's own kernel block, whose diagonal is kept).
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
        ``(n1, n2, p, p)`` or ``(n1, n2)`` tensor (``diagonal``: ``(n, p, p)`` or ``(n,)``); a
        dict of them when ``groups`` is given.

    Raises:
        KernelTooLargeError: the kernel or its smallest working set does not fit the budget
            (the message names the matrix-free and chunking options).
        ShapeError: inputs with mismatched feature shapes, or empty; an unknown implementation;
            ``diagonal`` with ``x2`` of another batch size.
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
    if diagonal and not req.symmetric and req.n1 != req.n2:
        raise ShapeError(f"diagonal=True pairs x1[i] with x2[i], but x1 has {req.n1} examples "
                         f"and x2 {req.n2}: pass x2 with as many examples, or x2=None for "
                         "K(x1_i, x1_i)")
    run = _run_diagonal if diagonal else _run
    choice = _choose(req, impl, thorough=False)
    # the structured plan's recording ran the model already; the other backends probe it
    req = structured.confirm(req, choice.plan) if choice.plan is not None else probe(req)
    try:
        K = run(req, choice)
    except structured.DataDependentForward:
        if impl != "auto":
            raise
        choice = _fallback("chunks record other layer calls than the forward on one "
                           "example", choice.coverage, choice.generic)
        K = run(probe(req), choice)
    for k in (K.values() if isinstance(K, dict) else [K]):
        # a sum is finite iff every entry is (barring overflow of the sum itself): cheap first
        if not torch.isfinite(k.sum()) and not torch.isfinite(k).all():
            raise NonFiniteError("the eNTK contains NaN/Inf: the model's outputs or gradients "
                                 "are not finite at these parameters/inputs (check for overflow; "
                                 "try dtype=torch.float64)")
    return K


@dataclasses.dataclass(frozen=True)
class EntkFn:
    """The eNTK of one model as a function (neural-tangents' ``empirical_ntk_fn`` result).

    ``kernel(x1, x2=None, params=None)`` is :func:`entk` of the model with the options fixed
    when it was made (:func:`entk_fn`); ``params`` (a dict ``name -> tensor``) replaces the
    stored ones for this call — a function model's parameters, or a subset/override of a
    module's. A module's parameters are read at each call, so the kernel follows training.

    Attributes:
        model: the ``nn.Module``, function ``fn(params, x)`` or ``FunctionalModel``.
        options: the keyword arguments passed to :func:`entk` (``trace_outputs``,
            ``implementation``, ``diagonal``, ...).
    """

    model: Any
    options: Mapping[str, Any]

    def __call__(self, x1: Tensor, x2: Tensor | None = None,
                 params: Mapping[str, Tensor] | None = None) -> Tensor | dict[str, Tensor]:
        """``K(x1, x2)`` with the stored options (see :func:`entk` for shapes)."""
        kw = dict(self.options)
        if params is not None:
            kw["params"] = params
        return entk(self.model, x1, x2, **kw)


def entk_fn(model_or_fn: Any, *, params: Mapping[str, Tensor] | None = None,
            trace_outputs: bool = False, implementation: Implementation | str = "auto",
            diagonal: bool = False, groups: Any = None,
            precondition: Mapping[str, Tensor] | Tensor | None = None,
            dtype: torch.dtype | None = None, memory_budget: int | str | None = None,
            chunk_size: int | None = None, show_progress: bool = False) -> EntkFn:
    """The empirical NTK as a kernel function ``(x1, x2=None, params=None) -> K``.

    The analogue of neural-tangents' ``empirical_ntk_fn(f, trace_axes, diagonal_axes,
    vmap_axes, implementation)``: ``trace_outputs=True`` ≙ ``trace_axes`` over every output
    axis (NT's default ``(-1,)`` for ``(batch, k)`` outputs), ``trace_outputs=False`` ≙
    ``trace_axes=()``; ``diagonal=True`` ≙ ``diagonal_axes=(0,)``; ``implementation`` takes
    the :class:`Implementation` names (``"auto"`` picks per call). Outputs of any shape
    ``(batch, *out)`` are flattened row-major to ``(batch, prod(out))``.

    Args:
        model_or_fn: an ``nn.Module``, a function ``fn(params, x) -> (batch, *out)`` (give
            ``params`` here or at each call), or a ``FunctionalModel``.
        params, trace_outputs, implementation, diagonal, groups, precondition, dtype,
            memory_budget, chunk_size, show_progress: as :func:`entk`, fixed for every call.

    Returns:
        an :class:`EntkFn`; ``kernel(x1)``, ``kernel(x1, x2)``, ``kernel(x1, x2, params)``.

    Raises:
        ShapeError: an unknown implementation. ConfigError: a non-floating ``dtype`` or a bad
            ``memory_budget`` (checked here, before any kernel).

    Example::

        kernel = ts.entk_fn(model, trace_outputs=True)
        K_train = kernel(x_train)              # (n, n)
        K_test = kernel(x_test, x_train)       # (m, n)
        k_diag = ts.entk_fn(model, diagonal=True, trace_outputs=True)(x_test)  # (m,)
    """
    _parse(implementation)
    _check_dtype(dtype)
    resolve_budget(memory_budget)
    opts = {"params": params, "implementation": implementation,
            "trace_outputs": bool(trace_outputs), "diagonal": bool(diagonal),
            "groups": groups, "precondition": precondition, "dtype": dtype,
            "memory_budget": memory_budget, "chunk_size": chunk_size,
            "show_progress": bool(show_progress)}
    return EntkFn(model_or_fn, opts)


def _run(req: Request, choice: ImplementationChoice) -> Tensor | dict[str, Tensor]:
    backend = _BACKENDS[choice.implementation]
    c = plan_chunks(req, backend.cost(req, choice))
    try:
        return backend.compute(req, c, choice)
    except RuntimeError as e:
        raise _unsupported(e, choice.implementation) from e


_DIAG_CHUNK = {"jacobian": 256, "loop": 256, "structured": 32, "ntvp": 32}


def _diagonal_plan(req: Request, work: WorkFn, cap: int) -> tuple[int, int, int]:
    """``(chunk, output bytes, working bytes)`` of a diagonal: the largest chunk up to ``cap``
    (halved) that fits the budget, or the forced ``chunk_size``."""
    per = 1 if req.trace else req.p * req.p
    out = req.n1 * per * req.itemsize * req.n_groups
    if req.chunk_size is not None:
        c = req.chunk_size
    else:
        c = min(req.n1, cap)
        while c > 1 and out + work(c, c) > req.budget:
            c //= 2
    return c, out, work(c, c)


def _diagonal_chunk(req: Request, work: WorkFn, cap: int) -> int:
    """:func:`_diagonal_plan`'s chunk, refusing before any work when it does not fit."""
    c, out, w = _diagonal_plan(req, work, cap)
    if out + w > req.budget:
        raise KernelTooLargeError(
            f"the kernel diagonal with {c} example(s) per chunk needs about "
            f"{format_bytes(out + w)}, over the memory budget of {format_bytes(req.budget)}: "
            "use a smaller chunk_size, trace_outputs=True, or a larger memory_budget= "
            "(TANGENTSCOPE_MEMORY_BUDGET)")
    return c


def _run_diagonal(req: Request, choice: ImplementationChoice) -> Tensor | dict[str, Tensor]:
    """``K(x1_i, x2_i)`` for every ``i`` (``x2 = x1`` when symmetric), chunk by chunk."""
    impl = choice.implementation
    backend = _BACKENDS[impl]
    c = _diagonal_chunk(req, backend.cost(req, choice), _DIAG_CHUNK[impl])
    fm, n, p, trace, sym = req.fm, req.n1, req.p, req.trace, req.symmetric
    grp = req.groups or {"": list(fm.params)}
    shape = (n,) if trace else (n, p, p)
    out = {g: torch.empty(shape, dtype=fm.dtype, device=fm.device) for g in grp}
    try:
        for k, a in enumerate(progress(chunks(n, c), desc="eNTK diagonal",
                                       disable=not req.show_progress or None)):
            x1, x2 = req.x1[a], (req.x1 if sym else req.x2)[a]
            if impl in ("jacobian", "loop"):  # per-example Jacobians with themselves
                rows = _jacobian.per_example_jacobian if impl == "jacobian" else \
                    _loop.jacobian_rows
                with torch.no_grad():
                    ja = rows(fm, x1)
                    jb = ja if sym else rows(fm, x2)
                    for g, names in grp.items():
                        J1 = flat_jac(ja, names, req.precondition, 2)   # (c, p, P_g)
                        J2 = flat_jac(jb, names, None, 2)
                        out[g][a] = (J1 * J2).sum((1, 2)) if trace else J1 @ J2.mT
                continue
            sub = dataclasses.replace(req, x1=x1, x2=x1 if sym else x2, chunk_size=c,
                                      show_progress=False)
            ch = choice
            if k and choice.plan is not None:  # the plan's x1[0] check is the first chunk's
                ch = dataclasses.replace(choice, plan=dataclasses.replace(choice.plan,
                                                                          out1=None))
            K = backend.compute(sub, c, ch)
            blocks = K if isinstance(K, dict) else {"": K}
            for g in grp:
                out[g][a] = torch.diagonal(blocks[g], dim1=0, dim2=1).movedim(-1, 0)
    except RuntimeError as e:
        raise _unsupported(e, impl) from e
    return out if req.groups else out[""]


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
                    diagonal: bool = False,
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
        ``diagonal=True`` estimates the diagonal (its ``(n, p, p)`` output and chunks).

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
    if diagonal:
        c, out, w = _diagonal_plan(req, work, _DIAG_CHUNK[choice.implementation])
    else:
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
