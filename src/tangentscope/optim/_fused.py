"""``GatedAdamW(fused=True)``: the ``update``-placement step as one compiled elementwise kernel.

Eager PyTorch runs every elementwise op as its own pass over memory; the gate adds about six
passes to AdamW's eight, so an eager gated step costs about twice ``torch.optim.AdamW`` (see
``benchmarks/optim.py``). ``torch.compile`` fuses the whole step — noise EMA, gate, moments,
decoupled decay, parameter update and the telemetry count — into one loop per tensor. The
kernel is compiled once per process and param-group layout (dynamic shapes; one call per group,
its loop unrolled into one graph; scalars passed as tensors so that the step count never
triggers a recompile); the first step pays the compile time (20–90 s on a loaded 2-core CPU)
and needs a C++ compiler (GPU: Triton). If compilation fails, the same kernel runs eagerly
(with a ``RuntimeWarning``).

Same math as :func:`~tangentscope.optim.adamw._single_tensor_step` for ``gate_on='update'``
(checked by a slow test); rounding differs at the float epsilon level.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from ._common import init_streaming
from .stats import GradMoments
from .transforms import deviation_inflation

_COMPILED: dict[str, Any] = {}


def _adam_tail(p: Tensor, g: Tensor, m: Tensor, v: Tensor, gate: Tensor, sc: Tensor) -> Tensor:
    """Moments, decoupled decay and the gated update; ``sc`` = [decay, 1−β1, β2, 1−β2, β_s,
    dev weight, mean scale, c, opened, lr/bc1, √bc2, ε]."""
    decay, om_b1, b2, om_b2, _, _, _, _, _, step_size, bc2s, eps = sc.unbind()
    m.copy_(m + om_b1 * (g - m))
    v.copy_(v * b2 + om_b2 * g * g)
    p.copy_(p * decay - step_size * gate * m / (v.sqrt() / bc2s + eps))
    return gate.sum()


def _gate(sig: Tensor, s: Tensor, sc: Tensor, soft: bool, dtype: torch.dtype) -> Tensor:
    """Passes where ``c·sig² > s`` (soft: ``max(0, 1 − s/(c·sig²))``); all open if ``opened``."""
    c, opened = sc[7], sc[8]
    g2c = c * sig * sig
    if soft:
        gate = torch.where(g2c > 0, (1 - s / g2c).clamp(min=0), torch.zeros_like(g2c))
    else:
        gate = (g2c > s).to(dtype)
    return torch.where(opened > 0, torch.ones_like(gate), gate)


def _kernel_off(p: Tensor, g: Tensor, m: Tensor, v: Tensor, sc: Tensor) -> Tensor:
    return _adam_tail(p, g, m, v, torch.ones_like(g), sc)


def _kernel_streaming(p: Tensor, g: Tensor, m: Tensor, v: Tensor, s: Tensor, sc: Tensor,
                      soft: bool) -> Tensor:
    """``s`` is the streaming noise state, updated from ``g − m̂_{t−1}`` before the moments."""
    nb, dev_w, mean_scale = sc[4], sc[5], sc[6]
    d = g - m * mean_scale
    s.copy_(s * nb + dev_w * d * d)
    return _adam_tail(p, g, m, v, _gate(g, s, sc, soft, p.dtype), sc)


def _kernel_exact(p: Tensor, g: Tensor, m: Tensor, v: Tensor, nu: Tensor, sig: Tensor,
                  sc: Tensor, soft: bool) -> Tensor:
    """``nu`` = ``ν̂`` and ``sig`` = ``S1`` from an exact statistics source."""
    return _adam_tail(p, g, m, v, _gate(sig, nu, sc, soft, p.dtype), sc)


def _group_off(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor],
               scs: list[Tensor]) -> Tensor:
    return torch.stack([_kernel_off(*a) for a in zip(ps, gs, ms, vs, scs)]).sum()


def _group_streaming(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor],
                     ss: list[Tensor], scs: list[Tensor], soft: bool) -> Tensor:
    return torch.stack([_kernel_streaming(*a, soft) for a in zip(ps, gs, ms, vs, ss, scs)]).sum()


def _group_exact(ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor],
                 nus: list[Tensor], sigs: list[Tensor], scs: list[Tensor], soft: bool) -> Tensor:
    return torch.stack([_kernel_exact(*a, soft)
                        for a in zip(ps, gs, ms, vs, nus, sigs, scs)]).sum()


# one compiled call per param group (the loop is unrolled into one graph): per-call overhead
# would otherwise dominate for models with many small tensors
_KERNELS = {"off": _group_off, "streaming": _group_streaming, "exact": _group_exact}


def _compiled(kind: str) -> Any:
    # every input is a distinct tensor: compiled graphs specialize on aliasing. The
    # persistent FX-graph cache is off: it once served a wrongly specialized graph (torch 2.13).
    if kind not in _COMPILED:
        _COMPILED[kind] = torch.compile(_KERNELS[kind], dynamic=True, fullgraph=True,
                                        options={"fx_graph_cache": False})
    return _COMPILED[kind]


def fused_update_step(params: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any],
                      mode: str | None, moments: list[GradMoments] | None
                      ) -> tuple[Tensor, int] | None:
    """The ``update``-placement step of a param group through the compiled kernel."""
    beta1, beta2 = group["betas"]
    lr, eps, wd, tau = float(group["lr"]), group["eps"], group["weight_decay"], group["threshold"]
    nb = group["noise_beta"] if group["noise_beta"] is not None else beta2
    cols: dict[str, list[Tensor]] = {k: [] for k in ("p", "g", "m", "v", "s", "sig")}
    if not params:
        return None if mode is None else (torch.tensor(0.0), 0)
    for p, st in zip(params, states):
        if not st:
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    steps = [st["step"] for st in states]
    torch._foreach_add_(steps, 1)                     # one call, one sync for the group
    ts = [int(t) for t in torch.stack(steps).tolist()]
    kind = "off" if mode is None else ("streaming" if moments is None else "exact")
    rows = []
    for i, p in enumerate(params):
        st, t = states[i], ts[i]
        mean_scale = dev_w = c = 0.0
        opened = True
        if kind == "streaming":
            init_streaming(p, st, own_mean=False)
            cols["s"].append(st["exp_avg_dev_sq"])
            if t >= 2:
                mean_scale = 1 / (1 - beta1 ** (t - 1))
                dev_w = (1 - nb) / deviation_inflation(beta1, t - 1)
                st["noise_n"] += 1
            opened = st["noise_n"] < 1 or t <= group["gate_warmup"]
            c = math.inf if tau == 0 else (1 - nb ** max(st["noise_n"], 1)) / tau
        elif kind == "exact":
            mom = moments[i]
            cols["s"].append(mom.noise_variance())
            cols["sig"].append(mom.grad_sum.clone())
            opened = t <= group["gate_warmup"]
            c = math.inf if tau == 0 else 1 / tau
        rows.append([1 - lr * wd, 1 - beta1, beta2, 1 - beta2, nb, dev_w, mean_scale, c,
                     float(opened), lr / (1 - beta1 ** t), math.sqrt(1 - beta2 ** t), eps])
        for k, x in (("p", p), ("g", p.grad), ("m", st["exp_avg"]), ("v", st["exp_avg_sq"])):
            cols[k].append(x)                         # elementwise: any shape, no views
    cols["sc"] = list(torch.tensor(rows, dtype=torch.float64, device=params[0].device).unbind())
    args: tuple[Any, ...] = (cols["p"], cols["g"], cols["m"], cols["v"])
    if kind == "off":
        args += (cols["sc"],)
    elif kind == "streaming":
        args += (cols["s"], cols["sc"], mode == "soft")
    else:
        args += (cols["s"], cols["sig"], cols["sc"], mode == "soft")
    try:
        passed = _compiled(kind)(*args)
    except torch._dynamo.exc.TorchDynamoException as e:   # compiled before any write
        warnings.warn(f"GatedAdamW(fused=True): compilation failed ({type(e).__name__}); "
                      "running the same kernel eagerly", RuntimeWarning, stacklevel=3)
        _COMPILED[kind] = _KERNELS[kind]
        passed = _KERNELS[kind](*args)
    numel = sum(p.numel() for p in params)
    if mode is None:
        return None
    return passed, numel
