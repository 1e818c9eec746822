"""The grokking setup shared by :mod:`.grokking` and :mod:`.grokking_theory` (private): the
settings (task, model, AdamW hyper-parameters), the optimizer grids, the task of a cell's seeds
and its models, and a cell's optimizer (an optimizer spec built with the setting's
hyper-parameters and the right statistics source)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from .._utils import seed_everything
from ..data.modular import OPERATIONS, modular_arithmetic
from ..errors import ConfigError
from ..models import EmbeddingMLP, EmbeddingMLPEnsemble, StackedEnsemble, TinyTransformer
from ..optim import GradMoments
from ..optim.spec import BuiltOptimizer, OptimizerSpec, build_optimizer, parse_optimizer
from ._harness import check_nonnegative, check_positive

__all__ = ["Setting", "SETTINGS", "FULL_OPTIMIZERS", "FULL_SETTINGS", "VARIANT_OPTIMIZERS",
           "VARIANT_SETTINGS", "ModularTask", "make_task", "build_model", "build_single_model",
           "SingleModel", "EnsembleMoments", "build_cell_optimizer", "gate_pass_fraction"]


@dataclasses.dataclass(frozen=True)
class Setting:
    """One regime: task, model and base-optimizer hyper-parameters.

    Attributes:
        model: ``mlp`` (:class:`~tangentscope.models.embedding_mlp.EmbeddingMLP` on ``(a, b)``)
            or ``transformer`` (:class:`~tangentscope.models.TinyTransformer` on the sequence
            ``a ∘ b =``, logits at ``=``).
        op: an operation of :func:`tangentscope.data.modular_arithmetic` (``add``, ``sub``,
            ``mul``, ``div`` = ``a · b⁻¹`` with ``b ≠ 0``, ``quad`` = ``a² + ab + b²``,
            ``cube_ab`` = ``a³ + ab``, ...).
        p: the modulus (a prime).
        train_fraction: fraction of all ``(a, b)`` pairs used for training.
        lr, weight_decay, beta1, beta2, eps: AdamW's (decoupled weight decay).
        base: ``adamw``, or ``adam`` (coupled L2, ``grad += wd·w``: Grokfast's reference runs).
        warmup_steps: linear learning-rate warm-up (Power et al. use 10).
        batch_size: minibatch size, sampled with replacement per step; 0 = full batch.
        max_steps: steps after which a seed that has not reached the target counts as censored.
        eval_every: steps between accuracy checks (the resolution of "steps to target").
        d_embed, width, depth: the MLP's sizes. d_model, n_heads, n_layers: the transformer's
            (its MLP is ``4·d_model`` wide).
    """

    model: str = "mlp"
    op: str = "add"
    p: int = 59
    train_fraction: float = 0.5
    lr: float = 3e-3
    weight_decay: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    base: str = "adamw"
    warmup_steps: int = 0
    batch_size: int = 512
    max_steps: int = 6000
    eval_every: int = 25
    d_embed: int = 128
    width: int = 256
    depth: int = 1
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 2

    def __post_init__(self):
        check_positive(self, "lr", "eps")
        check_nonnegative(self, "weight_decay", "warmup_steps")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"beta1, beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.op not in OPERATIONS:
            raise ConfigError(f"unknown op {self.op!r}; one of {', '.join(OPERATIONS)}")
        if self.model not in ("mlp", "transformer"):
            raise ConfigError(f"model must be 'mlp' or 'transformer', got {self.model!r}")
        if self.base not in ("adamw", "adam"):
            raise ConfigError(f"base must be 'adamw' or 'adam', got {self.base!r}")
        if not 0 < self.train_fraction < 1:
            raise ConfigError(f"train_fraction must be in (0, 1), got {self.train_fraction}")
        for name in ("max_steps", "eval_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 0:
            raise ConfigError(f"batch_size must be >= 0 (0 = full batch), got {self.batch_size}")


_T: dict[str, Any] = dict(model="transformer", lr=1e-3, p=97, warmup_steps=10)
SETTINGS: dict[str, Setting] = {
    # Seconds-sized, for tests: p = 23, 80% train, a narrow MLP; AdamW groks in ~400 steps.
    "tiny": Setting(p=23, train_fraction=0.8, d_embed=32, width=64, lr=1e-2, max_steps=600,
                    eval_every=20),
    # CI-sized: AdamW groks in ~1.5k steps (MLP, p = 59, 50% train, lr 3e-3, batch 512).
    "ci": Setting(),
    # The MLP at the original grokking paper's optimizer settings (lr 1e-3, wd 1), p = 97.
    "mlp-add": Setting(p=97, train_fraction=0.4, lr=1e-3, max_steps=12000, eval_every=50),
    "mlp-sub": Setting(op="sub", p=97, train_fraction=0.4, lr=1e-3, max_steps=12000,
                       eval_every=50),
    "mlp-mul": Setting(op="mul", p=97, train_fraction=0.4, lr=1e-3, max_steps=12000,
                       eval_every=50),
    "mlp-div": Setting(op="div", p=97, train_fraction=0.4, lr=1e-3, max_steps=12000,
                       eval_every=50),
    "mlp-quad": Setting(op="quad", p=97, train_fraction=0.5, lr=1e-3, max_steps=12000,
                        eval_every=50),
    # Regimes where AdamW groks slowly: weaker weight decay, less data, small / full batches.
    "mlp-add-wd0.3": Setting(p=97, train_fraction=0.4, lr=1e-3, weight_decay=0.3,
                             max_steps=40000, eval_every=100),
    "mlp-add-wd0.1": Setting(p=97, train_fraction=0.4, lr=1e-3, weight_decay=0.1,
                             max_steps=60000, eval_every=200),
    "mlp-add-frac0.3": Setting(p=97, train_fraction=0.3, lr=1e-3, max_steps=20000,
                               eval_every=50),
    "mlp-add-batch64": Setting(p=97, train_fraction=0.4, lr=1e-3, batch_size=64,
                               max_steps=20000, eval_every=50),
    "mlp-add-fullbatch": Setting(p=97, train_fraction=0.4, lr=1e-3, batch_size=0,
                                 max_steps=12000, eval_every=50),
    # Transformers: Power et al.'s optimizer settings (lr 1e-3, wd 1, β2 0.98, batch 512, 10
    # warm-up steps), and Grokfast's reference regime: no weight decay, 50% of x·y mod 97.
    "tf-add": Setting(**_T, op="add", max_steps=10000, eval_every=50),
    "tf-div": Setting(**_T, op="div", max_steps=10000, eval_every=50),
    "tf-mul-wd0": Setting(**_T, op="mul", weight_decay=0.0, max_steps=15000, eval_every=100),
}


# -- optimizers (names of tangentscope.optim.spec, with @key=value variants) ---------------------
# The claim's grid (`--preset full`): every statistics source and placement, Grokfast, AdamW.
FULL_OPTIMIZERS = ("adamw", "gated", "gated-grad", "gated-moments", "gated-streaming",
                   "grokfast")
FULL_SETTINGS = ("ci", "mlp-add", "mlp-sub", "mlp-mul", "mlp-div", "mlp-add-wd0.3",
                 "mlp-add-wd0.1", "mlp-add-frac0.3", "mlp-add-batch64", "mlp-add-fullbatch",
                 "tf-add")
# Variants grounded in the derivation (`--preset variants`).
VARIANT_OPTIMIZERS = ("adamw", "gated@gate=soft", "gated-grad@gate=soft",
                      "gated@threshold=0.25", "gated-streaming@gate_on=grad",
                      "gated-grad+grokfast", "grokfast-ma")
VARIANT_SETTINGS = ("ci", "mlp-add")


@dataclasses.dataclass(frozen=True)
class ModularTask:
    """All ``N`` examples once, and each seed's split: ``x (N, L)``, ``y (N,)``,
    ``train_idx (E, n_train)``, ``val_idx (E, n_val)`` (indices into ``x``)."""

    x: Tensor
    y: Tensor
    train_idx: Tensor
    val_idx: Tensor
    n_classes: int
    vocab: int


def make_task(setting: Setting, seeds: Sequence[int]) -> ModularTask:
    """The dataset of ``setting`` and one train/validation split per seed."""
    splits = [_modular(setting, seed) for seed in seeds]
    x, y = splits[0][0], splits[0][1]
    for xs, ys, _, _ in splits[1:]:
        if not (torch.equal(xs, x) and torch.equal(ys, y)):
            raise AssertionError("modular_arithmetic must list the same examples for every seed")
    if setting.model == "transformer":  # the sequence  a ∘ b =  (tokens p and p + 1)
        p = setting.p
        n = x.shape[0]
        x = torch.stack([x[:, 0], torch.full((n,), p), x[:, 1], torch.full((n,), p + 1)], 1)
        vocab = p + 2
    else:
        vocab = setting.p
    return ModularTask(x=x, y=y, train_idx=torch.stack([s[2] for s in splits]),
                 val_idx=torch.stack([s[3] for s in splits]), n_classes=setting.p, vocab=vocab)


def _modular(setting: Setting, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x (N, 2), y (N,), train_idx, val_idx)`` of :func:`~tangentscope.data.modular_arithmetic`
    for ``(a ∘ b) mod p``: all pairs ``0 ≤ a, b < p`` (``b ≠ 0`` for ``div``), split by a
    permutation seeded with ``seed``: the first ``round(train_fraction · N)`` for training (the
    recorded results in docs/grokking.md use exactly this split).

    Raises:
        ConfigError: an unknown op, a non-prime ``p`` for ``div``, or a train fraction that
            leaves one side empty.
    """
    d = modular_arithmetic(setting.p, setting.op, setting.train_fraction, seed=seed)
    N = len(d.y)
    if not 0 < round(setting.train_fraction * N) < N:
        raise ConfigError(f"train_fraction={setting.train_fraction} leaves an empty split of "
                          f"{N} examples")
    return d.x, d.y, d.train_idx, d.val_idx


def build_model(setting: Setting, task: ModularTask, seeds: Sequence[int], stacked: bool = True
                ) -> nn.Module:
    """One model per seed (initialised after ``seed_everything(seed)``), stacked — or, with
    ``stacked=False``, the single seed's plain model in a :class:`SingleModel` wrapper.

    Returns a module mapping tokens ``(B, E, L)`` to logits ``(B, E, p)``.
    """
    models = [build_single_model(setting, task, seed) for seed in seeds]
    if not stacked:
        if len(models) != 1:
            raise ConfigError("an unstacked cell trains exactly one seed")
        return SingleModel(models[0])
    if setting.model == "mlp":
        return EmbeddingMLPEnsemble.from_models(cast(list[EmbeddingMLP], models))
    return StackedEnsemble(models)


class SingleModel(nn.Module):
    """A plain model behind the stacked interface ``(B, 1, L) → (B, 1, p)``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x[:, 0])[:, None]


def build_single_model(setting: Setting, task: ModularTask, seed: int) -> nn.Module:
    """The plain model of ``setting`` for one seed (``seed_everything(seed)`` first):
    tokens ``(B, L)`` → logits ``(B, p)``."""
    seed_everything(seed)
    if setting.model == "mlp":
        return EmbeddingMLP(task.vocab, task.n_classes, d_embed=setting.d_embed,
                            width=setting.width, depth=setting.depth)
    return TinyTransformer(task.vocab, task.n_classes, d_model=setting.d_model,
                           n_heads=setting.n_heads, n_layers=setting.n_layers,
                           d_mlp=4 * setting.d_model, max_len=task.x.shape[1])


class EnsembleMoments:
    """Exact per-example moments of a stacked :class:`~tangentscope.models.EmbeddingMLPEnsemble`
    from its closed forms (``grad_sq_sums``), as a ``moments=`` provider of
    :func:`~tangentscope.optim.spec.build_optimizer`; ``batch`` examples per member and step."""

    def __init__(self, model: EmbeddingMLPEnsemble, batch: int):
        model.capture = True
        self.model, self.batch = model, batch

    def __call__(self) -> dict[Tensor, GradMoments]:
        sq = self.model.grad_sq_sums()
        return {p: GradMoments(p.grad, sq[n], self.batch) for n, p in
                self.model.named_parameters() if p.grad is not None}


def build_cell_optimizer(spec: str | OptimizerSpec, model: nn.Module, setting: Setting,
                         batch: int) -> BuiltOptimizer:
    """The optimizer of ``spec`` on ``model`` with ``setting``'s hyper-parameters.

    ``model`` is a plain module (tokens ``(B, L)``), a :class:`SingleModel` wrapper, a
    :class:`~tangentscope.models.StackedEnsemble` or an ``EmbeddingMLPEnsemble``. A setting with
    ``base='adam'`` turns AdamW into Adam (coupled L2); the gate skips non-finite steps silently
    (``nonfinite=ignore``: the run records the divergence). Exact statistics come from
    :class:`~tangentscope.optim.PerExampleStats` on plain models and from the ensemble's own
    closed forms (:class:`EnsembleMoments`, ``batch`` examples per step) on a stacked MLP; a
    stacked transformer has none (train it unstacked).

    Raises:
        ConfigError: a gated spec on an Adam setting, or exact statistics on a stacked
            transformer.
    """
    sp = parse_optimizer(spec)
    if sp.rule == "gated-adamw":
        if setting.base != "adamw":
            raise ConfigError("gated optimizers are AdamW-based; use a setting with base='adamw'")
        sp = sp.replace(nonfinite="ignore")
    elif setting.base == "adam" and sp.rule == "adamw":
        sp = sp.replace(name="adam", **{k: getattr(sp, k) for k in
                                        ("grokfast", "alpha", "lamb", "window_size")
                                        if getattr(sp, k) is not None})
    kw: dict[str, Any] = dict(lr=setting.lr, weight_decay=setting.weight_decay)
    if sp.rule != "sgd":
        kw.update(betas=(setting.beta1, setting.beta2), eps=setting.eps)
    if sp.rule == "gated-adamw" and sp.stats == "exact":
        if isinstance(model, EmbeddingMLPEnsemble):
            return build_optimizer(sp, model, **kw, moments=EnsembleMoments(model, batch))
        if isinstance(model, StackedEnsemble):
            raise ConfigError("exact statistics need an unstacked transformer (one seed per "
                              "job); GroupJob splits such cells automatically")
        inner = model.inner if isinstance(model, SingleModel) else model
        return build_optimizer(sp, model, **kw, model=inner)
    return build_optimizer(sp, model, **kw)


def gate_pass_fraction(optimizer: torch.optim.Optimizer) -> float | None:
    """The last step's fraction of coordinates updated (mean gate value); ``None`` for an
    optimizer without gate (one device sync: call it rarely)."""
    stats = getattr(optimizer, "gate_stats", None)
    if stats is None:
        return None
    fr = [f for f in stats()["fraction_updated"] if f is not None]
    return float(np.mean(fr)) if fr else None
