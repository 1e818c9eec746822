"""One name per optimizer: a frozen :class:`OptimizerSpec` and one builder.

An optimizer is named ``NAME@key=value@key=value...`` (optax's single alias namespace is the
model): ``NAME`` is a registry name (:data:`OPTIMIZERS`), the keys (:data:`KEYS`) change the
gate or add a gradient filter. Names are hyphenated and keys use underscores; the parser reads
``_`` as ``-`` in names and ``-`` as ``_`` in keys, so ``gated_streaming`` is
``gated-streaming`` and ``gate-on`` is ``gate_on``. Training hyper-parameters (``lr``,
``weight_decay``, ``betas``, ``eps``, ``momentum``) are arguments of :func:`build_optimizer`,
not part of the name::

    spec = parse_optimizer("gated@threshold=2@gate_on=grad")
    str(spec)                                      # 'gated@gate_on=grad@threshold=2'
    built = build_optimizer(spec, model, lr=1e-3, weight_decay=1.0)
    loss.backward(); built.step(); built.zero_grad()    # filter → optimizer.step

Registry (``rule``: the update; ``gated-adamw`` is :class:`~tangentscope.optim.GatedAdamW`):

=====================  ===========  ==================================================
name                   rule         registry settings
=====================  ===========  ==================================================
``adamw``              adamw        ``torch.optim.AdamW`` (decoupled weight decay)
``adam``               adam         ``torch.optim.Adam`` (coupled L2 weight decay)
``sgd``                sgd          ``torch.optim.SGD`` (``momentum=0``: plain GD)
``grokfast``           adamw        ``grokfast=ema`` (α 0.98, λ 2)
``grokfast-ma``        adamw        ``grokfast=ma`` (w 100, λ 5)
``gated``              gated-adamw  ``stats=exact``, ``gate_on=update``
``gated-grad``         gated-adamw  ``stats=exact``, ``gate_on=grad``
``gated-moments``      gated-adamw  ``stats=exact``, ``gate_on=moments``
``gated-streaming``    gated-adamw  ``stats=streaming``, ``gate_on=update``
``gated-grad+grokfast``gated-adamw  ``stats=exact``, ``gate_on=grad``, ``grokfast=ema``
=====================  ===========  ==================================================

Deprecated spellings still parse, through one table (:data:`ALIASES`): ``gd`` → ``sgd``,
``gated-adamw``/``gated_adamw`` → ``gated-streaming``; ``str(spec)`` prints the registry name.

Every optimizer name used before this module, and its spec here (old caller: old → new):

* grokking / grokking-theory (``experiments/grokking.py`` ``OPTIMIZERS``): every name and
  ``@key=value`` variant is unchanged (``adamw``, ``grokfast``, ``grokfast-ma``, ``gated``,
  ``gated-grad``, ``gated-moments``, ``gated-streaming``, ``gated-grad+grokfast``,
  ``gated@gate=soft``, ``gated@threshold=0.25``, ``gated-streaming@gate_on=grad``, …); a
  setting with ``base='adam'`` → ``adam`` (Grokfast on it: ``adam@grokfast=ema``);
  ``nonfinite='ignore'`` → ``@nonfinite=ignore``; the stacked ensemble's closed-form moments →
  ``build_optimizer(..., moments=provider)``. The key ``soft`` never reached the optimizer
  (``GatedAdamW`` has no such argument): use ``gate=soft``.
* phenomena / ``experiments._harness.make_optimizer``: ``gd`` → ``sgd``; ``adam`` → ``adam``;
  ``gated`` → ``gated`` (``weight_decay=0``); ``gated_streaming`` → ``gated-streaming``
  (``weight_decay=0``). ``channel_optimizer``/``channels._optimizer``: ``adam`` → ``adam``,
  ``gd``/``sgd`` → ``sgd``.
* the page (``demo._make_optimizer`` / ``available_optimizers``): ``adamw`` → ``adamw``;
  ``gated_adamw`` → ``gated-streaming``; ``sgd`` → ``sgd``.
* INR / PINN (``inr.OPTIMIZERS`` / ``_fitting.OPTIMIZERS``): ``adamw``, ``gated``,
  ``gated-grad``, ``gated-moments``, ``gated-streaming`` unchanged (``threshold=`` →
  ``@threshold=``; the exact source → ``stats=`` argument or the module); ``adamw-es`` →
  ``adamw`` (early stopping is the experiment's protocol, not an optimizer).
* Hugging Face (``integrations.hf.trainer_optimizers``): ``"adamw"`` → ``adamw``;
  ``"gated"`` → ``gated-streaming``, its ``gate_kwargs`` as keys
  (``threshold=2, gate_on="grad"`` → ``gated-streaming@threshold=2@gate_on=grad``,
  ``stats="microbatch"`` → ``@stats=microbatch``, a ``StatsSource`` object → ``stats=``
  argument of :func:`build_optimizer` with ``gated``).
* DPO (``experiments/dpo.py`` ``OPTIMIZER_NAMES``): ``adamw`` → ``adamw``; ``gated`` →
  ``gated-streaming``; ``gated_exact`` → ``gated@stats=microbatch`` (one pair per microbatch);
  the config's ``threshold``/``gate_on`` → ``@threshold=``/``@gate_on=``.
* poprisk-estimate (``gate`` × ``stats``): ``off``/exact → ``gated@gate=false``; ``hard``/exact
  → ``gated``; ``soft``/exact → ``gated@gate=soft``; streaming → the same on
  ``gated-streaming``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ._common import check_number
from .adamw import GatedAdamW
from .grokfast import GrokfastEMA, GrokfastMA
from .stats import GradMoments, MicrobatchStats, PerExampleStats, StatsSource

__all__ = ["OptimizerSpec", "BuiltOptimizer", "OPTIMIZERS", "KEYS", "ALIASES", "parse_optimizer",
           "build_optimizer"]

RULES = ("adamw", "adam", "sgd", "gated-adamw")


@dataclasses.dataclass(frozen=True)
class _Entry:
    rule: str
    settings: Mapping[str, Any]
    description: str


#: name -> (update rule, registry settings, one-line description).
_REGISTRY: dict[str, _Entry] = {
    "adamw": _Entry("adamw", {}, "AdamW (torch.optim.AdamW)"),
    "adam": _Entry("adam", {}, "Adam with coupled L2 weight decay (torch.optim.Adam)"),
    "sgd": _Entry("sgd", {}, "SGD (torch.optim.SGD; momentum=0 is plain gradient descent)"),
    "grokfast": _Entry("adamw", {"grokfast": "ema"}, "AdamW with the Grokfast EMA filter"),
    "grokfast-ma": _Entry("adamw", {"grokfast": "ma"}, "AdamW with the Grokfast MA filter"),
    "gated": _Entry("gated-adamw", {"stats": "exact", "gate_on": "update"},
                    "gated AdamW, exact per-example statistics, gate on the update"),
    "gated-grad": _Entry("gated-adamw", {"stats": "exact", "gate_on": "grad"},
                         "gated AdamW, exact per-example statistics, gate on the gradient"),
    "gated-moments": _Entry("gated-adamw", {"stats": "exact", "gate_on": "moments"},
                            "gated AdamW, exact per-example statistics, gate on the moments"),
    "gated-streaming": _Entry("gated-adamw", {"stats": "streaming", "gate_on": "update"},
                              "gated AdamW, streaming statistics (one extra state vector)"),
    "gated-grad+grokfast": _Entry("gated-adamw", {"stats": "exact", "gate_on": "grad",
                                                  "grokfast": "ema"},
                                  "gated AdamW on the gradient, then the Grokfast EMA filter"),
}

#: name -> one-line description (the public registry; its order is the display order).
OPTIMIZERS: Mapping[str, str] = {k: v.description for k, v in _REGISTRY.items()}

_GATED, _ANY, _EMA, _MA, _FILTER = "gated", "any", "ema", "ma", "filter"
# key -> (which specs take it, documentation)
_KEYS: dict[str, tuple[str, str]] = {
    "gate": (_GATED, "false | hard | soft (true = hard)"),
    "stats": (_GATED, "exact (PerExampleStats on the model) | microbatch (MicrobatchStats) | "
                      "streaming (inside the optimizer)"),
    "gate_on": (_GATED, "update | grad | moments"),
    "threshold": (_GATED, "tau >= 0 (1 = leave-one-out exact)"),
    "gate_warmup": (_GATED, "steps with the gate open, integer >= 0"),
    "noise_beta": (_GATED, "streaming noise EMA factor in [0, 1), or none (= betas[1])"),
    "fused": (_GATED, "true | false (the fused kernel; unset: used where already built; "
                      "true: gate_on=update only)"),
    "nonfinite": (_GATED, "skip | raise | ignore"),
    "grokfast": (_ANY, "none | ema | ma (gradient filter between backward and step)"),
    "alpha": (_EMA, "Grokfast EMA momentum in [0, 1) (default 0.98)"),
    "lamb": (_FILTER, "Grokfast gain, finite (default 2 for ema, 5 for ma)"),
    "window_size": (_MA, "Grokfast MA window, integer >= 1 (default 100)"),
}
#: key -> what it takes (the ``@key=value`` part of a name).
KEYS: Mapping[str, str] = {k: v[1] for k, v in _KEYS.items()}

_GATED_DEFAULTS: dict[str, Any] = {"gate": "hard", "stats": "exact", "gate_on": "update",
                                   "threshold": 1.0, "gate_warmup": 0, "noise_beta": None,
                                   "fused": None, "nonfinite": "skip"}
_FILTER_DEFAULTS = {"ema": {"alpha": 0.98, "lamb": 2.0}, "ma": {"window_size": 100, "lamb": 5.0}}
_CHOICES = {"stats": ("exact", "microbatch", "streaming"),
            "gate_on": ("update", "grad", "moments"), "nonfinite": ("skip", "raise", "ignore"),
            "grokfast": ("none", "ema", "ma"), "gate": (False, "hard", "soft")}
#: deprecated spellings still accepted (old configs, the page's old value) -> the registry name
#: they mean; the one alias table (``str(spec)`` always prints the registry name). Keys are in
#: canonical form: ``gated_adamw`` reads as ``gated-adamw``.
ALIASES: Mapping[str, str] = {"gd": "sgd", "gated-adamw": "gated-streaming"}
# old spellings that are neither registry names nor aliases: shown in the error message
_RENAMED = {"gated-exact": "gated@stats=microbatch (DPO) or gated (exact per-example)",
            "adamw-es": "adamw"}


def _canonical_name(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _canonical_key(key: str) -> str:
    return key.strip().lower().replace("-", "_")


def _word(v: Any) -> Any:
    """A text value's Python value: true/false/none, else the stripped lower-case text."""
    if not isinstance(v, str):
        return v
    w = v.strip().lower()
    return {"true": True, "false": False, "none": None}.get(w, w)


