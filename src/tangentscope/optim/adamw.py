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

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from ._common import GateMixin, check_common, gate_values, init_streaming, streaming_noise
from .stats import GradMoments, StatsSource
from .transforms import adam_self_influence, check_gate_args, deviation_inflation

__all__ = ["GatedAdamW"]


def _check_hparams(lr: Any, betas: Any, eps: Any, weight_decay: Any, noise_beta: Any,
                   gate_warmup: Any) -> None:
    if isinstance(lr, Tensor):
        lr = float(lr)
    if not lr >= 0:
        raise ConfigError(f"lr must be >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"betas must be two numbers in [0, 1), got {betas}")
    if not eps >= 0:
        raise ConfigError(f"eps must be >= 0, got {eps}")
    if not weight_decay >= 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
    if noise_beta is not None and not 0.0 <= noise_beta < 1.0:
        raise ConfigError(f"noise_beta must be in [0, 1) (None = betas[1]), got {noise_beta}")
    if not isinstance(gate_warmup, int) or gate_warmup < 0:
        raise ConfigError(f"gate_warmup must be an integer >= 0, got {gate_warmup!r}")


def _check_fused(fused: Any, gate_on: str) -> None:
    if fused not in (True, False):
        raise ConfigError(f"fused must be True or False, got {fused!r}")
    if fused and gate_on != "update":
        raise ConfigError(f"fused=True implements gate_on='update' only, got {gate_on!r}; use "
                          "fused=False for the other placements")


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
        foreach: use ``torch._foreach_*`` list ops (default: on CUDA only, as ``torch.optim``).
        fused: run the ``update``-placement step as one ``torch.compile``'d kernel per tensor
            (about 0.5× ``torch.optim.AdamW(foreach=True)``'s step on CPU instead of about 2×;
            the first step compiles, 15–45 s, and needs a C++ compiler). ``gate_on='update'``
            only; steps with an attached estimator use the eager path.

    Raises:
        ConfigError: invalid settings (before any state exists).
    """

    def __init__(self, params: Iterable[Any], lr: float | Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, gate: bool | str = True, threshold: float = 1.0,
                 gate_on: str = "update", stats: str | StatsSource = "streaming",
                 noise_beta: float | None = None, gate_warmup: int = 0,
                 nonfinite: str = "skip", foreach: bool | None = None, fused: bool = False):
        _check_hparams(lr, betas, eps, weight_decay, noise_beta, gate_warmup)
        check_gate_args(gate, threshold, gate_on)
        _check_fused(fused, gate_on)
        check_common(stats, nonfinite)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        gate=gate, threshold=float(threshold), gate_on=gate_on,
                        noise_beta=noise_beta, gate_warmup=gate_warmup, foreach=foreach,
                        fused=fused)
        super().__init__(params, defaults)
        self.stats = stats
        self.nonfinite = nonfinite
        self._init_gate()
        self._estimators: list[Any] = []
        self._scratch: dict[Any, Tensor] = {}       # reusable work buffers (not state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # also runs at the end of load_state_dict: a torch.optim.AdamW checkpoint lacks the
        # gate keys, which then take this optimizer's defaults
        super().__setstate__(state)
        for group in self.param_groups:
            for k, v in self.defaults.items():
                group.setdefault(k, v)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``, validating the gate settings."""
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        _check_hparams(g["lr"], g["betas"], g["eps"], g["weight_decay"], g["noise_beta"],
                       g["gate_warmup"])
        check_gate_args(g["gate"], g["threshold"], g["gate_on"])
        _check_fused(g["fused"], g["gate_on"])

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
        tele = []
        terms = [] if self._estimators else None
        for group, ps, mode in work:
            mom = None if collected is None or (mode is None and terms is None) else \
                [collected.get(id(p)) for p in ps]
            foreach = group["foreach"]
            if foreach is None:
                foreach = bool(ps) and all(p.is_cuda for p in ps)
            if group["fused"] and terms is None and all(p.is_contiguous() for p in ps):
                from ._fused import fused_update_step

                tele.append(fused_update_step(ps, [self.state[p] for p in ps], group, mode, mom))
            elif foreach and terms is None and ps:
                tele.append(_multi_tensor_step(ps, [self.state[p] for p in ps], group, mode,
                                               mom))
            elif (mode == "hard" and mom is None and terms is None and group["gate_on"] ==
                  "update" and group["threshold"] > 0):
                tele.append(_streaming_hard_update_step(ps, [self.state[p] for p in ps], group,
                                                        self._scratch))
            else:
                tele.append(_single_tensor_step(ps, [self.state[p] for p in ps], group, mode,
                                                mom, terms, self._scratch))
        self._reset_source()
        self._record(tele)
        if terms is not None:
            for est in self._estimators:
                est._record_step(terms)
        return loss


# =================================================================================================
# implementations (functional over lists of tensors; state dicts updated in place)
# =================================================================================================
def _init_state(p: Tensor, st: dict[str, Any], streaming: bool, gate_on: str) -> None:
    if not st:
        st["step"] = torch.tensor(0.0, dtype=torch.float32)
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if streaming:
        init_streaming(p, st, own_mean=gate_on != "update")


def _gate_for(p: Tensor, st: dict[str, Any], group: dict[str, Any], mode: str | None,
              mom: GradMoments | None, t: int, need_noise: bool = False
              ) -> tuple[Tensor | None, tuple[Tensor, float] | None, Tensor]:
    """``(gate or None, noise or None, signal)`` for one tensor, ``noise = (tensor, scale)``
    with ``ν̂ = scale·tensor``; updates the streaming state.

    With the gate off, ``ν̂`` is still computed (exact, or streaming) when ``need_noise``
    (an estimator is attached).

    The streaming reference mean is ``exp_avg`` (``t − 1`` raw gradients) for the ``update``
    placement, else the state's own ``grad_avg``.
    """
    g = p.grad
    if mode is None and not need_noise:
        return None, None, g
    if mom is not None:
        nu, signal = (mom.noise_variance(), 1.0), mom.grad_sum
    else:
        beta1 = group["betas"][0]
        nb = group["noise_beta"] if group["noise_beta"] is not None else group["betas"][1]
        own = group["gate_on"] != "update"
        nu = streaming_noise(g, st, beta1, nb, "grad_avg" if own else "exp_avg",
                             None if own else t - 1)
        signal = g
    if mode is None or t <= group["gate_warmup"]:
        return None, nu, signal
    return gate_values(signal, nu, group["threshold"], mode, p.dtype), nu, signal


def _single_tensor_step(params: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any],
                        mode: str | None, moments: list[GradMoments] | None,
                        terms: list[dict[str, Tensor]] | None, scratch: dict[Any, Tensor]
                        ) -> tuple[Tensor, int] | None:
    beta1, beta2 = group["betas"]
    lr, eps, wd, gate_on = float(group["lr"]), group["eps"], group["weight_decay"], group["gate_on"]
    passed: Tensor | None = None
    numel = 0
    for i, p in enumerate(params):
        st = states[i]
        mom = None if moments is None else moments[i]
        _init_state(p, st, mom is None and (mode is not None or terms is not None), gate_on)
        st["step"] += 1
        t = int(st["step"].item())
        gate, nu, signal = _gate_for(p, st, group, mode, mom, t, need_noise=terms is not None)
        g = p.grad
        m, v = st["exp_avg"], st["exp_avg_sq"]
        p_old = p.detach().clone() if terms is not None else None
        p.mul_(1 - lr * wd)
        if gate is not None and gate_on == "grad":
            g = g * gate
        if gate is not None and gate_on == "moments":
            m.lerp_(g, gate * (1 - beta1))
            v.lerp_(g * g, gate * (1 - beta2))
        else:
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bc1 = 1 - beta1 ** t
        bc2_sqrt = math.sqrt(1 - beta2 ** t)
        denom = torch.sqrt(v, out=_work_buffer(scratch, p, p.dtype))
        denom.div_(bc2_sqrt).add_(eps)            # AdamW's ops, in a reused buffer
        num = m if gate is None or gate_on == "grad" else torch.mul(
            m, gate, out=_work_buffer(scratch, p, p.dtype, slot=1))
        p.addcdiv_(num, denom, value=-lr / bc1)
        if mode is not None:
            numel += p.numel()
            s = gate.sum() if gate is not None else torch.tensor(float(p.numel()))
            passed = s if passed is None else passed + s
        if terms is not None:
            terms.append(_estimate_terms(p, p_old, g if gate_on == "grad" else p.grad, signal, nu,
                                         st, group, gate, t))
    return None if mode is None else (passed if passed is not None else torch.tensor(0.0), numel)


