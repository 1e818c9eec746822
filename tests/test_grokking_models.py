"""Stacked ensembles of the grokking experiment against separate models (float64), and the
closed-form per-example squared-gradient sums against a per-example autograd loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tangentscope import ShapeError, TangentscopeError
from tangentscope.experiments.grokking import StackedEnsemble
from tangentscope.models.embedding_mlp import EmbeddingMLP, EmbeddingMLPEnsemble
from tangentscope.models.transformer import TinyTransformer


def _members(E=3, vocab=7, depth=2, n_tokens=2):
    out = []
    for s in range(E):
        torch.manual_seed(s)
        out.append(EmbeddingMLP(vocab, d_embed=4, width=5, depth=depth,
                                n_tokens=n_tokens).double())
    return out


def _ce(logits_bec, y_be):
    return F.cross_entropy(logits_bec.permute(0, 2, 1), y_be, reduction="none").mean(0).sum()


_NAMES = {"embed": "embed.weight", "weights.0": "mlp.0.weight", "biases.0": "mlp.0.bias",
          "weights.1": "mlp.2.weight", "biases.1": "mlp.2.bias", "weights.2": "mlp.4.weight",
          "biases.2": "mlp.4.bias"}


def test_embedding_mlp_ensemble_equals_separate_models_outputs_and_grads():
    ms = _members()
    ens = EmbeddingMLPEnsemble.from_models(ms)
    x = torch.randint(7, (9, 3, 2))
    y = torch.randint(7, (9, 3))
    out = ens(x)
    _ce(out, y).backward()
    for e, m in enumerate(ms):
        torch.testing.assert_close(out[:, e], m(x[:, e]), rtol=1e-12, atol=1e-12)
        F.cross_entropy(m(x[:, e]), y[:, e]).backward()
        for k, v in _NAMES.items():
            got = dict(ens.named_parameters())[k].grad[e]
            torch.testing.assert_close(got, dict(m.named_parameters())[v].grad, rtol=1e-10,
                                       atol=1e-12)
        back = ens.member(e)
        torch.testing.assert_close(back(x[:, e]), m(x[:, e]), rtol=0, atol=0)


@pytest.mark.parametrize("n_tokens", [2, 3])
def test_grad_sq_sums_match_per_example_autograd(n_tokens):
    ms = _members(n_tokens=n_tokens)
    ens = EmbeddingMLPEnsemble.from_models(ms)
    ens.capture = True
    B = 8
    x = torch.randint(7, (B, 3, n_tokens))
    x[0, :, 1] = x[0, :, 0]  # repeated tokens: their gradients add before squaring
    x[1, :, :] = 3
    y = torch.randint(7, (B, 3))
    _ce(ens(x), y).backward()
    S2 = ens.grad_sq_sums()
    for e, m in enumerate(ms):
        brute = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
        for i in range(B):  # c_i = ∇ℓ_i / B, squared and summed
            m.zero_grad()
            (F.cross_entropy(m(x[i:i + 1, e]), y[i:i + 1, e]) / B).backward()
            for n, p in m.named_parameters():
                brute[n] += p.grad ** 2
        for k, v in _NAMES.items():
            torch.testing.assert_close(S2[k][e], brute[v], rtol=1e-10, atol=1e-16)


def test_grad_sq_sums_needs_a_captured_backward_and_shapes_are_checked():
    ens = EmbeddingMLPEnsemble.from_models(_members())
    with pytest.raises(TangentscopeError, match="capture = True"):
        ens.grad_sq_sums()
    with pytest.raises(ShapeError, match=r"\(batch, 3, 2\)"):
        ens(torch.randint(7, (4, 2, 2)))
    with pytest.raises(ShapeError, match="integer tokens"):
        EmbeddingMLP(7)(torch.zeros(4, 2))


def test_stacked_transformer_ensemble_equals_separate_models():
    ms = []
    for s in range(2):
        torch.manual_seed(s)
        ms.append(TinyTransformer(9, 7, d_model=8, n_heads=2, n_layers=1, d_mlp=16,
                                  max_len=4).double())
    ens = StackedEnsemble(ms)
    x = torch.randint(9, (5, 2, 4))
    y = torch.randint(7, (5, 2))
    out = ens(x)
    _ce(out, y).backward()
    grads = dict(zip(ens._names, (p.grad for p in ens.stacked)))
    for e, m in enumerate(ms):
        torch.testing.assert_close(out[:, e], m(x[:, e]), rtol=1e-12, atol=1e-12)
        F.cross_entropy(m(x[:, e]), y[:, e]).backward()
        for n, p in m.named_parameters():
            torch.testing.assert_close(grads[n][e], p.grad, rtol=1e-10, atol=1e-12)
