"""The bottom of the eNTK backends: one checked request, chunk planning and block bookkeeping.

Every backend (``_jacobian``, ``_ntvp``, ``_loop``, ``structured``) receives a :class:`Request`
made here: :func:`prepare` casts and checks the inputs, resolves the preconditioner, groups and
budget (no model run), :func:`probe` runs the model once on one and two examples
(differentiable, deterministic, examples independent) and sets ``p``. The structured backend
learns the same from its plan's recording instead (one forward fewer per call). A backend
returns its cost model as a :data:`WorkFn`; :func:`plan_chunks` sizes chunks to the budget with
it. Nothing here imports a backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .._utils import default_memory_budget, format_bytes, parse_bytes
from ..errors import ConfigError, KernelTooLargeError, ShapeError, UnsupportedModelError
from .functional import FunctionalModel, functionalize, param_groups

__all__ = ["Request", "WorkFn", "prepare", "as_input", "probe", "probe_model",
           "check_independent", "resolve_preconditioner",
           "resolve_budget", "activation_bytes", "output_bytes", "fit_chunk", "plan_chunks",
           "chunks", "block_pairs", "alloc", "finish", "write_block", "flat_jac", "contract",
           "coupled", "SAFETY"]

SAFETY = 1.5  # working-set estimates are multiplied by this
WorkFn = Callable[[int, int], int]
"""Working bytes of a backend for chunks of ``c1`` rows and ``c2`` columns."""

_HINT = ("use the matrix-free EntkOperator / entk_topk (tangentscope.entk_topk) for spectra, "
         "trace_outputs=True, fewer inputs, or a larger memory_budget= "
         "(TANGENTSCOPE_MEMORY_BUDGET)")


@dataclasses.dataclass(frozen=True)
class Request:
    """One checked eNTK call, as every backend receives it.

    Attributes:
        fm: the model as a pure function of its trainable parameters.
        x1: inputs ``(n1, ...)``; x2: inputs ``(n2, ...)`` (``x1`` itself when symmetric).
        symmetric: ``x2`` was not given (only the upper block triangle is computed).
        p: outputs per example (0 until the model is probed).
        trace: return ``Σ_a K[..., a, a]``.
        groups: ``group -> [parameter names]`` or None.
        precondition: ``name -> D`` shaped like each parameter, or None.
        budget: bytes the call may use.
        chunk_size: examples per chunk forced by the caller, or None.
        show_progress: a progress bar over blocks.
    """

    fm: FunctionalModel
    x1: Tensor
    x2: Tensor
    symmetric: bool
    p: int = 0
    trace: bool = False
    groups: dict[str, list[str]] | None = None
    precondition: dict[str, Tensor] | None = None
    budget: int = 0
    chunk_size: int | None = None
    show_progress: bool = False

    @property
    def n1(self) -> int:
        return self.x1.shape[0]

    @property
    def n2(self) -> int:
        return self.x2.shape[0]

    @property
    def n_groups(self) -> int:
        return len(self.groups) if self.groups else 1

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.fm.dtype).element_size()

    def restrict(self, names: list[str]) -> Request:
        """The same call for the parameters ``names`` only (the others held fixed)."""
        fm = self.fm
        fixed = {k: v for k, v in fm.params.items() if k not in names}

        def apply(prm: dict[str, Tensor], x: Tensor) -> Tensor:
            return fm.apply({**fixed, **prm}, x)

        sub = FunctionalModel(apply, {k: fm.params[k] for k in names}, None)
        grp = None
        if self.groups is not None:
            grp = {g: [n for n in ns if n in names] for g, ns in self.groups.items()}
            grp = {g: ns for g, ns in grp.items() if ns}
        D = None if self.precondition is None else {k: self.precondition[k] for k in names}
        return dataclasses.replace(self, fm=sub, groups=grp, precondition=D)


# -- checks -------------------------------------------------------------------------------------
def _check_dtype(dtype: Any) -> None:
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ConfigError(f"dtype must be a floating-point torch.dtype (torch.float32, "
                          f"torch.float64, ...), got {dtype!r}: the eNTK differentiates the "
                          "parameters, which needs real floating-point numbers; pass e.g. "
                          "dtype=torch.float64, or None for the parameters' dtype")


def as_input(x: Any, fm: FunctionalModel, dtype: torch.dtype | None, name: str) -> Tensor:
    """``x`` as a tensor on the model's device, floating inputs cast to the compute dtype."""
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ShapeError(f"{name} must be a tensor (or array) of inputs (n, ...), got "
                             f"{type(x).__name__} ({e}): pass a torch.Tensor") from e
    if x.dim() == 0:
        raise ShapeError(f"{name} must have a batch dimension, got a scalar: pass inputs of "
                         "shape (n, ...)")
    if x.shape[0] == 0:
        raise ShapeError(f"{name} is empty (batch of 0): pass at least one example")
    if x.is_floating_point():
        x = x.to(dtype or fm.dtype)
    return x.to(fm.device)


