"""Dense layers with the weight stored ``(d_in, d_out)``: ``z = b + a W`` by ``torch.addmm``
(Hugging Face GPT-2's ``Conv1D``).

The math is that of :mod:`.linear` with ``W`` transposed: per example ``i`` the weight gradient
is ``Σ_l a_il ⊗ δ_il`` (shape ``(d_in, d_out)``) and the bias gradient ``Σ_l δ_il``.

``torch.addmm`` takes a 2-d ``mat1``, so a layer applied to ``(B, L, d_in)`` flattens it to
``(B L, d_in)`` first (``x.view(-1, d_in)``). The rule groups the rows back into examples by
the tensor ``mat1`` is a view of (its ``_base``): rows are grouped by that tensor's first
dimension only when ``mat1`` covers it exactly and each index of that dimension is one
consecutive block of memory (:func:`group_rows`). A sequence-first layout (``(L, B, d)``
flattened) then groups by ``L``, which the batch check refuses — the structured eNTK takes the
generic path for those parameters rather than guess.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .base import batch_reason
from .linear import RowInputRule, bias_sq_sum, outer_per_example, outer_sq_sum, outer_sum

__all__ = ["AddmmRule", "group_rows"]


def group_rows(m: Tensor) -> Tensor:
    """``mat1 (R, d)`` as ``(B, R/B, d)`` when its rows are the flattening of a tensor ``(B, ...)``
    (its view base) whose examples are consecutive blocks of memory that ``mat1`` covers
    exactly; otherwise ``m`` itself (one row per example)."""
    base = m._base
    if base is None or m.dim() != 2 or base.dim() < 2 or not m.is_contiguous():
        return m
    B, s0, d = base.shape[0], base.stride(0), m.shape[1]
    inner = sum(st * (n - 1) for st, n in zip(base.stride()[1:], base.shape[1:]))
    if (base.numel() != m.numel() or base.data_ptr() != m.data_ptr() or B * s0 != m.numel()
            or inner >= s0 or s0 % d):
        return m
    return m.reshape(B, -1, d)


class AddmmRule(RowInputRule):
    """``torch.addmm(bias, a, W)`` / HF ``Conv1D``: ``z = a W + b`` with ``W (d_in, d_out)``.

    Kind ``"addmm"``: the structured eNTK contracts materialized per-example gradients (laid out
    like the parameters, so a diagonal preconditioner applies as is). ``beta``/``alpha`` other
    than 1 and a 2-d bias are refused (the generic path takes them).
    """

    kind = "addmm"
    arg_names = ("bias", "mat1", "weight")
    defaults: ClassVar[Mapping[str, Any]] = {"beta": 1, "alpha": 1}

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        kw = dict(kwargs)
        for ours, torchs in (("bias", "input"), ("weight", "mat2")):
            if torchs in kw:
                kw[ours] = kw.pop(torchs)
        out = super().bind(args, kw)
        m = out.get("mat1")
        if isinstance(m, Tensor):
            out["input"] = group_rows(m)
        return out

    def module_call(self, module: nn.Module, x: Tensor) -> dict[str, Any]:
        return {"input": x, "weight": module.weight, "bias": module.bias, "beta": 1, "alpha": 1}

    def reason(self, bound: Mapping[str, Any], batch: int | None) -> str | None:
        if bound.get("beta", 1) != 1 or bound.get("alpha", 1) != 1:
            return "it scales addmm's terms (beta/alpha other than 1)"
        b = bound.get("bias")
        if isinstance(b, Tensor) and b.dim() != 1:
            return f"its added term has shape {tuple(b.shape)} (not a bias vector)"
        x = bound.get("input")
        if not isinstance(x, Tensor):
            return "it has no input matrix"
        return batch_reason(x, batch, 2)


    def _rows(self, data: Mapping[str, Any], delta: Tensor) -> Tensor:
        """``δ (B, *z.shape[1:])`` of the module, or ``(B L, d_out)`` of the flattened call,
        as ``(B, L, d_out)``."""
        return delta.reshape(data["a"].shape[0], -1, delta.shape[-1])

    def per_example(self, data: Mapping[str, Any], delta: Tensor, roles: tuple[str, ...]
                    ) -> Tensor:
        B, o = data["a"].shape[0], delta.shape[-1]
        if delta.shape[0] != B:  # (B L, P, o) of the flattened call, batch-major rows
            d = delta.reshape(B, -1, delta.shape[1], o).transpose(1, 2)
        else:                    # (B, P, ..., o)
            d = delta.reshape(B, delta.shape[1], -1, o)
        P = d.shape[1]
        parts = []
        if "weight" in roles:
            g = outer_per_example(self.positions(data, B)[:, None], d)   # (B, P, o, i)
            parts.append(g.transpose(-1, -2).reshape(B, P, -1))         # W's (i, o) layout
        if "bias" in roles:
            parts.append(d.sum(2))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def grad_sum(self, data: Mapping[str, Any], delta: Tensor, role: str) -> Tensor:
        d = self._rows(data, delta)
        if role == "bias":
            return d.sum((0, 1))
        return outer_sum(self.positions(data, d.shape[0]), d).mT.reshape(-1)

    def grad_sq_sum(self, data: Mapping[str, Any], delta: Tensor, role: str, *,
                    pair_limit: int = 3, chunk_bytes: int = 2 ** 20) -> Tensor:
        d = self._rows(data, delta)
        if role == "bias":
            return bias_sq_sum(d)
        a = self.positions(data, d.shape[0])
        return outer_sq_sum(a, d, pair_limit, chunk_bytes).mT.reshape(-1)
