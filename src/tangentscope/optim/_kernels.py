"""The step kernels of :class:`~tangentscope.optim.GatedAdamW`, chosen from a table.

Each kernel steps one param group (functional over lists of tensors; state dicts updated in
place) and returns the group's telemetry ``(coordinates updated: 0-d tensor, numel)`` or
``None`` without gate. :data:`KERNELS` lists them in order of preference; the first whose
predicate accepts the group runs:

* ``compiled`` — the fused step (:mod:`._fused`): one pass over each parameter's state, a C++
  extension on CPU (:mod:`._native`), Triton on CUDA; ``fused=True``, and by default
  (``fused=None``) where the extension is already built; the ``update`` placement and the gate
  off, float32/float64;
* ``foreach`` — ``torch._foreach_*`` list ops over the group (``foreach=True``; default on
  CUDA, as ``torch.optim``, and with the gate off);
* ``streaming-hard`` — the default configuration (streaming noise, hard gate on the update)
  with list ops and torch's fused AdamW kernel for the moments and the move, the gated
  coordinates put back to their decayed value afterwards (eager: no compilation);
* ``reference`` — the chain of :mod:`.transforms` one tensor at a time
  (:func:`~tangentscope.optim.transforms.gated_adamw_step_`); always applicable, and the only
  one that computes the population-risk estimator's terms.

The fast kernels are tested against ``reference`` (tests/test_optim_adamw.py): bit for bit
where the arithmetic order is the same (the gate off, the noise state), else to rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._common import gate_values, init_streaming, streaming_noise
from ._fused import compiled_applies, compiled_step
from ._step import GroupStep, Telemetry
from .stats import GradMoments
from .transforms import adam_self_influence, deviation_inflation, gated_adamw_step_


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A table row: ``name``, the predicate ``applies(step)`` and ``run(step) → telemetry``."""

    name: str
    applies: Callable[[GroupStep], bool]
    run: Callable[[GroupStep], Telemetry]


# =================================================================================================
# shared pieces
# =================================================================================================
def init_state(p: Tensor, st: dict[str, Any], streaming: bool, gate_on: str) -> None:
    """AdamW's state (``step``, ``exp_avg``, ``exp_avg_sq``) and, for the streaming source, the
    noise state, if missing."""
    if not st:
        st["step"] = torch.tensor(0.0, dtype=torch.float32)
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if streaming:
        init_streaming(p, st, own_mean=gate_on != "update")


def _grad(p: Tensor) -> Tensor:
    g = p.grad
    assert g is not None
    return g


def _noise_beta(group: dict[str, Any]) -> float:
    return group["noise_beta"] if group["noise_beta"] is not None else group["betas"][1]


def gate_for(p: Tensor, st: dict[str, Any], group: dict[str, Any], mode: str | None,
             mom: GradMoments | None, t: int, need_noise: bool = False
             ) -> tuple[Tensor | None, tuple[Tensor, float] | None, Tensor]:
    """``(gate or None, noise or None, signal)`` for one tensor, ``noise = (tensor, scale)``
    with ``ν̂ = scale·tensor``; updates the streaming state.

    With the gate off, ``ν̂`` is still computed (exact, or streaming) when ``need_noise``
    (an estimator is attached). The streaming reference mean is ``exp_avg`` (``t − 1`` raw
    gradients) for the ``update`` placement, else the state's own ``grad_avg``.
    """
    g = _grad(p)
    nu: tuple[Tensor, float] | None
    if mode is None and not need_noise:
        return None, None, g
    if mom is not None:
        nu, signal = (mom.noise_variance(), 1.0), mom.grad_sum
    else:
        own = group["gate_on"] != "update"
        nu = streaming_noise(g, st, group["betas"][0], _noise_beta(group),
                             "grad_avg" if own else "exp_avg", None if own else t - 1)
        signal = g
    if mode is None or t <= group["gate_warmup"]:
        return None, nu, signal
    return gate_values(signal, nu, group["threshold"], mode, p.dtype), nu, signal