def _work_buffer(scratch: dict[Any, Tensor], p: Tensor, dtype: torch.dtype, slot: int = 0
                 ) -> Tensor:
    """A ``p``-shaped view of a reusable buffer (avoids a fresh allocation, hence page faults,
    for every tensor of every step)."""
    key = (dtype, p.device, slot)
    buf = scratch.get(key)
    if buf is None or buf.numel() < p.numel():
        buf = scratch[key] = torch.empty(p.numel(), dtype=dtype, device=p.device)
    return buf[:p.numel()].view_as(p)


def _streaming_hard_update_step(params: list[Tensor], states: list[dict[str, Any]],
                                group: dict[str, Any], scratch: dict[Any, Tensor]
                                ) -> tuple[Tensor, int]:
    """The default configuration (streaming noise, hard gate on the update) in place, with one
    float and one bool work buffer: the same step as :func:`_single_tensor_step`, fewer passes.

    Gate: ``ĝ² > τ ŝ/(1 − β_sⁿ)`` ⇔ ``ŝ − c ĝ² < 0`` with ``c = (1 − β_sⁿ)/τ``; gated
    coordinates get an infinite denominator (``m/∞ = 0``). The Adam denominator is
    ``√v + ε√(1−β2ᵗ)`` with the step scaled by ``√(1−β2ᵗ)/(1−β1ᵗ)`` (algebraically AdamW's).
    """
    beta1, beta2 = group["betas"]
    lr, eps, wd, tau = float(group["lr"]), group["eps"], group["weight_decay"], group["threshold"]
    nb = group["noise_beta"] if group["noise_beta"] is not None else beta2
    passed: Tensor | None = None
    numel = 0
    for p, st in zip(params, states):
        _init_state(p, st, True, "update")
    steps = [st["step"] for st in states]
    if steps:
        torch._foreach_add_(steps, 1)                 # one call and one sync per group
    ts = [int(t) for t in torch.stack(steps).tolist()] if steps else []
    for p, st, t in zip(params, states, ts):
        g, m, v, s = p.grad, st["exp_avg"], st["exp_avg_sq"], st["exp_avg_dev_sq"]
        d = _work_buffer(scratch, p, p.dtype)
        shut = _work_buffer(scratch, p, torch.bool)
        if t >= 2:                                    # exp_avg holds t − 1 gradients
            torch.sub(g, m, alpha=1 / (1 - beta1 ** (t - 1)), out=d)
            s.mul_(nb).addcmul_(d, d, value=(1 - nb) / deviation_inflation(beta1, t - 1))
            st["noise_n"] += 1
        gated = st["noise_n"] >= 1 and t > group["gate_warmup"]
        if gated:
            c = (1 - nb ** st["noise_n"]) / tau
            torch.addcmul(s, g, g, value=-c, out=d)
            torch.ge(d, 0, out=shut)
        if wd:
            p.mul_(1 - lr * wd)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bc2_sqrt = math.sqrt(1 - beta2 ** t)
        torch.sqrt(v, out=d)
        d.add_(eps * bc2_sqrt)
        if gated:
            d.masked_fill_(shut, math.inf)
        p.addcdiv_(m, d, value=-lr * bc2_sqrt / (1 - beta1 ** t))
        numel += p.numel()
        n_pass = (p.numel() - shut.sum()) if gated else torch.tensor(p.numel())
        passed = n_pass if passed is None else passed + n_pass
    return (passed if passed is not None else torch.tensor(0), numel)


