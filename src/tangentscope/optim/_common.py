"""Plumbing shared by :class:`GatedAdamW` and :class:`GatedOptimizer`: statistics collection,
the non-finite policy, the streaming noise state, gate telemetry and the step observers."""

from __future__ import annotations

import collections
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ..errors import ConfigError, NonFiniteError, ShapeError
from . import _native
from .stats import GradMoments, StatsSource
from .transforms import GateMode, check_gate_args, deviation_inflation, snr_gate, streaming_noise_

NONFINITE = ("skip", "raise", "ignore")
HISTORY = 100_000


def check_number(name: str, value: Any, *, low: float = 0.0, high: float = math.inf,
                 high_open: bool = False, integer: bool = False, fix: str = "") -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite number (an ``int`` if
    ``integer``; not a bool) in ``[low, high]`` (``[low, high)`` if ``high_open``)."""
    v = float(value) if isinstance(value, Tensor) and value.numel() == 1 else value
    kind = int if integer else (int, float)
    ok = not isinstance(v, bool) and isinstance(v, kind) and math.isfinite(v) and low <= v and (
        v < high if high_open else v <= high)
    if not ok:
        if math.isfinite(high):
            bounds = f" in [{low:g}, {high:g}{')' if high_open else ']'}"
        else:
            bounds = f" >= {low:g}" if math.isfinite(low) else ""
        raise ConfigError(f"{name} must be {'an integer' if integer else 'a finite number'}"
                          f"{bounds}, got {value!r}{fix}")


def param_list(params: Any, who: str) -> list[Any]:
    """``params`` (parameters or param groups) as a list, checked before ``torch.optim`` sees
    it: not a lone tensor, not empty, tensors that are leaves, no tensor twice."""
    fix = "pass model.parameters() or a list of param groups ({'params': [...], ...})"
    if isinstance(params, (Tensor, str, bytes, dict)) or not isinstance(params, Iterable):
        raise ConfigError(f"{who} takes an iterable of parameters or param groups, got "
                          f"{type(params).__name__}; {fix}")
    items: list[Any] = []
    seen: set[int] = set()
    for it in params:
        if isinstance(it, dict):
            if "params" not in it:
                raise ConfigError(f"{who}: a param group needs a 'params' key; {fix}")
            ps = it["params"]
            ps = [ps] if isinstance(ps, Tensor) else list(ps) if isinstance(ps, Iterable) and \
                not isinstance(ps, (str, bytes, dict)) else [ps]
            items.append({**it, "params": ps})
        else:
            ps = [it]
            items.append(it)
        for p in ps:
            if not isinstance(p, Tensor):
                raise ConfigError(f"{who} optimizes tensors, got a {type(p).__name__}; {fix}")
            if not p.is_leaf:
                raise ConfigError(f"{who} cannot optimize a non-leaf tensor (one computed from "
                                  "others); pass the leaf parameters (model.parameters())")
            if id(p) in seen:
                raise ConfigError(f"{who}: a parameter of shape {tuple(p.shape)} is given twice; "
                                  "pass each parameter once (in one param group)")
            seen.add(id(p))
    if not items:
        raise ConfigError(f"{who} got an empty parameter list; {fix}")
    return items


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
    n: int = st["grad_avg_n"] if mean_n is None else mean_n
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


@dataclasses.dataclass(frozen=True)
class GroupInfo:
    """One param group's gate telemetry for one step.

    Attributes:
        index: the group's position in ``optimizer.param_groups``.
        kernel: the step kernel that ran (``'reference'``, ``'foreach'``, ``'streaming-hard'``,
            ``'compiled'``; ``'wrapped'`` for :class:`GatedOptimizer`), ``None`` if skipped.
        passed: coordinates updated (the sum of gate values), a 0-d tensor on the parameters'
            device, or ``None`` for a group without gate.
        numel: coordinates that had a gradient (0 for a group without gate).
    """

    index: int
    kernel: str | None
    passed: Tensor | None
    numel: int

    @property
    def fraction_updated(self) -> float | None:
        """``passed / numel`` as a Python float (one device sync), ``None`` without gate."""
        return None if self.passed is None else float(self.passed) / max(self.numel, 1)


@dataclasses.dataclass(frozen=True)
class StepTerms:
    """The population-risk estimator's pieces for one tensor and step (0-d float64 tensors;
    see :mod:`.estimator`): ``ĝ·Δw``, ``Σ_k J_k ν̂_k``, ``Σ_k ν̂_k``, and whether the step had a
    noise estimate (0-d bool)."""

    grad_dot_delta: Tensor
    self_influence: Tensor
    noise: Tensor
    has_noise: Tensor


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What a step observer (``register_step_observer``) receives after every ``step()``.

    Attributes:
        step: the gate's step count (non-skipped steps so far, this one included).
        skipped: the step was skipped (non-finite gradients, ``nonfinite='skip'``): nothing
            moved and ``groups`` is empty.
        groups: per param group telemetry (:class:`GroupInfo`).
        terms: per-tensor estimator terms (:class:`StepTerms`, every parameter with a gradient
            in ``param_groups`` order) when an observer asked for them (``needs_terms=True``),
            else ``None``.
    """

    step: int
    skipped: bool
    groups: tuple[GroupInfo, ...] = ()
    terms: tuple[StepTerms, ...] | None = None