def _number(key: str, v: Any, kind: type) -> Any:
    what = "an integer" if kind is int else "a number"
    msg = f"optimizer key {key} must be {what} ({KEYS[key]}), got {v!r}"
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ConfigError(msg)
    try:
        x = float(v)
    except ValueError:
        raise ConfigError(msg) from None
    if kind is int:
        if not x.is_integer():
            raise ConfigError(msg)
        return int(x)
    return x


def _coerce(key: str, v: Any) -> Any:
    """Validate and normalize one key's value (text or Python)."""
    if key in _CHOICES:
        w = _word(v)
        if key == "gate" and w is True:
            w = "hard"
        if key == "grokfast" and w is None:
            w = "none"
        if w not in _CHOICES[key]:
            shown = ", ".join(_format(c) for c in _CHOICES[key])
            raise ConfigError(f"optimizer key {key} must be one of {shown}, got {v!r}")
        return w
    if key == "fused":
        w = _word(v)
        if w not in (True, False):
            raise ConfigError(f"optimizer key fused must be true or false, got {v!r}")
        return w
    if key == "noise_beta" and _word(v) is None:
        return None
    x = _number(key, v, int if key in ("gate_warmup", "window_size") else float)
    bad = {"threshold": not (math.isfinite(x) and x >= 0),
           "gate_warmup": x < 0, "window_size": x < 1,
           "noise_beta": not 0.0 <= x < 1.0, "alpha": not 0.0 <= x < 1.0,
           "lamb": not math.isfinite(x)}[key]
    if bad:
        raise ConfigError(f"optimizer key {key} must be {KEYS[key]}, got {v!r}")
    return x


