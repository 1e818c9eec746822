"""What a step kernel of :class:`~tangentscope.optim.GatedAdamW` gets and returns (shared by
:mod:`._kernels` and :mod:`._fused`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from .stats import GradMoments

__all__ = ["GroupStep", "Telemetry"]

#: a kernel's result: ``(coordinates updated: 0-d tensor, numel)``, or ``None`` without gate
Telemetry = tuple[Tensor, int] | None


@dataclasses.dataclass(frozen=True)
class GroupStep:
    """One param group's step: what a kernel gets.

    Attributes:
        params: the group's parameters that have a gradient.
        states: their optimizer state dicts (updated in place).
        group: the param group (hyper-parameters).
        mode: ``'hard'``, ``'soft'`` or ``None`` (gate off).
        moments: exact statistics per parameter, or ``None`` (streaming).
        terms: a list to append the estimator's per-tensor terms to, or ``None``.
        scratch: reusable work buffers (not state).
    """

    params: list[Tensor]
    states: list[dict[str, Any]]
    group: dict[str, Any]
    mode: str | None
    moments: list[GradMoments | None] | None
    terms: list[dict[str, Tensor]] | None
    scratch: dict[Any, Any]

    @property
    def foreach(self) -> bool | None:
        return self.group["foreach"]
