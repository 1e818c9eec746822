"""Embedding lookups ``z_il = W[tok_il]``.

Example ``i``'s gradient of row ``v`` is ``Σ_{l: tok_il = v} δ_il``: positions that share a
token add *before* squaring. :func:`token_sq_sum` gives ``Σ_i`` of its square without forming
the ``(B, V, d)`` per-example tensor (one ``unique`` over (example, token) keys), with optional
leading stack dimensions (ensemble members). ``padding_idx`` rows get no gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .base import CallSizes, LayerRule, batch_reason

__all__ = ["EmbeddingRule", "token_sum", "token_sq_sum"]


def _stack_offsets(tok: Tensor, size: int) -> Tensor:
    """``tok (*S, B, L)`` → row keys ``s · size + tok`` over the flattened stack dims."""
    S = tok.shape[:-2]
    n = max(1, tok[..., 0, 0].numel())
    off = torch.arange(n, device=tok.device).reshape(*S, 1, 1) * size if S else 0
    return tok + off


def token_sum(tok: Tensor, d: Tensor, vocab: int) -> Tensor:
    """``Σ_i`` per-row gradients: ``tok (*S, B, L)`` (no ``-1``), ``d (*S, B, L, o)`` →
    ``(*S, vocab, o)``."""
    S, o = tok.shape[:-2], d.shape[-1]
    n = max(1, tok[..., 0, 0].numel())
    out = torch.zeros(n * vocab, o, dtype=d.dtype, device=d.device)
    out.index_add_(0, _stack_offsets(tok, vocab).reshape(-1), d.reshape(-1, o))
    return out.view(*S, vocab, o)


def token_sq_sum(tok: Tensor, d: Tensor, vocab: int) -> Tensor:
    """``Σ_i (Σ_{l: tok_il = v} δ_il)²`` elementwise: ``tok (*S, B, L)`` (no ``-1``),
    ``d (*S, B, L, o)`` → ``(*S, vocab, o)``."""
    S, (B, L), o = tok.shape[:-2], tok.shape[-2:], d.shape[-1]
    n = max(1, tok[..., 0, 0].numel())
    out = torch.zeros(n * vocab, o, dtype=d.dtype, device=d.device)
    flat = d.reshape(-1, o)
    rows = _stack_offsets(tok, vocab)
    if L == 1:
        return out.index_add_(0, rows.reshape(-1), flat * flat).view(*S, vocab, o)
    ex = torch.arange(B, device=tok.device)[:, None]  # one key per (stack, example, token)
    keys = (rows // vocab * B + ex) * vocab + rows % vocab
    uniq, inv = torch.unique(keys.reshape(-1), return_inverse=True)
    seg = torch.zeros(uniq.shape[0], o, dtype=d.dtype, device=d.device).index_add_(0, inv, flat)
    row = uniq // (B * vocab) * vocab + uniq % vocab
    return out.index_add_(0, row, seg.square_()).view(*S, vocab, o)


class EmbeddingRule(LayerRule):
    """``F.embedding`` / ``nn.Embedding`` (not ``max_norm`` / ``scale_grad_by_freq``; for the
    statistics not ``sparse``)."""

    kind = "embedding"
    roles = ("weight",)
    arg_names = ("input", "weight", "padding_idx", "max_norm", "norm_type",
                 "scale_grad_by_freq", "sparse")
    defaults: ClassVar[Mapping[str, Any]] = {"padding_idx": None, "max_norm": None,
                                             "scale_grad_by_freq": False, "sparse": False}

    def module_call(self, module: nn.Module, x: Tensor) -> dict[str, Any]:
        return {"input": x, "weight": module.weight, "padding_idx": module.padding_idx,
                "max_norm": module.max_norm, "scale_grad_by_freq": module.scale_grad_by_freq,
                "sparse": module.sparse}

    def module_reason(self, module: nn.Module) -> str | None:
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            return (f"Embedding(max_norm={module.max_norm}, scale_grad_by_freq="
                    f"{module.scale_grad_by_freq}, sparse={module.sparse}) is not supported "
                    "(sparse gradients and in-forward renormalization have no per-example "
                    "closed form); use a plain nn.Embedding")
        return None

    def reason(self, bound: Mapping[str, Any], batch: int | None) -> str | None:
        if bound["max_norm"] is not None:
            return "max_norm renormalizes the weight inside forward"
        if bound["scale_grad_by_freq"]:
            return "scale_grad_by_freq makes its gradient depend on the whole batch"
        return batch_reason(bound["input"], batch, 1)

    def data(self, bound: Mapping[str, Any]) -> dict[str, Any]:
        pad, vocab = bound["padding_idx"], bound["weight"].shape[0]
        if pad is not None and pad < 0:
            pad += vocab
        return {"tokens": bound["input"].detach(), "padding_idx": pad, "vocab": vocab}

    def sizes(self, data: Mapping[str, Any], z: Tensor) -> CallSizes:
        t = data["tokens"]
        n = t.numel() // t.shape[0]
        return z.shape[-1], 0, n, n

    def positions(self, data: Mapping[str, Any], c: int) -> Tensor:
        t = data["tokens"].reshape(c, -1).long()
        pad = data["padding_idx"]
        return t if pad is None else t.masked_fill(t == pad, -1)

    def _masked(self, data: Mapping[str, Any], delta: Tensor) -> tuple[Tensor, Tensor]:
        """Ids ``(B, L)`` (padding → row 0) and ``δ (B, L, o)`` zeroed at padding."""
        B = delta.shape[0]
        tok = self.positions(data, B)
        d = delta.reshape(B, tok.shape[1], -1)
        if data["padding_idx"] is not None:
            d = d * (tok >= 0).unsqueeze(-1).to(d.dtype)
        return tok.clamp(min=0), d

    def per_example(self, data: Mapping[str, Any], delta: Tensor, roles: tuple[str, ...]
                    ) -> Tensor:
        B, P, o = delta.shape[0], delta.shape[1], delta.shape[-1]
        V = data["vocab"]
        tok = self.positions(data, B)
        u = delta.reshape(B, P, tok.shape[1], o)
        if data["padding_idx"] is not None:
            u = u * (tok >= 0)[:, None, :, None]
        idx = tok.clamp(min=0)[:, :, None, None].expand(-1, -1, P, o)
        g = u.new_zeros(B, V, P, o).scatter_add_(1, idx, u.permute(0, 2, 1, 3))
        return g.permute(0, 2, 1, 3).reshape(B, P, V * o)

    def grad_sum(self, data: Mapping[str, Any], delta: Tensor, role: str) -> Tensor:
        tok, d = self._masked(data, delta)
        return token_sum(tok, d, data["vocab"]).reshape(-1)

    def grad_sq_sum(self, data: Mapping[str, Any], delta: Tensor, role: str, *,
                    pair_limit: int = 3, chunk_bytes: int = 2 ** 20) -> Tensor:
        tok, d = self._masked(data, delta)
        return token_sq_sum(tok, d, data["vocab"]).reshape(-1)
