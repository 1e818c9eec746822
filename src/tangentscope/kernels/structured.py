"""Structured-derivatives eNTK: kernel blocks from Gram matrices, no Jacobian formed.

For a dense layer ``z = W a + b`` the Jacobian row of example ``i``, output ``a`` is
``Σ_s δ_ias ⊗ [a_is, 1]`` (``δ = ∂f_a/∂z``; ``s`` runs over positions: tokens, pixels, repeated
calls of the layer), so

    K_W,b[i, j, a, b] = Σ_{s,t} (δ_ias · δ_jbt) ([a_is, 1] · [a_jt, 1]),

which without positions is ``(Δ_a Δ_bᵀ) ⊙ (A Aᵀ + 1)``: one Gram matrix of output sensitivities
and one of layer inputs (neural-tangents' STRUCTURED_DERIVATIVES idea). Per block the cheapest
of three exact contractions ("routes") is used:

- ``hadamard``: one position, no preconditioner: the formula above.
- ``positional``: the double sum over positions through the ``(c L) × (c L)`` input Gram; for
  embeddings the "input Gram" is token equality ``[tok_is == tok_jt]`` (``padding_idx`` masked).
- ``materialize``: per-example gradients of the layer alone, ``G_ia = Σ_s δ_ias ⊗ a_is`` (conv via
  ``unfold``), contracted as ``(G D) Gᵀ``; also how a diagonal preconditioner ``D`` enters.

Affine normalizations contribute ``Σ_s δ ⊙ x̂`` (weight) and ``Σ_s δ`` (bias). Parameters used in
any other way go through the generic Jacobian path for those parameters only and are added in.
On the diagonal of a symmetric kernel only the upper tiles of each Gram are computed.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .._utils import progress
from ..errors import TangentscopeError, UnsupportedModelError
from ._capture import Recording, record
from ._factors import Block, Side, block_preconditioner, contract_block
from .functional import FunctionalModel, functionalize

__all__ = ["Block", "StructuredPlan", "structured_plan", "supports", "entk_structured",
           "working_floats", "generic_numel"]

_COVERAGE = 0.5  # "auto" picks structured when at least this fraction of P is factored
_LAYERS = "Linear, Conv1d/2d, Embedding, LayerNorm/RMSNorm/GroupNorm, eval-mode BatchNorm"


@dataclasses.dataclass(frozen=True)
class StructuredPlan:
    """What the structured path factors for a model, and what it leaves to the generic path.

    Attributes:
        blocks: factored parameter blocks.
        generic: parameter name → why it needs the generic Jacobian path.
        call_sig: kind, parameter names and per-example shapes of every recorded call.
        covered: trainable scalars handled by blocks (or unused by the forward).
        total: all trainable scalars ``P``.
        p: number of outputs.
        recorded: floats kept per example for ``p = 1``: ``(layer inputs, layer outputs)``.
        graph: floats autograd saves per example in the recording forward.
    """

    blocks: tuple[Block, ...]
    generic: Mapping[str, str]
    call_sig: tuple
    covered: int
    total: int
    p: int
    recorded: tuple[int, int]
    graph: float

    @property
    def coverage(self) -> float:
        """Fraction of trainable scalars the structured path handles."""
        return self.covered / max(self.total, 1)


# -- analysis ---------------------------------------------------------------------------------
def _sig(rec: Recording) -> tuple:
    def shapes(c: Any) -> tuple:
        big = [v for v in c.data.values() if isinstance(v, Tensor)]
        return tuple(c.z.shape[1:]) + tuple(tuple(t.shape[1:]) for t in big)
    return tuple((c.kind, tuple(sorted(c.names.items())), shapes(c)) for c in rec.calls)


def _call_sizes(call: Any) -> tuple[int, int, int, int]:
    """``(d_out, d_in features, positions, input floats)`` of a call recorded on one example."""
    z, d = call.z, call.data
    if call.kind == "linear":
        a = d["a"]
        return z.shape[-1], a.shape[-1], a.numel() // a.shape[-1], a.numel()
    if call.kind == "conv":
        a, g = d["a"], d["groups"]
        k = d["kernel"][0] * d["kernel"][1]
        return z.shape[1], a.shape[1] // g * k, z[0, 0].numel(), a.numel() * (1 + k)
    if call.kind == "embedding":
        return z.shape[-1], 0, d["tokens"].numel(), d["tokens"].numel()
    return 0, 0, 0, d["xhat"].numel()


def _roles(rec: Recording) -> tuple[dict[str, set[tuple[str, str]]], dict[str, list[int]]]:
    roles: dict[str, set[tuple[str, str]]] = {}
    calls_of: dict[str, list[int]] = {}
    for k, c in enumerate(rec.calls):
        for role, n in c.names.items():
            roles.setdefault(n, set()).add((c.kind, role))
            calls_of.setdefault(n, []).append(k)
    return roles, calls_of


def _blocks(r1: Recording, fm: FunctionalModel, generic: Mapping[str, str],
            groups: Mapping[str, list[str]] | None) -> list[Block]:
    roles, calls_of = _roles(r1)
    group_of = {n: g for g, ns in (groups or {}).items() for n in ns}
    ok = {n for n in roles if n not in generic}
    blocks: list[Block] = []
    done: set[str] = set()
    for n in sorted(ok, key=lambda n: (calls_of[n][0], next(iter(roles[n]))[1] != "weight")):
        if n in done:
            continue
        kind, role = next(iter(roles[n]))
        cs = tuple(calls_of[n])
        sizes = [_call_sizes(r1.calls[k]) for k in cs]
        d_out, feat, L = sizes[0][0], sizes[0][1], sum(s[2] for s in sizes)
        names, rls = [n], [role]
        if kind in ("linear", "conv") and role == "weight":
            bias = {r1.calls[k].names.get("bias") for k in cs}
            b = bias.pop() if len(bias) == 1 else None
            if (b is not None and b in ok and b not in done and tuple(calls_of[b]) == cs
                    and group_of.get(b, "") == group_of.get(n, "")):
                names.append(b)
                rls.append("bias")
            d_in = feat + len(names) - 1
        elif kind in ("linear", "conv"):  # a bias on its own acts on the input "1"
            d_in = 1
        elif kind == "embedding":
            d_in = fm.params[n].shape[0]
        else:
            d_out, d_in, L = fm.params[n].numel(), 1, 1
        done.update(names)
        blocks.append(Block(kind, tuple(names), tuple(rls), group_of.get(n, ""), cs, d_out,
                            d_in, L, d_out * d_in))
    return blocks


def _coupled(alone: Tensor, in_batch: Tensor) -> bool:
    """Whether one example's outputs differ beyond rounding when computed alone or in a batch."""
    tol = 1e-8 if alone.dtype == torch.float64 else 1e-3
    return not torch.allclose(alone, in_batch, rtol=tol,
                              atol=tol * (1 + float(alone.abs().max())))


