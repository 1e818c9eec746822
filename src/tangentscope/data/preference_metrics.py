"""Exact policy metrics of the synthetic preference task (:mod:`.preferences`).

For a vocabulary of ``V`` tokens the response space is ``V^L`` (every token, task or not, at
each of the ``L`` positions). TRL appends an EOS to every completion;
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
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import eval_mode
from ..errors import KernelTooLargeError, ShapeError
from .preferences import (
    PreferencePairs,
    PreferenceTask,
    _device,
    _next_token_logprobs,
    prompt_token_ids,
    true_reward,
)

__all__ = ["response_logprobs", "implicit_margins", "response_logprobs_exact", "exact_kl",
           "nontask_mass", "expected_reward", "PolicyStats", "exact_policy_stats",
           "sampled_policy_stats", "preference_accuracy", "PreferenceEvaluator"]


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
    get = getattr(model, "get_output_embeddings", None)
    emb = get() if callable(get) else None
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
            assert self._ref_leaf is not None
            return exact_policy_stats(policy, self.task, self.prompts, self._ref_leaf,
                                      max_leaves=self.max_leaves)
        g = torch.Generator().manual_seed(self.seed)
        return sampled_policy_stats(policy, self.reference, self.task, self.prompts, g,
                                    samples=self.samples)

    def __call__(self, policy: nn.Module) -> dict[str, float]:
        with eval_mode(policy):  # every submodule's own mode is restored afterwards
            mh, mt = self.margins(policy, "heldout"), self.margins(policy, "train")
            st = self.stats(policy)
        f = self.train.flipped
        return {"heldout_acc": preference_accuracy(mh), "train_acc": preference_accuracy(mt),
                "train_acc_clean": preference_accuracy(mt[~f]),
                "flipped_fit": preference_accuracy(mt[f]), "kl": st.kl,
                "nontask_mass": st.nontask_mass, "reward": st.reward}
