"""Plumbing shared by :class:`GatedAdamW` and :class:`GatedOptimizer`: statistics collection,
the non-finite policy, the streaming noise state and gate telemetry."""

from __future__ import annotations

import collections
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, NonFiniteError
from .stats import GradMoments, StatsSource
from .transforms import deviation_inflation, snr_gate, streaming_noise_

NONFINITE = ("skip", "raise", "ignore")
HISTORY = 100_000


def check_common(stats: Any, nonfinite: str) -> None:
    """Validate the ``stats`` and ``nonfinite`` arguments."""
    if not (stats == "streaming" or isinstance(stats, StatsSource)):
        raise ConfigError(f"stats must be 'streaming' or a StatsSource (PerExampleStats, "
                          f"VmapStats, MicrobatchStats), got {stats!r}")
    if nonfinite not in NONFINITE:
        raise ConfigError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")


def streaming_noise(grad: Tensor, st: dict[str, Any], beta1: float, noise_beta: float,
                    mean_key: str, mean_n: int | None = None) -> tuple[Tensor, float] | None:
    """Fold ``ĝ_t`` into the streaming noise state ``st``; return ``(s, c)`` with
    ``ν̂_t = c·s`` (None before the first deviation). ``s`` is the state itself: do not modify.

    The reference mean is ``st[mean_key]``, an EMA with factor ``beta1`` of ``mean_n``
    gradients (``mean_n=None``: the state keeps its own mean, ``st['grad_avg']``, updated here).
    """
    own = mean_n is None
    n = st["grad_avg_n"] if own else mean_n
    if n >= 1:
        streaming_noise_(st["exp_avg_dev_sq"], grad, st[mean_key], 1 / (1 - beta1 ** n),
                         noise_beta, deviation_inflation(beta1, n))
        st["noise_n"] += 1
    if own:
        st["grad_avg"].lerp_(grad, 1 - beta1)
        st["grad_avg_n"] += 1
    if st["noise_n"] < 1:
        return None
    return st["exp_avg_dev_sq"], 1 / (1 - noise_beta ** st["noise_n"])