def coupled(alone: Tensor, in_batch: Tensor) -> bool:
    """Whether one example's outputs differ beyond rounding when computed alone or in a batch."""
    if torch.equal(alone, in_batch):
        return False
    if not (bool(torch.isfinite(alone).all()) and bool(torch.isfinite(in_batch).all())):
        return False  # not finite: NonFiniteError after the kernel, not a guess here
    eps = torch.finfo(alone.dtype).eps if alone.is_floating_point() else 0.0
    tol = 1e-8 if alone.dtype == torch.float64 else max(1e-3, 50 * eps)
    err, scale = float((alone - in_batch).abs().max()), float(alone.abs().max())
    return err > tol * (1 + 2 * scale)


def probe_model(fm: FunctionalModel, x1: Tensor, x2: Tensor) -> int:
    """Run the model on one and two examples: it must be differentiable in its parameters,
    deterministic, and treat examples independently. Returns ``p``.

    Raises:
        ShapeError: the model fails on ``x1[:1]``.
        UnsupportedModelError: no autograd graph to the parameters; different outputs for the
            same input (a stochastic forward); or an example's outputs change with the rest of
            the batch (examples interact: the eNTK is not a per-example quantity).
    """
    params = {k: v.detach().requires_grad_(True) for k, v in fm.params.items()}
    hint = ("; x1 is 1-D, so each example is a scalar: for n examples of d features pass "
            "shape (n, d), e.g. x[:, None] when d = 1") if x1.dim() == 1 else ""
    fix = hint or "; check that x has the shape and dtype the model expects, batch first"
    with torch.enable_grad():
        try:
            out = fm.apply(params, x1[:1])
        except ShapeError as e:
            raise ShapeError(f"{e}{hint}") from e
        except RuntimeError as e:
            raise ShapeError(f"the model failed on x[:1] with shape {tuple(x1[:1].shape)}: "
                             f"{str(e).splitlines()[0]}{fix}") from e
    if not out.requires_grad:
        raise UnsupportedModelError(
            "the model's outputs do not depend differentiably on its parameters (no autograd "
            "graph): remove .detach()/argmax/integer casts from forward(), or check that "
            "parameters have requires_grad=True")
    alone = out.detach()
    with torch.no_grad():
        pair = x1[:2] if x1.shape[0] >= 2 else torch.cat([x1[:1], x2[:1]])
        try:
            in_pair = fm.apply(fm.params, pair)[:1]
        except RuntimeError as e:
            raise ShapeError(f"the model failed on a batch of two examples (shape "
                             f"{tuple(pair.shape)}) after running on one: "
                             f"{str(e).splitlines()[0]}; its forward must accept any batch "
                             "size") from e
    check_independent(fm, alone, in_pair, x1)
    return int(alone.shape[1])


