"""The ``compiled`` kernel of :class:`~tangentscope.optim.GatedAdamW`: the fused gated-AdamW step.

One pass over each parameter's state — the streaming noise EMA (or the exact noise variance
from a statistics source's sums), the gate (hard or soft), the decoupled weight decay, the Adam
moments and the update — for the ``update`` placement (and the gate off):

* CPU, float32/float64: a C++ extension (:mod:`._native`, built once per machine into a
  persistent cache), one call per param group and dtype. The reference chain of
  :mod:`.transforms` operation for operation (each rounded as torch's CPU kernel rounds it):
  moments, noise state and gate bit for bit; the denominator takes the correctly rounded
  hardware sqrt, as torch's own fused AdamW does, where torch's eager sqrt is MKL's vector
  function (one ulp off on ~20% of float32 inputs on AMD CPUs, and slower), so the weights
  agree with the eager reference — and with ``torch.optim.AdamW`` with the gate off — to
  ~1e-7 relative per step (``fused=False`` is bit for bit the eager reference);
* CUDA, float32: a Triton kernel (:mod:`._triton`), one launch per tensor (tested on an H200
  by ``tests/test_cuda.py``; per-tensor launches make it 6–10× torch's fused AdamW there);
* anything else (bfloat16/float16, non-contiguous tensors, the ``grad``/``moments``
  placements, an estimator asking for its terms, the extension unavailable): the eager kernels.

Shapes: every per-parameter list holds tensors shaped like the parameter (any shape,
contiguous); statistics ``S1``/``S2`` likewise; ``step`` is a 0-d float32 CPU tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _native
from ._common import init_streaming
from ._step import GroupStep, Telemetry

__all__ = ["MODES", "compiled_applies", "compiled_step", "fused_available"]

#: the gate's mode → the op's integer code (0 off, 1 hard, 2 soft)
MODES = {None: 0, "hard": 1, "soft": 2}
_DTYPES = (torch.float32, torch.float64)


def fused_available(device_type: str, build: bool) -> bool:
    """Whether the fused kernel can run on ``device_type`` now: on CPU the extension is loaded
    or built (``build``: compile it if missing; ``False``: only if already in the cache); on
    CUDA Triton imports."""
    if device_type == "cpu":
        if not build and not _native.is_built():
            return False
        return _native.load(build_if_missing=build) is not None
    if device_type == "cuda":
        from . import _triton  # lazy: imports triton

        return _triton.available()
    return False


def _layout_fits(k: GroupStep, device_type: str) -> bool:
    """The parameters' part of :func:`_tensors_fit` (cached per param list: it changes only
    when a group's parameters or their state tensors change)."""
    dtype = k.params[0].dtype
    if dtype not in (_DTYPES if device_type == "cpu" else (torch.float32,)):
        return False
    for p, st in zip(k.params, k.states):
        if p.device.type != device_type or p.dtype != dtype or not p.is_contiguous():
            return False
        if st:
            s = st.get("step")
            if not (isinstance(s, Tensor) and s.dtype == torch.float32 and not s.is_cuda
                    and st["exp_avg"].is_contiguous() and st["exp_avg_sq"].is_contiguous()):
                return False
    return True


def _tensors_fit(k: GroupStep, device_type: str) -> bool:
    """float32/float64 (CUDA: float32) contiguous tensors of one device type, gradients of the
    same dtype, CPU float32 step counters, statistics of the same dtype and device."""
    key = (device_type, *map(id, k.params), *(id(st.get("exp_avg")) for st in k.states))
    cache = k.scratch.setdefault("fused-layout", {})   # per param group (its key)
    fits = cache.get(key)
    if fits is None:
        if len(cache) > 64:
            cache.clear()
        fits = cache[key] = _layout_fits(k, device_type)
    if not fits:
        return False
    dtype = k.params[0].dtype
    for p in k.params:                                # new gradient tensors every step
        g = p.grad
        if g is None or g.dtype != dtype or not g.is_contiguous():
            return False
    if k.moments is not None:
        for p, m in zip(k.params, k.moments):
            if m is None or m.grad_sum.dtype != dtype or m.grad_sq_sum.dtype != dtype or \
                    m.grad_sum.device != p.device or m.grad_sq_sum.device != p.device:
                return False
    return True


