"""Grokking speed: AdamW vs the population-risk gate vs Grokfast on ``(a ∘ b) mod p``.

The claim under test (the essay and the preprint's abstract): the gate "accelerates grokking by
5×" over AdamW. One run of this experiment trains every ``optimizer × setting × seed`` cell and
records the steps (and seconds) until validation accuracy first reaches ``target`` (99%), and
until train accuracy does; the summary is a table of medians and spreads over seeds with the
speed-up of each optimizer over AdamW on the same seeds.

A *setting* (:data:`SETTINGS`) fixes the task (operation, ``p``, train fraction), the model (an
MLP over learned embeddings or a small transformer) and the AdamW hyper-parameters; an
*optimizer* (:data:`OPTIMIZERS`) is AdamW, a gated AdamW (statistics source × gate placement ×
threshold), Grokfast on AdamW, or a combination. Variants are spelled ``name@key=value@...``,
e.g. ``gated@threshold=2``.

The seeds of one ``(setting, optimizer)`` cell are trained together as one stacked model (every
parameter carries a leading seed axis, see :func:`train_group`): with elementwise optimizers
this is exactly ``n_seeds`` independent runs (tested in float64), at the cost of one on an
accelerator. Cells can also be spread over ``workers`` processes (``cuda_workers`` of them on
the GPU). Results: docs/grokking.md.

    tangentscope run grokking --preset smoke
    tangentscope run grokking --preset full --workers 16 --cuda_workers 10
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._utils import progress, seed_everything
from ..errors import ConfigError
from ..io import RunDir
from ._framework import Experiment

__all__ = ["Config", "EXPERIMENT", "OPTIMIZERS", "SETTINGS", "Setting", "parse_optimizer",
           "plot", "run", "summarize", "table_markdown", "train_group"]


# -- settings -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Setting:
    """One regime: task, model and base-optimizer hyper-parameters.

    Attributes:
        model: ``mlp`` (:class:`~tangentscope.models.embedding_mlp.EmbeddingMLP` on ``(a, b)``)
            or ``transformer`` (:class:`~tangentscope.models.TinyTransformer` on the sequence
            ``a ∘ b =``, logits at ``=``).
        op: ``add``, ``sub``, ``mul``, ``div`` (``a · b⁻¹``, ``b ≠ 0``), ``quad``
            (``a² + ab + b²``) or ``cubic`` (``a³ + ab``).
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


_T = dict(model="transformer", lr=1e-3, p=97, warmup_steps=10)
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

# -- optimizers ---------------------------------------------------------------------------------
_GATE_KEYS = ("gate_on", "stats", "threshold", "soft", "gate")
_GROKFAST_KEYS = ("grokfast", "alpha", "lamb", "window_size")
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": {},
    "grokfast": {"grokfast": "ema", "alpha": 0.98, "lamb": 2.0},
    "grokfast-ma": {"grokfast": "ma", "window_size": 100, "lamb": 5.0},
    "gated": {"gate_on": "update", "stats": "exact"},
    "gated-grad": {"gate_on": "grad", "stats": "exact"},
    "gated-moments": {"gate_on": "moments", "stats": "exact"},
    "gated-streaming": {"gate_on": "update", "stats": "streaming"},
    "gated-grad+grokfast": {"gate_on": "grad", "stats": "exact", "grokfast": "ema",
                            "alpha": 0.98, "lamb": 2.0},
}
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


def parse_optimizer(name: str) -> dict[str, Any]:
    """``'gated@threshold=2@gate_on=grad'`` → the registry entry with those keys replaced.

    Raises:
        ConfigError: unknown base name or key (the message lists the valid ones).
    """
    base, *mods = name.split("@")
    if base not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {base!r}; known: {', '.join(OPTIMIZERS)} "
                          "(variants: NAME@key=value, e.g. gated@threshold=2)")
    spec = dict(OPTIMIZERS[base])
    for m in mods:
        if "=" not in m:
            raise ConfigError(f"optimizer variant {m!r} in {name!r} must read key=value")
        k, v = m.split("=", 1)
        if k not in _GATE_KEYS + _GROKFAST_KEYS:
            raise ConfigError(f"unknown optimizer key {k!r} in {name!r}; keys: "
                              f"{', '.join(_GATE_KEYS + _GROKFAST_KEYS)}")
        spec[k] = _literal(v)
    if spec.get("grokfast") not in (None, "ema", "ma"):
        raise ConfigError(f"grokfast must be 'ema' or 'ma' in {name!r}")
    return spec


