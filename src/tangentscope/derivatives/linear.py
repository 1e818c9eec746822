"""Dense layers ``z = a Wᵀ + b`` over any middle (position) dimensions.

Per example ``i`` with positions ``l`` (tokens, pixels, repeated calls) the weight gradient is
``G_i = Σ_l δ_il ⊗ a_il`` and the bias gradient ``Σ_l δ_il``. The tensor formulas below take
``a (*S, B, L, d_in)`` and ``δ (*S, B, L, d_out)`` with optional leading *stack* dimensions
``S`` (convolution groups, ensemble members), so that one implementation serves every caller:

* :func:`outer_per_example` — ``(*S, B, d_out, d_in)``;
* :func:`outer_sum` — ``Σ_i G_i``;
* :func:`outer_sq_sum` — ``Σ_i G_i²`` elementwise: ``(δ²)ᵀ(a²)`` for ``L = 1`` (one matmul),
  the pair expansion ``Σ_{l,l'} (δ_l δ_l')ᵀ (a_l a_l')`` over the ``L(L+1)/2`` symmetric pairs
  for small ``L``, else per-example products in cache-sized chunks;
* :func:`bias_sq_sum` — ``Σ_i (Σ_l δ_il)²`` for the bias.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .base import CallSizes, LayerRule, batch_reason, ones_column

__all__ = ["RowInputRule", "LinearRule", "outer_per_example", "outer_sum", "outer_sq_sum",
           "bias_sq_sum"]


def outer_per_example(a: Tensor, d: Tensor) -> Tensor:
    """``G_i = Σ_l δ_il ⊗ a_il``: ``a (*S, B, L, i)``, ``d (*S, B, L, o)`` → ``(*S, B, o, i)``
    (leading dimensions broadcast, e.g. ``a (c, 1, L, i)`` against ``d (c, P, L, o)``)."""
    return d.mT @ a


def outer_sum(a: Tensor, d: Tensor) -> Tensor:
    """``Σ_i G_i``: ``(*S, o, i)``."""
    S = a.shape[:-3]
    return d.reshape(*S, -1, d.shape[-1]).mT @ a.reshape(*S, -1, a.shape[-1])


def outer_sq_sum(a: Tensor, d: Tensor, pair_limit: int = 3, chunk_bytes: int = 2 ** 20
                 ) -> Tensor:
    """``Σ_i G_i²`` elementwise: ``a (*S, B, L, i)``, ``d (*S, B, L, o)`` → ``(*S, o, i)``.

    Args:
        pair_limit: use the pair expansion when ``L(L+1)/2 ≤ pair_limit``.
        chunk_bytes: otherwise materialize per-example products in chunks of this size.
    """
    S, (b, L, n_in), n_out = a.shape[:-3], a.shape[-3:], d.shape[-1]
    if L == 1:
        return d[..., 0, :].square().mT @ a[..., 0, :].square()
    if pair_limit >= L * (L + 1) // 2:
        iu, ju = torch.triu_indices(L, L, device=a.device)
        w = torch.where(iu == ju, 1.0, 2.0).to(a.dtype)
        dd = (d[..., iu, :] * d[..., ju, :]).reshape(*S, -1, n_out)
        aa = (a[..., iu, :] * a[..., ju, :] * w[:, None]).reshape(*S, -1, n_in)
        return dd.mT @ aa
    out = torch.zeros(*S, n_out, n_in, dtype=a.dtype, device=a.device)
    n_stack = max(1, a[..., 0, 0, 0].numel())
    step = max(1, chunk_bytes // max(1, n_stack * n_out * n_in * a.element_size()))
    for s in range(0, b, step):
        g = d[..., s:s + step, :, :].mT @ a[..., s:s + step, :, :]
        out += g.square_().sum(-3)
    return out


def bias_sq_sum(d: Tensor) -> Tensor:
    """``Σ_i (Σ_l δ_il)²`` elementwise: ``d (*S, B, L, o)`` → ``(*S, o)``."""
    return d.sum(-2).square_().sum(-2)


class RowInputRule(LayerRule):
    """The parts shared by rules whose layer input is rows ``a (B, ..., d_in)`` acting on the
    last axis (``F.linear``, ``torch.addmm``): the recorded input, the sizes, the positions."""

    def data(self, bound: Mapping[str, Any]) -> dict[str, Any]:
        return {"a": bound["input"].detach()}

    def sizes(self, data: Mapping[str, Any], z: Tensor) -> CallSizes:
        a = data["a"]
        per = a.numel() // a.shape[0]
        return z.shape[-1], a.shape[-1], per // a.shape[-1], per

    def positions(self, data: Mapping[str, Any], c: int) -> Tensor:
        a = data["a"]
        return a.reshape(c, -1, a.shape[-1])


class LinearRule(RowInputRule):
    """``F.linear`` / ``nn.Linear``: ``z = a Wᵀ + b``, ``a (B, ..., d_in)``; every middle
    dimension is a position."""

    kind = "linear"
    arg_names = ("input", "weight", "bias")
    defaults: ClassVar[Mapping[str, Any]] = {"bias": None}

    def module_call(self, module: nn.Module, x: Tensor) -> dict[str, Any]:
        return {"input": x, "weight": module.weight, "bias": module.bias}

    def reason(self, bound: Mapping[str, Any], batch: int | None) -> str | None:
        return batch_reason(bound["input"], batch, 2)


    def _flat(self, data: Mapping[str, Any], delta: Tensor) -> tuple[Tensor, Tensor]:
        """``a (B, L, i)`` and ``δ (B, L, o)`` (``delta (B, *z.shape[1:])``)."""
        a = data["a"]
        B = a.shape[0]
        return a.reshape(B, -1, a.shape[-1]), delta.reshape(B, -1, delta.shape[-1])

    def per_example(self, data: Mapping[str, Any], delta: Tensor, roles: tuple[str, ...]
                    ) -> Tensor:
        B, P, o = delta.shape[0], delta.shape[1], delta.shape[-1]
        d = delta.reshape(B, P, -1, o)
        if roles == ("bias",):
            return d.sum(2)
        a = self.positions(data, B)
        if "bias" in roles:
            a = ones_column(a)
        return outer_per_example(a[:, None], d).reshape(B, P, -1)

    def grad_sum(self, data: Mapping[str, Any], delta: Tensor, role: str) -> Tensor:
        a, d = self._flat(data, delta)
        if role == "bias":
            return d.sum((0, 1))
        return outer_sum(a, d).reshape(-1)

    def grad_sq_sum(self, data: Mapping[str, Any], delta: Tensor, role: str, *,
                    pair_limit: int = 3, chunk_bytes: int = 2 ** 20) -> Tensor:
        a, d = self._flat(data, delta)
        if role == "bias":
            return bias_sq_sum(d)
        return outer_sq_sum(a, d, pair_limit, chunk_bytes).reshape(-1)
