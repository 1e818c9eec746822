"""DPO under noisy preferences: noise-robust losses, a synthetic task with a known reward, and
exact policy metrics (KL to the reference, likelihood displacement, true reward).

**Losses** of the implicit reward margin ``Δ = [log π(y_w|x) − log π_ref(y_w|x)] −
[log π(y_l|x) − log π_ref(y_l|x)]`` (nats, per pair), with ``L± = −log σ(±βΔ)``:

- DPO (Rafailov et al. 2023): ``L+``.
- conservative DPO, cDPO (Mitchell 2023; label smoothing ε): ``(1−ε) L+ + ε L−``. Its gradient
  vanishes at ``βΔ = log((1−ε)/ε)``, so margins stay bounded.
- robust DPO, rDPO (Chowdhury et al. 2024; flip rate ε): ``[(1−ε) L+ − ε L−] / (1−2ε)``, an
  unbiased estimate of the clean-label DPO loss when labels flip with probability ε.

TRL 1.16's ``loss_type="sigmoid"`` ignores ``label_smoothing`` (``dpo_trainer.py`` computes
``-F.logsigmoid(self.beta * delta_score)`` for it; only ``robust``, ``exo_pair``, ``aot`` and
``aot_unpaired`` read ``label_smoothing``), so cDPO is not available by name. Because TRL sums
weighted loss types, :func:`trl_loss_kwargs` obtains cDPO exactly from TRL's own terms:
``cDPO(ε) = 2(1−ε)·DPO − (1−2ε)·rDPO(ε)`` (tested against :func:`conservative_dpo_loss`).

**Task.** Prompts are ``prefix + k`` task symbols, responses ``L`` task symbols; the true reward
is the number of response positions equal to the prompt's first symbol (the "topic")::

    r*(x, y) = #{j : y_j = x_1}            ∈ {0, …, L}

Preference pairs are two responses sampled from the reference policy with different rewards,
the higher one chosen; then a fixed fraction of labels is flipped.

**Exact metrics.** For a vocabulary of ``V`` tokens the response space is ``V^L`` (every token,
task or not, at each of the ``L`` positions). TRL appends an EOS to every completion;
``DPOConfig(max_length=task.max_length)`` cuts it, so DPO trains on exactly these ``L``
tokens. :func:`response_logprobs_exact` computes ``log π(y|x)`` for every ``y ∈ V^L`` from
``V^(L−1)`` forward rows per prompt. From it, with no sampling: :func:`exact_kl` gives
``KL(π‖π_ref) = Σ_y π(y|x) log(π(y|x)/π_ref(y|x))``, :func:`nontask_mass` the expected share
of response positions holding a token outside the task alphabet (likelihood displacement) and
:func:`expected_reward` ``E_{y∼π}[r*(x, y)]``. For vocabularies too large to enumerate,
:func:`sampled_policy_stats` estimates the same quantities by sampling prefixes from π and
summing the *exact* per-token KL / non-task mass along them (unbiased).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, KernelTooLargeError, ShapeError

__all__ = [
    "LOSSES", "dpo_loss", "conservative_dpo_loss", "robust_dpo_loss", "preference_loss",
    "trl_loss_kwargs",
    "PreferenceTask", "PreferencePairs", "make_task", "sample_prompts", "prompt_token_ids",
    "true_reward", "sample_responses", "make_pairs", "flip_labels", "pairs_to_dataset",
    "pretrain_reference",
    "response_logprobs", "implicit_margins", "response_logprobs_exact", "exact_kl",
    "nontask_mass", "expected_reward", "PolicyStats", "exact_policy_stats",
    "sampled_policy_stats", "preference_accuracy", "PreferenceEvaluator", "task_symbols",
]

#: Loss names accepted by :func:`preference_loss` and :func:`trl_loss_kwargs`.
LOSSES = ("dpo", "cdpo", "rdpo")


# -- losses --------------------------------------------------------------------------------------
def dpo_loss(delta: Tensor, beta: float) -> Tensor:
    """DPO loss ``−log σ(βΔ)`` per pair. ``delta``: (n,) margins in nats → (n,)."""
    return -F.logsigmoid(beta * delta)


def _check_eps(eps: float, name: str) -> None:
    if not 0.0 <= eps < 0.5:
        raise ConfigError(f"{name} needs label_smoothing ε in [0, 0.5), got {eps}; ε is the "
                          "assumed probability that a preference label is flipped")


def conservative_dpo_loss(delta: Tensor, beta: float, eps: float) -> Tensor:
    """Conservative DPO ``(1−ε)(−log σ(βΔ)) + ε(−log σ(−βΔ))`` per pair → (n,)."""
    _check_eps(eps, "cdpo")
    return -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)


def robust_dpo_loss(delta: Tensor, beta: float, eps: float) -> Tensor:
    """Robust DPO ``[(1−ε)(−log σ(βΔ)) − ε(−log σ(−βΔ))] / (1−2ε)`` per pair → (n,)."""
    _check_eps(eps, "rdpo")
    return (-(1 - eps) * F.logsigmoid(beta * delta)
            + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)


def preference_loss(name: str, delta: Tensor, beta: float, eps: float = 0.0) -> Tensor:
    """Per-pair loss by name: ``"dpo"``, ``"cdpo"`` or ``"rdpo"`` (see module docstring)."""
    if name == "dpo":
        return dpo_loss(delta, beta)
    if name == "cdpo":
        return conservative_dpo_loss(delta, beta, eps)
    if name == "rdpo":
        return robust_dpo_loss(delta, beta, eps)
    raise ConfigError(f"loss must be one of {LOSSES}, got {name!r}")


def trl_loss_kwargs(name: str, eps: float = 0.0) -> dict[str, Any]:
    """``DPOConfig`` keyword arguments that make TRL (1.16) optimise loss ``name``.

    ``"dpo"`` → ``loss_type=["sigmoid"]``; ``"rdpo"`` → ``["robust"]`` with
    ``label_smoothing=ε``; ``"cdpo"`` → ``["sigmoid", "robust"]`` with weights
    ``[2(1−ε), −(1−2ε)]``, which equals ``(1−ε) L+ + ε L−`` exactly (TRL's ``sigmoid`` alone
    ignores ``label_smoothing``).
    """
    if name == "dpo":
        return {"loss_type": ["sigmoid"], "label_smoothing": 0.0}
    if name == "rdpo":
        _check_eps(eps, "rdpo")
        return {"loss_type": ["robust"], "label_smoothing": float(eps)}
    if name == "cdpo":
        _check_eps(eps, "cdpo")
        if eps == 0.0:
            return {"loss_type": ["sigmoid"], "label_smoothing": 0.0}
        return {"loss_type": ["sigmoid", "robust"], "label_smoothing": float(eps),
                "loss_weights": [2.0 * (1.0 - eps), -(1.0 - 2.0 * eps)]}
    raise ConfigError(f"loss must be one of {LOSSES}, got {name!r}")


# -- the synthetic task --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PreferenceTask:
    """A synthetic preference task mapped onto a tokenizer (build with :func:`make_task`).

    Attributes:
        symbols: the task alphabet as strings (each exactly one token), ``A`` of them.
        symbol_ids: their token ids, ``(A,)``.
        prefix: string put before every prompt (may be empty); ``prefix_ids`` its token ids
            as TRL sees them (with the tokenizer's leading special tokens, e.g. a BOS).
        prompt_len: task symbols per prompt (``k``; the first is the topic).
        response_len: task symbols per response (``L``).
        vocab_size: the tokenizer's size ``V`` (the response space is ``V^L``).
    """

    symbols: tuple[str, ...]
    symbol_ids: tuple[int, ...]
    prefix: str
    prefix_ids: tuple[int, ...]
    prompt_len: int
    response_len: int
    vocab_size: int

    @property
    def n_symbols(self) -> int:
        return len(self.symbols)

    @property
    def max_length(self) -> int:
        """Tokens in ``prompt + response``: TRL's ``max_length`` that cuts the appended EOS, so
        DPO trains on exactly the ``L`` response tokens of the evaluated response space."""
        return len(self.prefix_ids) + self.prompt_len + self.response_len

    def nontask_ids(self) -> Tensor:
        """Token ids outside the task alphabet (specials and unused tokens), ``(V − A,)``."""
        mask = torch.ones(self.vocab_size, dtype=torch.bool)
        mask[list(self.symbol_ids)] = False
        return mask.nonzero().squeeze(1)


def make_task(tokenizer: Any, symbols: Sequence[str], *, prefix: str = "", prompt_len: int = 4,
              response_len: int = 4) -> PreferenceTask:
    """Map the task onto ``tokenizer`` and check that it tokenizes as the experiment assumes.

    Each symbol must encode to one token, and prompt + response strings must encode to the
    concatenation of their ids (TRL splits prompt and completion by token prefix).

    Raises:
        ConfigError: a symbol is not a single token or concatenation changes the tokens; the
            message names the symbol and suggests space-prefixed symbols for BPE tokenizers.
    """
    if prompt_len < 1 or response_len < 1:
        raise ConfigError("prompt_len and response_len must be >= 1")
    if len(set(symbols)) != len(symbols) or len(symbols) < 2:
        raise ConfigError(f"need >= 2 distinct task symbols, got {list(symbols)!r}")

    def enc(s: str, specials: bool = False) -> list[int]:
        return list(tokenizer(s, add_special_tokens=specials)["input_ids"])

    ids = []
    for s in symbols:
        e = enc(s)
        if len(e) != 1:
            raise ConfigError(f"task symbol {s!r} is {len(e)} tokens in this tokenizer; choose "
                              "symbols that are single tokens (for BPE tokenizers try ' a', ' b', "
                              "... with a leading space)")
        ids.append(e[0])
    # TRL tokenizes the prompt with the tokenizer's special tokens (a BOS, for some models)
    prefix_ids = enc(prefix, specials=True)
    probe = [prefix + "".join(symbols), prefix + "".join(reversed(symbols)) * 2]
    want = [prefix_ids + ids, prefix_ids + ids[::-1] * 2]
    for text, w in zip(probe, want):
        if enc(text, specials=True) != w:
            raise ConfigError(f"concatenated symbols {text!r} do not tokenize symbol by symbol "
                              f"({enc(text, True)} != {w}); pick symbols that do not merge "
                              "and a tokenizer that adds no trailing special token")
    return PreferenceTask(tuple(symbols), tuple(ids), prefix, tuple(prefix_ids), prompt_len,
                          response_len, len(tokenizer))


def sample_prompts(task: PreferenceTask, n: int, generator: torch.Generator) -> Tensor:
    """``n`` prompts as task-symbol indices, ``(n, k)`` int64 in ``[0, A)``, uniform."""
    return torch.randint(task.n_symbols, (n, task.prompt_len), generator=generator)


def prompt_token_ids(task: PreferenceTask, prompts: Tensor) -> Tensor:
    """Token ids ``prefix + symbols`` of prompts ``(n, k)`` → ``(n, len(prefix) + k)``."""
    sym = torch.tensor(task.symbol_ids)[prompts]
    pre = torch.tensor(task.prefix_ids, dtype=torch.long).expand(len(prompts), -1)
    return torch.cat([pre, sym], dim=1)


def true_reward(task: PreferenceTask, prompts: Tensor, responses: Tensor) -> Tensor:
    """``r*(x, y) = #{j : y_j = topic(x)}``; ``responses`` are token ids ``(n, L)`` → (n,) float.

    ``prompts`` is ``(n, k)`` symbol indices; broadcasting over extra leading response dims is
    allowed (``responses (n, m, L)`` → ``(n, m)``).
    """
    topic = torch.tensor(task.symbol_ids)[prompts[:, 0]]
    topic = topic.reshape(topic.shape + (1,) * (responses.dim() - 1))
    return (responses == topic).sum(-1).to(torch.float64)


@torch.no_grad()
def _next_token_logprobs(model: nn.Module, ids: Tensor) -> Tensor:
    """log π(· | ids) at every position, float64 ``(n, T, V)``."""
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return torch.log_softmax(out.to(torch.float64), dim=-1)


@torch.no_grad()
def sample_responses(model: nn.Module, prompt_ids: Tensor, length: int,
                     generator: torch.Generator, *, restrict_to: Sequence[int] | None = None
                     ) -> Tensor:
    """Ancestral samples ``y ∼ π(·|x)`` of ``length`` tokens, ``(n, length)`` token ids.

    Args:
        restrict_to: token ids to renormalise onto (``None``: the full vocabulary).
    """
    dev = _device(model)
    ids = prompt_ids.to(dev)
    for _ in range(length):
        lp = _next_token_logprobs(model, ids)[:, -1]
        if restrict_to is not None:
            keep = torch.full_like(lp, -math.inf)
            idx = torch.tensor(list(restrict_to), device=dev)
            keep[:, idx] = lp[:, idx]
            lp = keep
        nxt = torch.multinomial(lp.exp().cpu().float(), 1, generator=generator).to(dev)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[:, prompt_ids.shape[1]:].cpu()


@dataclasses.dataclass(frozen=True)
class PreferencePairs:
    """Preference pairs; ``chosen``/``rejected`` follow the (possibly flipped) labels.

    Attributes:
        prompts: ``(n, k)`` symbol indices.
        chosen, rejected: ``(n, L)`` token ids.
        reward_chosen, reward_rejected: true rewards ``(n,)``.
        flipped: ``(n,)`` bool, True where the label disagrees with the true reward.
    """

    prompts: Tensor
    chosen: Tensor
    rejected: Tensor
    reward_chosen: Tensor
    reward_rejected: Tensor
    flipped: Tensor

    def __len__(self) -> int:
        return len(self.prompts)


def make_pairs(task: PreferenceTask, reference: nn.Module, n: int, generator: torch.Generator,
               *, prompts: Tensor | None = None) -> PreferencePairs:
    """``n`` clean pairs: two responses sampled from ``reference``, the higher ``r*`` chosen.

    Responses are sampled from the reference renormalised onto the task alphabet (pairs are
    task-like text); pairs with equal true reward are redrawn. Flip labels with
    :func:`flip_labels`.

    Args:
        prompts: ``(n, k)`` prompts to use (default: fresh uniform prompts).
    """
    P = sample_prompts(task, n, generator) if prompts is None else prompts
    if len(P) != n:
        raise ShapeError(f"prompts has {len(P)} rows, expected n={n}")
    L = task.response_len
    a = torch.empty(n, L, dtype=torch.long)
    b = torch.empty(n, L, dtype=torch.long)
    todo = torch.arange(n)
    for _ in range(200):
        if len(todo) == 0:
            break
        x = prompt_token_ids(task, P[todo])
        a[todo] = sample_responses(reference, x, L, generator, restrict_to=task.symbol_ids)
        b[todo] = sample_responses(reference, x, L, generator, restrict_to=task.symbol_ids)
        tie = true_reward(task, P[todo], a[todo]) == true_reward(task, P[todo], b[todo])
        todo = todo[tie]
    if len(todo):
        raise ConfigError("could not draw pairs with distinct rewards; the reference policy is "
                          "(nearly) deterministic: pretrain it less or use more task symbols")
    ra, rb = true_reward(task, P, a), true_reward(task, P, b)
    a_wins = (ra > rb)[:, None]
    return PreferencePairs(P, torch.where(a_wins, a, b), torch.where(a_wins, b, a),
                           torch.maximum(ra, rb), torch.minimum(ra, rb),
                           torch.zeros(n, dtype=torch.bool))


def flip_labels(pairs: PreferencePairs, rate: float, order: Tensor) -> PreferencePairs:
    """Swap chosen and rejected on the first ``round(rate · n)`` pairs of permutation ``order``.

    The noise rate is exact (not only in expectation), and with one ``order`` per seed the
    flipped set at a lower rate is contained in the one at a higher rate.

    Args:
        rate: flip rate in ``[0, 1]``.
        order: a permutation of ``range(n)``, e.g. ``torch.randperm(n, generator=g)``.
    """
    n = len(pairs)
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"flip rate must be in [0, 1], got {rate}")
    if sorted(order.tolist()) != list(range(n)):
        raise ShapeError(f"order must be a permutation of range({n})")
    flip = torch.zeros(n, dtype=torch.bool)
    flip[order[:round(rate * n)]] = True
    f = flip[:, None]
    return PreferencePairs(pairs.prompts, torch.where(f, pairs.rejected, pairs.chosen),
                           torch.where(f, pairs.chosen, pairs.rejected),
                           torch.where(flip, pairs.reward_rejected, pairs.reward_chosen),
                           torch.where(flip, pairs.reward_chosen, pairs.reward_rejected),
                           pairs.flipped ^ flip)


def pairs_to_dataset(task: PreferenceTask, pairs: PreferencePairs) -> Any:
    """A ``datasets.Dataset`` with ``prompt``/``chosen``/``rejected`` strings for TRL.

    Strings are concatenations of the symbol strings (``tokenizer.decode`` would insert
    spaces for some tokenizers); :func:`make_task` checked that they tokenize back exactly.
    """
    import datasets

    sym = dict(zip(task.symbol_ids, task.symbols))

    def text(ids: Tensor) -> list[str]:
        try:
            return ["".join(sym[t] for t in row) for row in ids.tolist()]
        except KeyError as e:
            raise ConfigError(f"response token {e} is not a task symbol; pairs must be made "
                              "of task symbols (make_pairs samples them that way)") from None

    prompts = [task.prefix + "".join(task.symbols[i] for i in row)
               for row in pairs.prompts.tolist()]
    return datasets.Dataset.from_dict({"prompt": prompts, "chosen": text(pairs.chosen),
                                       "rejected": text(pairs.rejected)})


def pretrain_reference(model: nn.Module, task: PreferenceTask, *, steps: int, batch_size: int = 64,
                       lr: float = 3e-3, generator: torch.Generator) -> list[float]:
    """Short SFT so the model writes task-like responses: uniform random task symbols.

    Next-token cross-entropy on the response positions of ``prefix + prompt + response``
    sequences whose response symbols are drawn uniformly from the task alphabet (so the ideal
    reference is uniform over ``A^L`` and puts no mass on non-task tokens). Trains in place.

    Returns:
        the loss per step (nats per response token).
    """
    dev = _device(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sym = torch.tensor(task.symbol_ids)
    model.train()
    losses = []
    for _ in range(steps):
        x = prompt_token_ids(task, sample_prompts(task, batch_size, generator))
        y = sym[torch.randint(task.n_symbols, (batch_size, task.response_len),
                              generator=generator)]
        ids = torch.cat([x, y], dim=1).to(dev)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        logits = logits[:, x.shape[1] - 1:-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(dev).reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


# -- metrics -------------------------------------------------------------------------------------
def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def response_logprobs(model: nn.Module, prompt_ids: Tensor, responses: Tensor, *,
                      batch_size: int = 4096) -> Tensor:
    """``log π(y_j | x, y_<j)`` for each response token, float64 ``(n, L)``."""
    if prompt_ids.shape[0] != responses.shape[0]:
        raise ShapeError(f"{prompt_ids.shape[0]} prompts but {responses.shape[0]} responses")
    dev, m = _device(model), prompt_ids.shape[1]
    out = []
    for s in range(0, len(prompt_ids), batch_size):
        ids = torch.cat([prompt_ids[s:s + batch_size], responses[s:s + batch_size]], 1).to(dev)
        lp = _next_token_logprobs(model, ids)[:, m - 1:-1]
        out.append(lp.gather(-1, ids[:, m:, None]).squeeze(-1).cpu())
    return torch.cat(out)


def implicit_margins(policy: nn.Module, reference: nn.Module, task: PreferenceTask,
                     pairs: PreferencePairs, *, ref_logps: tuple[Tensor, Tensor] | None = None
                     ) -> Tensor:
    """DPO margins ``Δ`` (nats, un-scaled by β) on the response tokens, ``(n,)`` float64.

    ``Δ > 0`` means the policy's implicit reward prefers the labelled chosen response.
    ``ref_logps`` = (chosen, rejected) sums under the reference, to skip recomputing them.
    """
    x = prompt_token_ids(task, pairs.prompts)
    pc = response_logprobs(policy, x, pairs.chosen).sum(1)
    pr = response_logprobs(policy, x, pairs.rejected).sum(1)
    if ref_logps is None:
        ref_logps = (response_logprobs(reference, x, pairs.chosen).sum(1),
                     response_logprobs(reference, x, pairs.rejected).sum(1))
    return (pc - ref_logps[0]) - (pr - ref_logps[1])


def _all_responses(V: int, L: int) -> Tensor:
    """All ``V^L`` token tuples in lexicographic order, ``(V^L, L)``."""
    grids = torch.meshgrid(*[torch.arange(V)] * L, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


@torch.no_grad()
def response_logprobs_exact(model: nn.Module, prompt_ids: Tensor, length: int, *,
                            max_leaves: int = 2_000_000, rows_per_batch: int = 8192) -> Tensor:
    """``log π(y|x)`` for every response ``y ∈ V^L`` (lexicographic order), ``(n, V^L)`` float64.

    One causal forward over the ``V^(L−1)`` length-``(L−1)`` continuations of each prompt gives
    the next-token distribution at every node of the response tree; leaf log-probabilities are
    sums along root-to-leaf paths (broadcast, no Python loop over leaves).

    Raises:
        KernelTooLargeError: ``n · V^L > max_leaves`` (use :func:`sampled_policy_stats`).
    """
    V = _vocab_size(model)
    n, m, L = prompt_ids.shape[0], prompt_ids.shape[1], length
    if n * V ** L > max_leaves:
        raise KernelTooLargeError(
            f"exact enumeration needs n·V^L = {n}·{V}^{L} = {n * V ** L:.3g} leaves > max_leaves="
            f"{max_leaves}; use sampled_policy_stats (Monte Carlo over prefixes, exact per-token "
            "terms), fewer prompts, or a larger max_leaves")
    dev = _device(model)
    conts = _all_responses(V, L - 1) if L > 1 else torch.zeros(1, 0, dtype=torch.long)
    R = len(conts)
    out = torch.empty(n, V ** L, dtype=torch.float64)
    per = max(1, rows_per_batch // R)
    for s in range(0, n, per):
        xs = prompt_ids[s:s + per]
        ids = torch.cat([xs.repeat_interleave(R, 0), conts.repeat(len(xs), 1)], 1).to(dev)
        lp = _next_token_logprobs(model, ids).cpu().reshape(len(xs), R, m + L - 1, V)
        leaf = torch.zeros((len(xs),) + (V,) * L, dtype=torch.float64)
        for j in range(L):
            rows = torch.arange(V ** j) * V ** (L - 1 - j)        # one row per depth-j prefix
            d = lp[:, rows, m - 1 + j, :]                           # (b, V^j, V)
            leaf += d.reshape((len(xs),) + (V,) * (j + 1) + (1,) * (L - 1 - j))
        out[s:s + len(xs)] = leaf.reshape(len(xs), -1)
    return out


def _vocab_size(model: nn.Module) -> int:
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is None:
        raise ShapeError("the model has no output embedding; pass a causal LM")
    return emb.weight.shape[0]


def exact_kl(logp: Tensor, logq: Tensor) -> Tensor:
    """``KL(π‖π_ref) = Σ_y π(y) (log π(y) − log π_ref(y))`` per prompt; ``(n, N)`` → ``(n,)``."""
    p = logp.exp()
    return (p * (logp - logq)).where(p > 0, torch.zeros((), dtype=logp.dtype)).sum(-1)


def nontask_mass(task: PreferenceTask, logp: Tensor) -> Tensor:
    """Expected share of response positions holding a non-task token; ``(n, V^L)`` → ``(n,)``."""
    L = task.response_len
    leaves = _all_responses(task.vocab_size, L)
    frac = (~torch.isin(leaves, torch.tensor(task.symbol_ids))).sum(1).to(logp.dtype) / L
    return logp.exp() @ frac


def expected_reward(task: PreferenceTask, prompts: Tensor, logp: Tensor) -> Tensor:
    """``E_{y∼π}[r*(x, y)]`` per prompt; ``prompts (n, k)``, ``logp (n, V^L)`` → ``(n,)``."""
    leaves = _all_responses(task.vocab_size, task.response_len)
    r = true_reward(task, prompts, leaves.expand(len(prompts), -1, -1))
    return (logp.exp() * r).sum(-1)


@dataclasses.dataclass(frozen=True)
class PolicyStats:
    """Per-prompt averages of the policy metrics (see module docstring).

    Attributes:
        kl: ``KL(π‖π_ref)`` over the response space (nats per response).
        nontask_mass: expected share of response positions with a non-task token.
        reward: ``E_{y∼π}[r*(x, y)]``.
        exact: True for full enumeration, False for the sampled estimate.
        n_prompts: prompts averaged over.
    """

    kl: float
    nontask_mass: float
    reward: float
    exact: bool
    n_prompts: int


def exact_policy_stats(policy: nn.Module, task: PreferenceTask, prompts: Tensor,
                       ref_logp: Tensor, **kw: Any) -> PolicyStats:
    """Exact :class:`PolicyStats` on ``prompts``; ``ref_logp`` from :func:`response_logprobs_exact`
    on the reference (computed once)."""
    logp = response_logprobs_exact(policy, prompt_token_ids(task, prompts), task.response_len,
                                   **kw)
    return PolicyStats(exact_kl(logp, ref_logp).mean().item(),
                       nontask_mass(task, logp).mean().item(),
                       expected_reward(task, prompts, logp).mean().item(), True, len(prompts))


@torch.no_grad()
def sampled_policy_stats(policy: nn.Module, reference: nn.Module, task: PreferenceTask,
                         prompts: Tensor, generator: torch.Generator, *, samples: int = 16
                         ) -> PolicyStats:
    """Monte Carlo :class:`PolicyStats` for vocabularies too large to enumerate.

    Draws ``samples`` responses per prompt from π; along each sampled prefix it adds the exact
    next-token ``KL(π(·|x,y_<j) ‖ π_ref(·|x,y_<j))`` and the exact non-task probability, so the
    estimates are unbiased (and lower-variance than ``log π(y)/π_ref(y)`` of the samples). The
    reward is the mean true reward of the samples.
    """
    x = prompt_token_ids(task, prompts).repeat_interleave(samples, 0)
    P = prompts.repeat_interleave(samples, 0)
    dev_p, dev_r = _device(policy), _device(reference)
    non = task.nontask_ids()
    ids = x
    kl = torch.zeros(len(x), dtype=torch.float64)
    mass = torch.zeros(len(x), dtype=torch.float64)
    for _ in range(task.response_len):
        lp = _next_token_logprobs(policy, ids.to(dev_p))[:, -1].cpu()
        lq = _next_token_logprobs(reference, ids.to(dev_r))[:, -1].cpu()
        p = lp.exp()
        kl += (p * (lp - lq)).where(p > 0, torch.zeros((), dtype=lp.dtype)).sum(-1)
        mass += p[:, non].sum(-1)
        nxt = torch.multinomial(p.float(), 1, generator=generator)
        ids = torch.cat([ids, nxt], 1)
    reward = true_reward(task, P, ids[:, x.shape[1]:])
    return PolicyStats(kl.mean().item(), (mass / task.response_len).mean().item(),
                       reward.mean().item(), False, len(prompts))


def preference_accuracy(margins: Tensor) -> float:
    """Share of pairs with ``Δ > 0``, ties counted ½ (so the reference scores exactly 0.5)."""
    if len(margins) == 0:
        return math.nan
    return ((margins > 0).double() + 0.5 * (margins == 0).double()).mean().item()


class PreferenceEvaluator:
    """Scores a policy against a fixed reference (reference terms are computed once).

    Metrics (all floats):
        ``heldout_acc``: clean-label preference accuracy of the implicit reward on held-out pairs.
        ``train_acc``: accuracy on the training labels as given (flips included).
        ``train_acc_clean``: on the training pairs whose label is correct.
        ``flipped_fit``: share of flipped training pairs the policy ranks the *wrong* way round,
            i.e. memorised label noise (NaN without flips).
        ``kl``, ``nontask_mass``, ``reward``: :class:`PolicyStats` on the evaluation prompts.

    Args:
        task: the task.
        reference: the frozen reference policy π_ref.
        train: the training pairs (labels as trained on).
        heldout: held-out pairs with clean labels.
        prompts: ``(m, k)`` prompts for the policy metrics.
        exact: enumerate ``V^L`` responses (default: when ``m·V^L ≤ max_leaves``), else sample.
        samples: responses per prompt for the sampled estimate.
        seed: seed of the sampling generator (reset at every call, so calls are comparable).
    """

    def __init__(self, task: PreferenceTask, reference: nn.Module, train: PreferencePairs,
                 heldout: PreferencePairs, prompts: Tensor, *, exact: bool | None = None,
                 samples: int = 16, max_leaves: int = 2_000_000, seed: int = 0):
        self.task, self.reference = task, reference
        self.train, self.heldout, self.prompts = train, heldout, prompts
        self.samples, self.seed, self.max_leaves = samples, seed, max_leaves
        if exact is None:
            exact = len(prompts) * task.vocab_size ** task.response_len <= max_leaves
        self.exact = exact
        self._ref = {name: self._ref_logps(pairs) for name, pairs in
                     (("train", train), ("heldout", heldout))}
        self._ref_leaf = (response_logprobs_exact(reference, prompt_token_ids(task, prompts),
                                                  task.response_len, max_leaves=max_leaves)
                          if exact else None)

    def _ref_logps(self, pairs: PreferencePairs) -> tuple[Tensor, Tensor]:
        x = prompt_token_ids(self.task, pairs.prompts)
        return (response_logprobs(self.reference, x, pairs.chosen).sum(1),
                response_logprobs(self.reference, x, pairs.rejected).sum(1))

    def margins(self, policy: nn.Module, which: str = "heldout") -> Tensor:
        """Implicit-reward margins ``Δ`` on ``"train"`` or ``"heldout"`` pairs, ``(n,)``."""
        pairs = self.train if which == "train" else self.heldout
        return implicit_margins(policy, self.reference, self.task, pairs,
                                ref_logps=self._ref[which])

    def stats(self, policy: nn.Module) -> PolicyStats:
        """:class:`PolicyStats` (exact or sampled, see ``exact``)."""
        if self.exact:
            return exact_policy_stats(policy, self.task, self.prompts, self._ref_leaf,
                                      max_leaves=self.max_leaves)
        g = torch.Generator().manual_seed(self.seed)
        return sampled_policy_stats(policy, self.reference, self.task, self.prompts, g,
                                    samples=self.samples)

    def __call__(self, policy: nn.Module) -> dict[str, float]:
        was_training = policy.training
        policy.eval()
        try:
            mh, mt = self.margins(policy, "heldout"), self.margins(policy, "train")
            st = self.stats(policy)
        finally:
            policy.train(was_training)
        f = self.train.flipped
        return {"heldout_acc": preference_accuracy(mh), "train_acc": preference_accuracy(mt),
                "train_acc_clean": preference_accuracy(mt[~f]),
                "flipped_fit": preference_accuracy(mt[f]), "kl": st.kl,
                "nontask_mass": st.nontask_mass, "reward": st.reward}


def task_symbols(tokenizer: Any, letters: str, *, prefix: str = "", prompt_len: int = 4,
                 response_len: int = 4) -> PreferenceTask:
    """:func:`make_task` with ``letters`` as given, else space-prefixed (``" a"``, BPE style).

    Raises:
        ConfigError: neither spelling tokenizes symbol by symbol (the first error's message).
    """
    errors = []
    for syms in (list(letters), [" " + c for c in letters]):
        try:
            return make_task(tokenizer, syms, prefix=prefix, prompt_len=prompt_len,
                             response_len=response_len)
        except ConfigError as e:
            errors.append(e)
    raise errors[0]
