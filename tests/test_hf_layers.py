"""Exact statistics and the structured eNTK on Hugging Face transformer layers (GPT-2's
``Conv1D``, ``LlamaRMSNorm``, training-mode BERT), against float64 brute force (one autograd
call per example); tiny models built from configs, nothing downloaded."""

from __future__ import annotations

import copy
import importlib
import sys
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

pytest.importorskip("transformers")

from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.pytorch_utils import Conv1D

import tangentscope as ts
from doc_examples import run_example
from tangentscope import UnsupportedModelError
from tangentscope.derivatives import (
    AddmmRule,
    HFRMSNormRule,
    register_rule,
    registered_modules,
    rule_for_module,
)
from tangentscope.kernels import structured as S
from tangentscope.optim import PerExampleStats
from test_optim_helpers import brute_sums, one_thread  # noqa: F401
from zoo import brute_force_entk

pytestmark = pytest.mark.usefixtures("one_thread")
V = 11
TOK: dict[str, Any] = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None,
                       "attn_implementation": "eager"}


def _cfg(cls: Any, **kw: Any) -> Any:
    return cls(**kw, **TOK)


def gpt2() -> nn.Module:
    return GPT2LMHeadModel(_cfg(GPT2Config, vocab_size=V, n_positions=8, n_embd=16, n_layer=2,
                                n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))


def llama() -> nn.Module:
    return LlamaForCausalLM(_cfg(LlamaConfig, vocab_size=V, hidden_size=16,
                                 intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1,
                                 max_position_embeddings=8))


def bert() -> nn.Module:
    return BertForSequenceClassification(_cfg(
        BertConfig, vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=8, num_labels=3, hidden_dropout_prob=0,
        attention_probs_dropout_prob=0))


class Logits(nn.Module):
    """``ids (b, L) -> logits`` (``last``: the last position's only)."""

    def __init__(self, hf: nn.Module, last: bool = False):
        super().__init__()
        self.hf: Any = hf
        self.last = last

    def forward(self, ids):
        out = self.hf(input_ids=ids).logits
        return out[:, -1] if self.last else out


def lm_loss(out, ids):                       # per example: the sequence's summed next-token CE
    b, _, v = out.shape
    ce = F.cross_entropy(out[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1), reduction="none")
    return ce.view(b, -1).sum(1).mean()


def cls_loss(out, y):
    return F.cross_entropy(out, y)


CASES = {"gpt2": (gpt2, lm_loss), "llama": (llama, lm_loss), "bert": (bert, cls_loss)}


def _data(name, b=5, L=6):
    ids = torch.randint(0, V, (b, L))
    return ids, ids if CASES[name][1] is lm_loss else torch.randint(0, 3, (b,))


def _hooked(model, loss_fn, x, y):
    stats = PerExampleStats(model)
    model.zero_grad()
    loss_fn(model(x), y).backward()
    got = stats.collect()
    stats.remove()
    return got


@pytest.mark.parametrize("name", list(CASES))
def test_per_example_sums_match_brute_force_in_float64(name):
    """Σ c_i and Σ c_i² of every parameter (GPT-2's Conv1D and tied head, Llama's RMSNorm,
    BERT in training mode) equal the per-example autograd loop: relative 1e-10, with an
    absolute floor of 1e-12 of the model's largest sum for sums that vanish analytically."""
    torch.manual_seed(0)
    build, loss_fn = CASES[name]
    model: Any = Logits(build()).double().train()
    ids, y = _data(name)
    ref = brute_sums(model, loss_fn, ids, y)
    got = _hooked(model, loss_fn, ids, y)
    top = max(float(s.abs().max()) for pair in ref.values() for s in pair)
    for n, p in model.named_parameters():
        m, (s1, s2) = got[id(p)], ref[n]
        assert m.count == 5, n
        for a, b, what in ((m.grad_sum, s1, "S1"), (m.grad_sq_sum, s2, "S2")):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * top, msg=f"{n} {what}")
    if name == "bert":    # the key bias' gradient vanishes analytically (softmax shift)
        kb = model.hf.bert.encoder.layer[0].attention.self.key.bias
        assert float(ref["hf.bert.encoder.layer.0.attention.self.key.bias"][0].abs().max()) \
            < 1e-14 * top
        assert id(kb) in got


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_validation_follows_the_compute_dtype_under_autocast(name, dtype):
    """float32 parameters, bf16/fp16 autocast, training mode: the first-step validation passes
    (the tolerance is the compute dtype's, with a floor for BERT's vanishing key bias) and the
    sums are those of the float64 per-example loop up to that rounding (relative norm error
    < 0.1)."""
    torch.manual_seed(1)
    build, loss_fn = CASES[name]
    model = Logits(build()).float().train()
    ids, y = _data(name, b=6)
    ref = brute_sums(copy.deepcopy(model).double(), loss_fn, ids, y)
    stats = PerExampleStats(model)
    with torch.autocast("cpu", dtype=dtype):
        loss = loss_fn(model(ids), y)
    loss.backward()                                       # validates: must not raise
    got = stats.collect()
    stats.remove()
    s1 = torch.cat([got[id(p)].grad_sum.double().reshape(-1) for p in model.parameters()])
    s2 = torch.cat([got[id(p)].grad_sq_sum.double().reshape(-1) for p in model.parameters()])
    r1 = torch.cat([ref[n][0].reshape(-1) for n, _ in model.named_parameters()])
    r2 = torch.cat([ref[n][1].reshape(-1) for n, _ in model.named_parameters()])
    assert float((s1 - r1).norm() / r1.norm()) < 0.1
    assert float((s2 - r2).norm() / r2.norm()) < 0.1