def work_buffer(scratch: dict[Any, Any], p: Tensor, dtype: torch.dtype, slot: int = 0
                ) -> Tensor:
    """A ``p``-shaped view of a reusable buffer (avoids a fresh allocation, hence page faults,
    for every tensor of every step)."""
    key = (dtype, p.device, slot)
    buf = scratch.get(key)
    if buf is None or buf.numel() < p.numel():
        buf = scratch[key] = torch.empty(p.numel(), dtype=dtype, device=p.device)
    return buf[:p.numel()].view_as(p)


def gate_total(gates: list[Tensor]) -> Tensor:
    """``Σ`` of every tensor's values, float64 (per-tensor sums in float32: exact counts up to
    2²⁴ per tensor); the same order in every kernel, so their telemetry agrees bit for bit."""
    return torch.stack([g.sum(dtype=torch.float32) for g in gates]).double().sum()


def _steps(states: list[dict[str, Any]]) -> list[int]:
    """Increment every ``step`` (one list op) and read them back (one sync)."""
    steps = [st["step"] for st in states]
    if not steps:
        return []
    torch._foreach_add_(steps, 1)
    return [int(t) for t in torch.stack(steps).tolist()]


# =================================================================================================
# reference: the transforms, one tensor at a time
# =================================================================================================
def reference_step(k: GroupStep) -> Telemetry:
    """:func:`~tangentscope.optim.transforms.gated_adamw_step_` per tensor, the gate from
    :func:`gate_for`; the estimator's terms when ``k.terms`` is a list."""
    group, mode, terms = k.group, k.mode, k.terms
    beta1, beta2 = group["betas"]
    lr, eps, wd, gate_on = float(group["lr"]), group["eps"], group["weight_decay"], group["gate_on"]
    sums: list[Tensor] = []
    numel = 0
    for i, p in enumerate(k.params):
        st = k.states[i]
        mom = None if k.moments is None else k.moments[i]
        init_state(p, st, mom is None and (mode is not None or terms is not None), gate_on)
        st["step"] += 1
        t = int(st["step"].item())
        gate, nu, signal = gate_for(p, st, group, mode, mom, t, need_noise=terms is not None)
        p_old = p.detach().clone() if terms is not None else None
        work = (work_buffer(k.scratch, p, p.dtype), work_buffer(k.scratch, p, p.dtype, slot=1))
        gated_adamw_step_(p, _grad(p), st, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                          weight_decay=wd, gate=gate, gate_on=gate_on, work=work)
        if mode is not None:
            numel += p.numel()
            sums.append(gate if gate is not None else torch.ones((), dtype=torch.float32)
                        .expand(p.shape))
        if terms is not None:
            assert p_old is not None
            taken = _grad(p) * gate if gate is not None and gate_on == "grad" else _grad(p)
            terms.append(_estimate_terms(p, p_old, taken, signal, nu, st, group, gate, t))
    if mode is None:
        return None
    return (gate_total(sums) if sums else torch.zeros((), dtype=torch.float64)), numel


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


# =================================================================================================
# foreach: the same step with list ops over the group
# =================================================================================================
def foreach_step(k: GroupStep) -> Telemetry:
    """The reference step with ``torch._foreach_*`` ops (gate off: ``torch.optim.AdamW``'s
    foreach step op for op)."""
    params, states, group, mode, moments = k.params, k.states, k.group, k.mode, k.moments
    beta1, beta2 = group["betas"]
    lr, eps, wd, gate_on = float(group["lr"]), group["eps"], group["weight_decay"], group["gate_on"]
    for p, st in zip(params, states):
        init_state(p, st, mode is not None and moments is None, gate_on)
    ts = _steps(states)
    grads = [_grad(p) for p in params]
    exp_avgs = [st["exp_avg"] for st in states]
    exp_avg_sqs = [st["exp_avg_sq"] for st in states]
    gates: list[Tensor] | None = None
    if mode is not None:
        gates = []
        for i, (p, st) in enumerate(zip(params, states)):
            gate, _, _ = gate_for(p, st, group, mode, None if moments is None else moments[i],
                                  ts[i])
            gates.append(gate if gate is not None else torch.ones_like(p))
    if wd != 0:
        torch._foreach_mul_(params, 1 - lr * wd)
    if gates is not None and gate_on == "grad":
        grads = list(torch._foreach_mul(grads, gates))
    if gates is not None and gate_on == "moments":
        torch._foreach_lerp_(exp_avgs, grads,
                             torch._foreach_mul(gates, 1 - beta1))
        torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(grads, grads),
                             torch._foreach_mul(gates, 1 - beta2))
    else:
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    bc2_sqrt = [(1 - beta2 ** t) ** 0.5 for t in ts]
    step_size = [-(lr / (1 - beta1 ** t)) for t in ts]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    num = exp_avgs if gates is None or gate_on == "grad" else torch._foreach_mul(exp_avgs, gates)
    torch._foreach_addcdiv_(params, num, denom, step_size)
    if gates is None:
        return None
    return gate_total(gates), sum(p.numel() for p in params)