def check_independent(fm: FunctionalModel, alone: Tensor, in_batch: Tensor, x1: Tensor) -> None:
    """Refuse a model whose outputs for ``x1[:1]`` differ alone (``alone``) and in a batch
    (``in_batch``): it is stochastic (a second forward of ``x1[:1]`` differs too) or couples
    the examples of a batch.

    Raises:
        UnsupportedModelError: naming which of the two, and the fix.
    """
    if not coupled(alone, in_batch):
        return
    with torch.no_grad():  # an input seen alone twice: different outputs → random numbers
        stochastic = any(coupled(alone, fm.apply(fm.params, x1[:1])) for _ in range(2))
    if stochastic:
        raise UnsupportedModelError(
            "the model gives different outputs for the same input (it draws random numbers "
            "in forward, e.g. dropout): the eNTK of a stochastic network is not defined. "
            "Make forward deterministic (model.eval(), dropout p=0) before computing it.")
    raise UnsupportedModelError(
        "the model couples the examples of a batch (the outputs of x[0] change when x[1] "
        "joins the batch), so the eNTK is not a per-example kernel and every implementation "
        "would return a batch-dependent answer; tangentscope refuses rather than guess. Fix: "
        "make forward treat examples independently (no statistics over the batch dimension; "
        "BatchNorm in eval mode), or differentiate the whole batch's output yourself with "
        "torch.func.jacrev.")


def probe(req: Request) -> Request:
    """``req`` with ``p`` set, after :func:`probe_model` checked the model on it."""
    return dataclasses.replace(req, p=probe_model(req.fm, req.x1, req.x2))


def resolve_preconditioner(fm: FunctionalModel, precondition: Any) -> dict[str, Tensor] | None:
    """Normalize a diagonal preconditioner to ``name -> tensor`` shaped like each parameter.

    Raises:
        ShapeError: wrong length / shapes / type. ConfigError: negative or non-finite entries
            (``J D Jᵀ`` needs ``D ≥ 0``).
    """
    if precondition is None:
        return None
    if isinstance(precondition, Tensor):
        flat = precondition.reshape(-1)
        if flat.numel() != fm.num_params:
            raise ShapeError(f"flat preconditioner has {flat.numel()} entries, the model has "
                             f"{fm.num_params} trainable parameters: pass one value per "
                             "trainable scalar, in model.parameters() order")
        out, i = {}, 0
        for k, v in fm.params.items():
            out[k] = flat[i:i + v.numel()].reshape(v.shape).to(v.dtype)
            i += v.numel()
    elif isinstance(precondition, Mapping):
        missing = set(fm.params) - set(precondition)
        if missing:
            raise ShapeError(f"preconditioner lacks entries for {sorted(missing)[:5]}: pass one "
                             "tensor per trainable parameter (names from named_parameters())")
        out = {}
        for k, v in fm.params.items():
            try:
                d = torch.as_tensor(precondition[k], dtype=v.dtype, device=v.device)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ShapeError(f"preconditioner[{k!r}] is not numeric ({e}): pass a tensor "
                                 "shaped like the parameter") from e
            if d.shape != v.shape:
                raise ShapeError(f"preconditioner[{k!r}] has shape {tuple(d.shape)}, parameter "
                                 f"has {tuple(v.shape)}: pass a tensor shaped like the "
                                 "parameter")
            out[k] = d
    else:
        raise ShapeError(f"precondition must be a dict or a flat tensor, got "
                         f"{type(precondition).__name__}: pass a dict name -> tensor, or a flat "
                         "tensor of length P")
    for k, d in out.items():
        if not bool(torch.isfinite(d).all()) or bool((d < 0).any()):
            raise ConfigError(
                f"preconditioner[{k!r}] has negative or non-finite entries: the kernel J D Jᵀ "
                "needs a diagonal D >= 0; pass finite non-negative values (e.g. "
                "1/(sqrt(v_hat) + eps) from tangentscope.adam_preconditioner)")
    return out