def _estimate_terms(p: Tensor, p_old: Tensor, g_taken: Tensor, signal: Tensor,
                    noise: tuple[Tensor, float] | None, st: dict[str, Any], group: dict[str, Any],
                    gate: Tensor | None, t: int) -> dict[str, Tensor]:
    """Per-tensor pieces of the population-risk estimate (see :mod:`.estimator`)."""
    nu = None if noise is None else noise[0] * noise[1]
    beta1, beta2 = group["betas"]
    lr = float(group["lr"])
    delta = p.detach() - p_old
    gain = 1.0 if gate is None or group["gate_on"] == "update" else gate
    J = adam_self_influence(st["exp_avg"], st["exp_avg_sq"], g_taken, t, beta1, beta2,
                            group["eps"], moment_gain=gain)
    if gate is not None and group["gate_on"] in ("update", "moments"):
        J = J * gate
    J = -lr * J
    sig = signal.to(delta.dtype)
    return {"grad_dot_delta": (sig * delta).sum().double(),
            "self_influence": (torch.zeros((), dtype=torch.float64) if nu is None
                               else (J.to(nu.dtype) * nu).sum().double()),
            "noise": (torch.zeros((), dtype=torch.float64) if nu is None
                      else nu.sum().double()),
            "has_noise": torch.tensor(nu is not None)}