def _literal(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(v.lower(), v)


# -- task and models ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Task:
    """All ``N`` examples once, and each seed's split: ``x (N, L)``, ``y (N,)``,
    ``train_idx (E, n_train)``, ``val_idx (E, n_val)`` (indices into ``x``)."""

    x: Tensor
    y: Tensor
    train_idx: Tensor
    val_idx: Tensor
    n_classes: int
    vocab: int


def make_task(setting: Setting, seeds: Sequence[int]) -> _Task:
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
    return _Task(x=x, y=y, train_idx=torch.stack([s[2] for s in splits]),
                 val_idx=torch.stack([s[3] for s in splits]), n_classes=setting.p, vocab=vocab)


_OPS = {
    "add": lambda a, b, p: (a + b) % p,
    "sub": lambda a, b, p: (a - b) % p,
    "mul": lambda a, b, p: (a * b) % p,
    "div": lambda a, b, p: (a * torch.tensor([pow(int(v), p - 2, p) for v in b])) % p,
    "quad": lambda a, b, p: (a * a + a * b + b * b) % p,
    "cubic": lambda a, b, p: (a ** 3 + a * b) % p,
}


def _modular(setting: Setting, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x (N, 2), y (N,), train_idx, val_idx)`` for ``(a ∘ b) mod p``: all pairs
    ``0 ≤ a, b < p`` (``b ≠ 0`` for ``div``, computed as ``a · b^{p−2}``), split by a permutation
    seeded with ``seed``: the first ``round(train_fraction · N)`` for training (the recorded
    results in docs/grokking.md use exactly this split).
    """
    p = setting.p
    if setting.op not in _OPS:
        raise ConfigError(f"unknown op {setting.op!r}; one of {', '.join(_OPS)}")
    a, b = (t.reshape(-1) for t in torch.meshgrid(torch.arange(p), torch.arange(p),
                                                  indexing="ij"))
    if setting.op == "div":
        a, b = a[b != 0], b[b != 0]
    y = _OPS[setting.op](a, b, p)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n = round(setting.train_fraction * len(y))
    if not 0 < n < len(y):
        raise ConfigError(f"train_fraction={setting.train_fraction} leaves an empty split of "
                          f"{len(y)} examples")
    return torch.stack([a, b], 1), y, perm[:n].sort().values, perm[n:].sort().values


def build_model(setting: Setting, task: _Task, seeds: Sequence[int], stacked: bool = True
                ) -> nn.Module:
    """One model per seed (initialised after ``seed_everything(seed)``), stacked — or, with
    ``stacked=False``, the single seed's plain model in a :class:`_Single` wrapper.

    Returns a module mapping tokens ``(B, E, L)`` to logits ``(B, E, p)``.
    """
    from ..models.embedding_mlp import EmbeddingMLPEnsemble

    models = [build_single_model(setting, task, seed) for seed in seeds]
    if not stacked:
        if len(models) != 1:
            raise ConfigError("an unstacked cell trains exactly one seed")
        return _Single(models[0])
    if setting.model == "mlp":
        return EmbeddingMLPEnsemble.from_models(models)
    return StackedEnsemble(models)


class _Single(nn.Module):
    """A plain model behind the stacked interface ``(B, 1, L) → (B, 1, p)``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x[:, 0])[:, None]


def build_single_model(setting: Setting, task: _Task, seed: int) -> nn.Module:
    """The plain model of ``setting`` for one seed (``seed_everything(seed)`` first):
    tokens ``(B, L)`` → logits ``(B, p)``."""
    from ..models.embedding_mlp import EmbeddingMLP
    from ..models.transformer import TinyTransformer

    seed_everything(seed)
    if setting.model == "mlp":
        return EmbeddingMLP(task.vocab, task.n_classes, d_embed=setting.d_embed,
                            width=setting.width, depth=setting.depth)
    return TinyTransformer(task.vocab, task.n_classes, d_model=setting.d_model,
                           n_heads=setting.n_heads, n_layers=setting.n_layers,
                           d_mlp=4 * setting.d_model, max_len=task.x.shape[1])


class StackedEnsemble(nn.Module):
    """``E`` copies of any module as one: parameters stacked on a leading axis, the forward
    ``vmap``-ed over it (``torch.func.stack_module_state`` + ``functional_call``).

    Tokens ``(B, E, ...)`` → outputs ``(B, E, ...)`` (batch first, like
    :class:`~tangentscope.models.embedding_mlp.EmbeddingMLPEnsemble`).
    """

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        import copy

        from torch.func import stack_module_state

        params, buffers = stack_module_state(list(models))
        self.n_members = len(models)
        self._names = list(params)
        self.stacked = nn.ParameterList(nn.Parameter(params[k].detach().clone())
                                        for k in self._names)
        self._buffers_stacked = buffers
        self._base = [copy.deepcopy(models[0]).to("meta")]

    def forward(self, x: Tensor) -> Tensor:
        from torch.func import functional_call, vmap

        base = self._base[0]

        def one(params: tuple[Tensor, ...], xe: Tensor) -> Tensor:
            return functional_call(base, dict(zip(self._names, params)), (xe,))

        return vmap(one, in_dims=(0, 1), out_dims=1)(tuple(self.stacked), x)


