"""The empirical neural tangent kernel ``K(x1, x2) = J(x1) D J(x2)ᵀ``.

Shapes: ``x1`` is ``(n1, ...)``, ``x2`` is ``(n2, ...)``, the model has ``p`` outputs. The full
kernel is returned as ``(n1, n2, p, p)`` with ``K[i, j, a, b] = ∂f_a(x1_i)/∂w · D · ∂f_b(x2_j)/∂w``;
``trace_outputs=True`` returns ``(n1, n2)`` with ``Σ_a K[i, j, a, a]``. The stacked ``(n1 p, n2 p)``
matrix of SPEC.md (row ``i*p + a``) is :func:`flatten_kernel` of the 4-d kernel.

Implementations (the ``implementation=`` argument):

- ``"structured"`` — for Linear / Conv / Embedding / LayerNorm / ... layers, the kernel block is
  built from layer-input and output-sensitivity Gram matrices without forming the Jacobian
  (neural-tangents' STRUCTURED_DERIVATIVES idea); the default wherever it applies.
- ``"jacobian"`` — per-example Jacobians by ``vmap(jacrev)``, contracted with one matmul.
- ``"ntvp"`` — NTK-vector products: ``vjp`` gives ``J(x2)ᵀ e``, ``jvp`` gives ``J(x1)(·)``.
- ``"loop"`` — plain autograd, one example at a time (no ``vmap``): slow, but works for models
  that ``torch.func`` cannot transform (data-dependent Python control flow, ``.item()``).

For spectra of kernels too large to form, use :class:`tangentscope.kernels.operator.EntkOperator`
and :func:`tangentscope.kernels.operator.entk_topk` (matrix-free Lanczos).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor
from torch.func import jacrev, jvp, vjp, vmap

from .._utils import default_memory_budget, format_bytes, parse_bytes, progress
from ..errors import KernelTooLargeError, NonFiniteError, ShapeError, UnsupportedModelError
from .functional import FunctionalModel, Params, functionalize, param_groups

__all__ = ["entk", "flatten_kernel", "unflatten_kernel", "estimate_memory", "IMPLEMENTATIONS",
           "resolve_preconditioner"]

Implementation = Literal["auto", "structured", "jacobian", "ntvp", "loop"]
IMPLEMENTATIONS = ("structured", "jacobian", "ntvp", "loop")
_SAFETY = 1.5


# -- public API -------------------------------------------------------------------------------
def entk(model: Any, x1: Tensor, x2: Tensor | None = None, *,
         params: Mapping[str, Tensor] | None = None,
         implementation: Implementation = "auto",
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
        implementation: ``"auto"`` (structured where supported layers — Linear, Conv1d/2d,
            Embedding, LayerNorm/RMSNorm/GroupNorm, eval BatchNorm — hold at least half of
            the parameters, the others going through jacobian; else jacobian),
            ``"structured"``, ``"jacobian"``, ``"ntvp"`` or ``"loop"``.
        trace_outputs: return ``Σ_a K[..., a, a]`` with shape ``(n1, n2)``.
        groups: ``None`` for one kernel; ``'layer'``, ``'param'``, a callable ``name -> group``
            or a mapping ``group -> [names]`` for per-group blocks ``J_g D_g J_gᵀ`` (their sum is
            the full kernel), returned as a dict.
        precondition: diagonal ``D`` — a dict ``name -> tensor`` shaped like each parameter, or
            a flat vector of length ``P`` in ``params`` order. Gives ``J D Jᵀ`` (e.g. the Adam
            preconditioner from :func:`tangentscope.adam_preconditioner`).
        dtype: compute in this dtype (e.g. ``torch.float64``); default the parameters' dtype.
        memory_budget: bytes (or ``'4G'``) the computation may use; default half the available
            RAM (``TANGENTSCOPE_MEMORY_BUDGET`` overrides). Chunks are sized to fit it.
        chunk_size: force the number of examples per chunk.
        show_progress: a progress bar over chunks.

    Returns:
        ``(n1, n2, p, p)`` or ``(n1, n2)`` tensor; a dict of them when ``groups`` is given.

    Raises:
        KernelTooLargeError: the kernel or its smallest working set does not fit the budget
            (the message names the matrix-free and chunking options).
        ShapeError: inputs with mismatched feature shapes, or empty.
        UnsupportedModelError: dropout/BatchNorm in training mode, or a model ``torch.func``
            cannot transform (use ``implementation="loop"``).
        NonFiniteError: the kernel contains NaN/Inf.
    """
    fm = model if isinstance(model, FunctionalModel) else functionalize(model, params, dtype=dtype)
    x1 = _as_input(x1, fm, dtype, "x1")
    symmetric = x2 is None
    x2 = x1 if symmetric else _as_input(x2, fm, dtype, "x2")
    if x1.shape[1:] != x2.shape[1:]:
        raise ShapeError(f"x1 has example shape {tuple(x1.shape[1:])} but x2 has "
                         f"{tuple(x2.shape[1:])}; both must be inputs of the same model")
    _check_differentiable(fm, x1)
    D = resolve_preconditioner(fm, precondition)
    grp = None if groups is None else param_groups(list(fm.params), groups)
    budget = parse_bytes(memory_budget) if memory_budget is not None else default_memory_budget()

    impl = implementation
    if impl == "auto":
        impl = "structured" if _structured_supports(fm, x1) else "jacobian"
    if impl not in IMPLEMENTATIONS:
        raise ShapeError(f"implementation must be one of {('auto',) + IMPLEMENTATIONS}, "
                         f"got {implementation!r}")
    fn = _implementation(impl)
    try:
        K = fn(fm, x1, x2, symmetric=symmetric, trace=trace_outputs, groups=grp,
               precondition=D, budget=budget, chunk_size=chunk_size,
               show_progress=show_progress)
    except RuntimeError as e:
        msg = str(e)
        if impl != "loop" and ("vmap" in msg or "functorch" in msg or ".item()" in msg
                               or "data-dependent" in msg):
            raise UnsupportedModelError(
                f"torch.func could not transform this model ({msg.splitlines()[0]}). Use "
                "implementation='loop' (plain autograd, slower), or remove data-dependent "
                "control flow / in-place ops on inputs from forward().") from e
        raise
    for k in (K.values() if isinstance(K, dict) else [K]):
        # a sum is finite iff every entry is (barring overflow of the sum itself): cheap first
        if not torch.isfinite(k.sum()) and not torch.isfinite(k).all():
            raise NonFiniteError("the eNTK contains NaN/Inf: the model's outputs or gradients "
                                 "are not finite at these parameters/inputs (check for overflow; "
                                 "try dtype=torch.float64)")
    return K


