"""Grokfast: amplify the slow component of the gradient (Lee et al. 2024, arXiv:2405.20233).

Reimplemented from the paper's description (its code is not used). Two low-pass filters of the
gradient sequence ``g_t`` of each parameter, added back to the gradient with a gain ``λ``:

* **EMA** (the paper's ``Grokfast``; defaults ``α = 0.98``, ``λ = 2``)::

      h_t = α h_{t-1} + (1 − α) g_t        (h_0 := g_1, so h_1 = g_1)
      g_t ← g_t + λ h_t

* **MA** (``Grokfast-MA``; defaults window ``w = 100``, ``λ = 5``): ``h_t`` is the mean of the
  last ``w`` gradients, and (with ``warmup``) nothing is added until ``w`` gradients are held.

The filter is a gradient transform usable with any optimizer, one line between ``backward()``
and ``step()``::

    grokfast = GrokfastEMA(model.parameters())
    ...
    loss.backward()
    grokfast()            # p.grad ← p.grad + λ·EMA(p.grad)
    optimizer.step()

The pure functions :func:`grokfast_ema` and :func:`grokfast_ma` are the functional core; the
classes hold the filter state and edit ``p.grad`` in place. Units: ``h`` has the units of the
gradient (per-parameter loss derivative), ``λ`` is dimensionless.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError

__all__ = ["GrokfastEMA", "GrokfastMA", "grokfast_ema", "grokfast_ma"]


def grokfast_ema(grads: Sequence[Tensor], ema: Sequence[Tensor] | None, *, alpha: float = 0.98,
                 lamb: float = 2.0) -> tuple[list[Tensor], list[Tensor]]:
    """One EMA-filter step on a list of gradients (pure: returns new tensors).

    Args:
        grads: the current gradients ``g_t`` (any shapes).
        ema: the previous ``h_{t-1}`` (same shapes), or ``None`` on the first step, where the
            paper initialises ``h`` with the first gradient.
        alpha: EMA momentum in ``[0, 1)``.
        lamb: gain ``λ`` of the amplified slow component.

    Returns:
        ``(filtered, h_t)`` with ``filtered[i] = g_t[i] + λ h_t[i]``.
    """
    prev = list(grads) if ema is None else list(ema)
    h = [alpha * hp + (1.0 - alpha) * g for hp, g in zip(prev, grads)]
    return [g + lamb * hi for g, hi in zip(grads, h)], h


def grokfast_ma(grads: Sequence[Tensor], window: Sequence[Sequence[Tensor]], *,
                window_size: int = 100, lamb: float = 5.0, warmup: bool = True
                ) -> tuple[list[Tensor], list[list[Tensor]]]:
    """One moving-average-filter step (pure).

    Args:
        grads: the current gradients ``g_t``.
        window: the previous gradients, oldest first, one list per step (at most
            ``window_size − 1`` of them are used).
        window_size: ``w``; the filter is the mean of the last ``w`` gradients ``g_t`` included.
        lamb: gain ``λ``.
        warmup: add nothing until ``w`` gradients are held (the paper's default).

    Returns:
        ``(filtered, new_window)``.
    """
    new_window = [list(s) for s in window][-(window_size - 1):] if window_size > 1 else []
    new_window.append(list(grads))
    if warmup and len(new_window) < window_size:
        return list(grads), new_window
    mean = [torch.stack([s[i] for s in new_window]).mean(0) for i in range(len(grads))]
    return [g + lamb * m for g, m in zip(grads, mean)], new_window


def _param_list(params: Iterable[Tensor] | nn.Module) -> list[Tensor]:
    if isinstance(params, nn.Module):
        params = params.parameters()
    items = [] if isinstance(params, (Tensor, str, bytes)) or \
        not isinstance(params, Iterable) else list(params)
    if not items or not all(isinstance(p, Tensor) for p in items):
        raise ConfigError("Grokfast: no trainable parameters given; pass model.parameters() "
                          "(or the module itself)")
    out = [p for p in items if p.requires_grad]
    if not out:
        raise ConfigError("Grokfast: no trainable parameters given; pass model.parameters() "
                          "(or the module itself)")
    return out


def _finite(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _check_gain(lamb: float) -> None:
    if not _finite(lamb):
        raise ConfigError(f"Grokfast: lamb must be finite, got {lamb!r} (a number: 2 for the EMA "
                          "filter, 5 for the MA filter are the paper's)")


def _check_state(state: Any, keys: tuple[str, str], n: int, who: str) -> None:
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise ConfigError(f"{who}.load_state_dict needs {who}.state_dict()'s keys {keys}; pass "
                          "the state of the same kind of filter")
    if len(state[keys[0]]) != n:
        raise ConfigError(f"{who}.load_state_dict: the state holds {len(state[keys[0]])} "
                          f"tensors but the filter has {n} parameters; load the state of a "
                          "filter built on the same parameters")


class GrokfastEMA:
    """EMA slow-gradient amplifier; call it between ``backward()`` and ``optimizer.step()``.

    Args:
        params: parameters (or a module) whose ``.grad`` is filtered in place.
        alpha: EMA momentum ``α`` in ``[0, 1)`` (paper default 0.98).
        lamb: gain ``λ`` (paper default 2.0; 0 leaves gradients unchanged).

    Parameters whose ``.grad`` is ``None`` at a call are skipped and keep their filter state.
    """

    def __init__(self, params: Iterable[Tensor] | nn.Module, *, alpha: float = 0.98,
                 lamb: float = 2.0):
        if not (_finite(alpha) and 0.0 <= alpha < 1.0):
            raise ConfigError(f"GrokfastEMA: alpha must be in [0, 1), got {alpha!r} "
                              "(0.98 is the paper's default)")
        _check_gain(lamb)
        self.params = _param_list(params)
        self.alpha, self.lamb = float(alpha), float(lamb)
        self.ema: list[Tensor | None] = [None] * len(self.params)
        self.steps = 0

    @torch.no_grad()
    def __call__(self) -> None:
        """Filter every ``p.grad`` in place: ``g ← g + λ·EMA(g)`` (in-place twin of
        :func:`grokfast_ema`)."""
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            h = self.ema[i]
            if h is None:
                h = self.ema[i] = p.grad.clone()
            else:
                h.mul_(self.alpha).add_(p.grad, alpha=1.0 - self.alpha)
            p.grad.add_(h, alpha=self.lamb)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """Filter state (``ema`` tensors, step count) for checkpoints."""
        return {"ema": [None if h is None else h.clone() for h in self.ema], "steps": self.steps,
                "alpha": self.alpha, "lamb": self.lamb}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(state, ("ema", "steps"), len(self.params), "GrokfastEMA")
        self.ema = [None if h is None else h.to(p) for h, p in zip(state["ema"], self.params)]
        self.steps = int(state["steps"])


class GrokfastMA:
    """Moving-average slow-gradient amplifier (``Grokfast-MA``).

    Args:
        params: parameters (or a module) whose ``.grad`` is filtered in place.
        window_size: ``w`` ≥ 1 (paper default 100). Memory: ``w`` copies of the parameters.
        lamb: gain ``λ`` (paper default 5.0).
        warmup: leave gradients unchanged until ``w`` of them are held.
    """

    def __init__(self, params: Iterable[Tensor] | nn.Module, *, window_size: int = 100,
                 lamb: float = 5.0, warmup: bool = True):
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
            raise ConfigError(f"GrokfastMA: window_size must be a positive integer, got "
                              f"{window_size!r} (100 is the paper's default)")
        _check_gain(lamb)
        self.params = _param_list(params)
        self.window_size, self.lamb, self.warmup = window_size, float(lamb), bool(warmup)
        self.window: list[collections.deque[Tensor]] = [
            collections.deque(maxlen=window_size) for _ in self.params]
        self._sums: list[Tensor | None] = [None] * len(self.params)
        self.steps = 0

    @torch.no_grad()
    def __call__(self) -> None:
        """Filter every ``p.grad`` in place: ``g ← g + λ·mean(last w gradients)``.

        Keeps a running sum of the window (O(1) per step instead of O(w)), recomputed exactly
        every ``w`` steps so rounding cannot drift.
        """
        for i, (p, q) in enumerate(zip(self.params, self.window)):
            if p.grad is None:
                continue
            g = p.grad.clone()
            total = self._sums[i]
            if total is None or len(q) == 0 or self.steps % self.window_size == 0:
                q.append(g)
                total = self._sums[i] = torch.stack(tuple(q)).sum(0)
            else:
                if len(q) == self.window_size:
                    total.sub_(q[0])
                q.append(g)
                total.add_(g)
            if self.warmup and len(q) < self.window_size:
                continue
            p.grad.add_(total, alpha=self.lamb / len(q))
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"window": [[g.clone() for g in q] for q in self.window], "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_state(state, ("window", "steps"), len(self.params), "GrokfastMA")
        for q, saved, p in zip(self.window, state["window"], self.params):
            q.clear()
            q.extend(g.to(p) for g in saved)
        self._sums = [torch.stack(tuple(q)).sum(0) if q else None for q in self.window]
        self.steps = int(state["steps"])