def resolve_budget(memory_budget: Any) -> int:
    """Bytes from ``memory_budget`` (``'4G'``, a number, or None for the default).

    Raises:
        ConfigError: not a size, or not positive.
    """
    if memory_budget is None:
        return default_memory_budget()
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (str, int, float)):
        raise ConfigError(f"memory_budget must be bytes or a size such as '4G', got "
                          f"{memory_budget!r}: pass an int or a string like '512M'")
    try:
        budget = parse_bytes(memory_budget)
    except (ValueError, OverflowError) as e:
        raise ConfigError(f"memory_budget={memory_budget!r} is not a size: use bytes (an int) or "
                          "a number with a K/M/G/T suffix such as '512M' or '4G'") from e
    if budget <= 0:
        raise ConfigError(f"memory_budget must be positive, got {memory_budget!r}: pass the "
                          "bytes the computation may use, e.g. '4G'")
    return budget


def _check_chunk_size(chunk_size: Any) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(
            chunk_size, int) or chunk_size < 1):
        raise ShapeError(f"chunk_size must be an integer >= 1, got {chunk_size!r}: pass the "
                         "examples per chunk, or None to size chunks to the memory budget")


def prepare(model: Any, x1: Any, x2: Any = None, *, params: Mapping[str, Tensor] | None = None,
            trace_outputs: bool = False, groups: Any = None, precondition: Any = None,
            dtype: torch.dtype | None = None, memory_budget: Any = None,
            chunk_size: int | None = None, show_progress: bool = False) -> Request:
    """Check and normalize the arguments of :func:`tangentscope.entk` into a :class:`Request`
    (the model is not run: ``p = 0`` until :func:`probe`)."""
    _check_dtype(dtype)
    _check_chunk_size(chunk_size)
    budget = resolve_budget(memory_budget)
    fm = model if isinstance(model, FunctionalModel) else functionalize(model, params, dtype=dtype)
    x1 = as_input(x1, fm, dtype, "x1")
    symmetric = x2 is None
    x2 = x1 if symmetric else as_input(x2, fm, dtype, "x2")
    if x1.shape[1:] != x2.shape[1:]:
        raise ShapeError(f"x1 has example shape {tuple(x1.shape[1:])} but x2 has "
                         f"{tuple(x2.shape[1:])}; both must be inputs of the same model: pass x2 "
                         "with the example shape of x1")
    D = resolve_preconditioner(fm, precondition)
    grp = None if groups is None else param_groups(list(fm.params), groups)
    return Request(fm, x1, x2, symmetric, 0, bool(trace_outputs), grp, D, budget, chunk_size,
                   bool(show_progress))


# -- costs and chunks ---------------------------------------------------------------------------
def _saved_bytes(fm: FunctionalModel, x: Tensor) -> int:
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    params = {k: v.detach().requires_grad_(True) for k, v in fm.params.items()}
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fm.apply(params, x)
    return total + out.numel() * out.element_size()


def activation_bytes(fm: FunctionalModel, x: Tensor) -> int:
    """Bytes of autograd-saved activations per example (measured on 1 and 2 examples)."""
    if x.shape[0] < 2:
        return _saved_bytes(fm, x[:1])
    a1, a2 = _saved_bytes(fm, x[:1]), _saved_bytes(fm, x[:2])
    return max(a2 - a1, 1)


def output_bytes(req: Request) -> int:
    """Bytes of the returned kernel(s)."""
    per = 1 if req.trace else req.p * req.p
    return req.n1 * req.n2 * per * req.itemsize * req.n_groups


def fit_chunk(req: Request, out: int, work: WorkFn) -> int | None:
    """The largest chunk (``max(n1, n2)`` halved until it fits) with ``out + work ≤ budget``,
    or None when even one example does not fit."""
    c = max(req.n1, req.n2)
    while c >= 1:
        if out + work(min(c, req.n1), min(c, req.n2)) <= req.budget:
            return c
        c //= 2
    return None