# -- optimizers ---------------------------------------------------------------------------------
@dataclasses.dataclass
class _Trainer:
    """The optimizer, an optional gradient filter run between ``backward`` and ``step``, and
    where the gate's statistics come from.

    ``step(batch)`` runs ``filter → optimizer.step``; for a stacked MLP with exact statistics it
    passes the closed-form per-example moments (``EmbeddingMLPEnsemble.grad_sq_sums``) to
    ``GatedAdamW.step(moments=...)``. With a filter, the gate's signal and noise are those of
    the raw minibatch gradient, and the gated step moves along the filtered one.
    """

    optimizer: torch.optim.Optimizer
    grad_filter: Any = None
    ensemble_moments: nn.Module | None = None

    def step(self, batch: int) -> None:
        moments = None
        if self.ensemble_moments is not None:
            from ..optim import GradMoments

            sq = self.ensemble_moments.grad_sq_sums()
            moments = {p: GradMoments(p.grad.clone() if self.grad_filter else p.grad, sq[n],
                                      batch) for n, p in
                       self.ensemble_moments.named_parameters() if p.grad is not None}
        if self.grad_filter is not None:
            self.grad_filter()
        if moments is None:
            self.optimizer.step()
        else:
            self.optimizer.step(moments=moments)

    def gate_pass_fraction(self) -> float | None:
        """The last step's fraction of coordinates updated (mean gate value); ``None`` for an
        optimizer without gate (one device sync: call it rarely)."""
        stats = getattr(self.optimizer, "gate_stats", None)
        if stats is None:
            return None
        fr = [f for f in stats()["fraction_updated"] if f is not None]
        return float(np.mean(fr)) if fr else None


def make_trainer(spec: Mapping[str, Any], model: nn.Module, setting: Setting) -> _Trainer:
    """The optimizer of ``spec`` (see :func:`parse_optimizer`) on ``model``'s parameters.

    ``model`` is a plain module (tokens ``(B, L)``), a :class:`_Single` wrapper, a
    :class:`StackedEnsemble` or an ``EmbeddingMLPEnsemble``. Exact statistics come from
    :class:`~tangentscope.optim.PerExampleStats` on plain models and from the ensemble's own
    closed forms on a stacked MLP; a stacked transformer has none (train it unstacked).
    """
    from ..models.embedding_mlp import EmbeddingMLPEnsemble

    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=setting.lr, betas=(setting.beta1, setting.beta2), eps=setting.eps,
              weight_decay=setting.weight_decay)
    gate_kw = {k: spec[k] for k in _GATE_KEYS if k in spec}
    ensemble_moments = None
    if gate_kw:
        if setting.base != "adamw":
            raise ConfigError("gated optimizers are AdamW-based; use a setting with base='adamw'")
        from ..optim import GatedAdamW, PerExampleStats

        stats = gate_kw.pop("stats", "streaming")
        if stats == "exact":
            if isinstance(model, EmbeddingMLPEnsemble):
                model.capture = True
                ensemble_moments, stats = model, "streaming"  # moments passed at each step
            elif isinstance(model, StackedEnsemble):
                raise ConfigError("exact statistics need an unstacked transformer (one seed "
                                  "per job); GroupJob splits such cells automatically")
            else:
                stats = PerExampleStats(model.inner if isinstance(model, _Single) else model)
        elif stats != "streaming":
            raise ConfigError(f"stats must be 'exact' or 'streaming', got {stats!r}")
        opt: torch.optim.Optimizer = GatedAdamW(params, **kw, **gate_kw, stats=stats,
                                                nonfinite="ignore")
    elif setting.base == "adam":
        opt = torch.optim.Adam(params, **kw)
    else:
        opt = torch.optim.AdamW(params, **kw)
    filt = None
    if spec.get("grokfast") == "ema":
        from ..optim.grokfast import GrokfastEMA

        filt = GrokfastEMA(params, alpha=spec.get("alpha", 0.98), lamb=spec.get("lamb", 2.0))
    elif spec.get("grokfast") == "ma":
        from ..optim.grokfast import GrokfastMA

        filt = GrokfastMA(params, window_size=int(spec.get("window_size", 100)),
                          lamb=spec.get("lamb", 5.0))
    return _Trainer(opt, filt, ensemble_moments)


def stacks_seeds(setting: Setting, optimizer: str) -> bool:
    """Whether the seeds of a cell can share one stacked model (not: transformer + exact)."""
    return setting.model == "mlp" or parse_optimizer(optimizer).get("stats") != "exact"


# -- training one (setting, optimizer) cell over its seeds --------------------------------------
@dataclasses.dataclass(frozen=True)
class GroupJob:
    """One ``(setting, optimizer)`` cell: its seeds are trained together as one stacked model."""

    setting_name: str
    setting: Setting
    optimizer: str
    seeds: tuple[int, ...]
    target: float = 0.99
    log_every: int = 200
    checkpoint: str | None = None
    checkpoint_seconds: float = 60.0


@dataclasses.dataclass(frozen=True)
class GroupResult:
    """``rows`` for ``metrics.csv`` and one result dict per seed (``cells``)."""

    rows: list[dict[str, Any]]
    cells: list[dict[str, Any]]


def relative_cost(job: GroupJob) -> float:
    """A rough per-step cost used only to start the slowest cells first."""
    c = 4.0 if job.setting.model == "transformer" else 1.0
    spec = parse_optimizer(job.optimizer)
    if spec.get("stats") == "exact":
        c *= 1.5
    if job.setting.batch_size == 0:
        c *= 4.0
    return c


