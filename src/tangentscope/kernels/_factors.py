"""Per-chunk factors of the structured eNTK and the exact contractions between two chunks.

A :class:`Block` is a set of parameters contracted together (a weight and its bias merge into
one augmented weight ``[W | b]`` acting on ``[a, 1]``). ``Side`` holds one chunk's recorded
layer calls and sensitivities ``δ`` and builds, lazily and cached, the factors the routes need
from the calls' derivative rules (:mod:`tangentscope.derivatives`): ``U`` (sensitivities over
positions), ``V`` (inputs), token ids, or ``X`` (per-example gradients of the block alone).
Shapes: ``c`` examples, ``p`` outputs, ``L`` positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._capture import Recording, sensitivities

__all__ = ["Block", "Side", "contract_block", "block_preconditioner", "streams",
           "positional_columns"]


@dataclasses.dataclass(frozen=True, eq=False)
class Block:
    """Parameters contracted together, from one or more recorded calls of one layer kind.

    Compared and hashed by identity: blocks key the per-chunk factor caches in the hot loop.

    Attributes:
        kind: ``"linear"``, ``"conv"``, ``"embedding"`` or ``"norm"``.
        names: parameter names (weight first), roles: their roles (``"weight"``/``"bias"``).
        group: the kernel group they belong to (``""`` without groups).
        calls: indices of the recorded calls.
        d_out: output features (conv: channels; embedding: width; norm: parameter size).
        d_in: input features per position (``+1`` for a merged bias; ``1`` for a bias alone;
            conv: ``C_in/groups · kernel``; embedding: vocabulary).
        L: positions per example, summed over calls.
        m: scalars of the block's parameters per output (``d_out · d_in`` for linear/conv).
        groups: convolution groups (a grouped convolution has no positional route).
    """

    kind: str
    names: tuple[str, ...]
    roles: tuple[str, ...]
    group: str
    calls: tuple[int, ...]
    d_out: int
    d_in: int
    L: int
    m: int
    groups: int = 1


def streams(b: Block) -> bool:
    """Whether a materialized block is formed output by output during the backward passes:
    its per-example gradient (``m = d_out · d_in`` per output) is smaller than its
    sensitivities (``d_out · L``), as for normalizations and for convolutions at more output
    positions than patch features (the early layers of a CNN)."""
    return b.kind == "norm" or (b.kind in ("linear", "conv") and b.d_in < b.L)


# -- one chunk of inputs ----------------------------------------------------------------------
class _Kept(NamedTuple):
    """What a chunk keeps of a recorded call once its sensitivities are known."""

    rule: Any
    data: dict[str, Any]


class Side:
    """Recorded inputs ``a`` and sensitivities ``δ`` of one chunk, with cached factors.

    With ``routes`` (block → route, fixed for the whole kernel) the blocks routed
    ``"materialize"`` are formed at once, in call order, and the sensitivities and recorded
    inputs that no other route reads are dropped as soon as they are used: the chunk then holds
    per-example gradients of those blocks instead of their (often larger) ``δ``. Blocks whose
    gradient is smaller than their ``δ`` (:func:`streams`: normalizations, and convolutions or
    linear layers with more positions than input features) are even formed output by output
    during the backward passes, so their ``δ`` are never held for all outputs at once. With
    ``form=False`` the other materialized blocks are formed lazily instead, when first read,
    and a side used once drops each block's factors with :meth:`release` after contracting it.
    """

    def __init__(self, rec: Recording, p: int, routes: Mapping[Block, str] | None = None,
                 form: bool = True):
        self.c, self.p = rec.out.shape[0], p
        self.out = rec.out.detach()
        self.differentiable = bool(rec.out.requires_grad)
        self.cache: dict[Any, Tensor] = {}
        keep, each = self._streamed(rec, routes or {})
        self.delta: list[Any] = sensitivities(rec, p, keep, each)
        self.calls: list[Any] = [_Kept(c.rule, c.data) for c in rec.calls]  # no outputs z
        self._readers: dict[int, int] = {}
        for b in routes or {}:
            for k in b.calls:
                self._readers[k] = self._readers.get(k, 0) + 1
        if routes and form:
            self._form(routes)

    def release(self, b: Block) -> None:
        """Drop block ``b``'s cached factors, and the sensitivities and recorded inputs that no
        other block reads (a side contracted block by block, used once)."""
        for key in ("X", "XD", "U", "V", "V1", "tok"):
            self.cache.pop((key, b), None)
        for k in b.calls:
            self._readers[k] -= 1
            if not self._readers[k]:
                self.delta[k] = self.calls[k] = None

    def _streamed(self, rec: Recording, routes: Mapping[Block, str]
                  ) -> tuple[list[bool] | None, Callable[[int, tuple[Tensor, ...]], None] | None]:
        """Which calls' ``δ`` to keep, and the per-output reduction forming the streamed
        blocks (:func:`streams`) into the cache."""
        stream = [b for b, r in routes.items() if r == "materialize" and streams(b)]
        if not stream:
            return None, None
        used = {k for b in routes if b not in stream for k in b.calls}
        keep = [k in used or not any(k in b.calls for b in stream) for k in range(len(rec.calls))]
        dtype, device = rec.out.dtype, rec.out.device
        xs = {b: torch.zeros(self.c, self.p, b.m, dtype=dtype, device=device) for b in stream}
        self.cache.update({("X", b): x for b, x in xs.items()})

        def each(a: int, grads: tuple[Tensor, ...]) -> None:
            for b, x in xs.items():
                for k in b.calls:
                    call = rec.calls[k]
                    x[:, a] += call.rule.per_example(call.data, grads[k].unsqueeze(1),
                                                     b.roles)[:, 0]
        return keep, each

    def _form(self, routes: Mapping[Block, str]) -> None:
        mats = sorted((b for b, r in routes.items() if r == "materialize"),
                      key=lambda b: min(b.calls))
        keep = {k for b, r in routes.items() if r != "materialize" for k in b.calls}
        left: dict[int, int] = {}
        for b in mats:
            for k in b.calls:
                left[k] = left.get(k, 0) + 1
        for b in mats:
            self.X(b, None)
            for k in b.calls:
                left[k] -= 1
                if not left[k] and k not in keep:
                    self.delta[k] = self.calls[k] = None  # read by no other block

    def _cached(self, key: Any, fn: Callable[[], Tensor]) -> Tensor:
        if key not in self.cache:
            self.cache[key] = fn()
        return self.cache[key]

    def rows(self, sl: slice) -> _Rows:
        """The examples ``sl`` of this chunk, sharing its cached factors."""
        return _Rows(self, sl)

    def U(self, b: Block) -> Tensor:
        """``(c, p, L, d_out)`` sensitivities over all positions of the block's calls."""
        def build() -> Tensor:
            if b.kind == "conv":  # channels first: (c, p, C, *spatial) -> (c, p, L, C)
                us = [self.delta[k].reshape(self.c, self.p, b.d_out, -1).transpose(2, 3)
                      for k in b.calls]
            else:
                us = [self.delta[k].reshape(self.c, self.p, -1, b.d_out) for k in b.calls]
            u = us[0] if len(us) == 1 else torch.cat(us, dim=2)
            if b.kind == "embedding":
                u = u * (self.tokens(b) >= 0)[:, None, :, None]
            return u
        return self._cached(("U", b), build)

    def V(self, b: Block) -> Tensor:
        """``(c, L, features)`` layer inputs; no features for a bias alone. A bias in the block
        acts on an extra input "1" (see :func:`_gram`, :meth:`V1`)."""
        def build() -> Tensor:
            vs = []
            for k in b.calls:
                a = self.calls[k].rule.positions(self.calls[k].data, self.c)
                vs.append(a[..., :0] if b.roles == ("bias",) else a)
            return vs[0] if len(vs) == 1 else torch.cat(vs, dim=1)
        return self._cached(("V", b), build)

    def V1(self, b: Block) -> Tensor:
        """``(c, L, d_in)``: :meth:`V` with the column of ones when the block has a bias."""
        v = self.V(b)
        if "bias" not in b.roles:
            return v
        return self._cached(("V1", b), lambda: torch.cat([v, v.new_ones(v.shape[:-1] + (1,))],
                                                          dim=-1))

    def tokens(self, b: Block) -> Tensor:
        """``(c, L)`` token ids, ``-1`` where the embedding gives no gradient (``padding_idx``)."""
        def build() -> Tensor:
            ts = [self.calls[k].rule.positions(self.calls[k].data, self.c) for k in b.calls]
            return ts[0] if len(ts) == 1 else torch.cat(ts, dim=1)
        return self._cached(("tok", b), build)

    def X(self, b: Block, D: Tensor | None) -> Tensor:
        """``(c, p, m)`` per-example gradients of the block's parameters, times ``D`` if given."""
        x = self._cached(("X", b), lambda: self._materialize(b))
        if D is None:
            return x
        return self._cached(("XD", b), lambda: x * D)

    def _materialize(self, b: Block) -> Tensor:
        out = None
        for k in b.calls:
            call = self.calls[k]
            g = call.rule.per_example(call.data, self.delta[k], b.roles)
            out = g if out is None else out + g
        assert out is not None
        return out