def structured_plan(model: Any, x: Tensor, groups: Mapping[str, list[str]] | None = None
                    ) -> StructuredPlan:
    """Which parameters the structured eNTK factors, by recording the forward on 1 and 2 examples.

    Args:
        model: an ``nn.Module`` or :class:`~tangentscope.kernels.functional.FunctionalModel`.
        x: inputs ``(n, ...)`` (only the first two examples are used).
        groups: ``group -> [names]``; a weight and its bias are merged only within one group.

    Returns:
        the :class:`StructuredPlan`; ``plan.generic`` says why each other parameter is generic.
    """
    fm = model if isinstance(model, FunctionalModel) else functionalize(model)
    x2 = x[:2] if x.shape[0] >= 2 else torch.cat([x[:1], x[:1]])
    r1 = record(fm.apply, fm.params, x[:1], count_saved=True)
    r2 = record(fm.apply, fm.params, x2, count_saved=True)
    generic = {**r1.generic, **r2.generic}
    reason = None
    if _sig(r1) != _sig(r2):
        reason = "the forward records different layer calls for 1 and 2 examples"
    elif _coupled(r1.out.detach()[0], r2.out.detach()[0]):
        reason = ("the model couples the examples of a batch (the outputs of x[0] change when "
                  "x[1] joins the batch); the structured path needs independent examples")
    if reason:
        for c in r1.calls + r2.calls:
            for n in c.names.values():
                generic.setdefault(n, reason)
    for n, rs in _roles(r1)[0].items():
        if len(rs) > 1:
            generic.setdefault(n, f"it fills several roles {sorted(rs)} (tied across layer kinds)")
    graph = max(r2.saved_bytes - r1.saved_bytes, 0) / r1.out.element_size()
    if generic:  # chunks are recorded without tracking these: plan on the same calls
        r1 = record(fm.apply, fm.params, x[:1], skip=generic)
    blocks = _blocks(r1, fm, generic, groups)
    numel = {k: v.numel() for k, v in fm.params.items()}
    total = sum(numel.values())
    covered = total - sum(numel[n] for n in generic if n in numel)
    recorded = (sum(_call_sizes(c)[3] for c in r1.calls), sum(c.z.numel() for c in r1.calls))
    return StructuredPlan(tuple(blocks), dict(generic), _sig(r1), covered, total,
                          r1.out.shape[1], recorded, graph)


