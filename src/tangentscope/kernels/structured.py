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

The per-layer factorizations are the rules of :mod:`tangentscope.derivatives`. This module is
the ``"structured"`` backend of :func:`tangentscope.entk`: :func:`structured_plan` (computed
once per call by the implementation choice and passed down), :func:`cost` and
:func:`compute`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .._utils import progress
from ..errors import TangentscopeError, UnsupportedModelError
from . import _jacobian
from ._capture import Recording, record
from ._factors import (
    Block,
    Side,
    block_preconditioner,
    contract_block,
    positional_columns,
    streams,
)
from ._plan import (
    SAFETY,
    Request,
    WorkFn,
    activation_bytes,
    block_pairs,
    check_independent,
    chunks,
    probe,
    probe_model,
)
from .functional import FunctionalModel, functionalize

__all__ = ["Block", "StructuredPlan", "structured_plan", "batch_dependence", "supports",
           "working_floats", "generic_numel", "cost", "compute", "confirm",
           "DataDependentForward", "COVERAGE"]

COVERAGE = 0.5  # "auto" picks structured when at least this fraction of P is factored
_LAYERS = ("Linear, Conv1d/2d, Embedding, LayerNorm/RMSNorm/GroupNorm, eval-mode BatchNorm "
           "and layers added with tangentscope.derivatives.register_rule")


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
        graph: floats per example of the forward's intermediate outputs (batch first): an
            upper bound of what autograd saves when a chunk is recorded.
        out1: the model's outputs ``(1, p)`` on ``x[:1]`` as recorded (the first chunk of
            the kernel is checked against them: examples must not interact).
        norm_out: floats per example of the normalization calls' outputs (part of
            ``recorded[1]``; their sensitivities are reduced output by output).
    """

    blocks: tuple[Block, ...]
    generic: Mapping[str, str]
    call_sig: tuple
    covered: int
    total: int
    p: int
    recorded: tuple[int, int]
    graph: float
    out1: Tensor | None = dataclasses.field(default=None, repr=False, compare=False)
    norm_out: int = 0

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
    """``(d_out, d_in features, positions, input floats)`` of a call, per example."""
    return call.rule.sizes(call.data, call.z)


def _roles(rec: Recording) -> tuple[dict[str, set[tuple[str, str]]], dict[str, list[int]]]:
    roles: dict[str, set[tuple[str, str]]] = {}
    calls_of: dict[str, list[int]] = {}
    for k, c in enumerate(rec.calls):
        for role, n in c.names.items():
            roles.setdefault(n, set()).add((c.kind, role))
            calls_of.setdefault(n, []).append(k)
    return roles, calls_of


def _blocks(r1: Recording, fm: FunctionalModel, generic: Mapping[str, str],
            groups: Mapping[str, list[str]] | None,
            call_sizes: list[tuple[int, int, int, int]]) -> list[Block]:
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
        sizes = [call_sizes[k] for k in cs]
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
        g = max((int(r1.calls[k].data.get("groups", 1)) for k in cs), default=1) \
            if kind == "conv" else 1
        blocks.append(Block(kind, tuple(names), tuple(rls), group_of.get(n, ""), cs, d_out,
                            d_in, L, d_out * d_in, g))
    return blocks


def structured_plan(model: Any, x: Tensor, groups: Mapping[str, list[str]] | None = None
                    ) -> StructuredPlan:
    """Which parameters the structured eNTK factors, by recording the forward on one example.

    Args:
        model: an ``nn.Module`` or :class:`~tangentscope.kernels.functional.FunctionalModel`.
        x: inputs ``(n, ...)`` (only the first example is used).
        groups: ``group -> [names]``; a weight and its bias are merged only within one group.

    Returns:
        the :class:`StructuredPlan`; ``plan.generic`` says why each other parameter is generic.
        Chunks of the kernel are recorded against it: a forward that records other layer calls
        for other inputs or batch sizes is refused then (``implementation='jacobian'``).
    """
    fm = model if isinstance(model, FunctionalModel) else functionalize(model)
    r1 = record(fm.apply, fm.params, x[:1], grad=False)
    generic = dict(r1.generic)
    for n, rs in _roles(r1)[0].items():
        if len(rs) > 1:
            generic.setdefault(n, f"it fills several roles {sorted(rs)} (tied across layer kinds)")
    graph = float(r1.activations)
    out1 = r1.out.detach()
    if generic:  # chunks are recorded without tracking these: plan on the same calls
        r1 = record(fm.apply, fm.params, x[:1], skip=generic, grad=False)
    sizes = [_call_sizes(c) for c in r1.calls]
    blocks = _blocks(r1, fm, generic, groups, sizes)
    numel = {k: v.numel() for k, v in fm.params.items()}
    total = sum(numel.values())
    covered = total - sum(numel[n] for n in generic if n in numel)
    recorded = (sum(s[3] for s in sizes), sum(c.z.numel() // c.z.shape[0] for c in r1.calls))
    return StructuredPlan(tuple(blocks), dict(generic), _sig(r1), covered, total,
                          out1.shape[1], recorded, graph, out1,
                          sum(c.z.numel() // c.z.shape[0] for c in r1.calls if c.kind == "norm"))


def batch_dependence(fm: FunctionalModel, plan: StructuredPlan, x: Tensor) -> str | None:
    """Why the forward on two examples records other layer calls than ``plan`` (None if the
    same): data- or batch-size-dependent control flow, which the structured path refuses."""
    pair = x[:2] if x.shape[0] >= 2 else torch.cat([x[:1], x[:1]])
    rec = record(fm.apply, fm.params, pair, skip=plan.generic, grad=False)
    if _sig(rec) != plan.call_sig or not set(rec.generic) <= set(plan.generic):
        return "the forward records different layer calls for 1 and 2 examples"
    return None


class DataDependentForward(UnsupportedModelError):
    """A chunk records other layer calls than the plan (``"auto"`` then falls back to the
    Jacobian path)."""


_DATA_DEPENDENT = ("the model's forward records different layer calls for different inputs "
                   "(data-dependent control flow): use implementation='jacobian'")


def _side(fm: FunctionalModel, plan: StructuredPlan, x: Tensor,
          routes: Mapping[Block, str] | None = None, form: bool = True) -> Side:
    """Record one chunk and check it against the plan (same calls, no new generic use);
    ``routes``, ``form``: see :class:`~tangentscope.kernels._factors.Side`."""
    rec = record(fm.apply, fm.params, x, skip=plan.generic)
    if _sig(rec) != plan.call_sig or not set(rec.generic) <= set(plan.generic):
        raise DataDependentForward(_DATA_DEPENDENT)
    return Side(rec, plan.p, routes, form)


def supports(fm: FunctionalModel, x: Tensor) -> bool:
    """Whether the structured path would be the ``implementation="auto"`` choice for ``fm``
    on ``x``: supported layers carry at least :data:`COVERAGE` (half) of the trainable scalars
    (the rest goes through the generic Jacobian path and is added in). See
    :func:`tangentscope.select_implementation` for the full decision and its reason."""
    try:
        probe_model(fm, x, x)
        plan = structured_plan(fm, x)
        if batch_dependence(fm, plan, x):
            return False
    except (RuntimeError, TypeError, ValueError, TangentscopeError):
        return False
    return bool(plan.blocks) and plan.coverage >= COVERAGE


# -- routes: which exact contraction, and its cost ---------------------------------------------
def _route_costs(b: Block, c1: int, c2: int, p: int, trace: bool, has_d: bool
                 ) -> dict[str, tuple[float, float]]:
    """``route -> (flops, temporary floats)`` of the routes valid for block ``b``."""
    q = p if trace else p * p
    pairs, L2 = c1 * c2, b.L * b.L
    out: dict[str, tuple[float, float]] = {}
    if b.kind == "linear" and b.L == 1 and not has_d:
        out["hadamard"] = (2 * pairs * (q * b.d_out + b.d_in), 2 * pairs * q)
    if b.kind == "embedding" or (b.kind in ("linear", "conv") and b.groups == 1 and not has_d):
        din = 1 if b.kind == "embedding" else b.d_in
        if trace:  # (c1 L1, c2 L2) sensitivity dots times the input Gram
            temp = pairs * L2 * (q + 1) + (c1 + c2) * b.L * p * b.d_out
            out["positional"] = (2 * pairs * L2 * (q * b.d_out + din + q), temp)
        else:  # the input Gram times δ over one side's positions, then δ of the other
            # (R and its permutation, a chunk of examples j at a time: positional_columns)
            r = c1 * positional_columns(c1, c2, p, b.d_out, b.L) * b.L * p * b.d_out
            temp = pairs * L2 + 2 * r + (c1 + c2) * b.L * p * b.d_out
            out["positional"] = (2 * pairs * (L2 * (p * b.d_out + din) + q * b.L * b.d_out),
                                 temp)
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
    plan = structured_plan(fm, x)
    return plan.total - plan.covered


def working_floats(plan: StructuredPlan, trace: bool, has_precondition: bool,
                   n_groups: int = 1) -> Callable[..., float]:
    """Floats the structured path holds at once for chunks of ``c1`` and ``c2`` examples
    (``work(c1, c2, single=False)``; ``single``: a symmetric kernel in one chunk, whose one
    recorded side serves as both).

    The recording graph of one chunk; per chunk its recorded inputs and the larger of its
    sensitivities right after the backward passes (less those of the streamed blocks,
    :func:`~tangentscope.kernels._factors.streams`, already reduced to per-example gradients)
    and what it keeps once the materialized blocks are formed (their per-example gradients —
    only the largest at a time when a one-chunk symmetric kernel goes block by block — and the
    sensitivities of the other blocks); cached unfolded convolution inputs (positional route),
    the largest contraction or unfolding temporary and the block accumulators.
    """
    rec_in, rec_out = plan.recorded
    p = plan.p

    def work(c1: int, c2: int, single: bool = False) -> float:
        sides = c1 if single else c1 + c2
        rows = _strips(c1, p)[0].stop if single else c1  # a diagonal chunk goes in strips
        formed, streamed, dropped, kept, cached, temp = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
        largest, pending = 0.0, 0.0  # by block: the largest gradient, the δ not yet formed
        routes: dict[Block, str] = {}
        for b in plan.blocks:
            costs = _route_costs(b, c1, c2, p, trace, has_precondition)
            r = routes[b] = min(costs, key=lambda k: costs[k][0])
            if rows < c1:
                costs = _route_costs(b, rows, c2, p, trace, has_precondition)
            patches = b.L * b.d_in if b.kind == "conv" and b.roles != ("bias",) else 0
            if r == "materialize":
                cached += c1 * has_precondition * p * b.m
                if streams(b):
                    streamed += p * b.m
                    dropped += p * b.d_out * b.L * (b.kind != "norm")
                else:
                    formed += p * b.m
                    largest = max(largest, p * b.m)
                    pending += p * b.d_out * b.L
                temp = max(temp, costs[r][1], max(c1, c2) * patches * (b.d_in > b.L))
            else:
                kept += p * b.L * b.d_out
                temp = max(temp, costs[r][1])
                cached += sides * patches * (1 + ("bias" in b.roles))  # V (and V1)
        acc = 2 * n_groups * c1 * c2 * (p if trace else p * p)
        by_block = single and _by_block(plan, routes, c1, trace, n_groups)
        after = kept + streamed + (pending + largest if by_block else formed)
        during = p * (rec_out - plan.norm_out) - dropped + streamed  # the backward passes
        # a chunk is recorded (graph, backward) while the other side, if any, is held formed
        backward = (c1 if single else c2) * (rec_in + during + plan.graph) + (
            0 if single else c1 * (rec_in + after))
        contract = sides * (rec_in + after) + cached + temp
        return max(backward, contract) + acc

    return work


# -- the backend --------------------------------------------------------------------------------
def _require_blocks(plan: StructuredPlan) -> None:
    if not plan.blocks:
        why = "; ".join(f"{k}: {v}" for k, v in list(plan.generic.items())[:3])
        raise UnsupportedModelError(
            f"implementation='structured' found no parameter used by a supported layer "
            f"({_LAYERS}){': ' + why if why else ''}. Use implementation='jacobian' or 'auto'.")


def confirm(req: Request, plan: StructuredPlan) -> Request:
    """``req`` with ``p`` from a fresh plan of it: the plan's recording already ran the model,
    and :func:`compute` checks that examples are independent on its first chunk. The full
    :func:`~tangentscope.kernels._plan.probe` runs instead where the recording cannot tell
    (generic parameters); an output without a graph to the parameters is caught on the
    first chunk."""
    if plan.generic or plan.out1 is None:
        return probe(req)
    return dataclasses.replace(req, p=plan.p)


def cost(req: Request, plan: StructuredPlan) -> WorkFn:
    """Working bytes for chunks ``(c1, c2)``: the structured part, or the Jacobian path of the
    generic parameters (run separately, so the larger of the two).

    Raises:
        UnsupportedModelError: no parameter sits in a supported layer.
    """
    _require_blocks(plan)
    s = req.itemsize
    floats = working_floats(plan, req.trace, req.precondition is not None, req.n_groups)
    Pg = plan.total - plan.covered
    Ag = activation_bytes(req.fm, req.x1) / s if Pg else 0.0

    def work(c1: int, c2: int) -> int:
        generic = _jacobian.jacobian_floats(c1, c2, req.p, Pg, Ag) if Pg else 0.0
        single = req.symmetric and c1 >= req.n1
        return int(SAFETY * s * max(floats(c1, c2, single), generic))
    return work


def _strips(c: int, p: int) -> list[slice]:
    """Row strips of a diagonal chunk: 1-8 strips of at least 64 Gram rows each."""
    k = max(1, min(8, c * p // 64))
    t = -(-c // k)
    return [slice(i, min(i + t, c)) for i in range(0, c, t)]


def _shift(sl: slice, start: int) -> slice:
    return slice(sl.start + start, sl.stop + start)


def _write(out: dict[str, Tensor], zero: dict[str, bool], g: str, acc: Tensor, a: slice,
           b: slice, trace: bool, p: int, mirror_from: int | None, direct: bool = False
           ) -> None:
    """Copy (or add) a contracted ``acc`` ``(c1 p, c2 p)`` / traced ``(c1, c2)`` into
    ``out[g][a, b]`` (``direct``: it already is that block, in the output's layout); with
    ``mirror_from = k`` also the transpose of its columns ``k:`` into ``out[g][b[k:], a]``
    (the lower triangle of a symmetric kernel)."""
    c1, c2 = a.stop - a.start, b.stop - b.start
    kb = acc if trace else acc.view(c1, p, c2, p).permute(0, 2, 1, 3)
    targets = [] if direct else [(a, b, kb)]
    if mirror_from is not None and mirror_from < c2:
        k = kb[:, mirror_from:]
        targets.append((slice(b.start + mirror_from, b.stop), a,
                        k.transpose(0, 1) if trace else k.permute(1, 0, 3, 2)))
    for r, c, k in targets:
        if zero[g]:
            out[g][r, c] = k
        else:
            out[g][r, c] += k


def _add_pair(out: dict[str, Tensor], zero: dict[str, bool], plan: StructuredPlan,
              dmap: Mapping[Block, Tensor], s1: Any, s2: Any, a: slice, b: slice,
              trace: bool, groups: dict | None, mirror_from: int | None,
              routes: Mapping[Block, str]) -> None:
    """Contract every block between ``s1`` (rows ``a``) and ``s2`` (columns ``b``) into
    ``out[g][a, b]`` by its route; with ``mirror_from = k`` also write the transpose of its
    columns ``k:`` into ``out[g][b[k:], a]`` (the lower triangle of a symmetric kernel)."""
    c1, c2, p = s1.c, s2.c, plan.p
    for g in out:
        direct = zero[g] and (trace or p == 1)  # same layout: accumulate in the output itself
        if direct:
            acc = out[g][a, b] if trace else out[g][a, b, 0, 0]
            acc.zero_()
        else:
            acc = torch.zeros((c1, c2) if trace else (c1 * p, c2 * p), dtype=out[g].dtype,
                              device=out[g].device)
        for blk in plan.blocks:
            if groups and blk.group != g:
                continue
            contract_block(acc, blk, s1, s2, routes[blk], trace, dmap.get(blk))
        _write(out, zero, g, acc, a, b, trace, p, mirror_from, direct)


def _by_block(plan: StructuredPlan, routes: Mapping[Block, str], c: int, trace: bool,
              n_groups: int = 1) -> bool:
    """Whether a one-chunk symmetric kernel is better contracted block by block (each block's
    factors formed, used and dropped in turn): when the materialized per-example gradients
    held at once would outweigh the strips' accumulators (one set per group)."""
    p = plan.p
    held = sum(c * p * b.m for b in plan.blocks if routes[b] == "materialize" and not streams(b))
    return held > n_groups * (c * c if trace else (c * p) ** 2)


def _diagonal_by_block(out: dict[str, Tensor], zero: dict[str, bool], plan: StructuredPlan,
                       dmap: Mapping[Block, Tensor], side: Side, a: slice, trace: bool,
                       groups: dict | None, routes: Mapping[Block, str]) -> None:
    """The symmetric kernel of one chunk (upper-triangle strips), block by block: each block
    is contracted over every strip, then its factors are released."""
    p = plan.p
    strips = _strips(side.c, p)
    accs = {g: [torch.zeros((u.stop - u.start) * (1 if trace else p),
                            (side.c - u.start) * (1 if trace else p),
                            dtype=out[g].dtype, device=out[g].device) for u in strips]
            for g in out}
    for blk in plan.blocks:
        for u, acc in zip(strips, accs.get(blk.group if groups else "", [])):
            contract_block(acc, blk, side.rows(u), side.rows(slice(u.start, side.c)),
                           routes[blk], trace, dmap.get(blk))
        side.release(blk)
    for g, row in accs.items():
        for u, acc in zip(strips, row):
            _write(out, zero, g, acc, _shift(u, a.start), _shift(slice(u.start, side.c),
                                                                 a.start),
                   trace, p, u.stop - u.start)


def compute(req: Request, c: int, plan: StructuredPlan) -> Tensor | dict[str, Tensor]:
    """The eNTK of ``req`` by structured derivatives in chunks of ``c`` examples, with the
    contract of :func:`tangentscope.entk`: ``(n1, n2, p, p)``, ``(n1, n2)`` traced, or a dict
    of them per group. ``plan`` is :func:`structured_plan` of ``req`` (computed once per call).

    Raises:
        UnsupportedModelError: no parameter sits in a supported layer (use ``"jacobian"``), or
            the forward records different layer calls for different inputs.
    """
    _require_blocks(plan)
    fm, x1, x2, sym, trace = req.fm, req.x1, req.x2, req.symmetric, req.trace
    n1, n2, p, groups = req.n1, req.n2, plan.p, req.groups
    keys = list(groups) if groups else [""]
    first = chunks(n1, c)[0]
    D = req.precondition
    # one route per block for the whole kernel, chosen at the full chunk size (the strips of a
    # diagonal chunk and a ragged last chunk share the factors cached for it)
    routes = {b: _route(b, min(c, n1), min(c, n2), p, trace, D is not None) for b in plan.blocks}
    one = sym and first.stop >= n1 and _by_block(plan, routes, first.stop, trace, len(keys))
    with torch.no_grad():
        side_a = _side(fm, plan, x1[first], routes, form=not one)
        if not side_a.differentiable:
            probe(req)  # raises: the output has no graph to the parameters
        if plan.out1 is not None:  # examples independent: x[0] alone vs in the first chunk
            in_batch = side_a.out[:1] if side_a.c >= 2 else fm.apply(
                fm.params, torch.cat([x1[:1], x2[1:2] if sym else x2[:1]]))[:1]
            check_independent(fm, plan.out1, in_batch, x1)
    names = [n for n in fm.params if n in plan.generic]
    out: dict[str, Tensor] = {}
    if names:  # the generic parameters through the Jacobian path, at the same chunk size
        K = _jacobian.compute(req.restrict(names), c)
        out = K if isinstance(K, dict) else {"": K}
    zero = {g: g not in out for g in keys}  # blocks are copied rather than added
    shape = (n1, n2) if trace else (n1, n2, p, p)
    out = {g: out[g] if g in out else torch.empty(shape, dtype=fm.dtype, device=fm.device)
           for g in keys}
    dmap = {b: block_preconditioner(b, D) for b in plan.blocks} if D is not None else {}
    cur_a = first.start
    with torch.no_grad():
        for a, b in progress(block_pairs(n1, n2, c, sym), desc="eNTK blocks (structured)",
                             disable=not req.show_progress or None):
            if cur_a != a.start:
                side_a, cur_a = _side(fm, plan, x1[a], routes), a.start
            if one:  # the whole kernel is one chunk: block by block, factors dropped
                _diagonal_by_block(out, zero, plan, dmap, side_a, a, trace, groups, routes)
            elif sym and a == b:  # strips of the upper triangle of the symmetric Gram
                for u in _strips(side_a.c, p):
                    rest = slice(u.start, side_a.c)
                    _add_pair(out, zero, plan, dmap, side_a.rows(u), side_a.rows(rest),
                              _shift(u, a.start), _shift(rest, a.start), trace, groups,
                              mirror_from=u.stop - u.start, routes=routes)
            else:
                _add_pair(out, zero, plan, dmap, side_a, _side(fm, plan, x2[b], routes), a, b,
                          trace, groups, mirror_from=0 if sym else None, routes=routes)
    return out if groups else out[""]