def compiled_applies(k: GroupStep) -> bool:
    """``fused=True`` (build the extension if needed), or ``fused=None`` (the default) where it
    is already built; the ``update`` placement or the gate off; float32/float64 contiguous
    tensors on one CPU or CUDA device; no estimator terms."""
    fused = k.group["fused"]
    if fused is False or k.terms is not None or not k.params:
        return False
    if k.mode is not None and k.group["gate_on"] != "update":
        return False
    device_type = k.params[0].device.type
    return _tensors_fit(k, device_type) and fused_available(device_type, build=bool(fused))


def _hyper(group: dict[str, Any]) -> list[float]:
    """``[lr, β1, β2, ε, λ, β_s, τ, warm-up]``."""
    beta1, beta2 = group["betas"]
    nb = group["noise_beta"] if group["noise_beta"] is not None else beta2
    return [float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
            float(group["weight_decay"]), float(nb), float(group["threshold"]),
            float(group["gate_warmup"])]


def _init(p: Tensor, st: dict[str, Any], streaming: bool) -> None:
    if not st:
        st["step"] = torch.tensor(0.0, dtype=torch.float32)
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if streaming:
        init_streaming(p, st, own_mean=False)


def compiled_step(k: GroupStep) -> Telemetry:
    """The fused step of one param group (see the module docstring)."""
    params, states, mode = k.params, k.states, k.mode
    streaming = mode is not None and k.moments is None
    for p, st in zip(params, states):
        _init(p, st, streaming)
    if params[0].is_cuda:
        from . import _triton

        passed = _triton.step(params, states, k.group, mode, k.moments)
    else:
        passed = _cpu_step(params, states, k.group, mode, k.moments)
    if mode is None:
        return None
    return passed, sum(p.numel() for p in params)


def _cpu_step(params: list[Tensor], states: list[dict[str, Any]], group: dict[str, Any],
              mode: str | None, moments: list[Any] | None) -> Tensor:
    """One op call per statistics count (one for the streaming source and the gate off)."""
    op = _native.load(build_if_missing=False)
    assert op is not None                            # compiled_applies loaded it
    hyper = _hyper(group)
    code = MODES[mode]
    if mode is None or moments is None:
        source = 0 if mode is None else 1
        idx_by_count: dict[int, list[int]] = {0: list(range(len(params)))}
    else:
        source = 2
        idx_by_count = {}
        for i, m in enumerate(moments):
            idx_by_count.setdefault(int(m.count), []).append(i)
    total: Tensor | None = None
    for count, idx in idx_by_count.items():
        ps = params if len(idx) == len(params) else [params[i] for i in idx]
        sts = states if len(idx) == len(params) else [states[i] for i in idx]
        noise = [st["exp_avg_dev_sq"] for st in sts] if source == 1 else []
        n_noise = [st["noise_n"] for st in sts] if source == 1 else [0] * len(sts)
        sums = [moments[i].grad_sum for i in idx] if moments is not None and source == 2 else []
        sqs = [moments[i].grad_sq_sum for i in idx] if moments is not None and source == 2 else []
        passed, counts = op(list(ps), [p.grad for p in ps],
                            [st["exp_avg"] for st in sts], [st["exp_avg_sq"] for st in sts],
                            noise, [s.contiguous() for s in sums], [s.contiguous() for s in sqs],
                            [st["step"] for st in sts], n_noise, hyper, code, source, count)
        if source == 1:
            for st, c in zip(sts, counts.tolist()):
                st["noise_n"] = c
        total = passed if total is None else total + passed
    assert total is not None
    return total