_RECENT: dict[tuple, tuple[weakref.ref, StructuredPlan]] = {}  # the last few plans


def _plan_for(fm: FunctionalModel, x: Tensor, groups: Mapping[str, list[str]] | None,
              fresh: bool = False) -> StructuredPlan:
    """:func:`structured_plan`, remembering recent results per module: ``entk`` asks up to
    three times per call (``auto``, memory planning, computing), and recorders call ``entk`` in
    a loop. A stale plan is caught when a chunk is recorded (:func:`_side`) and redone."""
    owner = fm.module if fm.module is not None else fm
    key = (id(owner), tuple((k, tuple(v.shape), v.dtype) for k, v in fm.params.items()),
           tuple(x.shape[1:]), x.dtype, x.device,
           None if groups is None else tuple((g, tuple(ns)) for g, ns in groups.items()))
    hit = _RECENT.get(key)
    if not fresh and hit is not None and hit[0]() is owner:
        return hit[1]
    plan = structured_plan(fm, x, groups)
    _RECENT.pop(key, None)
    while len(_RECENT) >= 8:
        _RECENT.pop(next(iter(_RECENT)))
    _RECENT[key] = (weakref.ref(owner), plan)
    return plan


class _StalePlan(Exception):
    pass


_DATA_DEPENDENT = ("the model's forward records different layer calls for different inputs "
                   "(data-dependent control flow): use implementation='jacobian'")


def _side(fm: FunctionalModel, plan: StructuredPlan, x: Tensor, stale_ok: bool = False) -> Side:
    """Record one chunk and check it against the plan (same calls, no new generic use)."""
    rec = record(fm.apply, fm.params, x, skip=plan.generic)
    if _sig(rec) != plan.call_sig or not set(rec.generic) <= set(plan.generic):
        if stale_ok:
            raise _StalePlan
        raise UnsupportedModelError(_DATA_DEPENDENT)
    return Side(rec, plan.p)


def supports(fm: FunctionalModel, x: Tensor) -> bool:
    """Whether ``implementation="auto"`` should use the structured path for ``fm`` on ``x``.

    True when supported layers carry at least half of the trainable scalars (the rest goes
    through the generic Jacobian path and is added in).
    """
    try:
        plan = _plan_for(fm, x, None)
    except (RuntimeError, TypeError, ValueError, TangentscopeError):
        return False
    return bool(plan.blocks) and plan.coverage >= _COVERAGE


# -- routes: which exact contraction, and its cost ---------------------------------------------
def _route_costs(b: Block, c1: int, c2: int, p: int, trace: bool, has_d: bool
                 ) -> dict[str, tuple[float, float]]:
    """``route -> (flops, temporary floats)`` of the routes valid for block ``b``."""
    q = p if trace else p * p
    pairs, L2 = c1 * c2, b.L * b.L
    out: dict[str, tuple[float, float]] = {}
    if b.kind == "linear" and b.L == 1 and not has_d:
        out["hadamard"] = (2 * pairs * (q * b.d_out + b.d_in), 2 * pairs * q)
    if b.kind == "embedding" or (b.kind == "linear" and not has_d):
        din = 1 if b.kind == "embedding" else b.d_in
        temp = pairs * L2 * (q + 1) + (c1 + c2) * b.L * p * b.d_out * trace
        out["positional"] = (2 * pairs * L2 * (q * b.d_out + din + q), temp)
    if b.kind != "linear" or b.L > 1 or has_d:
        form = (c1 + c2) * p * (b.L * b.d_out * (1 if b.kind == "embedding" else b.d_in)
                                + (b.m if b.kind == "embedding" else 0))
        out["materialize"] = (2 * form + 2 * pairs * q * b.m, (c1 + c2) * p * b.m * 2)
    return out