def _format(v: Any) -> str:
    if v is None or isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)
    return str(v)


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """A resolved optimizer name: registry name plus every setting that applies to it.

    Build it with :func:`parse_optimizer` (or ``OptimizerSpec("gated", threshold=2)``; values
    may be text as in a name). ``str(spec)`` is the canonical ``NAME@key=value`` text (only
    settings that differ from the registry's), and ``parse_optimizer(str(spec)) == spec``.

    Attributes:
        name: a registry name (:data:`OPTIMIZERS`), canonical spelling.
        gate, stats, gate_on, threshold, gate_warmup, noise_beta, fused, nonfinite: the gate of a
            ``gated*`` name (``GatedAdamW``'s arguments; ``stats`` ``'exact'``,
            ``'microbatch'`` or ``'streaming'``); ``None`` for the other rules.
        grokfast: ``'none'``, ``'ema'`` or ``'ma'``; alpha, lamb, window_size: the filter's
            settings (``None`` where they do not apply).

    Raises:
        ConfigError: unknown name, a key that does not apply to the name, or a bad value (the
            message lists the valid names or keys).
    """

    name: str
    gate: bool | str | None = None
    stats: str | None = None
    gate_on: str | None = None
    threshold: float | None = None
    gate_warmup: int | None = None
    noise_beta: float | None = None
    fused: bool | None = None
    nonfinite: str | None = None
    grokfast: str | None = None
    alpha: float | None = None
    lamb: float | None = None
    window_size: int | None = None

    def __post_init__(self) -> None:
        given = {k: getattr(self, k) for k in _KEYS if getattr(self, k) is not None}
        if not isinstance(self.name, str):
            raise ConfigError(f"an optimizer name must be a string (e.g. 'gated'), got "
                              f"{self.name!r}; names: {', '.join(_REGISTRY)}")
        name = _canonical_name(self.name)
        name = ALIASES.get(name, name)
        if name not in _REGISTRY:
            hint = f" (renamed: use {_RENAMED[name]!r})" if name in _RENAMED else ""
            raise ConfigError(f"unknown optimizer {self.name!r}{hint}; known: "
                              f"{', '.join(_REGISTRY)} (variants: NAME@key=value, e.g. "
                              "gated@threshold=2)")
        object.__setattr__(self, "name", name)
        for k, v in self._resolve(name, given).items():
            object.__setattr__(self, k, v)

    @staticmethod
    def _resolve(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every field's value for registry ``name`` with the keys ``given`` (validated)."""
        entry = _REGISTRY[name]
        gated = entry.rule == "gated-adamw"
        values = {k: _coerce(k, v) for k, v in given.items()}
        for k in values:
            if _KEYS[k][0] == _GATED and not gated:
                raise ConfigError(f"optimizer key {k} applies to the gated optimizers "
                                  f"({', '.join(n for n in _REGISTRY if n.startswith('gated'))}), "
                                  f"not to {name!r}; keys of {name!r}: "
                                  f"{', '.join(k for k, v in _KEYS.items() if v[0] != _GATED)}")
        out: dict[str, Any] = dict.fromkeys(_KEYS)
        if gated:
            out.update(_GATED_DEFAULTS)
        out["grokfast"] = "none"
        out.update(entry.settings)
        out.update({k: v for k, v in values.items() if k == "grokfast" or k in _GATED_DEFAULTS})
        filt = out["grokfast"]
        for k in ("alpha", "lamb", "window_size"):
            scope = _KEYS[k][0]
            if k in values and (filt == "none" or scope not in (_FILTER, filt)):
                need = "ema or ma" if scope == _FILTER else scope
                raise ConfigError(f"optimizer key {k} applies to grokfast={need}, but "
                                  f"{name!r} here has grokfast={filt}; add @grokfast="
                                  f"{'ema' if scope == _FILTER else scope}")
        if filt != "none":
            out.update(_FILTER_DEFAULTS[filt])
            out.update({k: values[k] for k in ("alpha", "lamb", "window_size") if k in values})
        if gated and out["fused"] and out["gate_on"] != "update":
            raise ConfigError(f"fused=true implements gate_on=update only, got "
                              f"gate_on={out['gate_on']}; drop @fused=true")
        return out

    @property
    def rule(self) -> str:
        """The update: ``'adamw'``, ``'adam'``, ``'sgd'`` or ``'gated-adamw'``."""
        return _REGISTRY[self.name].rule

    @property
    def description(self) -> str:
        """The registry's one-line description of :attr:`name`."""
        return _REGISTRY[self.name].description

    @property
    def settings(self) -> dict[str, Any]:
        """Every key that applies to this spec and its value (defaults included)."""
        return {k: getattr(self, k) for k in _KEYS if getattr(self, k) is not None or
                (k == "noise_beta" and self.rule == "gated-adamw")}

    def overrides(self) -> dict[str, Any]:
        """The keys whose values differ from the registry's for :attr:`name` (what
        ``str(spec)`` writes after the name)."""
        registry_filter = _REGISTRY[self.name].settings.get("grokfast", "none")
        default = OptimizerSpec._resolve(self.name, {"grokfast": self.grokfast})
        return {k: getattr(self, k) for k in _KEYS if getattr(self, k) != default[k] or
                (k == "grokfast" and self.grokfast != registry_filter)}

    def replace(self, **changes: Any) -> OptimizerSpec:
        """This spec with some keys changed (``spec.replace(threshold=2)``), validated.

        ``name=`` swaps the registry name and keeps the keys set on top of the old name's
        registry settings (:meth:`overrides`); changing ``grokfast`` drops the old filter's
        settings.
        """
        keys = {_canonical_key(k): v for k, v in changes.items() if k != "name"}
        bad = [k for k in keys if k not in _KEYS]
        if bad:
            raise ConfigError(f"unknown optimizer key(s) {bad}; keys: {', '.join(_KEYS)}")
        base = self.overrides()
        if "grokfast" in keys:
            for k in ("alpha", "lamb", "window_size"):
                base.pop(k, None)
        base.update(keys)
        return OptimizerSpec(changes.get("name", self.name), **base)

    def __str__(self) -> str:
        return "".join([self.name] + [f"@{k}={_format(v)}" for k, v in self.overrides().items()])


def parse_optimizer(text: str | OptimizerSpec) -> OptimizerSpec:
    """``'gated@threshold=2@gate_on=grad'`` → an :class:`OptimizerSpec` (a spec passes through).

    Raises:
        ConfigError: unknown name or key, a key given twice or not written ``key=value``, or a
            bad value (the message lists the valid names or keys).
    """
    if isinstance(text, OptimizerSpec):
        return text
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"an optimizer name must be a non-empty string NAME@key=value... "
                          f"(e.g. 'gated@threshold=2'), got {text!r}; names: "
                          f"{', '.join(_REGISTRY)}")
    name, *mods = text.split("@")
    kw: dict[str, str] = {}
    for m in mods:
        if "=" not in m:
            raise ConfigError(f"optimizer variant {m!r} in {text!r} must read key=value "
                              f"(keys: {', '.join(_KEYS)})")
        k, v = m.split("=", 1)
        k = _canonical_key(k)
        if k not in _KEYS:
            raise ConfigError(f"unknown optimizer key {k!r} in {text!r}; keys: "
                              f"{', '.join(_KEYS)}")
        if k in kw:
            raise ConfigError(f"optimizer key {k} is given twice in {text!r}; keep one")
        kw[k] = v
    return OptimizerSpec(name, **kw)  # type: ignore[arg-type]


