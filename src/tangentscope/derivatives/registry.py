"""Which rule differentiates which layer: one table for torch functions, one for module types.

The structured eNTK looks recorded *function* calls up (:func:`rule_for_function`);
:class:`~tangentscope.optim.stats.PerExampleStats` looks *modules* up
(:func:`rule_for_module`, by the first registered class in the module's MRO). A layer is added
once, for both, with :func:`register_rule`.

Hugging Face layers (:mod:`.hf`: GPT-2's ``Conv1D``, Llama/Mistral/Qwen2 RMSNorm) are added
lazily: a module lookup registers those whose ``transformers`` module is already imported (this
package never imports ``transformers``), unless the user registered or removed a rule for that
class.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .addmm import AddmmRule
from .base import LayerRule
from .conv import ConvRule
from .embedding import EmbeddingRule
from .hf import LAZY_RULES
from .linear import LinearRule
from .norm import BatchNormRule, GroupNormRule, LayerNormRule, RMSNormRule

__all__ = ["register_rule", "rule_for_function", "rule_for_module", "registered_modules"]

_LOCK = threading.Lock()
_FUNCTIONS: dict[Any, LayerRule] = {}
_MODULES: dict[type, LayerRule] = {}
_LAZY_LEFT = list(LAZY_RULES)   # Hugging Face classes not looked up yet
_USER: set[Any] = set()         # targets the user registered or removed: never overridden


def register_rule(target: type[nn.Module] | Callable[..., Any], rule: LayerRule | None
                  ) -> None:
    """Use ``rule`` for a module type or a torch function (replacing any earlier rule;
    ``rule=None`` removes it).

    Args:
        target: an ``nn.Module`` subclass (every instance, subclasses included, is hooked by
            :class:`~tangentscope.optim.stats.PerExampleStats`), or a function such as
            ``F.linear`` (its calls on trainable parameters are factored by the structured
            eNTK, ``ts.entk(..., implementation="structured")``).
        rule: a :class:`~tangentscope.derivatives.LayerRule`; for a module type it must
            implement :meth:`~LayerRule.module_call`.

    Example: an elementwise scale layer ``z = x ⊙ w`` (over the last dimension) for the
    statistics; only :meth:`~LayerRule.per_example` is needed, the sums default to its
    reductions::

        class Scale(nn.Module):
            def __init__(self, d):
                super().__init__()
                self.weight = nn.Parameter(torch.ones(d))

            def forward(self, x):
                return x * self.weight

        class ScaleRule(LayerRule):
            roles = ("weight",)

            def module_call(self, module, x):
                return {"input": x, "weight": module.weight}

            def data(self, bound):
                return {"x": bound["input"].detach()}

            def per_example(self, data, delta, roles):  # delta (B, P, ..., d) -> (B, P, d)
                B, P, d = delta.shape[0], delta.shape[1], delta.shape[-1]
                return (delta * data["x"].unsqueeze(1)).reshape(B, P, -1, d).sum(2)

        register_rule(Scale, ScaleRule())  # PerExampleStats(model) now covers Scale

    Hugging Face layers: a rule for your own copy of a supported layer is one line, e.g.
    ``register_rule(MyRMSNorm, HFRMSNormRule())`` (:mod:`tangentscope.derivatives.hf`).

    Raises:
        TypeError: ``rule`` is not a LayerRule, or ``target`` is neither.
    """
    if rule is not None and not isinstance(rule, LayerRule):
        raise TypeError(f"rule must be a tangentscope.derivatives.LayerRule, got {type(rule)}")
    with _LOCK:
        if isinstance(target, type) and issubclass(target, nn.Module):
            table: dict[Any, LayerRule] = _MODULES
        elif callable(target):
            table = _FUNCTIONS
        else:
            raise TypeError(f"target must be an nn.Module subclass or a function, got {target!r}")
        _set(table, target, rule)
        _USER.add(target)


def _set(table: dict[Any, LayerRule], target: Any, rule: LayerRule | None) -> None:
    if rule is None:
        table.pop(target, None)
    else:
        table[target] = rule


def _load_lazy() -> None:
    """Register the Hugging Face rules whose ``transformers`` module is imported by now."""
    if not _LAZY_LEFT:
        return
    with _LOCK:
        for entry in list(_LAZY_LEFT):
            mod = sys.modules.get(entry[0])
            if mod is None:
                continue
            cls = getattr(mod, entry[1], None)
            if isinstance(cls, type) and issubclass(cls, nn.Module):  # (None: still importing)
                _LAZY_LEFT.remove(entry)
                if cls not in _USER:
                    _MODULES.setdefault(cls, entry[2]())


def rule_for_function(func: Any) -> LayerRule | None:
    """The rule registered for a torch function (None if none)."""
    try:
        return _FUNCTIONS.get(func)
    except TypeError:  # unhashable callables are never registered
        return None


def rule_for_module(module: nn.Module) -> LayerRule | None:
    """The rule of the nearest registered class in ``type(module).__mro__`` (None if none)."""
    _load_lazy()
    for cls in type(module).__mro__:
        rule = _MODULES.get(cls)
        if rule is not None:
            return rule
    return None


def registered_modules() -> tuple[type, ...]:
    """Module types with a rule (what :class:`PerExampleStats` has closed forms for)."""
    _load_lazy()
    return tuple(_MODULES)


def _register_builtin() -> None:
    linear, emb = LinearRule(), EmbeddingRule()
    conv1, conv2 = ConvRule(1), ConvRule(2)
    ln, gn, bn = LayerNormRule(), GroupNormRule(), BatchNormRule()
    pairs: list[tuple[Any, LayerRule]] = [
        (F.linear, linear), (nn.Linear, linear), (F.conv1d, conv1), (nn.Conv1d, conv1),
        (F.conv2d, conv2), (nn.Conv2d, conv2), (F.embedding, emb), (nn.Embedding, emb),
        (F.layer_norm, ln), (nn.LayerNorm, ln), (F.group_norm, gn), (nn.GroupNorm, gn),
        (F.batch_norm, bn), (nn.modules.batchnorm._BatchNorm, bn), (torch.addmm, AddmmRule())]
    if hasattr(F, "rms_norm"):
        rms = RMSNormRule()
        pairs.append((F.rms_norm, rms))
        if hasattr(nn, "RMSNorm"):
            pairs.append((nn.RMSNorm, rms))
    for target, rule in pairs:
        _set(_FUNCTIONS if not isinstance(target, type) else _MODULES, target, rule)


_register_builtin()