def flatten_kernel(K: Tensor) -> Tensor:
    """``(n1, n2, p, p)`` → the stacked ``(n1 p, n2 p)`` matrix (row ``i*p + a``)."""
    if K.dim() == 2:
        return K
    if K.dim() != 4:
        raise ShapeError(f"expected a (n1, n2, p, p) kernel, got shape {tuple(K.shape)}")
    n1, n2, p, q = K.shape
    return K.permute(0, 2, 1, 3).reshape(n1 * p, n2 * q)


def unflatten_kernel(M: Tensor, p: int) -> Tensor:
    """Inverse of :func:`flatten_kernel`: ``(n1 p, n2 p)`` → ``(n1, n2, p, p)``."""
    if M.dim() != 2 or M.shape[0] % p or M.shape[1] % p:
        raise ShapeError(f"cannot unflatten shape {tuple(M.shape)} with p={p}")
    return M.reshape(M.shape[0] // p, p, M.shape[1] // p, p).permute(0, 2, 1, 3)


def resolve_preconditioner(fm: FunctionalModel, precondition: Any) -> dict[str, Tensor] | None:
    """Normalize a diagonal preconditioner to ``name -> tensor`` shaped like each parameter."""
    if precondition is None:
        return None
    if isinstance(precondition, Tensor):
        flat = precondition.reshape(-1)
        if flat.numel() != fm.num_params:
            raise ShapeError(f"flat preconditioner has {flat.numel()} entries, the model has "
                             f"{fm.num_params} trainable parameters")
        out, i = {}, 0
        for k, v in fm.params.items():
            out[k] = flat[i:i + v.numel()].reshape(v.shape).to(v.dtype)
            i += v.numel()
        return out
    if isinstance(precondition, Mapping):
        missing = set(fm.params) - set(precondition)
        if missing:
            raise ShapeError(f"preconditioner lacks entries for {sorted(missing)[:5]}")
        out = {}
        for k, v in fm.params.items():
            d = torch.as_tensor(precondition[k], dtype=v.dtype, device=v.device)
            if d.shape != v.shape:
                raise ShapeError(f"preconditioner[{k!r}] has shape {tuple(d.shape)}, parameter "
                                 f"has {tuple(v.shape)}")
            out[k] = d
        return out
    raise ShapeError(f"precondition must be a dict or a flat tensor, got {type(precondition)}")


# -- memory planning -------------------------------------------------------------------------------
def _saved_bytes(fm: FunctionalModel, x: Tensor) -> int:
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    params = {k: v.detach().requires_grad_(True) for k, v in fm.params.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fm.apply(params, x)
    return total + out.numel() * out.element_size()


def activation_bytes(fm: FunctionalModel, x: Tensor) -> int:
    """Bytes of autograd-saved activations per example (measured on 1 and 2 examples)."""
    if x.shape[0] < 2:
        return _saved_bytes(fm, x[:1])
    a1, a2 = _saved_bytes(fm, x[:1]), _saved_bytes(fm, x[:2])
    return max(a2 - a1, 1)


def estimate_memory(model: Any, x1: Tensor, x2: Tensor | None = None, *,
                    implementation: str = "jacobian", trace_outputs: bool = False,
                    chunk_size: int | None = None, params: Mapping[str, Tensor] | None = None,
                    dtype: torch.dtype | None = None, n_groups: int = 1) -> dict[str, int]:
    """Estimated bytes of an :func:`entk` call: the output and the working set per chunk.

    Returns:
        ``{"output": ..., "working": ..., "total": ..., "chunk_size": ...}``.
    """
    fm = model if isinstance(model, FunctionalModel) else functionalize(model, params, dtype=dtype)
    x1 = _as_input(x1, fm, dtype, "x1")
    x2 = x1 if x2 is None else _as_input(x2, fm, dtype, "x2")
    p = fm.output_dim(x1)
    c = chunk_size or min(max(x1.shape[0], x2.shape[0]), 1 << 30)
    out, work = _cost(fm, x1, p, x1.shape[0], x2.shape[0], implementation, trace_outputs,
                      n_groups)
    w = work(min(c, x1.shape[0]), min(c, x2.shape[0]))
    return {"output": out, "working": w, "total": out + w, "chunk_size": c}


def _cost(fm: FunctionalModel, x: Tensor, p: int, n1: int, n2: int, impl: str, trace: bool,
          n_groups: int, has_precondition: bool = False
          ) -> tuple[int, Callable[[int, int], int]]:
    s = torch.empty((), dtype=fm.dtype).element_size()
    P = fm.num_params
    out = n1 * n2 * (1 if trace else p * p) * s * n_groups

    def jacobian_floats(c1: int, c2: int, n_params: int, acts: float) -> float:
        # per-parameter Jacobians of both chunks plus their flattened (concatenated) copies
        return (2 * (c1 + c2) * p * n_params + max(c1, c2) * acts * (1 + p) + n_params
                + c1 * c2 * p * p)

    if impl == "structured":  # recorded layer inputs/sensitivities and Gram temporaries; the
        # parameters outside supported layers go through the jacobian path, run separately
        from .structured import generic_numel, working_floats

        floats = working_floats(fm, x, p, trace, has_precondition, n_groups)
        Pg = generic_numel(fm, x)
        Ag = activation_bytes(fm, x) / s if Pg else 0.0

        def work(c1: int, c2: int) -> int:
            generic = jacobian_floats(c1, c2, Pg, Ag) if Pg else 0.0
            return int(_SAFETY * s * max(floats(c1, c2), generic))
        return out, work

    A = activation_bytes(fm, x) / s  # floats per example
    if impl == "ntvp":
        def work(c1: int, c2: int) -> int:
            return int(_SAFETY * s * (c2 * p * P + c2 * A * (1 + p) + c2 * p * c1 * (A + p)
                                      + c1 * c2 * p * p))
    elif impl == "loop":
        def work(c1: int, c2: int) -> int:
            return int(_SAFETY * s * ((c1 + c2) * p * P + 2 * A + 2 * P))
    else:  # jacobian (and the generic fallback of structured)
        def work(c1: int, c2: int) -> int:
            return int(_SAFETY * s * jacobian_floats(c1, c2, P, A))
    return out, work


def _plan_chunks(fm: FunctionalModel, x1: Tensor, x2: Tensor, p: int, impl: str, trace: bool,
                 budget: int, chunk_size: int | None, n_groups: int,
                 has_precondition: bool = False) -> int:
    n1, n2 = x1.shape[0], x2.shape[0]
    out, work = _cost(fm, x1, p, n1, n2, impl, trace, n_groups, has_precondition)
    hint = ("use the matrix-free EntkOperator / entk_topk (tangentscope.entk_topk) for spectra, "
            "trace_outputs=True, fewer inputs, or a larger memory_budget= "
            "(TANGENTSCOPE_MEMORY_BUDGET)")
    if out > budget:
        raise KernelTooLargeError(
            f"the kernel itself needs {format_bytes(out)} ({n1}x{n2}"
            f"{'' if trace else f'x{p}x{p}'} {fm.dtype}), over the memory budget of "
            f"{format_bytes(budget)}: {hint}")
    if chunk_size is not None:
        if chunk_size < 1:
            raise ShapeError(f"chunk_size must be >= 1, got {chunk_size}")
        need = out + work(min(chunk_size, n1), min(chunk_size, n2))
        if need > budget:
            raise KernelTooLargeError(
                f"chunk_size={chunk_size} needs about {format_bytes(need)}, over the budget of "
                f"{format_bytes(budget)}: use a smaller chunk_size (or leave it None to pick one)"
                f", or {hint}")
        return chunk_size
    c = max(n1, n2)
    while c >= 1:
        if out + work(min(c, n1), min(c, n2)) <= budget:
            return c
        c = c // 2 if c > 1 else 0
    raise KernelTooLargeError(
        f"even one example per chunk needs about {format_bytes(out + work(1, 1))} "
        f"(model has {fm.num_params:,} parameters, p={p}), over the budget of "
        f"{format_bytes(budget)}: {hint}")


# -- shared helpers ------------------------------------------------------------------------------
def _as_input(x: Any, fm: FunctionalModel, dtype: torch.dtype | None, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    if x.dim() == 0:
        raise ShapeError(f"{name} must have a batch dimension, got a scalar")
    if x.shape[0] == 0:
        raise ShapeError(f"{name} is empty (batch of 0)")
    if x.is_floating_point():
        x = x.to(dtype or fm.dtype)
    return x.to(fm.device)


def _check_differentiable(fm: FunctionalModel, x: Tensor) -> None:
    params = {k: v.detach().requires_grad_(True) for k, v in fm.params.items()}
    with torch.enable_grad():
        try:
            out = fm.apply(params, x[:1])
        except RuntimeError as e:
            raise ShapeError(f"the model failed on x[:1] with shape {tuple(x[:1].shape)}: "
                             f"{str(e).splitlines()[0]}") from e
    if not out.requires_grad:
        raise UnsupportedModelError(
            "the model's outputs do not depend differentiably on its parameters (no autograd "
            "graph): remove .detach()/argmax/integer casts from forward(), or check that "
            "parameters have requires_grad=True")


def _structured_supports(fm: FunctionalModel, x: Tensor) -> bool:
    try:
        from .structured import supports
    except ImportError:
        return False
    return supports(fm, x)


def _implementation(name: str) -> Callable[..., Any]:
    if name == "structured":
        from .structured import entk_structured

        return entk_structured
    return {"jacobian": _entk_jacobian, "ntvp": _entk_ntvp, "loop": _entk_loop}[name]


def _chunks(n: int, c: int) -> list[slice]:
    return [slice(i, min(i + c, n)) for i in range(0, n, c)]


def _flat_jac(jac: Mapping[str, Tensor], names: list[str], D: Mapping[str, Tensor] | None,
              batch_dims: int) -> Tensor:
    """Concatenate per-parameter Jacobians ``(*batch, *shape)`` into ``(*batch, P_group)``."""
    parts = []
    for k in names:
        j = jac[k]
        if D is not None:
            j = j * D[k]
        parts.append(j.reshape(*j.shape[:batch_dims], -1))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def _contract(J1: Tensor, J2: Tensor, trace: bool) -> Tensor:
    """``J1 (c1, p, P)``, ``J2 (c2, p, P)`` → ``(c1, c2, p, p)`` or traced ``(c1, c2)``."""
    c1, p, _ = J1.shape
    c2 = J2.shape[0]
    if trace:
        return J1.reshape(c1, -1) @ J2.reshape(c2, -1).T
    return (J1.reshape(c1 * p, -1) @ J2.reshape(c2 * p, -1).T).reshape(c1, p, c2, p).permute(
        0, 2, 1, 3)


def _alloc(n1: int, n2: int, p: int, trace: bool, groups: dict | None, like: Tensor
           ) -> dict[str, Tensor]:
    shape = (n1, n2) if trace else (n1, n2, p, p)
    keys = list(groups) if groups else [""]
    return {g: torch.zeros(shape, dtype=like.dtype, device=like.device) for g in keys}


def _finish(out: dict[str, Tensor], groups: dict | None) -> Tensor | dict[str, Tensor]:
    return out if groups else out[""]


def _block_pairs(n1: int, n2: int, c: int, symmetric: bool) -> list[tuple[slice, slice]]:
    s1, s2 = _chunks(n1, c), _chunks(n2, c)
    return [(a, b) for i, a in enumerate(s1) for j, b in enumerate(s2)
            if not symmetric or j >= i]


def _write_block(out: Tensor, a: slice, b: slice, blk: Tensor, symmetric: bool, trace: bool
                 ) -> None:
    out[a, b] = blk
    if symmetric and a != b:
        out[b, a] = blk.transpose(0, 1) if trace else blk.permute(1, 0, 3, 2)


# -- jacobian contraction --------------------------------------------------------------------
def _per_example_jacobian(fm: FunctionalModel, x: Tensor) -> dict[str, Tensor]:
    """``name -> (c, p, *shape)`` per-example Jacobians via ``vmap(jacrev)``."""
    def f(params: Params, xi: Tensor) -> Tensor:
        return fm.apply(params, xi.unsqueeze(0))[0]

    return vmap(jacrev(f), in_dims=(None, 0))(fm.params, x)


def _entk_jacobian(fm: FunctionalModel, x1: Tensor, x2: Tensor, *, symmetric: bool, trace: bool,
                   groups: dict | None, precondition: dict | None, budget: int,
                   chunk_size: int | None, show_progress: bool) -> Tensor | dict[str, Tensor]:
    p = fm.output_dim(x1)
    n1, n2 = x1.shape[0], x2.shape[0]
    c = _plan_chunks(fm, x1, x2, p, "jacobian", trace, budget, chunk_size,
                     len(groups) if groups else 1)
    grp = groups or {"": list(fm.params)}
    out = _alloc(n1, n2, p, trace, groups, torch.empty(0, dtype=fm.dtype, device=fm.device))
    cur_a, ja = None, None
    with torch.no_grad():
        for a, b in progress(_block_pairs(n1, n2, c, symmetric), desc="eNTK blocks",
                             disable=not show_progress or None):
            if cur_a != a.start:
                ja, cur_a = _per_example_jacobian(fm, x1[a]), a.start
            jb = ja if (symmetric and a == b) else _per_example_jacobian(fm, x2[b])
            for g, names in grp.items():
                J1 = _flat_jac(ja, names, precondition, 2)
                J2 = _flat_jac(jb, names, None, 2)
                _write_block(out[g], a, b, _contract(J1, J2, trace), symmetric, trace)
    return _finish(out, groups)


# -- NTK-vector products -------------------------------------------------------------------------
def _entk_ntvp(fm: FunctionalModel, x1: Tensor, x2: Tensor, *, symmetric: bool, trace: bool,
               groups: dict | None, precondition: dict | None, budget: int,
               chunk_size: int | None, show_progress: bool) -> Tensor | dict[str, Tensor]:
    p = fm.output_dim(x1)
    n1, n2 = x1.shape[0], x2.shape[0]
    c = _plan_chunks(fm, x1, x2, p, "ntvp", trace, budget, chunk_size,
                     len(groups) if groups else 1)
    grp = groups or {"": list(fm.params)}
    dt = fm.dtype
    out = _alloc(n1, n2, p, trace, groups, torch.empty(0, dtype=dt, device=fm.device))
    pairs = _block_pairs(n1, n2, c, symmetric)
    with torch.no_grad():
        cur_b, tangents = None, None
        for a, b in progress(pairs, desc="eNTK blocks", disable=not show_progress or None):
            if cur_b != b.start:
                xb = x2[b]
                _, vjp_fn = vjp(lambda prm: fm.apply(prm, xb), fm.params)
                cb = xb.shape[0]
                basis = torch.eye(cb * p, dtype=dt, device=fm.device).reshape(cb * p, cb, p)
                tangents = vmap(vjp_fn)(basis)[0]  # name -> (cb p, *shape) = rows of J(x2)
                if precondition is not None:
                    tangents = {k: v * precondition[k] for k, v in tangents.items()}
                cur_b = b.start
            xa = x1[a]
            assert tangents is not None
            for g, names in grp.items():
                tg = {k: (v if k in names else torch.zeros_like(v)) for k, v in tangents.items()}

                def jvp_one(t: Params) -> Tensor:
                    return jvp(lambda prm: fm.apply(prm, xa), (fm.params,), (t,))[1]

                cols = vmap(jvp_one)(tg)  # (cb p, ca, p): cols[j b, i, a] = K[i a, j b]
                ca, cb = xa.shape[0], b.stop - b.start
                blk = cols.reshape(cb, p, ca, p).permute(2, 0, 3, 1)
                if trace:
                    blk = blk.diagonal(dim1=2, dim2=3).sum(-1)
                _write_block(out[g], a, b, blk, symmetric, trace)
    return _finish(out, groups)


# -- plain autograd loop -------------------------------------------------------------------------
def _jacobian_rows_autograd(fm: FunctionalModel, x: Tensor) -> dict[str, Tensor]:
    """``name -> (c, p, *shape)`` by ``torch.autograd.grad``, one example and output at a time."""
    params = {k: v.detach().requires_grad_(True) for k, v in fm.params.items()}
    names = list(params)
    rows: dict[str, list[Tensor]] = {k: [] for k in names}
    for i in range(x.shape[0]):
        with torch.enable_grad():
            out = fm.apply(params, x[i:i + 1])[0]
            per_out: dict[str, list[Tensor]] = {k: [] for k in names}
            for a in range(out.shape[0]):
                gs = torch.autograd.grad(out[a], [params[k] for k in names], retain_graph=True,
                                         allow_unused=True)
                for k, gk in zip(names, gs):
                    per_out[k].append(torch.zeros_like(params[k]) if gk is None else gk)
        for k in names:
            rows[k].append(torch.stack(per_out[k]))
    return {k: torch.stack(v) for k, v in rows.items()}


def _entk_loop(fm: FunctionalModel, x1: Tensor, x2: Tensor, *, symmetric: bool, trace: bool,
               groups: dict | None, precondition: dict | None, budget: int,
               chunk_size: int | None, show_progress: bool) -> Tensor | dict[str, Tensor]:
    p = fm.output_dim(x1)
    n1, n2 = x1.shape[0], x2.shape[0]
    c = _plan_chunks(fm, x1, x2, p, "loop", trace, budget, chunk_size,
                     len(groups) if groups else 1)
    grp = groups or {"": list(fm.params)}
    out = _alloc(n1, n2, p, trace, groups, torch.empty(0, dtype=fm.dtype, device=fm.device))
    for a, b in progress(_block_pairs(n1, n2, c, symmetric), desc="eNTK blocks",
                         disable=not show_progress or None):
        ja = _jacobian_rows_autograd(fm, x1[a])
        jb = ja if (symmetric and a == b) else _jacobian_rows_autograd(fm, x2[b])
        for g, names in grp.items():
            blk = _contract(_flat_jac(ja, names, precondition, 2), _flat_jac(jb, names, None, 2),
                            trace)
            _write_block(out[g], a, b, blk.detach(), symmetric, trace)
    return _finish(out, groups)
