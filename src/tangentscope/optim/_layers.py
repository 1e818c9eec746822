"""The layer hooks behind :class:`~tangentscope.optim.stats.PerExampleStats`: one module's call
turned into per-example statistics through its derivative rule
(:mod:`tangentscope.derivatives`), the per-parameter bookkeeping across backward passes, and
the first-step check that the hooked contributions add up to ``p.grad``.

The per-layer math is not here: a hooked call's saved input and output gradient ``δ`` go to
``rule.grad_sq_sum`` / ``rule.grad_sum`` (closed forms) or, for a parameter used several times
in one forward, ``rule.per_example`` (summed over the uses before squaring).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..derivatives import LayerRule
from ..errors import ShapeError, UnsupportedModelError

__all__ = ["acc_dtype", "ParamState", "graph_task", "contributions", "noise_floor",
           "tolerance", "check_total"]


def acc_dtype(p: Tensor) -> torch.dtype:
    """Accumulation dtype: float32 for half-precision parameters."""
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def graph_task() -> int:
    """Id of the running backward pass (``torch.autograd.grad`` calls get their own)."""
    return torch._C._current_graph_task_id()


@dataclasses.dataclass
class ParamState:
    """One parameter's sums since the last reset and this backward's pending values."""

    name: str
    sq: Tensor | None = None          # Σ_i c_i² since reset
    grad: Tensor | None = None        # p.grad snapshot after the last backward (S1)
    count: int = 0                    # examples since reset
    uses: int = 0                     # forward uses awaiting backward
    pending_sq: Tensor | None = None  # this backward, single use: closed form
    pending_sum: Tensor | None = None  # this backward, for validation
    pending_floor: float = 0.0        # this backward, rounding floor of the validation
    buf: Tensor | None = None         # this backward, several uses: per-example sum
    pending_b: int = 0
    task: int = -1                    # autograd graph task the pending values belong to
    compute: torch.dtype | None = None  # lowest precision seen in this backward's calls
    grad_ref: Any = None              # weakref to p.grad as snapshot, and its version
    grad_version: int = -1

    def drop_pending(self) -> None:
        self.pending_sq = self.pending_sum = self.buf = None
        self.pending_floor, self.pending_b, self.task, self.compute = 0.0, 0, -1, None

    def reset(self) -> None:
        self.sq, self.grad, self.count = None, None, 0

    def snapshot(self, g: Tensor, dtype: torch.dtype) -> None:
        """Keep ``S1 = p.grad`` (a copy) and remember which tensor/version it was."""
        self.grad = g.detach().to(dtype, copy=True)
        self.grad_ref, self.grad_version = weakref.ref(g), g._version

    def cleared(self, g: Tensor | None) -> bool:
        """Whether ``p.grad`` was cleared since the last snapshot (``zero_grad``): then sums
        left from backward passes no optimizer step consumed (a ``GradScaler`` skip) are
        stale."""
        if self.count == 0:
            return False
        if g is None:
            return True
        if self.grad_ref is not None and self.grad_ref() is g and g._version == self.grad_version:
            return False
        return not bool(g.any())


def _precision(*dtypes: torch.dtype | None) -> torch.dtype:
    """The least precise floating dtype among ``dtypes``."""
    fl = [d for d in dtypes if d is not None and d.is_floating_point]
    return max(fl, key=lambda d: torch.finfo(d).eps) if fl else torch.float32


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the validation for contributions computed in ``dtype``."""
    if dtype in (torch.float16, torch.bfloat16):
        return 3e-2
    return 1e-3 if dtype == torch.float32 else 1e-8


def noise_floor(data: Mapping[str, Any], d: Tensor, role: str, dtype: torch.dtype) -> float:
    """Absolute rounding floor of a gradient summed from ``N`` terms of size at most ``M``:
    ``8 √N ε M`` (``ε`` of ``dtype``; ``M = max|δ| · max|input|`` for a weight, ``max|δ|`` for
    a bias). Gradients that vanish analytically (an attention key bias) are pure rounding."""
    m = float(d.abs().max()) if d.numel() else 0.0
    if role != "bias":
        ins = [float(v.abs().max()) for v in data.values()
               if isinstance(v, Tensor) and v.is_floating_point() and v.numel()]
        m *= max(ins, default=1.0)
    return 8 * math.sqrt(max(d.numel(), 1)) * torch.finfo(dtype).eps * m