@torch.no_grad()
def _evaluate(model: nn.Module, task: _Task) -> dict[str, Tensor]:
    """Train/val accuracy and loss per member ``(E,)`` on every example."""
    E = task.train_idx.shape[0]
    logits = model(task.x[:, None, :].expand(-1, E, -1))  # (N, E, C)
    y = task.y[:, None].expand(-1, E)
    correct = (logits.argmax(-1) == y).float().T  # (E, N)
    loss = torch.nn.functional.cross_entropy(logits.permute(0, 2, 1), y, reduction="none").T
    out = {}
    for split, idx in (("train", task.train_idx), ("val", task.val_idx)):
        out[f"{split}_acc"] = correct.gather(1, idx).mean(1)
        out[f"{split}_loss"] = loss.gather(1, idx).mean(1)
    return out


def train_group(job: GroupJob, device: str = "cpu", *, quiet: bool = True) -> GroupResult:
    """Train ``job.seeds`` of one ``(setting, optimizer)`` until every seed has reached
    ``job.target`` on validation and train accuracy, or ``max_steps``.

    Each seed gets its own split, initialization (``seed_everything(seed)`` before building its
    model) and minibatch stream (a generator seeded ``10_000 + seed``), so the result per seed
    does not depend on which other seeds share the stack. With ``job.checkpoint`` set, the cell
    saves its state every ``checkpoint_seconds`` and resumes from it when restarted.
    """
    st = job.setting
    dev = torch.device(device)
    task = make_task(st, job.seeds)
    model = build_model(st, task, job.seeds, stacked=stacks_seeds(st, job.optimizer))
    task = _Task(*(t.to(dev) if isinstance(t, Tensor) else t for t in dataclasses.astuple(task)))
    model = model.to(dev)
    trainer = make_trainer(parse_optimizer(job.optimizer), model, st)
    opt = trainer.optimizer
    E, n_train = task.train_idx.shape
    gens = [torch.Generator(device=dev).manual_seed(10_000 + s) for s in job.seeds]
    hit_val: list[int | None] = [None] * E
    hit_train: list[int | None] = [None] * E
    sec_val: list[float | None] = [None] * E
    rows: list[dict[str, Any]] = []
    gate_fracs: list[float] = []
    start, train_seconds, diverged = 0, 0.0, False
    ckpt = Path(job.checkpoint) if job.checkpoint else None
    if ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location=dev)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if trainer.grad_filter is not None:
            trainer.grad_filter.load_state_dict(state["grad_filter"])
        for g, gs in zip(gens, state["gens"]):
            g.set_state(gs.cpu())
        start, train_seconds = state["step"], state["train_seconds"]
        hit_val, hit_train, sec_val = state["hit_val"], state["hit_train"], state["sec_val"]
        rows, gate_fracs = state["rows"], state["gate_fracs"]
    last_ckpt = time.monotonic()
    step = start
    metrics: dict[str, Tensor] = {}
    while step < st.max_steps:
        t0 = time.perf_counter()
        for _ in range(st.eval_every):
            step += 1
            if st.warmup_steps:
                for grp in opt.param_groups:
                    grp["lr"] = st.lr * min(1.0, step / st.warmup_steps)
            if st.batch_size == 0 or st.batch_size >= n_train:
                idx = task.train_idx.T  # (n_train, E)
            else:
                u = torch.stack([torch.randint(n_train, (st.batch_size,), generator=g,
                                               device=dev) for g in gens], 1)
                idx = task.train_idx.T.gather(0, u)  # (B, E)
            logits = model(task.x[idx])  # (B, E, C)
            per_example = torch.nn.functional.cross_entropy(
                logits.permute(0, 2, 1), task.y[idx], reduction="none")  # (B, E)
            opt.zero_grad(set_to_none=True)
            per_example.mean(0).sum().backward()
            trainer.step(idx.shape[0])
            if step >= st.max_steps:
                break
        frac = trainer.gate_pass_fraction()
        if frac is not None:
            gate_fracs.append(frac)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        train_seconds += time.perf_counter() - t0
        metrics = {k: v.cpu() for k, v in _evaluate(model, task).items()}
        if not all(math.isfinite(float(v)) for v in metrics["train_loss"]):
            diverged = True
        for e in range(E):
            if hit_train[e] is None and metrics["train_acc"][e] >= job.target:
                hit_train[e] = step
            if hit_val[e] is None and metrics["val_acc"][e] >= job.target:
                hit_val[e], sec_val[e] = step, train_seconds
        if step % job.log_every < st.eval_every or step >= st.max_steps:
            for e, seed in enumerate(job.seeds):
                rows.append({"setting": job.setting_name, "optimizer": job.optimizer,
                             "seed": seed, "step": step, "seconds": round(train_seconds, 3),
                             **{k: round(float(v[e]), 6) for k, v in metrics.items()}})
        if all(h is not None for h in hit_val + hit_train) or diverged:
            break
        if ckpt is not None and time.monotonic() - last_ckpt > job.checkpoint_seconds:
            _save_checkpoint(ckpt, model, trainer, gens, step, train_seconds, hit_val,
                             hit_train, sec_val, rows, gate_fracs)
            last_ckpt = time.monotonic()
    cells = [{"steps_to_val": hit_val[e], "steps_to_train": hit_train[e],
              "seconds_to_val": sec_val[e], "seconds_per_step": train_seconds / max(step, 1),
              "steps_run": step, "final_train_acc": float(metrics["train_acc"][e]),
              "final_val_acc": float(metrics["val_acc"][e]),
              "gate_pass_fraction": float(np.mean(gate_fracs)) if gate_fracs else None,
              "diverged": diverged, "n_stacked": E, "device": str(dev)} for e in range(E)]
    return GroupResult(rows, cells)