def _route(b: Block, c1: int, c2: int, p: int, trace: bool, has_d: bool) -> str:
    costs = _route_costs(b, c1, c2, p, trace, has_d)
    return min(costs, key=lambda r: costs[r][0])


def generic_numel(fm: FunctionalModel, x: Tensor) -> int:
    """Trainable scalars the structured path leaves to the generic Jacobian path."""
    plan = _plan_for(fm, x, None)
    return plan.total - plan.covered


def working_floats(fm: FunctionalModel, x: Tensor, p: int, trace: bool, has_precondition: bool,
                   n_groups: int = 1) -> Callable[[int, int], float]:
    """Floats the structured path holds at once for chunks of ``c1`` and ``c2`` examples.

    The recording graph of one chunk, recorded inputs and sensitivities of both chunks, cached
    per-example layer gradients, the largest contraction temporary and the block accumulators.
    """
    plan = _plan_for(fm, x, None)
    rec_in, rec_out = plan.recorded

    def work(c1: int, c2: int) -> float:
        side = (c1 + c2) * (rec_in + p * rec_out) + max(c1, c2) * plan.graph
        mats, temp = 0.0, 0.0
        for b in plan.blocks:
            costs = _route_costs(b, c1, c2, p, trace, has_precondition)
            r = min(costs, key=lambda k: costs[k][0])
            temp = max(temp, costs[r][1])
            if r == "materialize":
                mats += (c1 + c2 + c1 * has_precondition) * p * b.m
        return side + mats + temp + 2 * n_groups * c1 * c2 * (p if trace else p * p)

    return work


# -- entry point -------------------------------------------------------------------------------
def _generic_part(fm: FunctionalModel, names: list[str], x1: Tensor, x2: Tensor, *,
                  groups: dict | None, precondition: dict | None, **kw: Any
                  ) -> dict[str, Tensor]:
    """The Jacobian-contraction kernel of the parameters ``names`` only (others held fixed)."""
    from .entk import _entk_jacobian

    fixed = {k: v for k, v in fm.params.items() if k not in names}

    def apply(prm: dict[str, Tensor], x: Tensor) -> Tensor:
        return fm.apply({**fixed, **prm}, x)

    sub = FunctionalModel(apply, {k: fm.params[k] for k in names}, None)
    grp = None
    if groups is not None:
        grp = {g: [n for n in ns if n in names] for g, ns in groups.items()}
        grp = {g: ns for g, ns in grp.items() if ns}
    D = None if precondition is None else {k: precondition[k] for k in names}
    K = _entk_jacobian(sub, x1, x2, groups=grp, precondition=D, **kw)
    return K if isinstance(K, dict) else {"": K}


