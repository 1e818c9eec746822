"""Affine normalizations ``z = x̂ ⊙ γ + β`` (LayerNorm, RMSNorm, GroupNorm, eval-mode
BatchNorm).

Per example the gradients are ``∂γ = Σ δ ⊙ x̂`` and ``∂β = Σ δ`` over the dimensions the
affine parameters do not span (positions, and for channel-first norms the spatial
dimensions). ``x̂`` is the normalized input, recomputed from the call's input; examples are
independent as long as the statistics are per example (not training-mode BatchNorm).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from .base import CallSizes, LayerRule, batch_reason

__all__ = ["NormRule", "LayerNormRule", "RMSNormRule", "GroupNormRule", "BatchNormRule"]


class NormRule(LayerRule):
    """Shared part of the affine normalizations; subclasses say how to compute ``x̂``."""

    kind = "norm"
    #: parameters over the channel dimension 1 (BatchNorm, GroupNorm) or the trailing dims
    channel_first = False

    def normalize(self, bound: Mapping[str, Any]) -> Tensor:
        """``x̂``, shaped like the input."""
        raise NotImplementedError

    def _m(self, bound: Mapping[str, Any]) -> int:
        x = bound["input"]
        return x.shape[1] if self.channel_first else math.prod(bound["normalized_shape"])

    def data(self, bound: Mapping[str, Any]) -> dict[str, Any]:
        return {"xhat": self.normalize(bound).detach(), "m": self._m(bound)}

    def sizes(self, data: Mapping[str, Any], z: Tensor) -> CallSizes:
        xh = data["xhat"]
        return 0, 0, 0, xh.numel() // xh.shape[0]

    def _flat(self, data: Mapping[str, Any], delta: Tensor) -> tuple[Tensor, Tensor]:
        """``x̂ (B, 1, L, m)``, ``δ (B, P, L, m)`` for ``delta (B, P, *z.shape[1:])``."""
        xh, m = data["xhat"], data["m"]
        B, P = delta.shape[:2]
        if self.channel_first:
            delta, xh = delta.movedim(2, -1), xh.movedim(1, -1)
        return xh.reshape(B, 1, -1, m), delta.reshape(B, P, -1, m)

    def per_example(self, data: Mapping[str, Any], delta: Tensor, roles: tuple[str, ...]
                    ) -> Tensor:
        xh, d = self._flat(data, delta)
        return (d if roles == ("bias",) else d * xh).sum(2)

    def grad_sq_sum(self, data: Mapping[str, Any], delta: Tensor, role: str, *,
                    pair_limit: int = 3, chunk_bytes: int = 2 ** 20) -> Tensor:
        return self.per_example(data, delta.unsqueeze(1), (role,))[:, 0].square_().sum(0)


class LayerNormRule(NormRule):
    """``F.layer_norm`` / ``nn.LayerNorm``."""

    arg_names = ("input", "normalized_shape", "weight", "bias", "eps")
    defaults: ClassVar[Mapping[str, Any]] = {"weight": None, "bias": None, "eps": 1e-5}

    def module_call(self, module: nn.Module, x: Tensor) -> dict[str, Any]:
        return {"input": x, "normalized_shape": module.normalized_shape,
                "weight": module.weight, "bias": module.bias, "eps": module.eps}

    def normalize(self, bound: Mapping[str, Any]) -> Tensor:
        return F.layer_norm(bound["input"], bound["normalized_shape"], eps=bound["eps"])


class RMSNormRule(NormRule):
    """``F.rms_norm`` / ``nn.RMSNorm`` (weight only)."""

    roles = ("weight",)
    arg_names = ("input", "normalized_shape", "weight", "eps")
    defaults: ClassVar[Mapping[str, Any]] = {"weight": None, "eps": None}

    def module_call(self, module: nn.Module, x: Tensor) -> dict[str, Any]:
        return {"input": x, "normalized_shape": module.normalized_shape,
                "weight": module.weight, "eps": module.eps}

    def normalize(self, bound: Mapping[str, Any]) -> Tensor:
        return F.rms_norm(bound["input"], bound["normalized_shape"], eps=bound["eps"])


class GroupNormRule(NormRule):
    """``F.group_norm`` / ``nn.GroupNorm`` (statistics per example and group)."""

    channel_first = True
    arg_names = ("input", "num_groups", "weight", "bias", "eps")
    defaults: ClassVar[Mapping[str, Any]] = {"weight": None, "bias": None, "eps": 1e-5}

    def module_call(self, module: nn.Module, x: Tensor) -> dict[str, Any]:
        return {"input": x, "num_groups": module.num_groups, "weight": module.weight,
                "bias": module.bias, "eps": module.eps}

    def normalize(self, bound: Mapping[str, Any]) -> Tensor:
        return F.group_norm(bound["input"], bound["num_groups"], eps=bound["eps"])


class BatchNormRule(NormRule):
    """``F.batch_norm`` / ``nn.BatchNorm1d/2d/3d`` with running statistics (eval mode)."""

    channel_first = True
    arg_names = ("input", "running_mean", "running_var", "weight", "bias", "training",
                 "momentum", "eps")
    defaults: ClassVar[Mapping[str, Any]] = {"weight": None, "bias": None, "training": False,
                                             "eps": 1e-5}

    def module_call(self, module: nn.Module, x: Tensor) -> dict[str, Any]:
        batch_stats = module.training or module.running_mean is None
        return {"input": x, "running_mean": module.running_mean,
                "running_var": module.running_var, "weight": module.weight,
                "bias": module.bias, "training": batch_stats, "eps": module.eps}

    def reason(self, bound: Mapping[str, Any], batch: int | None) -> str | None:
        if bound.get("training"):
            return "batch statistics couple the examples (training-mode batch_norm)"
        return batch_reason(bound["input"], batch, 2)

    def normalize(self, bound: Mapping[str, Any]) -> Tensor:
        x = bound["input"]
        rm, rv = bound["running_mean"], bound["running_var"]
        return F.batch_norm(x, rm.to(x.dtype), rv.to(x.dtype), eps=bound["eps"])