StepObserver = Callable[[Any, StepInfo], None]


def gate_values(signal: Tensor, noise: tuple[Tensor, float] | None, threshold: float, mode: str,
                dtype: torch.dtype) -> Tensor | None:
    """The gate from ``noise = (tensor, scale)``, ``ν̂ = scale·tensor`` (None: no noise
    estimate yet, gate open)."""
    if noise is None:
        return None
    return snr_gate(signal, noise[0], threshold * noise[1], cast(GateMode, mode)).to(dtype)


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
        self._step_observers: collections.OrderedDict[int, StepObserver] = \
            collections.OrderedDict()
        self._observers_needing_terms: collections.OrderedDict[int, bool] = \
            collections.OrderedDict()

    # -- observers --------------------------------------------------------------------------------
    def register_step_observer(self, fn: StepObserver, *, needs_terms: bool = False
                               ) -> RemovableHandle:
        """Call ``fn(optimizer, info)`` after every ``step()`` (skipped ones included) with a
        frozen :class:`StepInfo`; like ``torch.optim.Optimizer.register_step_post_hook``.

        Args:
            fn: the observer; it must not change the optimizer.
            needs_terms: also compute the population-risk estimator's per-tensor terms
                (``info.terms``); while such an observer is registered, steps take the
                reference kernel (about two extra parameter-sized passes).

        Returns:
            A handle; ``handle.remove()`` detaches the observer.

        Raises:
            ConfigError: ``fn`` is not callable, or ``needs_terms`` where the optimizer cannot
                compute them.
        """
        if not callable(fn):
            raise ConfigError(f"a step observer must be callable as fn(optimizer, info), got "
                              f"{type(fn).__name__}")
        if needs_terms and not self._supports_terms:
            raise ConfigError(f"{type(self).__name__} cannot compute the estimator's terms (the "
                              "Jacobian of the base optimizer's update is unknown); use "
                              "GatedAdamW, or register the observer with needs_terms=False")
        handle = RemovableHandle(self._step_observers, extra_dict=self._observers_needing_terms)
        self._step_observers[handle.id] = fn
        self._observers_needing_terms[handle.id] = bool(needs_terms)
        return handle

    _supports_terms = False

    def _needs_terms(self) -> bool:
        return any(self._observers_needing_terms.values())

    def _notify(self, info: StepInfo) -> None:
        for fn in list(self._step_observers.values()):
            fn(self, info)

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
        """Every parameter with a gradient has statistics of its shape from >= 2 contributions.

        A parameter the source saw nothing for but whose gradient is exactly zero (a layer
        unused this step, gradients zeroed with ``zero_grad(set_to_none=False)``) gets zero
        statistics: a zero contribution, which the gate never passes.
        """
        count: int | None = None
        for p in ps:
            m = collected.get(id(p))
            name = self.stats._name(p) if isinstance(self.stats, StatsSource) else \
                f"of shape {tuple(p.shape)}"
            if m is None:
                grad = p.grad
                if grad is not None and not bool(grad.any()):
                    if count is None:
                        count = max([c.count for c in collected.values()
                                     if isinstance(c.count, int)] + [2])
                    collected[id(p)] = GradMoments(grad, torch.zeros_like(grad), count)
                    continue
                raise ConfigError(
                    f"parameter {name} has a gradient but the statistics source collected "
                    "nothing for it: build the source on the module that owns every optimized "
                    "parameter, or turn its gate off with a param group {'gate': False}.")
            if not (isinstance(m, GradMoments) and m.grad_sum.shape == p.shape and
                    m.grad_sq_sum.shape == p.shape):
                shapes = ((tuple(m.grad_sum.shape), tuple(m.grad_sq_sum.shape))
                          if isinstance(m, GradMoments) else type(m).__name__)
                raise ShapeError(f"statistics for parameter {name} (shape {tuple(p.shape)}) have "
                                 f"shape {shapes}: pass GradMoments(grad_sum, grad_sq_sum, count) "
                                 "shaped like the parameter")
            if isinstance(m.count, bool) or not isinstance(m.count, int):
                raise ConfigError(f"GradMoments.count for parameter {name} must be an integer "
                                  f"number of contributions, got {m.count!r}")
            if m.count < 2:
                raise ConfigError(
                    f"the gate's exact statistics come from {m.count} {m.source} contribution(s): "
                    "the variance of one sample is undefined. Use a batch of >= 2 examples, "
                    ">= 2 microbatches (gradient_accumulation_steps) with MicrobatchStats, or "
                    "the streaming source (stats='streaming'), which needs one gradient per step.")

    @staticmethod
    def _check_dense(ps: list[Tensor], who: str) -> None:
        for p in ps:
            if p.grad is not None and p.grad.is_sparse:
                raise TypeError(f"{who} does not support sparse gradients (e.g. "
                                "nn.Embedding(sparse=True)); use dense gradients (sparse=False).")

    @staticmethod
    def _all_finite(grads: list[Tensor]) -> bool:
        # the fused kernel's extension, once loaded: one read-only pass, one call
        op = _native.loaded_op("all_finite")
        if op is not None:
            try:
                return bool(op(grads))
            except RuntimeError:                        # not contiguous float32/64 CPU tensors
                pass
        # one sum per tensor (cheaper than norms); a sum that overflows is confirmed elementwise
        sums = torch.stack([g.sum(dtype=torch.float32) for g in grads])
        if bool(torch.isfinite(sums).all()):
            return True
        return all(bool(torch.isfinite(g).all()) for g in grads)

    def _nonfinite_skip(self, grads: list[Tensor], n_groups: int, who: str) -> bool:
        """Apply the non-finite policy; True if the step must be skipped."""
        if self.nonfinite == "ignore" or not grads or self._all_finite(grads):
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
        if self._step_observers:
            self._notify(StepInfo(step=self._last["step"], skipped=True))
        return True

    def _begin_step(self, closure: Any, moments: Mapping[Any, GradMoments] | None, who: str
                    ) -> tuple[Any, dict[int, GradMoments] | None, list[tuple[dict, list, Any]],
                               bool]:
        """Closure, statistics, per-group validation and the non-finite policy, before any
        state changes. Returns ``(loss, collected, [(group, params with grad, mode)], skip)``."""
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

    def _record(self, tele: list[Any], kernels: list[str] | None = None,
                terms: list[dict[str, Tensor]] | None = None) -> None:
        """Record a finished step's telemetry (``[(passed, numel) or None]`` per group) and call
        the observers."""
        step_no = self._last["step"] + 1
        self._last = {"step": step_no, "skipped": False, "groups": tele}
        self._history.append((step_no, False, tele))
        if not self._step_observers:
            return
        groups = tuple(GroupInfo(i, None if kernels is None else kernels[i],
                                 None if g is None else g[0],
                                 0 if g is None else int(g[1])) for i, g in enumerate(tele))
        self._notify(StepInfo(step=step_no, skipped=False, groups=groups,
                              terms=None if terms is None else tuple(StepTerms(**t)
                                                                     for t in terms)))

    # -- telemetry --------------------------------------------------------------------------------
    def _telemetry_state(self) -> dict[str, int]:
        """What a state dict keeps of the telemetry: the step counter and skipped steps."""
        return {"step": int(self._last["step"]), "skipped_steps": int(self.skipped_steps)}

    def _load_telemetry_state(self, saved: Mapping[str, Any] | None) -> None:
        if not saved:
            return
        self.skipped_steps = int(saved.get("skipped_steps", 0))
        self._last = {"step": int(saved.get("step", 0)), "skipped": False, "groups": []}

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