def _save_checkpoint(path: Path, model: nn.Module, trainer: _Trainer, gens: list, step: int,
                     train_seconds: float, hit_val: list, hit_train: list, sec_val: list,
                     rows: list, gate_fracs: list) -> None:
    state = {"model": model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
             "grad_filter": (trainer.grad_filter.state_dict() if trainer.grad_filter is not None
                             else None),
             "gens": [g.get_state() for g in gens], "step": step,
             "train_seconds": train_seconds, "hit_val": hit_val, "hit_train": hit_train,
             "sec_val": sec_val, "rows": rows, "gate_fracs": gate_fracs}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# -- running many cells ---------------------------------------------------------------------------
def _worker(conn: Any, device: str) -> None:
    """A pool process: train the jobs the parent sends until it sends ``None``."""
    torch.set_num_threads(1)
    conn.send(("ready", None))
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            conn.send(("done", train_group(job, device)))
        except Exception:  # report, then keep serving (the parent decides)
            import traceback

            conn.send(("error", traceback.format_exc()))


def run_jobs(jobs: Sequence[GroupJob], *, workers: int = 1, cuda_workers: int = 0,
             device: str = "cpu") -> Iterator[tuple[GroupJob, GroupResult | str]]:
    """Yield ``(job, result)`` as cells finish (``result`` is the traceback text of a cell that
    failed in a worker; the other cells go on).

    ``workers == 1``: in this process, on ``device`` (``auto`` picks CUDA when available).
    Otherwise ``workers`` processes of one thread each, ``cuda_workers`` of them on the GPU;
    ``jobs`` should come longest first: a GPU worker takes the longest job left, a CPU worker
    the shortest, so a slow CPU worker never holds the last long job.

    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if (device.startswith("cuda") or cuda_workers) and not torch.cuda.is_available():
        raise ConfigError("a CUDA device was asked for but torch sees no GPU; use --device cpu "
                          "and --cuda_workers 0")
    if workers <= 1:
        for job in jobs:
            yield job, train_group(job, device)
        return
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    pending = list(jobs)
    conns, procs, running = {}, [], {}
    for i in range(min(workers, max(len(pending), 1))):
        parent, child = ctx.Pipe()
        dev = "cuda" if i < cuda_workers else "cpu"
        proc = ctx.Process(target=_worker, args=(child, dev), daemon=True)
        proc.start()
        conns[parent], running[parent] = dev, None
        procs.append(proc)
    try:
        while conns:
            for c in wait(list(conns)):
                kind, payload = c.recv()
                if kind in ("done", "error"):
                    yield running[c], payload
                if pending:
                    running[c] = pending.pop(0 if conns[c] == "cuda" else -1)
                    c.send(running[c])
                else:
                    c.send(None)
                    del conns[c]
    finally:
        for p in procs:
            p.join(timeout=1)
            if p.is_alive():
                p.terminate()


@dataclasses.dataclass(frozen=True)
class Config:
    """Grid of ``setting × optimizer × seed`` (every field can be set on the command line).

    Attributes:
        seed: first seed; the cell trains seeds ``seed … seed + n_seeds − 1``.
        n_seeds: seeds per ``(setting, optimizer)`` cell (≥ 5 for the claim).
        optimizer: optimizer names (keys of :data:`OPTIMIZERS`, with ``@key=value`` variants).
        setting: setting names (keys of :data:`SETTINGS`).
        op, prime, train_fraction, lr, weight_decay, batch_size, max_steps, eval_every: when
            set, override that field of every setting (``None``: the setting's own value;
            ``prime`` is the setting's ``p``).
        target: accuracy that counts as reached (0.99).
        device: ``cpu``, ``cuda`` or ``auto`` for in-process runs (``workers == 1``).
        workers: processes training cells in parallel (1: in this process).
        cuda_workers: how many of the ``workers`` use the GPU (the rest use one CPU thread).
        log_every: steps between rows of ``metrics.csv`` (the threshold is checked every
            ``eval_every`` steps regardless).
        checkpoint_seconds: a running cell checkpoints this often, so ``--resume`` continues it.
    """

    seed: int = 0
    n_seeds: int = 5
    optimizer: tuple[str, ...] = ("adamw", "gated", "grokfast")
    setting: tuple[str, ...] = ("ci",)
    op: str | None = None
    prime: int | None = None
    train_fraction: float | None = None
    lr: float | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    max_steps: int | None = None
    eval_every: int | None = None
    target: float = 0.99
    device: str = "cpu"
    workers: int = 1
    cuda_workers: int = 0
    log_every: int = 200
    checkpoint_seconds: float = 60.0

    def __post_init__(self):
        if self.n_seeds < 1:
            raise ConfigError(f"n_seeds must be >= 1, got {self.n_seeds}")
        if not 0 < self.target <= 1:
            raise ConfigError(f"target is an accuracy in (0, 1], got {self.target}")
        if self.workers < 1 or not 0 <= self.cuda_workers <= self.workers:
            raise ConfigError(f"need workers >= 1 and 0 <= cuda_workers <= workers, got "
                              f"workers={self.workers}, cuda_workers={self.cuda_workers}")
        for s in self.setting:
            if s not in SETTINGS:
                raise ConfigError(f"unknown setting {s!r}; known: {', '.join(SETTINGS)}")
        for o in self.optimizer:
            parse_optimizer(o)  # raises ConfigError naming the problem
        if not self.optimizer or not self.setting:
            raise ConfigError("give at least one --optimizer and one --setting")

    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.n_seeds))

    def resolved_setting(self, name: str) -> Setting:
        """``SETTINGS[name]`` with this config's overrides applied."""
        over = {f: getattr(self, f) for f in ("op", "train_fraction", "lr", "weight_decay",
                                              "batch_size", "max_steps", "eval_every")
                if getattr(self, f) is not None}
        if self.prime is not None:
            over["p"] = self.prime
        return dataclasses.replace(SETTINGS[name], **over)


def _cell_key(setting: str, optimizer: str, seed: int) -> str:
    return f"{setting}|{optimizer}|seed{seed}"


def _group_key(setting: str, optimizer: str) -> str:
    return f"{setting}|{optimizer}"


# -- run ----------------------------------------------------------------------------------------
def run(cfg: Config, rd: RunDir) -> dict[str, Any]:
    """Train every missing cell; log curves and results as each ``(setting, optimizer)`` ends."""
    done = rd.cells()
    jobs = []
    for s in cfg.setting:
        setting = cfg.resolved_setting(s)
        for o in cfg.optimizer:
            seeds = [sd for sd in cfg.seeds() if _cell_key(s, o, sd) not in done]
            groups = [seeds] if stacks_seeds(setting, o) else [[sd] for sd in seeds]
            for grp in groups if seeds else []:
                tag = _safe(s, o, f"seeds{grp[0]}-{grp[-1]}")
                jobs.append(GroupJob(setting_name=s, setting=setting, optimizer=o,
                                     seeds=tuple(grp), target=cfg.target,
                                     log_every=cfg.log_every,
                                     checkpoint=str(rd.path / f"state-{tag}.pt"),
                                     checkpoint_seconds=cfg.checkpoint_seconds))
    # longest expected first, so a parallel run is not left waiting on one slow cell
    jobs.sort(key=lambda j: -j.setting.max_steps * relative_cost(j) * len(j.seeds))

    failed = []

    def record(job: GroupJob, res: GroupResult | str) -> None:
        if isinstance(res, str):  # not saved as a cell: --resume retries it
            failed.append({"setting": job.setting_name, "optimizer": job.optimizer,
                           "seeds": list(job.seeds), "error": res[-2000:]})
            print(f"[grokking] cell {job.setting_name} / {job.optimizer} failed:\n{res}",
                  flush=True)
            return
        for row in res.rows:
            rd.log(**row)
        for seed, cell in zip(job.seeds, res.cells):
            rd.save_cell(_cell_key(job.setting_name, job.optimizer, seed), cell)
        Path(job.checkpoint).unlink(missing_ok=True)

    for job, res in progress(run_jobs(jobs, workers=cfg.workers,
                                      cuda_workers=cfg.cuda_workers, device=cfg.device),
                             desc="grokking cells", total=len(jobs)):
        record(job, res)
    return {**summarize(cfg, rd.cells()), "failed_cells": failed}


def _safe(*parts: str) -> str:
    return "-".join("".join(c if c.isalnum() or c in "._=" else "_" for c in p) for p in parts)


# -- summary ------------------------------------------------------------------------------------
def _stats(values: Sequence[float | None], cap: int) -> dict[str, Any]:
    """Median / quartiles with censoring: a seed that never reached the target counts as ∞.

    A statistic that lands on a censored seed is ``None`` (read: "> cap"); ``reached`` counts
    the seeds that did reach it.
    """
    xs = sorted(math.inf if v is None else float(v) for v in values)
    n = len(xs)
    if n == 0:
        return {"median": None, "q25": None, "q75": None, "min": None, "max": None, "n": 0,
                "reached": 0, "cap": cap}
    fin = lambda x: x if math.isfinite(x) else None  # noqa: E731
    q = lambda f: fin(float(np.quantile(np.array(xs), f, method="inverted_cdf")))  # noqa: E731
    med = float(np.median(xs)) if all(math.isfinite(x) for x in xs) else q(0.5)
    return {"median": med, "q25": q(0.25), "q75": q(0.75), "min": fin(xs[0]),
            "max": fin(xs[-1]), "n": n, "reached": sum(math.isfinite(x) for x in xs),
            "cap": cap}


def summarize(cfg: Config, cells: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The comparison table (one row per ``setting × optimizer``) and the verdict."""
    rows = []
    for s in cfg.setting:
        cap = cfg.resolved_setting(s).max_steps
        base = {sd: cells.get(_cell_key(s, "adamw", sd)) for sd in cfg.seeds()}
        for o in cfg.optimizer:
            recs = [(sd, cells.get(_cell_key(s, o, sd))) for sd in cfg.seeds()]
            recs = [(sd, r) for sd, r in recs if r is not None]
            if not recs:
                continue
            val = [r["steps_to_val"] for _, r in recs]
            st = _stats(val, cap)
            row = {"setting": s, "optimizer": o, "seeds": [sd for sd, _ in recs],
                   "steps_to_val": st, "steps_to_train": _stats([r["steps_to_train"]
                                                                 for _, r in recs], cap),
                   "seconds_to_val": _stats([r["seconds_to_val"] for _, r in recs], cap),
                   "seconds_per_step": float(np.median([r["seconds_per_step"] for _, r in recs])),
                   "device": "/".join(sorted({r.get("device", "?") for _, r in recs})),
                   "stacked": max(r.get("n_stacked", 1) for _, r in recs),
                   "gate_pass_fraction": _nanmedian([r.get("gate_pass_fraction") for _, r in recs]),
                   "final_val_acc": float(np.median([r["final_val_acc"] for _, r in recs]))}
            paired = [_ratio(base[sd]["steps_to_val"], r["steps_to_val"]) for sd, r in recs
                      if base.get(sd) is not None]
            row["paired_speedup_median"] = _finite_median(paired)
            b = _stats([base[sd]["steps_to_val"] for sd, _ in recs if base.get(sd)], cap)
            row["speedup_vs_adamw"], row["speedup_bound"] = _speedup(b, st, cap)
            rows.append(row)
    out: dict[str, Any] = {"table": rows, "target": cfg.target, "seeds": cfg.seeds(),
                           "verdict": _verdict(rows)}
    if len(rows) == 1:  # one cell: scalars for `tangentscope compare`
        r = rows[0]
        out.update(steps_to_val=r["steps_to_val"]["median"],  # None when censored
                   steps_to_train=r["steps_to_train"]["median"],
                   seconds_to_val=r["seconds_to_val"]["median"],
                   seconds_per_step=r["seconds_per_step"],
                   reached_fraction=r["steps_to_val"]["reached"] / r["steps_to_val"]["n"])
    return out


def _finite_median(xs: Sequence[float | None]) -> float | None:
    """Median of ratios where ``None`` (both censored) is dropped; ∞ means "at least"."""
    v = sorted(x for x in xs if x is not None)
    if not v:
        return None
    m = float(np.quantile(np.array(v), 0.5, method="inverted_cdf"))
    return m if math.isfinite(m) else None


def _nanmedian(xs: Sequence[float | None]) -> float | None:
    v = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.median(v)) if v else None


def _ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` of two step counts where ``None`` means "never" (censored): ``None`` unless
    both are finite."""
    return None if a is None or b is None else a / b


def _speedup(base: Mapping[str, Any], opt: Mapping[str, Any], cap: int
             ) -> tuple[float | None, str | None]:
    """Median-over-seeds speed-up over AdamW, with the cap as a bound when a median is
    censored: ``(x, None)`` exact, ``(x, '>=')`` AdamW censored, ``(x, '<=')`` optimizer
    censored, ``(None, None)`` both censored or no baseline."""
    if not base["n"]:
        return None, None
    a, b = base["median"], opt["median"]
    if a is not None and b is not None:
        return a / b, None
    if a is None and b is not None:
        return cap / b, ">="
    if a is not None and b is None:
        return a / cap, "<="
    return None, None


def _verdict(rows: Sequence[Mapping[str, Any]]) -> str:
    gate = [r for r in rows if r["optimizer"].startswith("gated") and r["speedup_vs_adamw"]
            is not None]
    if not gate:
        return "no gated optimizer with an AdamW baseline in this run"
    best = max(gate, key=lambda r: r["speedup_vs_adamw"])
    fast = [r for r in gate if r["speedup_vs_adamw"] >= 5]
    line = (f"best gated speed-up over AdamW (median steps to target): "
            f"{best.get('speedup_bound') or ''}{best['speedup_vs_adamw']:.2f}x "
            f"({best['optimizer']} on {best['setting']}); ")
    line += (f"5x reached in {len(fast)} of {len(gate)} gated cells" if fast else
             "5x not reached in any setting")
    return line


def table_markdown(summary: Mapping[str, Any]) -> str:
    """The summary's table as Markdown (what ``docs/grokking.md`` shows)."""
    lines = ["| setting | optimizer | steps to val ≥ target: median [q25–q75] | reached | "
             "speed-up vs AdamW (median / paired) | steps to train | ms/step (device, seeds "
             "stacked) |", "|---|---|---|---|---|---|---|"]

    def f(x: float | None, cap: int | None = None) -> str:
        return (f"> {cap:,}" if cap else "—") if x is None else f"{x:,.0f}"

    def g(x: float | None, bound: str | None = None) -> str:
        return "—" if x is None else {None: "", ">=": "≥ ", "<=": "≤ "}[bound] + f"{x:.2f}×"

    for r in summary["table"]:
        s = r["steps_to_val"]
        c = s["cap"]
        lines.append(f"| {r['setting']} | {r['optimizer']} | {f(s['median'], c)} "
                     f"[{f(s['q25'], c)}–{f(s['q75'], c)}] | {s['reached']}/{s['n']} | "
                     f"{g(r['speedup_vs_adamw'], r.get('speedup_bound'))} / "
                     f"{g(r['paired_speedup_median'])} | "
                     f"{f(r['steps_to_train']['median'], c)} | "
                     f"{r['seconds_per_step'] * 1e3:.1f} ({r.get('device', '?')}, "
                     f"{r.get('stacked', 1)}) |")
    return "\n".join(lines) + "\n"


# -- plot ---------------------------------------------------------------------------------------
def plot(rd: RunDir) -> list[Path]:
    """Steps-to-target per seed (dots) and median (bar) per optimizer and setting; curves."""
    from ..viz._mpl import pyplot, save_figure

    plt = pyplot()
    summary = rd.read_summary()
    if not summary:
        saved = rd.read_config()["config"]
        summary = summarize(Config(**{k: tuple(v) if isinstance(v, list) else v
                                      for k, v in saved.items()}), rd.cells())
    rows = summary["table"]
    cells = rd.cells()
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    opts = list(dict.fromkeys(r["optimizer"] for r in rows))
    paths = []
    ncol = min(4, len(settings))
    nrow = -(-len(settings) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.2 + 0.55 * len(opts) * ncol, 3.4 * nrow),
                             squeeze=False)
    for ax in axes.flat[len(settings):]:
        ax.set_visible(False)
    for ax, s in zip(axes.flat, settings):
        for i, o in enumerate(opts):
            r = next((r for r in rows if r["setting"] == s and r["optimizer"] == o), None)
            if r is None:
                continue
            cap = r["steps_to_val"]["cap"]
            vals = [cells[_cell_key(s, o, sd)]["steps_to_val"] for sd in r["seeds"]]
            ys = [cap * 1.15 if v is None else v for v in vals]
            ax.scatter(np.full(len(ys), i) + np.linspace(-0.15, 0.15, len(ys)), ys, s=12,
                       marker="o", color=f"C{i}", zorder=3)
            med = r["steps_to_val"]["median"]
            if med is not None:
                ax.hlines(med, i - 0.3, i + 0.3, color=f"C{i}", lw=2.5, alpha=0.6)
            ax.axhline(cap, color="0.6", lw=0.7, ls=":")
        ax.set_yscale("log")
        ax.set_xticks(range(len(opts)), opts, rotation=60, ha="right", fontsize=7)
        ax.set_title(s)
    for row in axes:
        row[0].set_ylabel(f"steps to val acc ≥ {summary.get('target', 0.99):.0%}")
    fig.suptitle("grokking: steps to target per seed (dots; above the dotted cap = never), "
                 "median (bar)")
    fig.tight_layout()
    paths.append(save_figure(fig, rd.figure_path("grokking_steps")))

    metrics = rd.read_metrics()
    if metrics:
        fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3.2 * nrow), squeeze=False)
        for ax in axes.flat[len(settings):]:
            ax.set_visible(False)
        seed0 = min(r["seed"] for r in metrics)
        for ax, s in zip(axes.flat, settings):
            for i, o in enumerate(opts):
                pts = [(m["step"], m["val_acc"], m["train_acc"]) for m in metrics
                       if m["setting"] == s and m["optimizer"] == o and m["seed"] == seed0]
                if not pts:
                    continue
                st, va, tr = map(np.array, zip(*sorted(pts)))
                ax.plot(st, va, color=f"C{i}", label=o)
                ax.plot(st, tr, color=f"C{i}", ls="--", lw=0.8)
            ax.set_xscale("log")
            ax.set_title(f"{s} (seed {seed0}; dashed = train)")
            ax.set_xlabel("step")
        for row in axes:
            row[0].set_ylabel("accuracy")
        axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(save_figure(fig, rd.figure_path("grokking_curves")))
    (rd.path / "table.md").write_text(table_markdown(summary))
    return paths


EXPERIMENT = Experiment(
    "grokking", Config, run, plot,
    presets={
        "smoke": dict(setting=("tiny",), optimizer=("adamw", "gated", "grokfast"), n_seeds=2,
                      log_every=100),
        "full": dict(setting=FULL_SETTINGS, optimizer=FULL_OPTIMIZERS, n_seeds=5),
        "variants": dict(setting=VARIANT_SETTINGS, optimizer=VARIANT_OPTIMIZERS, n_seeds=5),
    },
    description="the gate's 5x grokking claim: AdamW vs gated AdamW vs Grokfast, median over seeds",
)