def test_validation_names_the_right_cause_on_bert():
    """A 1% rescaling hook is a rounding-size mismatch (no "tied head" blamed); a weight used
    outside its module (a second head through F.linear) is named as such."""
    torch.manual_seed(2)
    model: Any = Logits(bert()).train()
    ids, y = _data("bert")
    w = model.hf.classifier.weight
    h = w.register_hook(lambda g: g * 1.01)
    stats = PerExampleStats(model)
    with pytest.raises(UnsupportedModelError, match="rounding tolerance") as e:
        cls_loss(model(ids), y).backward()
    assert "tied head" not in str(e.value)
    h.remove()
    stats.remove()

    class ExtraHead(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m: Any = m

        def forward(self, ids):
            h = self.m.hf.bert(input_ids=ids).pooler_output
            return self.m.hf.classifier(h) + F.linear(h, self.m.hf.classifier.weight)

    outside = ExtraHead(model)
    stats = PerExampleStats(outside)
    model.zero_grad()
    with pytest.raises(UnsupportedModelError, match="outside the modules"):
        cls_loss(outside(ids), y).backward()
    stats.remove()


def test_structured_entk_factors_conv1d_exactly():
    """GPT-2's Conv1D calls (torch.addmm on flattened rows) are factored by the structured eNTK:
    equal to the brute-force kernel in float64 (relative 1e-10), with a preconditioner too. The
    position table (indexed without the batch) is frozen here: the structured plan cannot
    follow it, and "auto" would take the Jacobian path."""
    torch.manual_seed(3)
    model: Any = Logits(gpt2(), last=True).double().eval()
    model.hf.transformer.wpe.weight.requires_grad_(False)
    x1, x2 = torch.randint(0, V, (3, 5)), torch.randint(0, V, (2, 5))
    plan = S.structured_plan(model, x1)
    conv = [b for b in plan.blocks if b.kind == "addmm"]
    assert len(conv) == 16 and plan.coverage > 0.8          # 2 layers x 4 Conv1D x (W, b)
    params = [p for p in model.parameters() if p.requires_grad]
    d = torch.cat([torch.rand_like(p).reshape(-1) for p in params])
    for D in (None, d):
        K = ts.entk(model, x1, x2, implementation="structured", precondition=D)
        ref = brute_force_entk(model, x1, x2, D)
        torch.testing.assert_close(K, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()))


def test_sequence_first_rows_are_not_grouped_as_examples():
    """An addmm over rows flattened from a (L, B, d) tensor is not batch-major: the rule refuses
    it (the generic path takes the weight) instead of grouping rows by the wrong example."""

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = Conv1D(3, 4)

        def forward(self, x):                               # (B, L, 4)
            h = x.transpose(0, 1).contiguous()              # (L, B, 4)
            z = self.proj(h)                                 # addmm on (L B, 4)
            return z.transpose(0, 1).reshape(x.shape[0], -1)

    torch.manual_seed(4)
    model = SeqFirst().double()
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    plan = S.structured_plan(model, x)
    assert "proj.weight" in plan.generic
    torch.testing.assert_close(ts.entk(model, x), brute_force_entk(model, x), rtol=1e-10,
                               atol=1e-12)


def test_hf_rules_are_lazy_and_a_users_rule_wins():
    """A Hugging Face class is registered once its module is imported (tangentscope never
    imports transformers: tests/test_integrations_monitor.py), and a user's rule for it wins."""
    qwen = "transformers.models.qwen2.modeling_qwen2"
    if qwen not in sys.modules:
        assert "Qwen2RMSNorm" not in {c.__name__ for c in registered_modules()}
    mod = importlib.import_module(qwen)
    assert isinstance(rule_for_module(mod.Qwen2RMSNorm(4)), HFRMSNormRule)
    assert isinstance(rule_for_module(Conv1D(3, 4)), AddmmRule)
    assert isinstance(rule_for_module(LlamaRMSNorm(4)), HFRMSNormRule)

    class Mine(HFRMSNormRule):
        pass

    try:
        register_rule(LlamaRMSNorm, Mine())
        assert isinstance(rule_for_module(LlamaRMSNorm(4)), Mine)
    finally:
        register_rule(LlamaRMSNorm, HFRMSNormRule())


def test_documented_user_rule_example():
    """docs/integrations.md's register_rule example runs as written, and its rule is exact."""
    ns = run_example("register-rule")
    cls = ns["OffsetRMSNorm"]
    try:
        model = copy.deepcopy(ns["model"]).double()
        tok, y = ns["tok"], ns["y"]

        def loss_fn(out, t):
            return F.cross_entropy(out.flatten(0, 1), t.flatten())

        ref = brute_sums(model, loss_fn, tok, y)
        got = _hooked(model, loss_fn, tok, y)
        for n, p in model.named_parameters():
            for a, b in zip((got[id(p)].grad_sum, got[id(p)].grad_sq_sum), ref[n]):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    finally:
        register_rule(cls, None)
    with pytest.raises(UnsupportedModelError, match="register_rule"):
        PerExampleStats(ns["model"])