# =================================================================================================
# streaming-hard: the default configuration, list ops + torch's fused AdamW
# =================================================================================================
_FUSED_DTYPES = (torch.float32, torch.float64)
_FUSED_DEVICES = ("cpu", "cuda")


def _streaming_hard_applies(k: GroupStep) -> bool:
    g = k.group
    return (k.mode == "hard" and k.moments is None and k.terms is None and k.foreach is not True
            and g["gate_on"] == "update" and g["threshold"] > 0 and bool(k.params)
            and hasattr(torch, "_fused_adamw_")
            and all(p.device.type in _FUSED_DEVICES and p.dtype in _FUSED_DTYPES and
                    p.grad is not None and p.grad.dtype == p.dtype and not p.grad.is_sparse
                    for p in k.params))


#: tensors with fewer elements take list ops, one call per chunk of them (and flat work buffers:
#: one op for an elementwise step on all of them); larger ones are stepped one by one in two
#: reused work buffers (a fresh parameter-sized temporary costs page faults on every step)
FOREACH_MAX_NUMEL = 2 ** 17
#: elements per chunk of small tensors (bounds the list ops' temporaries)
CHUNK_NUMEL = 2 ** 20


def streaming_hard_step(k: GroupStep) -> Telemetry:
    """Streaming noise, hard gate on the update, in a few passes more than AdamW.

    Per chunk of small tensors sharing device, dtype, step ``t`` and noise count ``n`` (list
    ops), or per large tensor:

    1. the noise state takes ``d = ĝ − m̂_{t−1}`` (:func:`~.transforms.streaming_noise_`);
    2. the shut weights ``1[ŝ − c ĝ² ≥ 0]`` as floats (``c = (1 − β_sⁿ)/τ``: the gate is
       ``1[ĝ² > τ ŝ/(1 − β_sⁿ)]``);
    3. the decayed weights ``w (1 − lr·λ)``, then torch's fused AdamW step (moments take the raw
       gradient, as in the ``update`` placement);
    4. shut coordinates back to the decayed weights: ``lerp(w_new, w_decayed, shut)`` (exact for
       weights 0 and 1).

    Same gate decisions and noise state as the reference; the moves differ by rounding (torch's
    fused kernel orders the Adam arithmetic its own way).
    """
    group = k.group
    for p, st in zip(k.params, k.states):
        init_state(p, st, True, "update")
    ts = _steps(k.states)
    buckets: dict[tuple[Any, ...], list[list[int]]] = {}
    fill: dict[tuple[Any, ...], int] = {}
    for i, (p, st) in enumerate(zip(k.params, k.states)):
        n = p.numel()
        key = (p.device, p.dtype, ts[i], st["noise_n"]) if n < FOREACH_MAX_NUMEL else (i,)
        chunks = buckets.setdefault(key, [[]])
        if chunks[-1] and fill[key] + n > CHUNK_NUMEL:
            chunks.append([])
            fill[key] = 0
        chunks[-1].append(i)
        fill[key] = fill.get(key, 0) + n
    shut_total: Tensor | None = None
    for chunks in buckets.values():
        for idx in chunks:
            ps = [k.params[i] for i in idx]
            sts = [k.states[i] for i in idx]
            t, n = ts[idx[0]], sts[0]["noise_n"]
            s = (_streaming_hard_one(ps[0], sts[0], group, t, n, k.scratch)
                 if ps[0].numel() >= FOREACH_MAX_NUMEL else
                 _streaming_hard_list(ps, sts, group, t, n, k.scratch))
            if s is not None:
                s = s.to(k.params[0].device)
                shut_total = s if shut_total is None else shut_total + s
    numel = sum(p.numel() for p in k.params)
    passed = torch.tensor(float(numel), dtype=torch.float64, device=k.params[0].device)
    return (passed if shut_total is None else passed - shut_total), numel