def plan_chunks(req: Request, work: WorkFn) -> int:
    """Examples per chunk for ``req`` under its budget, refusing before any work.

    Raises:
        KernelTooLargeError: the output, the forced ``chunk_size`` or one example per chunk
            does not fit (the message names the options).
    """
    n1, n2, p, budget = req.n1, req.n2, req.p, req.budget
    out = output_bytes(req)
    if out > budget:
        raise KernelTooLargeError(
            f"the kernel itself needs {format_bytes(out)} ({n1}x{n2}"
            f"{'' if req.trace else f'x{p}x{p}'} {req.fm.dtype}), over the memory budget of "
            f"{format_bytes(budget)}: {_HINT}")
    if req.chunk_size is not None:
        c = req.chunk_size
        need = out + work(min(c, n1), min(c, n2))
        if need > budget:
            raise KernelTooLargeError(
                f"chunk_size={c} needs about {format_bytes(need)}, over the budget of "
                f"{format_bytes(budget)}: use a smaller chunk_size (or leave it None to pick one)"
                f", or {_HINT}")
        return c
    fit = fit_chunk(req, out, work)
    if fit is None:
        raise KernelTooLargeError(
            f"even one example per chunk needs about {format_bytes(out + work(1, 1))} "
            f"(model has {req.fm.num_params:,} parameters, p={p}), over the budget of "
            f"{format_bytes(budget)}: {_HINT}")
    return fit


# -- blocks --------------------------------------------------------------------------------------
def chunks(n: int, c: int) -> list[slice]:
    return [slice(i, min(i + c, n)) for i in range(0, n, c)]


def block_pairs(n1: int, n2: int, c: int, symmetric: bool) -> list[tuple[slice, slice]]:
    """Row/column chunk pairs; for a symmetric kernel only the upper triangle."""
    s1, s2 = chunks(n1, c), chunks(n2, c)
    return [(a, b) for i, a in enumerate(s1) for j, b in enumerate(s2)
            if not symmetric or j >= i]


def alloc(req: Request) -> dict[str, Tensor]:
    """Zeroed outputs, one per group (key ``""`` without groups)."""
    shape = (req.n1, req.n2) if req.trace else (req.n1, req.n2, req.p, req.p)
    keys = list(req.groups) if req.groups else [""]
    return {g: torch.zeros(shape, dtype=req.fm.dtype, device=req.fm.device) for g in keys}


def finish(out: dict[str, Tensor], groups: Mapping[str, Any] | None
           ) -> Tensor | dict[str, Tensor]:
    return out if groups else out[""]


def write_block(out: Tensor, a: slice, b: slice, blk: Tensor, symmetric: bool, trace: bool
                ) -> None:
    out[a, b] = blk
    if symmetric and a != b:
        out[b, a] = blk.transpose(0, 1) if trace else blk.permute(1, 0, 3, 2)


def flat_jac(jac: Mapping[str, Tensor], names: list[str], D: Mapping[str, Tensor] | None,
             batch_dims: int) -> Tensor:
    """Concatenate per-parameter Jacobians ``(*batch, *shape)`` into ``(*batch, P_group)``."""
    parts = []
    for k in names:
        j = jac[k]
        if D is not None:
            j = j * D[k]
        parts.append(j.reshape(*j.shape[:batch_dims], -1))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def contract(J1: Tensor, J2: Tensor, trace: bool) -> Tensor:
    """``J1 (c1, p, P)``, ``J2 (c2, p, P)`` → ``(c1, c2, p, p)`` or traced ``(c1, c2)``."""
    c1, p, _ = J1.shape
    c2 = J2.shape[0]
    if trace:
        return J1.reshape(c1, -1) @ J2.reshape(c2, -1).T
    return (J1.reshape(c1 * p, -1) @ J2.reshape(c2 * p, -1).T).reshape(c1, p, c2, p).permute(
        0, 2, 1, 3)