class _Rows:
    """A row slice of a :class:`Side` (a strip of a symmetric Gram), same interface."""

    def __init__(self, side: Side, sl: slice):
        self.side, self.sl = side, sl
        self.c, self.p = len(range(*sl.indices(side.c))), side.p

    def U(self, b: Block) -> Tensor:
        return self.side.U(b)[self.sl]

    def V(self, b: Block) -> Tensor:
        return self.side.V(b)[self.sl]

    def V1(self, b: Block) -> Tensor:
        return self.side.V1(b)[self.sl]

    def tokens(self, b: Block) -> Tensor:
        return self.side.tokens(b)[self.sl]

    def X(self, b: Block, D: Tensor | None) -> Tensor:
        return self.side.X(b, D)[self.sl]


# -- contraction of one block between two chunks -----------------------------------------------
def block_preconditioner(b: Block, D: Mapping[str, Tensor]) -> Tensor:
    """The block's diagonal preconditioner laid out like its materialized gradient ``(m,)``."""
    if b.kind in ("linear", "conv") and b.roles != ("bias",):
        parts = [D[b.names[0]].reshape(b.d_out, -1)]
        if len(b.names) == 2:
            parts.append(D[b.names[1]].reshape(b.d_out, 1))
        return torch.cat(parts, dim=1).reshape(-1)
    return D[b.names[0]].reshape(-1)