def contributions(rule: LayerRule, module: nn.Module, x: Tensor, d: Tensor,
                  uses: list[tuple[str, Tensor]], states: Mapping[int, ParamState], task: int,
                  validate: bool, pair_limit: int, chunk_bytes: int) -> None:
    """Add one hooked call's per-example statistics to its parameters' pending values.

    ``x`` is the call's input, ``d`` its output gradient (batch first), ``uses`` the
    ``(role, parameter)`` pairs it used. The sums are computed in the accumulation dtype, outside
    any autocast region the backward runs in.
    """
    with torch.autocast(d.device.type, enabled=False):
        _contributions(rule, module, x, d, uses, states, task, validate, pair_limit,
                       chunk_bytes)


def _contributions(rule: LayerRule, module: nn.Module, x: Tensor, d: Tensor,
                   uses: list[tuple[str, Tensor]], states: Mapping[int, ParamState], task: int,
                   validate: bool, pair_limit: int, chunk_bytes: int) -> None:
    acc = acc_dtype(uses[0][1])
    compute = _precision(d.dtype, x.dtype if x.is_floating_point() else None, uses[0][1].dtype)
    data = rule.data(rule.module_call(module, x.to(acc) if x.is_floating_point() else x))
    dd = d.to(acc)
    b = d.shape[0]
    for role, p in uses:
        st = states[id(p)]
        if st.task != task:                # left over from a backward that never reached
            st.drop_pending()              # .grad (torch.autograd.grad): not ours
            st.task = task
            if st.cleared(p.grad):         # a new backward on cleared gradients
                st.reset()
        if st.pending_b and st.pending_b != b:
            raise ShapeError(f"{st.name} is used with batch sizes {st.pending_b} and {b} in "
                             "one backward; per-example statistics need one batch dimension")
        st.pending_b = b
        st.compute = compute if st.compute is None else _precision(st.compute, compute)
        if validate:
            st.pending_floor += noise_floor(data, dd, role, compute)
        if st.uses > 1 or st.buf is not None:
            g = rule.per_example(data, dd.unsqueeze(1), (role,))[:, 0].reshape(b, *p.shape)
            st.buf = g if st.buf is None else st.buf.add_(g)
        else:
            st.pending_sq = rule.grad_sq_sum(data, dd, role, pair_limit=pair_limit,
                                             chunk_bytes=chunk_bytes).reshape(p.shape)
            if validate:
                st.pending_sum = rule.grad_sum(data, dd, role).reshape(p.shape)


def check_total(p: Tensor, st: ParamState, total: Tensor) -> None:
    """Refuse when the hooked contributions of this backward do not add up to its part of
    ``p.grad``, within the rounding of the compute dtype (autocast included).

    Raises:
        UnsupportedModelError: naming the likely cause — gradient from outside the hooked
            modules (a large mismatch) or rounding beyond the tolerance (a small one).
    """
    before = st.grad if st.grad is not None else torch.zeros_like(total)
    assert p.grad is not None
    delta = p.grad.detach().to(total.dtype) - before
    if not (bool(torch.isfinite(delta).all()) and bool(torch.isfinite(total).all())):
        return  # an overflow (GradScaler will skip this step): validate a later backward
    compute = st.compute or total.dtype
    tol = tolerance(compute)
    err_abs = float((total - delta).abs().max())
    scale = max(float(delta.abs().max()), float(total.abs().max()))
    if err_abs <= tol * scale + st.pending_floor:
        return
    err = err_abs / max(scale, torch.finfo(total.dtype).tiny)
    if err < 0.1:
        raise UnsupportedModelError(
            f"{st.name}: the hooked per-example contributions differ from p.grad by {err:.2e} "
            f"(relative), beyond the rounding tolerance {tol:.0e} for {compute} compute: "
            "the backward ran in a lower precision than the hooks saw (e.g. a custom autocast "
            "region) or the gradient was modified during backward (a hook). Pass "
            "validate=False if that is intended, or use VmapStats(model, loss_fn).")
    raise UnsupportedModelError(
        f"{st.name}: the hooked per-example contributions do not add up to p.grad (relative "
        f"error {err:.2e}): the parameter also receives gradient from outside the modules "
        "that own it (e.g. a tied head via F.linear, or a forward run twice with different "
        "graphs). Use VmapStats(model, loss_fn) or the streaming gate for this model.")
