"""``GatedAdamW``: AdamW with the population-risk gate, a drop-in ``torch.optim.Optimizer``.

Per step and coordinate ``k``: ``scale_by_adam → gate → add_decayed_weights → scale_by_lr``
(see :mod:`.transforms`), the gate being ``1[ĝ_k² > τ ν̂_k]`` (hard) or
``max(0, 1 − τ ν̂_k/ĝ_k²)`` (soft), ``ν̂`` the noise variance of the gradient estimate from the
statistics source (:mod:`.stats`; default: the streaming EMA inside the optimizer, so plain
``loss.backward(); opt.step()`` works). With ``gate=False`` it is ``torch.optim.AdamW``.

    opt = GatedAdamW(model.parameters(), lr=1e-3)                       # streaming
    opt = GatedAdamW(model.parameters(), stats=PerExampleStats(model))  # exact, per example
    opt = GatedAdamW([{"params": body}, {"params": head, "gate": False}], lr=3e-4)
    ...
    loss.backward(); opt.step(); opt.zero_grad()
    opt.gate_stats()     # {'step': 120, 'skipped': False, 'fraction_updated': [0.31, 1.0], ...}

State per parameter: ``step``, ``exp_avg``, ``exp_avg_sq`` (as ``torch.optim.AdamW``, so
state dicts load across the two), plus for the streaming source ``exp_avg_dev_sq`` (the one
extra vector) and, for ``gate_on`` ``'grad'``/``'moments'`` (whose ``exp_avg`` sees gated
gradients), ``grad_avg``, a raw-gradient EMA mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ._common import GateMixin, check_common, check_number, param_list
from ._kernels import KERNELS, GroupStep, Kernel, select_kernel
from .stats import GradMoments, StatsSource
from .transforms import check_gate_args

__all__ = ["GatedAdamW"]


#: ``torch.optim.AdamW`` options GatedAdamW does not implement (accepted as ``False`` only)
UNSUPPORTED = ("amsgrad", "maximize", "capturable", "differentiable")


def _check_group(g: Mapping[str, Any]) -> None:
    """Validate one param group's settings (ConfigError naming the fix)."""
    check_number("lr", g["lr"], fix="; lr is a learning rate")
    betas = g["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ConfigError(f"betas must be two numbers in [0, 1), got {betas!r}")
    for b in betas:
        check_number("betas", b, high=1.0, high_open=True, fix=f" (in betas={betas!r})")
    check_number("eps", g["eps"])
    check_number("weight_decay", g["weight_decay"])
    if g["noise_beta"] is not None:
        check_number("noise_beta", g["noise_beta"], high=1.0, high_open=True,
                     fix=" (None = betas[1])")
    check_number("gate_warmup", g["gate_warmup"], integer=True)
    if g["foreach"] not in (None, True, False):
        raise ConfigError(f"foreach must be None, True or False, got {g['foreach']!r}")
    check_gate_args(g["gate"], g["threshold"], g["gate_on"])
    if g["fused"] not in (True, False, None):
        raise ConfigError(f"fused must be True, False or None (default: where available), "
                          f"got {g['fused']!r}")
    if g["fused"] and g["gate_on"] != "update":
        raise ConfigError(f"fused=True implements gate_on='update' only, got {g['gate_on']!r}; "
                          "use fused=False for the other placements")
    for flag in UNSUPPORTED:
        if g.get(flag):
            raise ConfigError(f"GatedAdamW does not implement AdamW's {flag}=True; use "
                              f"torch.optim.AdamW({flag}=True) (no gate), or {flag}=False")


class GatedAdamW(GateMixin, torch.optim.Optimizer):
    """AdamW with the per-parameter population-risk gate.

    Args:
        params: parameters or param groups (any key below can be set per group).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay, never
            gated).
        gate: ``True``/``'hard'`` (update coordinate ``k`` only if ``ĝ² > τ ν̂``), ``'soft'``
            (scale it by ``max(0, 1 − τ ν̂/ĝ²)``) or ``False`` (plain AdamW).
        threshold: ``τ ≥ 0``. ``1`` = exact leave-one-out rule (= the seeds' ``μ² > σ²/(b−1)``
            with the biased variance); ``b/(b−1)`` = the same with the unbiased variance;
            ``0`` passes every coordinate with ``ĝ ≠ 0``; larger is stricter.
        gate_on: where the gate multiplies (docs/gate.md): ``'update'`` (the Adam direction;
            moments see raw gradients), ``'grad'`` (the gradient entering the moments) or
            ``'moments'`` (the moment increments and the direction: skip the coordinate).
        stats: ``'streaming'`` or a :class:`~tangentscope.optim.stats.StatsSource`
            (``PerExampleStats``, ``VmapStats``, ``MicrobatchStats``) collecting exact
            statistics during ``backward()``; ``step(moments=...)`` also accepts them directly.
        noise_beta: EMA factor of the streaming noise state (default ``betas[1]``).
        gate_warmup: steps with the gate open at the start (the streaming noise state keeps
            learning meanwhile; its first step is always open: no variance yet).
        nonfinite: non-finite gradients → ``'skip'`` the step (state untouched; a
            ``RuntimeWarning`` and ``gate_stats()['skipped_steps']`` report it), ``'raise'``
            :class:`NonFiniteError`, or ``'ignore'`` (no check: fastest).
        foreach: ``True``: ``torch._foreach_*`` list ops; ``None`` (default): list ops on CUDA
            (as ``torch.optim``) and with the gate off, else the fastest eager kernel
            (:attr:`kernels`); ``False``: no list ops.
        fused: the fused step (the ``compiled`` kernel, :mod:`._fused`): noise state, gate,
            moments and update in one pass over each parameter's state — a C++ extension on
            CPU (torch's ``AdamW(fused=True)`` arithmetic and about its speed: the eager
            reference to ~1e-7 relative, the hardware sqrt where torch's eager one is MKL's),
            Triton on CUDA (untested on a GPU). ``None`` (default): used where available, i.e.
            float32/float64 contiguous tensors, the ``update`` placement or the gate off, and on
            CPU the extension already built (``make install`` or ``python -m
            tangentscope.optim._build --build``; never compiled implicitly); else the eager
            kernels. ``True``: the same, building the extension on first use if needed (once per
            machine, 15–40 s; without a C++ compiler: one ``RuntimeWarning``, then the eager
            kernels); ``gate_on='update'`` only. ``False``: eager kernels only (bit for bit the
            reference chain; with the gate off, bit for bit ``torch.optim.AdamW``). Steps with an
            estimator asking for its terms, and bfloat16/float16, use the eager kernels.
        amsgrad, maximize, capturable, differentiable: ``torch.optim.AdamW``'s options, not
            implemented: ``False`` only (``True`` raises, naming the alternative).

    Raises:
        ConfigError: invalid settings (before any state exists).
    """

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, gate: bool | str = True, threshold: float = 1.0,
                 gate_on: str = "update", stats: str | StatsSource = "streaming",
                 noise_beta: float | None = None, gate_warmup: int = 0,
                 nonfinite: str = "skip", foreach: bool | None = None,
                 fused: bool | None = None,
                 amsgrad: bool = False, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False):
        defaults: dict[str, Any] = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        gate=gate, threshold=threshold, gate_on=gate_on,
                        noise_beta=noise_beta, gate_warmup=gate_warmup, foreach=foreach,
                        fused=fused, amsgrad=amsgrad, maximize=maximize, capturable=capturable,
                        differentiable=differentiable)
        _check_group(defaults)
        check_common(stats, nonfinite)
        defaults.update(betas=tuple(betas), threshold=float(threshold))
        super().__init__(param_list(params, "GatedAdamW"), defaults)
        self.stats = stats
        self.nonfinite = nonfinite
        self._init_gate()
        self._scratch: dict[Any, Tensor] = {}       # reusable work buffers (not state)

    _supports_terms = True
    #: the step kernels in order of preference (see :mod:`._kernels`): name, predicate, function
    kernels: tuple[Kernel, ...] = KERNELS

    def __setstate__(self, state: dict[str, Any]) -> None:
        # also runs at the end of load_state_dict: a torch.optim.AdamW checkpoint lacks the
        # gate keys, which then take this optimizer's defaults
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``, validating the gate settings (a group
        with a bad value raises and is not kept)."""
        n = len(self.param_groups)
        try:
            super().add_param_group(param_group)
            _check_group(self.param_groups[-1])
        except ConfigError:
            del self.param_groups[n:]
            raise
        except (TypeError, ValueError) as e:         # torch's own checks (duplicates, types)
            del self.param_groups[n:]
            raise ConfigError(f"GatedAdamW.add_param_group: {e}; pass a dict with new "
                              "parameters under 'params'") from e

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict()`` plus ``'gate_telemetry'`` (the telemetry step
        counter and skipped steps; ``torch.optim.AdamW`` ignores the extra key)."""
        sd = super().state_dict()
        sd["gate_telemetry"] = self._telemetry_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``GatedAdamW`` or ``torch.optim.AdamW`` state dict.

        Raises:
            ConfigError: its param groups use an AdamW option GatedAdamW does not implement
                (``amsgrad``, ``maximize``, …) or another bad value — before anything changes.
        """
        for g in state_dict.get("param_groups", []):
            _check_group({**self.defaults, **g})
        super().load_state_dict(state_dict)
        self._load_telemetry_state(state_dict.get("gate_telemetry"))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,
             moments: Mapping[Any, GradMoments] | None = None) -> Any:
        """One optimizer step.

        Args:
            closure: re-evaluates the model and returns the loss (as ``torch.optim``).
            moments: caller-supplied statistics ``param (or id) -> GradMoments`` for this step
                (overrides ``stats``).

        Raises:
            ConfigError: a parameter with a gradient but no statistics from the source, or
                statistics from a single contribution (variance undefined).
            NonFiniteError: non-finite gradients with ``nonfinite='raise'``.
            TypeError: sparse gradients.
        """
        loss, collected, work, skip = self._begin_step(closure, moments, "GatedAdamW")
        if skip:
            return loss
        tele, names = [], []
        terms: list[dict[str, Tensor]] | None = [] if self._needs_terms() else None
        for group, ps, mode in work:
            mom = None if collected is None or (mode is None and terms is None) else \
                [collected.get(id(p)) for p in ps]
            k = GroupStep(ps, [self.state[p] for p in ps], group, mode, mom, terms, self._scratch)
            kernel = select_kernel(k, self.kernels)
            tele.append(kernel.run(k))
            names.append(kernel.name)
        self._reset_source()
        self._record(tele, names, terms)
        return loss
