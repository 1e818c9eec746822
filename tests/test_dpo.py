"""DPO losses, the synthetic preference task and the exact policy metrics, against brute force.

Everything here is torch-only except the tiny GPT-2 (transformers, built from a config).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tangentscope import ConfigError, KernelTooLargeError
from tangentscope.data import preference_metrics as M
from tangentscope.data import preferences as T
from tangentscope.integrations import hf as H
from tangentscope.losses import preference as L

pytest.importorskip("transformers")


# -- losses ------------------------------------------------------------------------------------
DELTA = torch.linspace(-6, 6, 25, dtype=torch.float64)


def _lp(x):  # log σ(x), written out
    return -torch.log1p(torch.exp(-x))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3, 0.45])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_losses_match_their_formulas(eps, beta):
    x = beta * DELTA
    torch.testing.assert_close(L.dpo_loss(DELTA, beta), -_lp(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(L.conservative_dpo_loss(DELTA, beta, eps),
                               -(1 - eps) * _lp(x) - eps * _lp(-x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(L.robust_dpo_loss(DELTA, beta, eps),
                               (-(1 - eps) * _lp(x) + eps * _lp(-x)) / (1 - 2 * eps),
                               rtol=1e-12, atol=1e-12)
    # rDPO is unbiased: averaging over a label flip with probability ε gives clean DPO
    torch.testing.assert_close((1 - eps) * L.robust_dpo_loss(DELTA, beta, eps)
                               + eps * L.robust_dpo_loss(-DELTA, beta, eps),
                               L.dpo_loss(DELTA, beta), rtol=1e-12, atol=1e-12)
    # the TRL weighting used for cDPO is exact
    kw = L.trl_loss_kwargs("cdpo", eps)
    if eps > 0:
        assert kw["loss_type"] == ["sigmoid", "robust"] and kw["label_smoothing"] == eps
        w = kw["loss_weights"]
        torch.testing.assert_close(w[0] * L.dpo_loss(DELTA, beta)
                                   + w[1] * L.robust_dpo_loss(DELTA, beta, eps),
                                   L.conservative_dpo_loss(DELTA, beta, eps),
                                   rtol=1e-12, atol=1e-12)
    else:
        assert kw["loss_type"] == ["sigmoid"]


def test_cdpo_margin_is_bounded_where_dpo_is_not():
    beta, eps = 0.5, 0.2
    d = torch.tensor([math.log((1 - eps) / eps) / beta], dtype=torch.float64, requires_grad=True)
    L.conservative_dpo_loss(d, beta, eps).sum().backward()
    assert abs(d.grad.item()) < 1e-12               # stationary at βΔ = log((1−ε)/ε)
    d2 = torch.tensor([100.0], dtype=torch.float64, requires_grad=True)
    L.robust_dpo_loss(d2, beta, eps).sum().backward()
    assert d2.grad.item() < -0.1 * beta             # rDPO keeps pushing margins up


def test_loss_errors_name_the_fix():
    with pytest.raises(ConfigError, match=r"\[0, 0.5\)"):
        L.conservative_dpo_loss(DELTA, 1.0, 0.5)
    with pytest.raises(ConfigError, match="dpo"):
        L.preference_loss("ipo", DELTA, 1.0)
    with pytest.raises(ConfigError, match="loss must be one of"):
        L.trl_loss_kwargs("hinge")


# -- task ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup():
    tok = H.char_tokenizer("abcxy|", eos_token="$")             # V = 7
    task = T.make_preference_task(tok, list("abc"), prefix="|", prompt_len=2, response_len=3)
    ref = H.tiny_causal_lm(len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=8,
                           eos_token_id=tok.eos_token_id, seed=0).double().eval()
    pol = H.tiny_causal_lm(len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=8,
                           eos_token_id=tok.eos_token_id, seed=1).double().eval()
    return tok, task, ref, pol


def test_task_tokenization_and_errors(setup):
    tok, task, _, _ = setup
    assert task.vocab_size == 7 and task.max_length == 1 + 2 + 3
    assert sorted(task.nontask_ids().tolist()) == sorted(set(range(7)) - set(task.symbol_ids))
    assert tok("|ab" + "cab")["input_ids"] == list(task.prefix_ids) + [
        task.symbol_ids[i] for i in (0, 1, 2, 0, 1)]
    with pytest.raises(ConfigError, match="2 tokens"):
        T.make_preference_task(tok, ["a", "bc"])
    with pytest.raises(ConfigError, match="single characters"):
        H.char_tokenizer(["ab", "c"])
    with pytest.raises(ConfigError, match="distinct"):
        T.make_preference_task(tok, ["a", "a"])


def test_true_reward_counts_topic_matches(setup):
    _, task, _, _ = setup
    s = task.symbol_ids
    prompts = torch.tensor([[0, 1], [2, 2]])
    resp = torch.tensor([[s[0], s[0], s[1]], [s[2], 6, s[2]]])
    assert true_list(T.true_reward(task, prompts, resp)) == [2.0, 2.0]


def true_list(t):
    return [float(x) for x in t]


def test_pairs_and_flips(setup):
    _, task, ref, _ = setup
    g = torch.Generator().manual_seed(0)
    pairs = T.make_pairs(task, ref, 40, g)
    assert (pairs.reward_chosen > pairs.reward_rejected).all() and not pairs.flipped.any()
    assert torch.isin(pairs.chosen, torch.tensor(task.symbol_ids)).all()
    torch.testing.assert_close(T.true_reward(task, pairs.prompts, pairs.chosen),
                               pairs.reward_chosen)
    order = torch.randperm(40, generator=g)
    f2, f4 = T.flip_preferences(pairs, 0.2, order), T.flip_preferences(pairs, 0.4, order)
    assert f2.flipped.sum() == 8 and f4.flipped.sum() == 16
    assert (f2.flipped <= f4.flipped).all()                      # nested
    assert ((f4.reward_chosen < f4.reward_rejected) == f4.flipped).all()
    assert torch.equal(f4.chosen[f4.flipped], pairs.rejected[f4.flipped])
    assert torch.equal(T.flip_preferences(f4, 0.0, order).chosen, f4.chosen)
    with pytest.raises(ConfigError):
        T.flip_preferences(pairs, 1.5, order)
    ds = H.pairs_to_dataset(task, f4)
    assert ds[0]["prompt"].startswith("|") and len(ds[0]["chosen"]) == 3


# -- exact metrics vs brute force -----------------------------------------------------------------
def _brute_logp(model, task, prompts):
    """log π(y|x) for every y ∈ V^L, one full sequence at a time (no tree)."""
    x = T.prompt_token_ids(task, prompts)
    ys = list(itertools.product(range(task.vocab_size), repeat=task.response_len))
    out = torch.empty(len(prompts), len(ys), dtype=torch.float64)
    for i in range(len(prompts)):
        for j, y in enumerate(ys):
            ids = torch.cat([x[i], torch.tensor(y)])[None]
            lp = torch.log_softmax(model(input_ids=ids).logits.double()[0], -1)
            m = x.shape[1]
            out[i, j] = sum(lp[m - 1 + t, y[t]] for t in range(len(y)))
    return out, ys


def test_exact_enumeration_matches_brute_force(setup):
    _, task, ref, pol = setup
    prompts = torch.tensor([[0, 1], [2, 0]])
    with torch.no_grad():
        brute_p, ys = _brute_logp(pol, task, prompts)
        brute_q, _ = _brute_logp(ref, task, prompts)
    exact_p = M.response_logprobs_exact(pol, T.prompt_token_ids(task, prompts), 3,
                                        rows_per_batch=50)      # several batches
    exact_q = M.response_logprobs_exact(ref, T.prompt_token_ids(task, prompts), 3)
    torch.testing.assert_close(exact_p, brute_p, rtol=0, atol=1e-10)
    torch.testing.assert_close(exact_p.exp().sum(1), torch.ones(2, dtype=torch.float64),
                               rtol=0, atol=1e-10)
    p = brute_p.exp()
    kl = (p * (brute_p - brute_q)).sum(1)
    torch.testing.assert_close(M.exact_kl(exact_p, exact_q), kl, rtol=0, atol=1e-10)
    assert M.exact_kl(exact_p, exact_p).abs().max() < 1e-12 and (kl > 0).all()
    non = set(task.nontask_ids().tolist())
    mass = torch.tensor([sum(p[i, j] * sum(t in non for t in y) / 3 for j, y in enumerate(ys))
                         for i in range(2)])
    torch.testing.assert_close(M.nontask_mass(task, exact_p), mass.double(), rtol=0, atol=1e-10)
    topic = [task.symbol_ids[int(prompts[i, 0])] for i in range(2)]
    rew = torch.tensor([sum(p[i, j] * sum(t == topic[i] for t in y) for j, y in enumerate(ys))
                        for i in range(2)])
    torch.testing.assert_close(M.expected_reward(task, prompts, exact_p), rew.double(), rtol=0,
                               atol=1e-10)
    with pytest.raises(KernelTooLargeError, match="sampled_policy_stats"):
        M.response_logprobs_exact(pol, T.prompt_token_ids(task, prompts), 3, max_leaves=100)


def test_sampled_stats_converge_to_exact(setup):
    _, task, ref, pol = setup
    prompts = torch.tensor([[0, 1], [1, 2]])
    ref_leaf = M.response_logprobs_exact(ref, T.prompt_token_ids(task, prompts), 3)
    ex = M.exact_policy_stats(pol, task, prompts, ref_leaf)
    mc = M.sampled_policy_stats(pol, ref, task, prompts, torch.Generator().manual_seed(0),
                                samples=4000)
    assert ex.exact and not mc.exact
    # 8000 samples: standard errors are ~1% of these values; 5% is > 4 standard errors
    assert mc.kl == pytest.approx(ex.kl, rel=0.05)
    assert mc.nontask_mass == pytest.approx(ex.nontask_mass, rel=0.05)
    assert mc.reward == pytest.approx(ex.reward, rel=0.05)


def test_margins_accuracy_and_evaluator(setup):
    _, task, ref, pol = setup
    g = torch.Generator().manual_seed(1)
    pairs = T.flip_preferences(T.make_pairs(task, ref, 12, g), 0.25, torch.arange(12))
    x = T.prompt_token_ids(task, pairs.prompts)
    with torch.no_grad():
        def seq(m, y):
            ids = torch.cat([x, y], 1)
            lp = torch.log_softmax(m(input_ids=ids).logits.double(), -1)[:, 2:-1]
            return lp.gather(-1, y[..., None]).squeeze(-1).sum(1)
        want = (seq(pol, pairs.chosen) - seq(ref, pairs.chosen)) - (
            seq(pol, pairs.rejected) - seq(ref, pairs.rejected))
    torch.testing.assert_close(M.implicit_margins(pol, ref, task, pairs), want, rtol=0,
                               atol=1e-10)
    assert M.preference_accuracy(torch.tensor([1.0, -1.0, 0.0, 2.0])) == 0.625
    ev = M.PreferenceEvaluator(task, ref, pairs, pairs, pairs.prompts[:2])
    at_ref = ev(ref)
    assert at_ref["heldout_acc"] == 0.5 and at_ref["kl"] == 0.0 and ev.exact
    m = ev(pol)
    assert m["flipped_fit"] == M.preference_accuracy(want[pairs.flipped])
    assert m["train_acc_clean"] == M.preference_accuracy(want[~pairs.flipped])
    assert m["kl"] > 0 and 0 <= m["nontask_mass"] <= 1 and 0 <= m["reward"] <= 3
