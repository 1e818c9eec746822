"""The fused gated-AdamW step on CUDA: one Triton kernel launch per tensor (float32).

Tested on an H200 (``tests/test_cuda.py``, skipped without a GPU): it mirrors the CPU
extension's arithmetic (``optim/csrc/gated_adamw.cpp``) with correctly rounded ``sqrt_rn`` and
``div_rn``, and agrees with the eager reference to rounding (1e-6 in float32), not bit for bit.
It runs only for float32 CUDA tensors when ``import triton`` works; float64/bfloat16 on
CUDA, or no Triton, take the eager kernels. Triton caches its compiled kernels on disk
(``~/.triton/cache``), so the compile (about a second per gate mode) is paid once per machine.

Shapes: ``params`` and every per-parameter list hold contiguous tensors shaped like the
parameter; coefficients are Python floats per tensor.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .transforms import deviation_inflation

try:                                                 # optional: only where CUDA is
    import triton
    import triton.language as tl
except ImportError:                                  # pragma: no cover - no triton here
    triton = None
    tl = None

__all__ = ["available", "step"]

BLOCK = 1024


def available() -> bool:
    """Triton imports and CUDA is available."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:                               # pragma: no cover - needs a GPU
    @triton.jit
    def _kernel(p_ptr, g_ptr, m_ptr, v_ptr, s_ptr, s1_ptr, s2_ptr, out_ptr, n, decay, w1,
                beta2, omb2, bc2s, eps, neg_step, neg_scale, nb, dev_w, gv, cnt, cm1, tau0,
                MODE: tl.constexpr, SRC: tl.constexpr, OPEN: tl.constexpr,
                UPD: tl.constexpr, BLOCK_SIZE: tl.constexpr):
        offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        gate = tl.full([BLOCK_SIZE], 1.0, tl.float32)
        if SRC == 1:
            s = tl.load(s_ptr + offs, mask=mask, other=0.0)
            if UPD:
                d = tl.fma(m, neg_scale, g)
                s = tl.fma(dev_w * d, d, s * nb)
                tl.store(s_ptr + offs, s, mask=mask)
            sig = g
            nu = s
        else:
            sig = tl.load(s1_ptr + offs, mask=mask, other=0.0)
            q = tl.load(s2_ptr + offs, mask=mask, other=0.0)
            nu = tl.maximum(tl.div_rn(cnt * q - sig * sig, cm1), 0.0)
        if MODE == 1 and not OPEN:
            z = tl.fma(gv * sig, sig, nu)
            gate = tl.where(tau0 > 0, tl.where(sig != 0.0, 1.0, 0.0), tl.where(z < 0.0, 1.0, 0.0))
        if MODE == 2 and not OPEN:
            r = tl.div_rn(nu, sig * sig) * gv + 1.0
            r = tl.where(r != r, 0.0, tl.maximum(r, 0.0))
            gate = tl.where(r == float("inf"), 3.4028234663852886e38, r)
        m = m + w1 * (g - m)
        v = tl.fma(omb2 * g, g, v * beta2)
        den = tl.div_rn(tl.sqrt_rn(v), bc2s) + eps
        p = p * decay + tl.div_rn(neg_step * (m * gate), den)
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if MODE != 0:
            tl.atomic_add(out_ptr, tl.sum(tl.where(mask, gate, 0.0), axis=0))


def step(params: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any],
         mode: str | None, moments: list[Any] | None) -> Tensor:  # pragma: no cover - GPU
    """One fused step of a group of float32 CUDA tensors; returns the gate sum (0-d float64)."""
    beta1, beta2 = group["betas"]
    lr, eps, wd, tau = float(group["lr"]), group["eps"], group["weight_decay"], group["threshold"]
    nb = group["noise_beta"] if group["noise_beta"] is not None else beta2
    steps = [st["step"] for st in states]
    torch._foreach_add_(steps, 1)
    ts = [int(t) for t in torch.stack(steps).tolist()]
    out = torch.zeros(1, dtype=torch.float32, device=params[0].device)
    code = {None: 0, "hard": 1, "soft": 2}[mode]
    src = 0 if mode is None else (1 if moments is None else 2)
    for i, (p, st) in enumerate(zip(params, states)):
        t = ts[i]
        neg_scale = dev_w = 0.0
        te, upd, opened = tau, False, mode is None or t <= group["gate_warmup"]
        if src == 1:
            if t >= 2:
                upd = True
                neg_scale = -(1 / (1 - beta1 ** (t - 1)))
                dev_w = (1 - nb) / deviation_inflation(beta1, t - 1)
                st["noise_n"] += 1
            if st["noise_n"] < 1:
                opened = True
            else:
                te = tau * (1 / (1 - nb ** st["noise_n"]))
        gv = -te if mode == "soft" else (0.0 if te == 0 else -1.0 / te)
        s = st["exp_avg_dev_sq"] if src == 1 else p
        s1 = moments[i].grad_sum.contiguous() if src == 2 and moments is not None else p
        s2 = moments[i].grad_sq_sum.contiguous() if src == 2 and moments is not None else p
        cnt = float(moments[i].count) if src == 2 and moments is not None else 2.0
        n = p.numel()
        _kernel[(triton.cdiv(n, BLOCK),)](
            p, p.grad, st["exp_avg"], st["exp_avg_sq"], s, s1, s2, out, n, 1 - lr * wd,
            1 - beta1, beta2, 1 - beta2, math.sqrt(1 - beta2 ** t), eps,
            -(lr / (1 - beta1 ** t)), neg_scale, nb, dev_w, gv, cnt, cnt - 1,
            1.0 if te == 0 else 0.0, MODE=code, SRC=max(src, 1), OPEN=opened, UPD=upd,
            BLOCK_SIZE=BLOCK)
    return out.double()[0]
