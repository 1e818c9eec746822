"""A small transformer built from plain layers (Embedding, Linear, LayerNorm).

Attention is written out (no fused kernels) so every eNTK implementation, the structured one
included, and per-example gradient statistics see ordinary layers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["TinyTransformer"]


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_mlp: int, causal: bool):
        super().__init__()
        self.n_heads, self.causal = n_heads, causal
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_mlp)
        self.fc2 = nn.Linear(d_mlp, d_model)

    def forward(self, h: Tensor) -> Tensor:
        B, L, d = h.shape
        hd = d // self.n_heads
        q, k, v = self.qkv(self.ln1(h)).split(d, dim=-1)
        q, k, v = (t.reshape(B, L, self.n_heads, hd).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        if self.causal:
            mask = torch.ones(L, L, dtype=torch.bool, device=h.device).triu(1)
            att = att.masked_fill(mask, float("-inf"))
        z = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, L, d)
        h = h + self.proj(z)
        return h + self.fc2(torch.relu(self.fc1(self.ln2(h))))


class TinyTransformer(nn.Module):
    """Token sequence ``(B, L)`` → logits ``(B, n_out)`` read at the last position.

    Args:
        vocab: vocabulary size.
        n_out: output size (default ``vocab``).
        d_model, n_heads, n_layers, d_mlp: the usual sizes.
        max_len: longest sequence.
        causal: causal attention mask.
    """

    def __init__(self, vocab: int, n_out: int | None = None, *, d_model: int = 128,
                 n_heads: int = 4, n_layers: int = 2, d_mlp: int = 512, max_len: int = 8,
                 causal: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, d_mlp, causal)
                                    for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_out or vocab)
        self.max_len = max_len

    def forward(self, tokens: Tensor) -> Tensor:
        L = tokens.shape[1]
        if self.max_len < L:
            raise ConfigError(f"sequence length {L} exceeds max_len={self.max_len}")
        h = self.tok(tokens) + self.pos(torch.arange(L, device=tokens.device))
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h[:, -1]))
