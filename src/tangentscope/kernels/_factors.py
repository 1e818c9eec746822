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
from typing import Any

import torch
from torch import Tensor

from ._capture import Recording, sensitivities

__all__ = ["Block", "Side", "contract_block", "block_preconditioner"]


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


# -- one chunk of inputs ----------------------------------------------------------------------
class Side:
    """Recorded inputs ``a`` and sensitivities ``δ`` of one chunk, with cached factors."""

    def __init__(self, rec: Recording, p: int):
        self.c, self.p = rec.out.shape[0], p
        self.out = rec.out.detach()
        self.differentiable = bool(rec.out.requires_grad)
        self.calls = rec.calls
        self.delta = sensitivities(rec, p)
        self.cache: dict[Any, Tensor] = {}

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
    else:
        uu = u1.reshape(c1 * p * L1, -1) @ u2.reshape(c2 * p * L2, -1).T
        uu = uu.view(c1, p, L1, c2, p, L2).mul_(S.view(c1, 1, L1, c2, 1, L2))
        acc.add_(uu.sum((2, 5)).reshape(c1 * p, c2 * p))