def _strips(c: int, p: int) -> list[slice]:
    """Row strips of a diagonal chunk: 1-8 strips of at least 64 Gram rows each."""
    k = max(1, min(8, c * p // 64))
    t = -(-c // k)
    return [slice(i, min(i + t, c)) for i in range(0, c, t)]


def _shift(sl: slice, start: int) -> slice:
    return slice(sl.start + start, sl.stop + start)


def _add_pair(out: dict[str, Tensor], zero: dict[str, bool], plan: StructuredPlan,
              dmap: Mapping[Block, Tensor], s1: Any, s2: Any, a: slice, b: slice,
              trace: bool, groups: dict | None, mirror_from: int | None) -> None:
    """Contract every block between ``s1`` (rows ``a``) and ``s2`` (columns ``b``) into
    ``out[g][a, b]``; with ``mirror_from = k`` also write the transpose of its columns ``k:``
    into ``out[g][b[k:], a]`` (the lower triangle of a symmetric kernel)."""
    c1, c2, p = s1.c, s2.c, plan.p
    for g in out:
        acc = torch.zeros((c1, c2) if trace else (c1 * p, c2 * p), dtype=out[g].dtype,
                          device=out[g].device)
        for blk in plan.blocks:
            if groups and blk.group != g:
                continue
            d = dmap.get(blk)
            contract_block(acc, blk, s1, s2, _route(blk, c1, c2, p, trace, d is not None),
                           trace, d)
        kb = acc if trace else acc.view(c1, p, c2, p).permute(0, 2, 1, 3)
        targets = [(a, b, kb)]
        if mirror_from is not None and mirror_from < c2:
            k = kb[:, mirror_from:]
            targets.append((slice(b.start + mirror_from, b.stop), a,
                            k.transpose(0, 1) if trace else k.permute(1, 0, 3, 2)))
        for r, c, k in targets:
            if zero[g]:
                out[g][r, c] = k
            else:
                out[g][r, c] += k


def entk_structured(fm: FunctionalModel, x1: Tensor, x2: Tensor, *, symmetric: bool,
                    trace: bool, groups: dict | None, precondition: dict | None, budget: int,
                    chunk_size: int | None, show_progress: bool) -> Tensor | dict[str, Tensor]:
    """The eNTK by structured derivatives, with the contract of
    :func:`tangentscope.kernels.entk.entk`: ``x1 (n1, ...)``, ``x2 (n2, ...)`` →
    ``(n1, n2, p, p)``, ``(n1, n2)`` traced, or a dict of them per group.

    Raises:
        UnsupportedModelError: no parameter sits in a supported layer (use ``"jacobian"``), or
            the forward records different layer calls for different inputs.
    """
    from .entk import _block_pairs, _chunks, _plan_chunks

    plan = _plan_for(fm, x1, groups)
    if not plan.blocks:
        why = "; ".join(f"{k}: {v}" for k, v in list(plan.generic.items())[:3])
        raise UnsupportedModelError(
            f"implementation='structured' found no parameter used by a supported layer "
            f"({_LAYERS}){': ' + why if why else ''}. Use implementation='jacobian' or 'auto'.")
    n1, n2, p = x1.shape[0], x2.shape[0], plan.p
    keys = list(groups) if groups else [""]
    c = _plan_chunks(fm, x1, x2, p, "structured", trace, budget, chunk_size, len(keys),
                     has_precondition=precondition is not None)
    first = _chunks(n1, c)[0]
    with torch.no_grad():
        try:
            side_a = _side(fm, plan, x1[first], stale_ok=True)
        except _StalePlan:  # a cached plan from an earlier call no longer fits: redo it
            plan = _plan_for(fm, x1, groups, fresh=True)
            side_a = _side(fm, plan, x1[first])
    names = [n for n in fm.params if n in plan.generic]
    out: dict[str, Tensor] = {}
    if names:
        out = _generic_part(fm, names, x1, x2, symmetric=symmetric, trace=trace, groups=groups,
                            precondition=precondition, budget=budget, chunk_size=chunk_size,
                            show_progress=show_progress)
    zero = {g: g not in out for g in keys}  # blocks are copied rather than added
    shape = (n1, n2) if trace else (n1, n2, p, p)
    out = {g: out[g] if g in out else torch.empty(shape, dtype=fm.dtype, device=fm.device)
           for g in keys}
    dmap = ({b: block_preconditioner(b, precondition) for b in plan.blocks}
            if precondition is not None else {})
    cur_a = first.start
    with torch.no_grad():
        for a, b in progress(_block_pairs(n1, n2, c, symmetric), desc="eNTK blocks (structured)",
                             disable=not show_progress or None):
            if cur_a != a.start:
                side_a, cur_a = _side(fm, plan, x1[a]), a.start
            if symmetric and a == b:  # strips of the upper triangle of the symmetric Gram
                for u in _strips(side_a.c, p):
                    rest = slice(u.start, side_a.c)
                    _add_pair(out, zero, plan, dmap, side_a.rows(u), side_a.rows(rest),
                              _shift(u, a.start), _shift(rest, a.start), trace, groups,
                              mirror_from=u.stop - u.start)
            else:
                _add_pair(out, zero, plan, dmap, side_a, _side(fm, plan, x2[b]), a, b, trace,
                          groups, mirror_from=0 if symmetric else None)
    return out if groups else out[""]
