"""A synthetic preference task with a known reward, mapped onto any tokenizer.

Prompts are ``prefix + k`` task symbols, responses ``L`` task symbols; the true reward is the
number of response positions equal to the prompt's first symbol (the "topic")::

    r*(x, y) = #{j : y_j = x_1}            ∈ {0, …, L}

Preference pairs are two responses sampled from the reference policy with different rewards,
the higher one chosen; then a fixed fraction of labels is flipped (:func:`flip_preferences`).
The exact policy metrics of the task are in :mod:`.preference_metrics`; the losses in
:mod:`tangentscope.losses.preference`; the TRL dataset in
:func:`tangentscope.integrations.hf.pairs_to_dataset`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError

__all__ = ["PreferenceTask", "PreferencePairs", "make_preference_task",
           "preference_task_from_letters", "sample_prompts", "prompt_token_ids", "true_reward",
           "sample_responses", "make_pairs", "flip_preferences", "pretrain_reference"]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclasses.dataclass(frozen=True)
class PreferenceTask:
    """A synthetic preference task mapped onto a tokenizer (build with
    :func:`make_preference_task`).

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


def make_preference_task(tokenizer: Any, symbols: Sequence[str], *, prefix: str = "",
                         prompt_len: int = 4, response_len: int = 4) -> PreferenceTask:
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
    :func:`flip_preferences`.

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


def flip_preferences(pairs: PreferencePairs, rate: float, order: Tensor) -> PreferencePairs:
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


def preference_task_from_letters(tokenizer: Any, letters: str, *, prefix: str = "",
                                 prompt_len: int = 4, response_len: int = 4) -> PreferenceTask:
    """:func:`make_preference_task` with ``letters`` as given, else space-prefixed (``" a"``,
    BPE style).

    Raises:
        ConfigError: neither spelling tokenizes symbol by symbol (the first error's message).
    """
    errors = []
    for syms in (list(letters), [" " + c for c in letters]):
        try:
            return make_preference_task(tokenizer, syms, prefix=prefix, prompt_len=prompt_len,
                             response_len=response_len)
        except ConfigError as e:
            errors.append(e)
    raise errors[0]