def _multi_tensor_step(params: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any],
                       mode: str | None, moments: list[GradMoments] | None
                       ) -> tuple[Tensor, int] | None:
    """The same step with ``torch._foreach_*`` ops over the group's tensors."""
    beta1, beta2 = group["betas"]
    lr, eps, wd, gate_on = float(group["lr"]), group["eps"], group["weight_decay"], group["gate_on"]
    streaming = mode is not None and moments is None
    for p, st in zip(params, states):
        _init_state(p, st, streaming, gate_on)
    steps = [st["step"] for st in states]
    torch._foreach_add_(steps, 1)
    ts = [int(s.item()) for s in steps]
    grads = [p.grad for p in params]
    exp_avgs = [st["exp_avg"] for st in states]
    exp_avg_sqs = [st["exp_avg_sq"] for st in states]
    gates: list[Tensor] | None = None
    if mode is not None:
        gates = []
        for i, (p, st) in enumerate(zip(params, states)):
            gate, _, _ = _gate_for(p, st, group, mode, None if moments is None else moments[i],
                                   ts[i])
            gates.append(gate if gate is not None else torch.ones_like(p))
    torch._foreach_mul_(params, 1 - lr * wd)
    if gates is not None and gate_on == "grad":
        grads = torch._foreach_mul(grads, gates)
    if gates is not None and gate_on == "moments":
        torch._foreach_lerp_(exp_avgs, grads, torch._foreach_mul(gates, 1 - beta1))
        torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(grads, grads),
                             torch._foreach_mul(gates, 1 - beta2))
    else:
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    bc2_sqrt = [math.sqrt(1 - beta2 ** t) for t in ts]
    step_size = [-lr / (1 - beta1 ** t) for t in ts]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    num = exp_avgs if gates is None or gate_on == "grad" else torch._foreach_mul(exp_avgs, gates)
    torch._foreach_addcdiv_(params, num, denom, step_size)
    if gates is None:
        return None
    sums = torch._foreach_norm(gates, 1)
    return torch.stack(sums).sum(), sum(p.numel() for p in params)