def _hard_coefficients(group: dict[str, Any], t: int, n: int
                       ) -> tuple[float, float, float, bool]:
    """``(mean scale, deviation weight, gate coefficient, gated)`` for step ``t`` with ``n``
    noise updates so far (before this step's)."""
    beta1, nb, tau = group["betas"][0], _noise_beta(group), group["threshold"]
    scale = 1 / (1 - beta1 ** (t - 1)) if t >= 2 else 0.0
    weight = (1 - nb) / deviation_inflation(beta1, t - 1) if t >= 2 else 0.0
    n += t >= 2
    coef = 1.0 / (tau * (1 / (1 - nb ** n))) if n >= 1 else 0.0   # exactly as snr_gate's
    return scale, weight, coef, n >= 1 and t > group["gate_warmup"]


def _fused_adamw(ps: list[Tensor], sts: list[dict[str, Any]], group: dict[str, Any], t: int
                 ) -> None:
    beta1, beta2 = group["betas"]
    device = ps[0].device
    steps = ([st["step"] for st in sts] if device.type == "cpu" else
             list(torch.full((len(ps),), float(t), device=device).unbind(0)))
    torch._fused_adamw_(ps, [_grad(p) for p in ps], [st["exp_avg"] for st in sts],
                        [st["exp_avg_sq"] for st in sts], [], steps, amsgrad=False,
                        lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                        weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def _flat_views(scratch: dict[Any, Any], ps: list[Tensor], slot: int
                ) -> tuple[Tensor, list[Tensor]]:
    """A reused flat buffer (``slot``) and views of it shaped like ``ps`` (same dtype/device);
    the views are cached for the chunk."""
    key = ("flat", slot, ps[0].dtype, ps[0].device, tuple(id(p) for p in ps))
    hit = scratch.get(key)
    if hit is not None:
        return hit
    total = sum(p.numel() for p in ps)
    flat = torch.empty(total, dtype=ps[0].dtype, device=ps[0].device)
    views, off = [], 0
    for p in ps:
        views.append(flat[off:off + p.numel()].view(p.shape))
        off += p.numel()
    stale = [k for k in scratch if isinstance(k, tuple) and k[:2] == ("flat", slot)]
    for k in stale[:-1]:                             # keep the last chunk layouts
        del scratch[k]
    scratch[key] = (flat, views)
    return flat, views


def _flat_noise_state(scratch: dict[Any, Any], ps: list[Tensor], sts: list[dict[str, Any]]
                      ) -> Tensor:
    """The chunk's noise states ``exp_avg_dev_sq`` as views of one flat tensor (so that their
    updates are one op each); re-laid out, values kept, when they are not (first step, a loaded
    state dict, another chunk)."""
    key = ("flat-noise", tuple(id(p) for p in ps))
    entry: Any = scratch.get(key)
    if entry is not None and all(st["exp_avg_dev_sq"] is v for st, v in zip(sts, entry[1])):
        return entry[0]
    flat, views = _flat_views({}, ps, 0)             # a new tensor: it becomes state
    torch._foreach_copy_(views, [st["exp_avg_dev_sq"] for st in sts])
    for st, v in zip(sts, views):
        st["exp_avg_dev_sq"] = v
    for old in [k for k in scratch if isinstance(k, tuple) and k[:1] == ("flat-noise",)][:-1]:
        del scratch[old]                           # keep the last layouts
    scratch[key] = (flat, views)
    return flat


def _streaming_hard_list(ps: list[Tensor], sts: list[dict[str, Any]], group: dict[str, Any],
                         t: int, n: int, scratch: dict[Any, Any]) -> Tensor | None:
    """:func:`streaming_hard_step` for small tensors sharing ``t`` and ``n``: the gradients
    copied into a flat buffer, the noise state laid out flat, so the gate's elementwise steps
    are one op each; returns the number of shut coordinates (None: the gate is still open)."""
    scale, weight, coef, gated = _hard_coefficients(group, t, n)
    grads = [_grad(p) for p in ps]
    noise = _flat_noise_state(scratch, ps, sts)
    g_flat, g_views = _flat_views(scratch, ps, 2)
    torch._foreach_copy_(g_views, grads)
    if t >= 2:                                       # exp_avg holds t − 1 gradients
        dev_flat, dev = _flat_views(scratch, ps, 1)  # g + (−c)·m: the arithmetic of sub
        dev_flat.copy_(g_flat)
        torch._foreach_add_(dev, [st["exp_avg"] for st in sts], alpha=-scale)
        noise.mul_(_noise_beta(group)).addcmul_(dev_flat, dev_flat, value=weight)
        for st in sts:
            st["noise_n"] += 1
    if not gated:
        _fused_adamw(ps, sts, group, t)
        return None
    shut_flat, shut = _flat_views(scratch, ps, 0)
    torch.addcmul(noise, g_flat, g_flat, value=-coef, out=shut_flat)
    torch.ge(shut_flat, 0.0, out=shut_flat)          # 1.0 / 0.0 (NaN: 0, as the reference)
    dec_flat, decayed = _flat_views(scratch, ps, 1)
    torch._foreach_copy_(decayed, ps)
    dec_flat.mul_(1 - float(group["lr"]) * group["weight_decay"])
    _fused_adamw(ps, sts, group, t)
    torch._foreach_lerp_(ps, decayed, shut)
    return gate_total([shut_flat])


def _streaming_hard_one(p: Tensor, st: dict[str, Any], group: dict[str, Any], t: int, n: int,
                        scratch: dict[Any, Tensor]) -> Tensor | None:
    """:func:`streaming_hard_step` for one large tensor, in two reused work buffers."""
    scale, weight, coef, gated = _hard_coefficients(group, t, n)
    g, s = _grad(p), st["exp_avg_dev_sq"]
    a = work_buffer(scratch, p, p.dtype)
    if t >= 2:
        torch.sub(g, st["exp_avg"], alpha=scale, out=a)
        s.mul_(_noise_beta(group)).addcmul_(a, a, value=weight)
        st["noise_n"] += 1
    if not gated:
        _fused_adamw([p], [st], group, t)
        return None
    shut = torch.addcmul(s, g, g, value=-coef, out=work_buffer(scratch, p, p.dtype, slot=1))
    torch.ge(shut, 0.0, out=shut)                  # 1.0 / 0.0 (NaN: 0, as the reference)
    torch.mul(p, 1 - float(group["lr"]) * group["weight_decay"], out=a)
    _fused_adamw([p], [st], group, t)
    p.lerp_(a, shut)
    return gate_total([shut])


# =================================================================================================
# the table
# =================================================================================================
def _foreach_applies(k: GroupStep) -> bool:
    """``foreach=True``; by default (``None``) on CUDA, and with the gate off in float32/64
    (there torch's foreach and single-tensor AdamW agree bit for bit on CPU, and list ops are
    faster on many small tensors; in bfloat16/float16 they do not)."""
    fe = k.foreach
    if fe is None:
        fe = bool(k.params) and (all(p.is_cuda for p in k.params) or (
            k.mode is None and all(p.dtype in _FUSED_DTYPES for p in k.params)))
    return bool(fe) and k.terms is None and bool(k.params)


KERNELS: tuple[Kernel, ...] = (
    Kernel("compiled", compiled_applies, compiled_step),
    Kernel("foreach", _foreach_applies, foreach_step),
    Kernel("streaming-hard", _streaming_hard_applies, streaming_hard_step),
    Kernel("reference", lambda k: True, reference_step),
)


def select_kernel(k: GroupStep, table: tuple[Kernel, ...] | None = None) -> Kernel:
    """The first kernel of ``table`` (default :data:`KERNELS`) that applies to ``k``."""
    for kern in KERNELS if table is None else table:
        if kern.applies(k):
            return kern
    return KERNELS[-1]
