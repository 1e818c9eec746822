"""Convolutions (1-d and 2-d, with groups, stride, dilation, ``padding='same'`` and every
padding mode) as dense layers on unfolded patches.

Unfolding is written once here (:func:`unfold`): the padded input becomes patches
``(B, g, C/g · k, L)`` (``g`` groups, ``k`` kernel elements, ``L`` output positions), the output
sensitivity ``δ (B, C_out, *spatial)`` becomes ``(B, g, C_out/g, L)``, and the weight gradient
of group ``j`` is the dense-layer outer product of its patches and its sensitivities; groups
are a stack dimension of :mod:`.linear`'s formulas. A 1-d convolution is a 2-d one over
``(1, W)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import CallSizes, LayerRule, batch_reason
from .linear import outer_sq_sum, outer_sum

__all__ = ["ConvRule", "unfold"]

_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


def _tuple(v: Any, nd: int) -> tuple[int, ...]:
    return (int(v),) * nd if isinstance(v, int) else tuple(int(t) for t in v)


def unfold(data: Mapping[str, Any]) -> Tensor:
    """Patches ``(B, g, C/g · k, L)`` of a recorded convolution (padding applied)."""
    (t, bo), (le, r) = data["pads"]
    a = data["a"]
    if any((le, r, t, bo)):
        mode = data["mode"]
        a = F.pad(a, (le, r, t, bo), mode=mode) if mode != "constant" else F.pad(
            a, (le, r, t, bo))
    cols = F.unfold(a, data["kernel"], dilation=data["dilation"], stride=data["stride"])
    return cols.reshape(cols.shape[0], data["groups"], -1, cols.shape[-1])


def _weight_grads(data: Mapping[str, Any], dl: Tensor) -> Tensor:
    """Per-example, per-output weight gradients ``(B, P, g, C_out/g, C_in/g · k)`` of a recorded
    convolution from its sensitivities ``dl (B, P, g, C_out/g, L)``, without unfolding: the
    weight gradient of one convolution with ``B · g`` groups, example ``i``'s channels its own
    groups and its ``P`` outputs' sensitivities their output channels (patch features in
    :func:`unfold`'s order)."""
    (t, bo), (le, r) = data["pads"]
    a, (kh, kw), (sh, sw), (dh, dw) = data["a"], data["kernel"], data["stride"], data["dilation"]
    if data["mode"] != "constant" or t != bo or le != r:
        a = F.pad(a, (le, r, t, bo), mode=data["mode"]) if data["mode"] != "constant" else \
            F.pad(a, (le, r, t, bo))
        t = le = 0
    B, P, g, o = dl.shape[:4]
    hp, wp = a.shape[2] + 2 * t, a.shape[3] + 2 * le
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    grad_out = dl.transpose(1, 2).reshape(1, B * g * P * o, ho, wo)
    shape = [B * g * P * o, a.shape[1] // g, kh, kw]
    w = torch.ops.aten.convolution_backward(
        grad_out, a.reshape(1, -1, a.shape[2], a.shape[3]), a.new_empty(shape), None,
        [sh, sw], [t, le], [dh, dw], False, [0, 0], B * g, [False, True, False])[1]
    return w.reshape(B, g, P, o, -1).transpose(1, 2)


class ConvRule(LayerRule):
    """``F.conv1d``/``F.conv2d`` and ``nn.Conv1d``/``nn.Conv2d`` (``nd`` = 1 or 2)."""

    kind = "conv"
    arg_names = _ARGS
    defaults = _DEFAULTS

    def __init__(self, nd: int):
        if nd not in (1, 2):
            raise ValueError(f"ConvRule supports 1-d and 2-d convolutions, got nd={nd}")
        self.nd = nd

    def module_call(self, module: nn.Module, x: Tensor) -> dict[str, Any]:
        bound: dict[str, Any] = {"input": x, "weight": module.weight, "bias": module.bias,
                 "stride": module.stride, "padding": module.padding,
                 "dilation": module.dilation, "groups": module.groups}
        if module.padding_mode != "zeros":  # nn.Conv pads with F.pad, then convolves unpadded
            rp: list[int] = list(module._reversed_padding_repeated_twice)  # type: ignore[arg-type]
            bound["padding"] = 0
            bound["explicit_pads"] = ([(rp[2], rp[3]), (rp[0], rp[1])] if self.nd == 2
                                      else [(rp[0], rp[1])])
            bound["padding_mode"] = module.padding_mode
        return bound

    def reason(self, bound: Mapping[str, Any], batch: int | None) -> str | None:
        if bound["weight"].dim() != self.nd + 2:
            return "unexpected weight shape"
        return batch_reason(bound["input"], batch, self.nd + 2)

    def data(self, bound: Mapping[str, Any]) -> dict[str, Any]:
        nd, x, w = self.nd, bound["input"].detach(), bound["weight"]
        ks = tuple(w.shape[2:])
        stride, dil = _tuple(bound["stride"], nd), _tuple(bound["dilation"], nd)
        pad = bound["padding"]
        if "explicit_pads" in bound:
            pads = list(bound["explicit_pads"])
        elif isinstance(pad, str):
            if pad == "valid":
                pads = [(0, 0)] * nd
            else:  # 'same': total d(k-1), the extra element on the right (as ATen does)
                pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
                        for k, d in zip(ks, dil)]
        else:
            pads = [(q, q) for q in _tuple(pad, nd)]
        mode = bound.get("padding_mode", "zeros")
        if nd == 1:  # as a 2-d convolution over (1, W)
            x, ks, stride, dil, pads = (x.unsqueeze(2), (1, *ks), (1, *stride), (1, *dil),
                                        [(0, 0), *pads])
        return {"a": x, "kernel": ks, "stride": stride, "dilation": dil, "pads": pads,
                "groups": int(bound["groups"]), "mode": "constant" if mode == "zeros" else mode}

    def sizes(self, data: Mapping[str, Any], z: Tensor) -> CallSizes:
        a, g = data["a"], data["groups"]
        k = data["kernel"][0] * data["kernel"][1]
        return (z.shape[1], a.shape[1] // g * k, math.prod(z.shape[2:]), a.numel() // a.shape[0])

    def positions(self, data: Mapping[str, Any], c: int) -> Tensor:
        """Patches ``(c, L, C_in · k)`` of an ungrouped convolution (the dense layer it is at
        every output position), for the positional route of the structured eNTK."""
        if data["groups"] != 1:
            raise ValueError("a grouped convolution has no dense positional factors")
        return unfold(data)[:, 0].transpose(1, 2)

    def per_example(self, data: Mapping[str, Any], delta: Tensor, roles: tuple[str, ...]
                    ) -> Tensor:
        B, P, C = delta.shape[:3]
        g = data["groups"]
        dl = delta.reshape(B, P, g, C // g, -1)
        if roles == ("bias",):
            return dl.sum(-1).reshape(B, P, C)
        q = data["a"].shape[1] // g * data["kernel"][0] * data["kernel"][1]
        if dl.shape[-1] >= q:  # many positions: the convolution's own weight gradient
            w = _weight_grads(data, dl)
        else:  # few positions, many patch features: one product with the unfolded patches
            w = torch.einsum("bpgol,bgql->bpgoq", dl, unfold(data))
        if "bias" in roles:
            w = torch.cat([w, dl.sum(-1, keepdim=True)], dim=-1)
        return w.reshape(B, P, -1)

    def _grouped(self, data: Mapping[str, Any], delta: Tensor) -> tuple[Tensor, Tensor]:
        """Patches ``(g, B, L, i)`` and sensitivities ``(g, B, L, o)`` (stack dim ``g``)."""
        B, C, g = delta.shape[0], delta.shape[1], data["groups"]
        d = delta.reshape(B, g, C // g, -1).permute(1, 0, 3, 2)
        return unfold(data).permute(1, 0, 3, 2), d

    def grad_sum(self, data: Mapping[str, Any], delta: Tensor, role: str) -> Tensor:
        if role == "bias":
            return delta.reshape(delta.shape[0], delta.shape[1], -1).sum((0, 2))
        return outer_sum(*self._grouped(data, delta)).reshape(-1)

    def grad_sq_sum(self, data: Mapping[str, Any], delta: Tensor, role: str, *,
                    pair_limit: int = 3, chunk_bytes: int = 2 ** 20) -> Tensor:
        if role == "bias":
            return delta.reshape(delta.shape[0], delta.shape[1], -1).sum(2).square_().sum(0)
        return outer_sq_sum(*self._grouped(data, delta), pair_limit, chunk_bytes).reshape(-1)
