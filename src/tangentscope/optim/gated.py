"""``GatedOptimizer``: the population-risk gate around any ``torch.optim`` optimizer.

    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = GatedOptimizer(base)                      # or gate(base, threshold=2.0, ...)
    loss.backward(); opt.step(); opt.zero_grad()    # schedulers: pass `opt` (or `base`)

The gate (see :mod:`.transforms`) is computed from the same statistics sources as
:class:`~tangentscope.optim.GatedAdamW`; with the streaming source the wrapper keeps its own
raw-gradient EMA mean (``mean_beta``) and squared-deviation EMA (``noise_beta``): two
parameter-sized vectors. Placements, for an optimizer the wrapper cannot see inside:

* ``'grad'``: ``p.grad ← γ ⊙ p.grad`` before the base step (``p.grad`` is modified in place);
* ``'update'``: the base step's whole move is scaled, ``w ← w_old + γ ⊙ (w_new − w_old)``
  (weight decay inside the base step is gated with it; costs one parameter copy);
* ``'moments'``: ``'update'`` plus every state tensor shaped like the parameter
  (``exp_avg``, ``momentum_buffer``, …) is interpolated the same way — a hard gate skips the
  coordinate entirely. Factored state (Adafactor's row/column statistics) cannot be gated per
  coordinate: that raises, use ``'update'`` or ``'grad'``. On the base optimizer's very first
  step its state does not exist yet, so only the parameters are restored.

It is a ``torch.optim.Optimizer`` sharing ``param_groups`` and ``state`` with the base, so LR
schedulers, ``GradScaler`` and Hugging Face ``Trainer(optimizers=(opt, sched))`` accept it.
Per-group gate settings are keys of the base's param groups (``gate``, ``threshold``,
``gate_on``, ``gate_warmup``). ``step(closure)`` evaluates the closure once for the gate and
hands the base a closure whose first call returns that loss (an optimizer that re-evaluates,
such as LBFGS, gets fresh evaluations after it: gate it with ``gate_on='update'``).
``gate_on='moments'`` is refused for optimizers whose preconditioner is not diagonal
(:data:`NON_DIAGONAL`, or state kept as matrices).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ._common import (
    GateMixin,
    check_common,
    check_number,
    gate_values,
    init_streaming,
    streaming_noise,
)
from .stats import GradMoments, StatsSource
from .transforms import check_gate_args

__all__ = ["GatedOptimizer", "gate"]

_GATE_KEYS = ("gate", "threshold", "gate_on", "gate_warmup")
#: optimizers whose preconditioner mixes coordinates (orthogonalized or matrix-preconditioned
#: updates): their moments cannot be frozen per coordinate (``gate_on='moments'``)
NON_DIAGONAL = ("Muon", "SOAP", "Shampoo", "DistributedShampoo", "KFAC", "EKFAC", "Kron",
                "PSGD", "PSGDKron", "Scion", "Dion")
#: optimizers that re-evaluate the closure inside ``step()``: only ``gate_on='update'`` gates
#: them (a gated gradient would be recomputed)
REEVALUATING = ("LBFGS",)


def _class_names(optimizer: torch.optim.Optimizer) -> set[str]:
    return {c.__name__ for c in type(optimizer).__mro__}


def _check_placement(optimizer: torch.optim.Optimizer, gate_on: str) -> None:
    names = _class_names(optimizer)
    if gate_on == "moments" and names & set(NON_DIAGONAL):
        raise ConfigError(
            f"gate_on='moments' freezes the base optimizer's state per coordinate, but the "
            f"preconditioner of {type(optimizer).__name__} is not diagonal (its update mixes "
            "coordinates): use gate_on='update' or 'grad'")
    if gate_on != "update" and names & set(REEVALUATING):
        raise ConfigError(
            f"{type(optimizer).__name__} re-evaluates the closure inside step(), which would "
            f"recompute the gradient gate_on={gate_on!r} gated: use gate_on='update' (the "
            "whole move is gated)")


class GatedOptimizer(GateMixin, torch.optim.Optimizer):
    """Wrap ``optimizer`` so that each step is gated per coordinate.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (SGD, Adam, Adafactor, …); it keeps its own
            hyperparameters and state.
        gate, threshold, gate_on, gate_warmup: as :class:`~tangentscope.optim.GatedAdamW`
            (defaults for every param group; a group's own keys win).
        stats: ``'streaming'`` or a :class:`~tangentscope.optim.stats.StatsSource`.
        mean_beta, noise_beta: EMA factors of the streaming mean and noise state.
        nonfinite: ``'skip'`` / ``'raise'`` / ``'ignore'`` non-finite gradients.

    Raises:
        ConfigError: invalid settings, or ``optimizer`` is not a ``torch.optim.Optimizer``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, gate: bool | str = True,
                 threshold: float = 1.0, gate_on: str = "update",
                 stats: str | StatsSource = "streaming", gate_warmup: int = 0,
                 mean_beta: float = 0.9, noise_beta: float = 0.999, nonfinite: str = "skip"):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(f"GatedOptimizer wraps a torch.optim.Optimizer, got "
                              f"{type(optimizer).__name__}; pass one, e.g. "
                              "gate(torch.optim.SGD(model.parameters(), lr=0.1))")
        if isinstance(optimizer, GatedOptimizer):
            raise ConfigError("this optimizer is already gated")
        check_gate_args(gate, threshold, gate_on)
        check_common(stats, nonfinite)
        for name, b in (("mean_beta", mean_beta), ("noise_beta", noise_beta)):
            check_number(name, b, high=1.0, high_open=True)
        check_number("gate_warmup", gate_warmup, integer=True)
        defaults = dict(gate=gate, threshold=float(threshold), gate_on=gate_on,
                        gate_warmup=gate_warmup)
        for g in optimizer.param_groups:
            self._check_group({**defaults, **g}, optimizer)
        for g in optimizer.param_groups:
            for k, v in defaults.items():
                g.setdefault(k, v)
        super().__init__([{"params": list(g["params"])} for g in optimizer.param_groups],
                         {**optimizer.defaults, **defaults})
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups     # shared: schedulers edit the base's lr
        self.state = optimizer.state
        self.defaults = {**optimizer.defaults, **defaults}
        self.stats, self.nonfinite = stats, nonfinite
        self.mean_beta, self.noise_beta = mean_beta, noise_beta
        self.gate_state: dict[int, dict[str, Any]] = {}
        self._steps = 0
        self._init_gate()

    def __repr__(self) -> str:
        return f"GatedOptimizer({self.optimizer!r})"

    @staticmethod
    def _check_group(g: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
        check_gate_args(g["gate"], g["threshold"], g["gate_on"])
        check_number("gate_warmup", g["gate_warmup"], integer=True)
        _check_placement(optimizer, g["gate_on"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (with the gate defaults; a group with a bad value
        raises and is not kept)."""
        if not hasattr(self, "optimizer"):       # during torch.optim.Optimizer.__init__
            return super().add_param_group(param_group)
        n = len(self.optimizer.param_groups)
        try:
            self.optimizer.add_param_group(param_group)
            g = self.optimizer.param_groups[-1]
            for k in _GATE_KEYS:
                g.setdefault(k, self.defaults[k])
            self._check_group(g, self.optimizer)
        except ConfigError:
            del self.optimizer.param_groups[n:]
            raise
        except (TypeError, ValueError) as e:         # the base's own checks
            del self.optimizer.param_groups[n:]
            raise ConfigError(f"GatedOptimizer.add_param_group: {e}; pass a dict with new "
                              "parameters under 'params'") from e

    # -- state dict: the base's, plus the streaming gate state ------------------------------------
    def state_dict(self) -> dict[str, Any]:
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        gate_state = {index[k]: dict(v) for k, v in self.gate_state.items() if k in index}
        return {"base": self.optimizer.state_dict(), "gate_state": gate_state,
                "gate_steps": self._steps, "gate_telemetry": self._telemetry_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "base" not in state_dict:
            raise ConfigError("not a GatedOptimizer state dict (no 'base' key); load a plain "
                              "optimizer's state into the base: opt.optimizer.load_state_dict()")
        self.optimizer.load_state_dict(state_dict["base"])
        # torch's load_state_dict replaces the base's param_groups and state: share them again
        # (LR schedulers and gate_on='moments' read them through the wrapper)
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        params = [p for g in self.param_groups for p in g["params"]]
        self.gate_state = {}
        for i, st in state_dict["gate_state"].items():
            p = params[int(i)]
            self.gate_state[id(p)] = {k: (v.to(p) if isinstance(v, Tensor) else v)
                                      for k, v in st.items()}
        self._steps = state_dict.get("gate_steps", 0)
        self._load_telemetry_state(state_dict.get("gate_telemetry",
                                                  {"step": self._steps, "skipped_steps": 0}))

    # -- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,
             moments: Mapping[Any, GradMoments] | None = None) -> Any:
        """Gate, then ``optimizer.step()``; arguments and errors as ``GatedAdamW.step``."""
        loss, collected, work, skip = self._begin_step(closure, moments, "GatedOptimizer")
        if skip:
            return loss
        for group, ps, mode in work:                 # refuse before anything changes
            if mode is not None and group["gate_on"] == "moments":
                for p in ps:
                    self._check_state(p)
        self._steps += 1
        pending: list[tuple[Tensor, Tensor, str, dict[str, Tensor]]] = []
        tele: list[Any] = []
        for group, ps, mode in work:
            if mode is None:
                tele.append(None)
                continue
            passed, numel = torch.zeros(()), 0
            for p in ps:
                gate = self._gate(p, group, mode, None if collected is None else collected[id(p)])
                numel += p.numel()
                passed = passed + (gate.sum().cpu() if gate is not None else p.numel())
                if gate is None:
                    continue
                if group["gate_on"] == "grad":
                    p.grad.mul_(gate)
                else:
                    pending.append((p, gate, group["gate_on"], self._snapshot(p, group)))
            tele.append((passed, numel))
        with torch.enable_grad():
            self.optimizer.step(None if closure is None else self._replay(closure, loss))
        for p, gate, _, old in pending:
            for key, before in old.items():
                now = p if key == "" else self.state[p][key]
                now.copy_(torch.lerp(before, now, gate))
        self._reset_source()
        self._record(tele, ["wrapped"] * len(tele))
        return loss

    @staticmethod
    def _replay(closure: Callable[[], Any], loss: Any) -> Callable[[], Any]:
        """The closure for the base's ``step``: its first call returns the loss already
        evaluated (the gradients the gate saw), later calls (LBFGS) re-evaluate."""
        first = [loss]

        def replay() -> Any:
            if first:
                return first.pop()
            with torch.enable_grad():
                return closure()

        return replay

    def _check_state(self, p: Tensor) -> None:
        """``gate_on='moments'``: the base's state for ``p`` must be per-coordinate."""
        for key, v in self.state.get(p, {}).items():
            if isinstance(v, (list, tuple, dict)) and any(
                    isinstance(x, Tensor) for x in (v.values() if isinstance(v, dict) else v)):
                raise ConfigError(
                    f"gate_on='moments' freezes state shaped like the parameter, but "
                    f"{type(self.optimizer).__name__} keeps {key!r} as a collection of tensors "
                    "(a matrix preconditioner: not diagonal); use gate_on='update' or 'grad' "
                    "with this optimizer.")
            if not isinstance(v, Tensor) or not v.is_floating_point() or v.numel() <= 1:
                continue
            if v.shape != p.shape:
                raise ConfigError(
                    f"gate_on='moments' freezes state shaped like the parameter, but "
                    f"{type(self.optimizer).__name__} keeps {key!r} of shape {tuple(v.shape)} for "
                    f"a parameter of shape {tuple(p.shape)} (factored statistics); use "
                    "gate_on='update' or 'grad' with this optimizer.")

    def _snapshot(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        out = {"": p.detach().clone()}
        if group["gate_on"] != "moments":
            return out
        for key, v in self.state.get(p, {}).items():
            if isinstance(v, Tensor) and v.is_floating_point() and v.numel() > 1:
                out[key] = v.clone()
        return out

    def _gate(self, p: Tensor, group: dict[str, Any], mode: str, mom: GradMoments | None
              ) -> Tensor | None:
        nu: tuple[Tensor, float] | None
        if mom is not None:
            nu, signal = (mom.noise_variance(), 1.0), mom.grad_sum
        else:
            st = self.gate_state.setdefault(id(p), {})
            init_streaming(p, st, own_mean=True)
            grad = p.grad
            assert grad is not None
            nu, signal = streaming_noise(grad, st, self.mean_beta, self.noise_beta,
                                         "grad_avg"), grad
        if self._steps <= group["gate_warmup"]:
            return None
        return gate_values(signal, nu, group["threshold"], mode, p.dtype)


def gate(optimizer: torch.optim.Optimizer, **kwargs: Any) -> GatedOptimizer:
    """``GatedOptimizer(optimizer, **kwargs)`` — add the population-risk gate to any optimizer."""
    return GatedOptimizer(optimizer, **kwargs)
