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
``gate_on``, ``gate_warmup``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ._common import GateMixin, check_common, gate_values, init_streaming, streaming_noise
from .stats import GradMoments, StatsSource
from .transforms import check_gate_args

__all__ = ["GatedOptimizer", "gate"]

_GATE_KEYS = ("gate", "threshold", "gate_on", "gate_warmup")


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
                              f"{type(optimizer).__name__}")
        if isinstance(optimizer, GatedOptimizer):
            raise ConfigError("this optimizer is already gated")
        check_gate_args(gate, threshold, gate_on)
        check_common(stats, nonfinite)
        for name, b in (("mean_beta", mean_beta), ("noise_beta", noise_beta)):
            if not 0.0 <= b < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {b}")
        if not isinstance(gate_warmup, int) or gate_warmup < 0:
            raise ConfigError(f"gate_warmup must be an integer >= 0, got {gate_warmup!r}")
        defaults = dict(gate=gate, threshold=float(threshold), gate_on=gate_on,
                        gate_warmup=gate_warmup)
        for g in optimizer.param_groups:
            for k, v in defaults.items():
                g.setdefault(k, v)
            check_gate_args(g["gate"], g["threshold"], g["gate_on"])
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

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (with the gate defaults)."""
        if not hasattr(self, "optimizer"):       # during torch.optim.Optimizer.__init__
            return super().add_param_group(param_group)
        self.optimizer.add_param_group(param_group)
        g = self.optimizer.param_groups[-1]
        for k in _GATE_KEYS:
            g.setdefault(k, self.defaults[k])
        check_gate_args(g["gate"], g["threshold"], g["gate_on"])

    # -- state dict: the base's, plus the streaming gate state ------------------------------------
    def state_dict(self) -> dict[str, Any]:
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        gate_state = {index[k]: dict(v) for k, v in self.gate_state.items() if k in index}
        return {"base": self.optimizer.state_dict(), "gate_state": gate_state,
                "gate_steps": self._steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "base" not in state_dict:
            raise ConfigError("not a GatedOptimizer state dict (no 'base' key); load a plain "
                              "optimizer's state into the base: opt.optimizer.load_state_dict()")
        self.optimizer.load_state_dict(state_dict["base"])
        params = [p for g in self.param_groups for p in g["params"]]
        self.gate_state = {}
        for i, st in state_dict["gate_state"].items():
            p = params[int(i)]
            self.gate_state[id(p)] = {k: (v.to(p) if isinstance(v, Tensor) else v)
                                      for k, v in st.items()}
        self._steps = state_dict.get("gate_steps", 0)

    # -- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,
             moments: Mapping[Any, GradMoments] | None = None) -> Any:
        """Gate, then ``optimizer.step()``; arguments and errors as ``GatedAdamW.step``."""
        loss, collected, work, skip = self._begin_step(closure, moments, "GatedOptimizer")
        if skip:
            return loss
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
            self.optimizer.step()
        for p, gate, _, old in pending:
            for key, before in old.items():
                now = p if key == "" else self.state[p][key]
                now.copy_(torch.lerp(before, now, gate))
        self._reset_source()
        self._record(tele)
        return loss

    def _snapshot(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        out = {"": p.detach().clone()}
        if group["gate_on"] != "moments":
            return out
        for key, v in self.state.get(p, {}).items():
            if not isinstance(v, Tensor) or not v.is_floating_point() or v.numel() <= 1:
                continue
            if v.shape != p.shape:
                raise ConfigError(
                    f"gate_on='moments' freezes state shaped like the parameter, but "
                    f"{type(self.optimizer).__name__} keeps {key!r} of shape {tuple(v.shape)} for "
                    f"a parameter of shape {tuple(p.shape)} (factored statistics); use "
                    "gate_on='update' or 'grad' with this optimizer.")
            out[key] = v.clone()
        return out

    def _gate(self, p: Tensor, group: dict[str, Any], mode: str, mom: GradMoments | None
              ) -> Tensor | None:
        if mom is not None:
            nu, signal = (mom.noise_variance(), 1.0), mom.grad_sum
        else:
            st = self.gate_state.setdefault(id(p), {})
            init_streaming(p, st, own_mean=True)
            nu, signal = streaming_noise(p.grad, st, self.mean_beta, self.noise_beta,
                                         "grad_avg"), p.grad
        if self._steps <= group["gate_warmup"]:
            return None
        return gate_values(signal, nu, group["threshold"], mode, p.dtype)


def gate(optimizer: torch.optim.Optimizer, **kwargs: Any) -> GatedOptimizer:
    """``GatedOptimizer(optimizer, **kwargs)`` — add the population-risk gate to any optimizer."""
    return GatedOptimizer(optimizer, **kwargs)
