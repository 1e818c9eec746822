"""An MLP over learned token embeddings — the small grokking model for ``(a ∘ b) mod p``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..derivatives import bias_sq_sum, outer_sq_sum, token_sq_sum
from ..errors import ConfigError, ShapeError, TangentscopeError
from .mlp import mlp

__all__ = ["EmbeddingMLP", "EmbeddingMLPEnsemble"]


class EmbeddingMLP(nn.Module):
    """Token tuple ``(B, n_tokens)`` → logits ``(B, n_out)``.

    Each token is looked up in one shared ``nn.Embedding(vocab, d_embed)``; the ``n_tokens``
    embeddings are concatenated (so the model can tell ``a`` from ``b``) and fed to
    :func:`~tangentscope.models.mlp` with ``depth`` hidden layers of ``width``. Plain
    ``Embedding``/``Linear`` layers only, so every eNTK implementation and per-example gradient
    statistics see ordinary layers.

    Args:
        vocab: number of distinct tokens (``p`` for ``(a ∘ b) mod p``).
        n_out: number of classes (default ``vocab``).
        d_embed: embedding size per token.
        width: hidden width.
        depth: hidden layers (≥ 1).
        n_tokens: tokens per example (2 for ``a, b``).
        activation: hidden activation (see :func:`~tangentscope.models.mlp`).

    Raises:
        ConfigError: non-positive sizes.
    """

    def __init__(self, vocab: int, n_out: int | None = None, *, d_embed: int = 128,
                 width: int = 256, depth: int = 1, n_tokens: int = 2,
                 activation: str = "relu"):
        super().__init__()
        for name, v in (("vocab", vocab), ("d_embed", d_embed), ("n_tokens", n_tokens)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"EmbeddingMLP: {name} must be a positive integer, got {v!r}")
        self.vocab, self.n_tokens = vocab, n_tokens
        self.embed = nn.Embedding(vocab, d_embed)
        self.mlp = mlp(n_tokens * d_embed, width, depth, n_out or vocab, activation=activation)

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 2 or tokens.shape[1] != self.n_tokens:
            raise ShapeError(f"EmbeddingMLP expects tokens of shape (batch, {self.n_tokens}), "
                             f"got {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ShapeError(f"EmbeddingMLP expects integer tokens, got {tokens.dtype}; "
                             "pass a LongTensor of token ids in [0, vocab)")
        return self.mlp(self.embed(tokens).flatten(1))


class EmbeddingMLPEnsemble(nn.Module):
    """``E`` independent :class:`EmbeddingMLP` members trained as one module (batched matmuls).

    Every parameter carries a leading member axis ``E``; member ``e`` only ever sees its own
    slice, so the gradient of ``Σ_e loss_e`` on member ``e``'s slice is exactly member ``e``'s
    gradient, and any elementwise optimizer (AdamW, Grokfast, per-coordinate gates) run on the
    stacked tensors runs ``E`` independent trainings at once.

    Inputs and outputs are batch-first so that per-example code can slice examples on dim 0:
    tokens ``(B, E, n_tokens)`` → logits ``(B, E, n_out)``.

    Build it from ``E`` single models with :meth:`from_models` (so each member's initialization
    equals that of a single model built with the same seed) and read a member back with
    :meth:`member`.
    """

    def __init__(self, models: list[EmbeddingMLP]):
        super().__init__()
        if not models:
            raise ConfigError("EmbeddingMLPEnsemble needs at least one member")
        m0 = models[0]
        self.vocab, self.n_tokens, self.n_members = m0.vocab, m0.n_tokens, len(models)
        self._template = [m0]  # a list hides it from nn.Module (no parameters registered)
        self.embed = nn.Parameter(torch.stack([m.embed.weight.detach() for m in models]).clone())
        linears = [[l for l in m.mlp if isinstance(l, nn.Linear)] for m in models]
        self.acts = [l for l in m0.mlp if not isinstance(l, nn.Linear)]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([ls[i].weight.detach() for ls in linears]).clone())
            for i in range(len(linears[0])))
        self.biases = nn.ParameterList(
            nn.Parameter(torch.stack([ls[i].bias.detach() for ls in linears]).clone())
            for i in range(len(linears[0])))
        self.capture = False  # record what grad_sq_sums() needs during forward/backward
        self._capture: dict[str, Tensor] = {}

    @classmethod
    def from_models(cls, models: list[EmbeddingMLP]) -> EmbeddingMLPEnsemble:
        """Stack ``models`` (identical architectures) into an ensemble (copies the weights)."""
        return cls(list(models))

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 3 or tokens.shape[1:] != (self.n_members, self.n_tokens):
            raise ShapeError(f"EmbeddingMLPEnsemble expects tokens (batch, {self.n_members}, "
                             f"{self.n_tokens}), got {tuple(tokens.shape)}")
        tok = tokens.transpose(0, 1)  # (E, B, T)
        rows = torch.arange(self.n_members, device=tok.device)[:, None, None]
        emb = self.embed[rows, tok]  # (E, B, T, d)
        cap = self._capture if self.capture and torch.is_grad_enabled() else None
        if cap is not None:
            cap.clear()
            cap["tokens"] = tok
            emb.register_hook(lambda d: cap.__setitem__("d_embed", d))
        h = emb.flatten(2)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            a = h
            h = torch.baddbmm(b[:, None, :], a, w.transpose(1, 2))
            if cap is not None:
                cap[f"a{i}"] = a.detach()
                h.register_hook(lambda d, i=i: cap.__setitem__(f"d{i}", d))
            if i < len(self.acts):
                h = self.acts[i](h)
        return h.transpose(0, 1)

    @torch.no_grad()
    def grad_sq_sums(self) -> dict[str, Tensor]:
        """``S2 = Σ_i c_i²`` per parameter (elementwise) from the last captured backward.

        ``c_i`` is example ``i``'s contribution to ``p.grad`` (``∇ℓ_i / B`` for a loss that is a
        mean over the batch, summed over members), computed in closed form from each layer's
        inputs ``a`` and output gradients ``δ`` by the derivative formulas of
        :mod:`tangentscope.derivatives` with the members as a stack dimension: ``(δ²)ᵀ(a²)``
        for weights, ``Σ_i δ_i²`` for biases, and for the embedding table the per-example row
        sums ``(Σ_{t: tok_it = r} δ_it)²`` (positions sharing a token are summed before
        squaring). Set ``capture = True`` before the forward pass.

        Returns:
            ``name → (E, *shape)`` tensors keyed like :meth:`named_parameters`.

        Raises:
            TangentscopeError: no captured forward/backward (``capture`` was off, or
                ``backward()`` has not run).
        """
        cap = self._capture
        if "d_embed" not in cap or any(f"d{i}" not in cap for i in range(len(self.weights))):
            raise TangentscopeError("EmbeddingMLPEnsemble.grad_sq_sums: nothing captured; set "
                                    "model.capture = True, then run forward and backward")
        out: dict[str, Tensor] = {}
        for i in range(len(self.weights)):  # members are a stack dimension, one position each
            a, d = cap[f"a{i}"].unsqueeze(2), cap[f"d{i}"].unsqueeze(2)  # (E, B, 1, features)
            out[f"weights.{i}"] = outer_sq_sum(a, d)
            out[f"biases.{i}"] = bias_sq_sum(d)
        out["embed"] = token_sq_sum(cap["tokens"], cap["d_embed"], self.vocab)
        return out

    @torch.no_grad()
    def member(self, e: int) -> EmbeddingMLP:
        """A standalone copy of member ``e`` (an :class:`EmbeddingMLP`)."""
        import copy

        m = copy.deepcopy(self._template[0])
        m.embed.weight.copy_(self.embed[e])
        for lin, w, b in zip([l for l in m.mlp if isinstance(l, nn.Linear)], self.weights,
                             self.biases):
            lin.weight.copy_(w[e])
            lin.bias.copy_(b[e])
        return m.to(self.embed.device)