# =================================================================================================
# the builder
# =================================================================================================
MomentsProvider = Callable[[], Mapping[Any, GradMoments]]


@dataclasses.dataclass(frozen=True)
class BuiltOptimizer:
    """What :func:`build_optimizer` returns.

    Attributes:
        spec: the spec it was built from.
        optimizer: the ``torch.optim.Optimizer`` (hand it to LR schedulers, ``GradScaler``,
            ``Trainer(optimizers=...)``; it does not run :attr:`grad_filter`).
        grad_filter: Grokfast filter run between ``backward()`` and the step, or ``None``.
        stats: the statistics source the builder made or was given (exact statistics), or
            ``None`` (streaming, or no gate).
        moments: a caller-supplied provider of this step's exact moments, called by
            :meth:`step` before the filter, or ``None``.
    """

    spec: OptimizerSpec
    optimizer: torch.optim.Optimizer
    grad_filter: GrokfastEMA | GrokfastMA | None = None
    stats: StatsSource | None = None
    moments: MomentsProvider | None = None

    @property
    def params(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def step(self, closure: Callable[[], Any] | None = None, *,
             moments: Mapping[Any, GradMoments] | None = None) -> Any:
        """``grad_filter`` (if any) then ``optimizer.step``; returns the closure's loss.

        Args:
            closure: as ``torch.optim`` (evaluated before the filter).
            moments: exact statistics for this step (``param or id → GradMoments``) for a gated
                optimizer; default: the builder's ``moments`` provider, if any. They are taken
                before the filter: the gate's signal and noise are the raw gradient's, the step
                moves along the filtered one.

        Raises:
            ConfigError: ``moments`` for an optimizer without gate.
        """
        if moments is None and self.moments is not None:
            moments = self.moments()
        if moments is not None and not isinstance(self.optimizer, GatedAdamW):
            raise ConfigError(f"step(moments=...) needs a gated optimizer; {self.spec} is "
                              f"{type(self.optimizer).__name__}")
        loss = None
        if self.grad_filter is not None:
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
                closure = None
            if moments is not None:          # the filter edits p.grad in place
                grads = {p.grad.data_ptr() for p in self.params if p.grad is not None}
                moments = {k: (dataclasses.replace(m, grad_sum=m.grad_sum.clone())
                               if m.grad_sum.data_ptr() in grads else m)
                           for k, m in moments.items()}
            self.grad_filter()
        if moments is None:
            out = self.optimizer.step(closure)
        else:
            assert isinstance(self.optimizer, GatedAdamW)
            out = self.optimizer.step(closure, moments=moments)
        return loss if out is None else out

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """``{'optimizer': ..., 'grad_filter': ... or None}`` for checkpoints."""
        return {"optimizer": self.optimizer.state_dict(),
                "grad_filter": None if self.grad_filter is None else
                self.grad_filter.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        if "optimizer" not in state:
            raise ConfigError("not a BuiltOptimizer state dict (no 'optimizer' key); load a "
                              "plain optimizer's state with built.optimizer.load_state_dict()")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.grad_filter is not None and state.get("grad_filter") is not None:
            self.grad_filter.load_state_dict(state["grad_filter"])


def _params_of(params: Any) -> tuple[list[Any], nn.Module | None]:
    if isinstance(params, nn.Module):
        out = [p for p in params.parameters() if p.requires_grad]
        if not out:
            raise ConfigError("build_optimizer: the module has no parameters that require grad; "
                              "pass a module with trainable parameters")
        return out, params
    if isinstance(params, Tensor):
        return [params], None
    if isinstance(params, (str, bytes)) or not isinstance(params, Iterable):
        raise ConfigError(f"build_optimizer needs a module, parameters or param groups (pass "
                          f"model or model.parameters()), got {type(params).__name__}")
    out = list(params)
    if not out:
        raise ConfigError("build_optimizer got no parameters; pass model.parameters() or the "
                          "module")
    if not all(isinstance(p, Tensor) or (isinstance(p, dict) and "params" in p) for p in out):
        raise ConfigError("build_optimizer needs tensors or param groups ({'params': [...]}); "
                          "pass model.parameters() or the module")
    return out, None


def _flat(params: list[Any]) -> list[Tensor]:
    return [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]


def build_optimizer(spec: str | OptimizerSpec, params: nn.Module | Iterable[Any], *,
                    lr: float, weight_decay: float | None = None,
                    betas: tuple[float, float] | None = None, eps: float | None = None,
                    momentum: float | None = None, model: nn.Module | None = None,
                    stats: StatsSource | None = None, moments: MomentsProvider | None = None
                    ) -> BuiltOptimizer:
    """The optimizer (and gradient filter, statistics source) of ``spec``.

    Args:
        spec: a name (``'gated@threshold=2'``) or an :class:`OptimizerSpec`.
        params: a module (its parameters that require grad), parameters, or param groups.
        lr: learning rate, finite and > 0.
        weight_decay, betas, eps: the rule's hyper-parameters; ``None`` = that optimizer's own
            default (AdamW and gated AdamW: ``weight_decay=0.01``; Adam and SGD: ``0``,
            coupled L2 for Adam).
        momentum: SGD momentum (``None`` = 0); only for ``sgd``.
        model: the module that owns the parameters, for ``stats=exact`` (``PerExampleStats``)
            or ``stats=microbatch`` when ``params`` is not the module.
        stats: a caller-supplied statistics source (``PerExampleStats``, ``VmapStats``,
            ``MicrobatchStats``, …) for a gated spec with ``stats=exact`` or ``microbatch``;
            no source is built then.
        moments: a caller-supplied provider of each step's exact moments (``param or id →
            GradMoments``, e.g. closed forms of a stacked ensemble), called by
            :meth:`BuiltOptimizer.step`; for ``stats=exact``. No source is built then.

    Returns:
        A :class:`BuiltOptimizer`.

    Raises:
        ConfigError: a bad name or value, hyper-parameters the rule does not take, exact
            statistics without the module, or a source/provider for a spec that does not use
            one — before anything is built.
    """
    sp = parse_optimizer(spec)
    plist, owner = _params_of(params)
    model = model if model is not None else owner
    if isinstance(lr, bool) or not isinstance(lr, (int, float, Tensor)) or \
            (isinstance(lr, Tensor) and lr.numel() != 1) or \
            not (math.isfinite(float(lr)) and float(lr) > 0):
        raise ConfigError(f"learning rate must be a finite positive number (> 0), got {lr!r}")
    for name, value in (("weight_decay", weight_decay), ("eps", eps), ("momentum", momentum)):
        if value is not None:
            check_number(name, value, high=1.0 if name == "momentum" else math.inf)
    if betas is not None:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ConfigError(f"betas must be two numbers in [0, 1), got {betas!r}")
        for b in betas:
            check_number("betas", b, high=1.0, high_open=True, fix=f" (in betas={betas!r})")
    if momentum is not None and sp.rule != "sgd":
        raise ConfigError(f"momentum is an argument of sgd, not of {sp.name!r}")
    if sp.rule == "sgd" and (betas is not None or eps is not None):
        raise ConfigError("sgd takes lr, weight_decay and momentum (not betas/eps)")
    exact = sp.rule == "gated-adamw" and sp.stats != "streaming"
    if (stats is not None or moments is not None) and not exact:
        what = "uses streaming statistics" if sp.rule == "gated-adamw" else "has no gate"
        raise ConfigError(f"stats=/moments= supply exact statistics, but {sp} {what}; use a "
                          "gated name with stats=exact (e.g. 'gated') or drop them")
    if stats is not None and moments is not None:
        raise ConfigError("give one of stats= (a source) and moments= (a provider), not both")
    if moments is not None and sp.stats != "exact":
        raise ConfigError(f"moments= supplies exact per-example moments; {sp} has "
                          f"stats={sp.stats}")
    if sp.stats == "exact" and stats is None and moments is None and model is None:
        raise ConfigError(f"{sp} needs the module for its statistics "
                          "(PerExampleStats): pass build_optimizer(spec, model, ...) or model=, or "
                          "a stats= source / moments= provider")
    kw: dict[str, Any] = {"lr": lr}
    kw.update({k: v for k, v in (("weight_decay", weight_decay), ("betas", betas), ("eps", eps),
                                 ("momentum", momentum)) if v is not None})
    source = stats
    opt: torch.optim.Optimizer
    if sp.rule == "gated-adamw":
        if sp.stats == "exact" and source is None and moments is None:
            assert model is not None
            source = PerExampleStats(model)
        elif sp.stats == "microbatch" and source is None:
            source = MicrobatchStats(model if model is not None else _flat(plist))
        assert sp.gate is not None and sp.threshold is not None and sp.gate_on is not None
        assert sp.gate_warmup is not None and sp.nonfinite is not None
        opt = GatedAdamW(plist, **kw, gate=sp.gate, threshold=sp.threshold, gate_on=sp.gate_on,
                         gate_warmup=sp.gate_warmup, noise_beta=sp.noise_beta,
                         fused=sp.fused, nonfinite=sp.nonfinite,
                         stats=source if source is not None else "streaming")
    elif sp.rule == "adam":
        opt = torch.optim.Adam(plist, **kw)
    elif sp.rule == "sgd":
        opt = torch.optim.SGD(plist, **kw)
    else:
        opt = torch.optim.AdamW(plist, **kw)
    filt: GrokfastEMA | GrokfastMA | None = None
    if sp.grokfast == "ema":
        assert sp.alpha is not None and sp.lamb is not None
        filt = GrokfastEMA(_flat(plist), alpha=sp.alpha, lamb=sp.lamb)
    elif sp.grokfast == "ma":
        assert sp.window_size is not None and sp.lamb is not None
        filt = GrokfastMA(_flat(plist), window_size=sp.window_size, lamb=sp.lamb)
    return BuiltOptimizer(sp, opt, filt, source, moments)