def init_streaming(p: Tensor, st: dict[str, Any], own_mean: bool) -> None:
    """Create the streaming noise state (and an own raw-gradient mean) if missing."""
    if "exp_avg_dev_sq" not in st:
        st["exp_avg_dev_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["noise_n"] = 0
    if own_mean and "grad_avg" not in st:
        st["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["grad_avg_n"] = 0


def gate_values(signal: Tensor, noise: tuple[Tensor, float] | None, threshold: float, mode: str,
                dtype: torch.dtype) -> Tensor | None:
    """The gate from ``noise = (tensor, scale)``, ``ν̂ = scale·tensor`` (None: no noise
    estimate yet, gate open)."""
    if noise is None:
        return None
    return snr_gate(signal, noise[0], threshold * noise[1], mode).to(dtype)


class GateMixin:
    """Telemetry, statistics collection and the non-finite policy for a gated optimizer.

    Needs ``self.stats``, ``self.nonfinite`` and calls :meth:`_init_gate` in ``__init__``.
    """

    stats: Any
    nonfinite: str

    def _init_gate(self) -> None:
        self.skipped_steps = 0
        self._last: dict[str, Any] = {"step": 0, "skipped": False, "groups": []}
        self._history: collections.deque = collections.deque(maxlen=HISTORY)

    # -- statistics -------------------------------------------------------------------------------
    def _collect(self, moments: Mapping[Any, GradMoments] | None) -> dict[int, GradMoments] | None:
        if moments is not None:
            return {(k if isinstance(k, int) else id(k)): v for k, v in moments.items()}
        if isinstance(self.stats, StatsSource):
            return self.stats.collect()
        return None

    def _reset_source(self) -> None:
        if isinstance(self.stats, StatsSource):
            self.stats.reset()

    def _check_moments(self, ps: list[Tensor], collected: dict[int, GradMoments]) -> None:
        for p in ps:
            m = collected.get(id(p))
            if m is None:
                name = self.stats._name(p) if isinstance(self.stats, StatsSource) else \
                    tuple(p.shape)
                raise ConfigError(
                    f"parameter {name} has a gradient but the statistics source collected "
                    "nothing for it: build the source on the module that owns every optimized "
                    "parameter, or turn its gate off with a param group {'gate': False}.")
            if m.count < 2:
                raise ConfigError(
                    f"the gate's exact statistics come from {m.count} {m.source} contribution(s): "
                    "the variance of one sample is undefined. Use a batch of >= 2 examples, "
                    ">= 2 microbatches (gradient_accumulation_steps) with MicrobatchStats, or "
                    "the streaming source (stats='streaming'), which needs one gradient per step.")

    @staticmethod
    def _check_dense(ps: list[Tensor], who: str) -> None:
        for p in ps:
            if p.grad.is_sparse:
                raise TypeError(f"{who} does not support sparse gradients (e.g. "
                                "nn.Embedding(sparse=True)); use dense gradients (sparse=False).")

    def _nonfinite_skip(self, grads: list[Tensor], n_groups: int, who: str) -> bool:
        """Apply the non-finite policy; True if the step must be skipped."""
        if self.nonfinite == "ignore" or not grads:
            return False
        norms = torch._foreach_norm(grads)
        if bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
            return False
        self._reset_source()
        if self.nonfinite == "raise":
            raise NonFiniteError(f"{who}: non-finite gradient (NaN/Inf) at step "
                                 f"{self._last['step'] + 1}; lower the learning rate, clip "
                                 "gradients, or pass nonfinite='skip' to skip such steps")
        self.skipped_steps += 1
        groups: list[Any] = [None] * n_groups
        self._last = {"step": self._last["step"], "skipped": True, "groups": groups}
        self._history.append((self._last["step"], True, groups))
        warnings.warn(f"{who}: non-finite gradient, step skipped ({self.skipped_steps} so far; "
                      "see gate_stats()['skipped_steps'])", RuntimeWarning, stacklevel=3)
        return True

    def _begin_step(self, closure: Any, moments: Mapping[Any, GradMoments] | None, who: str
                    ) -> tuple[Any, dict[int, GradMoments] | None, list[tuple[dict, list, Any]],
                               bool]:
        """Closure, statistics, per-group validation and the non-finite policy, before any
        state changes. Returns ``(loss, collected, [(group, params with grad, mode)], skip)``."""
        from .transforms import check_gate_args

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        collected = self._collect(moments)
        work, grads = [], []
        for group in self.param_groups:  # type: ignore[attr-defined]
            ps = [p for p in group["params"] if p.grad is not None]
            self._check_dense(ps, who)
            mode = check_gate_args(group["gate"], group["threshold"], group["gate_on"])
            if mode is not None and collected is not None:
                self._check_moments(ps, collected)
            work.append((group, ps, mode))
            grads += [p.grad for p in ps]
        return loss, collected, work, self._nonfinite_skip(grads, len(work), who)

    def _record(self, tele: list[Any]) -> None:
        step_no = self._last["step"] + 1
        self._last = {"step": step_no, "skipped": False, "groups": tele}
        self._history.append((step_no, False, tele))

    # -- telemetry --------------------------------------------------------------------------------
    @staticmethod
    def _fractions(groups: list[Any]) -> list[float | None]:
        return [None if g is None else float(g[0]) / max(g[1], 1) for g in groups]

    def gate_stats(self, flat: bool = False) -> dict[str, Any]:
        """The last step's gate telemetry (converts to Python floats: one device sync).

        Returns:
            ``{'step', 'skipped', 'skipped_steps', 'fraction_updated': [per group],
            'numel': [per group]}``. ``fraction_updated`` is the mean gate value over the
            group's coordinates that had a gradient (hard gate: the fraction updated; soft:
            the mean step scale; ``None`` for a group without gate). With ``flat=True``:
            ``{'gate/step', 'gate/skipped', 'gate/fraction/<group>'}`` for a logger or
            ``RunDir.log``.
        """
        last = self._last
        fr = self._fractions(last["groups"])
        out = {"step": last["step"], "skipped": last["skipped"],
               "skipped_steps": self.skipped_steps, "fraction_updated": fr,
               "numel": [None if g is None else g[1] for g in last["groups"]]}
        if not flat:
            return out
        row: dict[str, Any] = {"gate/step": out["step"], "gate/skipped": int(out["skipped"])}
        row.update({f"gate/fraction/{i}": f for i, f in enumerate(fr) if f is not None})
        return row

    def gate_history(self) -> list[dict[str, Any]]:
        """Every recorded step's ``{'step', 'skipped', 'fraction_updated'}`` (last 100 000)."""
        return [{"step": s, "skipped": k, "fraction_updated": self._fractions(g)}
                for s, k, g in self._history]