def _gram(v1: Tensor, v2: Tensor, ones: bool) -> Tensor:
    """``[v1, 1] [v2, 1]ᵀ`` (``ones``) or ``v1 v2ᵀ``, without forming the column of ones."""
    if ones:
        return torch.addmm(v1.new_ones(()), v1, v2.T)
    return v1 @ v2.T


def contract_block(acc: Tensor, b: Block, s1: Any, s2: Any, route: str, trace: bool,
                   d: Tensor | None) -> None:
    """Add block ``b``'s kernel between chunks ``s1``, ``s2`` (:class:`Side` or row slices) to
    ``acc`` by ``route``; ``d`` is the block's preconditioner (:func:`block_preconditioner`).

    ``acc`` is ``(c1 p, c2 p)`` (row ``i p + a``) or, traced, ``(c1, c2)``.
    """
    c1, c2, p = s1.c, s2.c, s1.p
    if route == "materialize":
        r1, r2 = (c1, c2) if trace else (c1 * p, c2 * p)
        acc.addmm_(s1.X(b, d).reshape(r1, -1), s2.X(b, None).reshape(r2, -1).T)
        return
    u1, u2 = s1.U(b), s2.U(b)
    if route == "hadamard":
        vv = _gram(s1.V(b)[:, 0], s2.V(b)[:, 0], "bias" in b.roles)
        if trace or p == 1:  # (c1, c2) either way
            acc.addcmul_(u1.reshape(c1, -1) @ u2.reshape(c2, -1).T, vv)
        else:
            uu = u1.reshape(c1 * p, -1) @ u2.reshape(c2 * p, -1).T
            acc.view(c1, p, c2, p).addcmul_(uu.view(c1, p, c2, p), vv[:, None, :, None])
        return
    # positional: Σ_{s,t} (δ_is · δ_jt) S[is, jt]
    L1, L2 = u1.shape[2], u2.shape[2]
    if b.kind == "embedding":
        t1, t2 = s1.tokens(b).reshape(-1), s2.tokens(b).reshape(-1)
        S = ((t1[:, None] == t2[None, :]) & (t1[:, None] >= 0)).to(u1.dtype)
        if d is not None:
            u1 = u1 * d.reshape(b.d_in, b.d_out)[s1.tokens(b).clamp(min=0)][:, None]
    else:
        S = _gram(s1.V(b).reshape(c1 * L1, -1), s2.V(b).reshape(c2 * L2, -1),
                  "bias" in b.roles)
    if trace:
        uu = (u1.transpose(1, 2).reshape(c1 * L1, -1) @ u2.transpose(1, 2).reshape(c2 * L2, -1).T)
        acc.add_(uu.mul_(S).view(c1, L1, c2, L2).sum((1, 3)))
        return
    # R[i, (a, o), (j, t)] = Σ_s δ_iaso S[is, jt], then K[ia, jb] = Σ_{o,t} R δ_jbto: the
    # spatial double sum contracted with p·d_out columns, not with (p L)² sensitivity dots.
    # R is formed for a few examples j at a time (positional_columns): each chunk stays in
    # cache for its permutation and second product, and one example needs no permutation.
    o = u1.shape[3]
    a = u1.transpose(2, 3).reshape(c1, p * o, L1)
    w = u2.permute(0, 3, 2, 1).reshape(c2, o * L2, p)
    Sv = S.view(c1, L1, c2, L2)
    out = acc.view(c1 * p, c2, p)
    cj = positional_columns(c1, c2, p, o, L2)
    for j0 in range(0, c2, cj):
        j1 = min(c2, j0 + cj)
        nj = j1 - j0
        R = torch.bmm(a, Sv[:, :, j0:j1].reshape(c1, L1, nj * L2))  # (i, (a, o), (j, t))
        if nj == 1:
            out[:, j0].addmm_(R.view(c1 * p, o * L2), w[j0])
        else:
            Rj = R.view(c1 * p, o, nj, L2).permute(2, 0, 1, 3).reshape(nj, c1 * p, o * L2)
            out[:, j0:j1].add_(torch.bmm(Rj, w[j0:j1]).transpose(0, 1))  # (j, ia, b)


#: floats of one chunk of the positional route's intermediate ``R`` (2 MiB in float32)
POSITIONAL_CHUNK = 1 << 19


def positional_columns(c1: int, c2: int, p: int, d_out: int, L2: int) -> int:
    """Examples ``j`` per chunk of the positional route's ``R`` ``(c1, p d_out, j L2)``: as many
    as fit :data:`POSITIONAL_CHUNK` floats, at least one."""
    return max(1, min(c2, POSITIONAL_CHUNK // max(1, c1 * p * d_out * L2)))
