"""The kernel-motion experiment's model and settings (private).

- :class:`ScaledDifference` — ``f(x) = α (h(x; w_a) − h(x; w_b)) / √2`` with ``w_a = w_b`` at
  initialization (the doubling trick): the output is exactly 0 at initialization for every
  ``α`` and the eNTK is ``α² K_h``. Training ``f`` with the step ``c · n / λ_max(K_f(0))`` is the
  lazy-training scaling of Chizat, Oyallon & Bach (2019): the step shrinks as ``1/α²``, the
  function-space dynamics at initialization do not depend on ``α``, and the parameters must
  move by ``O(1/α)`` to fit — large ``α`` is lazy, small ``α`` is rich.
- :class:`Setting` / :func:`settings` — the sweep: output scale at the base width and step, then
  width and step size at ``α = 1``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["ScaledDifference", "Setting", "settings", "count_params"]


class ScaledDifference(nn.Module):
    """``α (h_a(x) − h_b(x)) / √2`` with ``h_b`` a copy of ``h_a`` at construction.

    Args:
        net: the base network ``h``; it becomes ``h_a`` (``h_b`` is a deep copy).
        alpha: the output scale ``α > 0``.
    """

    def __init__(self, net: nn.Module, alpha: float):
        super().__init__()
        self.a, self.b = net, copy.deepcopy(net)
        self.alpha = float(alpha)

    def forward(self, x: Tensor) -> Tensor:
        return (self.alpha / math.sqrt(2.0)) * (self.a(x) - self.b(x))


@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of the sweep.

    Attributes:
        sweep: which axis it belongs to (``alpha``, ``width`` or ``lr``; the base point is on
            all three and listed once, under ``alpha``).
        alpha, width, lr_scale: output scale, hidden width, GD step relative to
            ``n / λ_max(K(0))``.
    """

    sweep: str
    alpha: float
    width: int
    lr_scale: float

    @property
    def key(self) -> str:
        return f"a{self.alpha:g}/w{self.width}/lr{self.lr_scale:g}"


def settings(alphas: Sequence[float], widths: Sequence[int], lr_scales: Sequence[float],
             base_width: int, base_lr_scale: float) -> list[Setting]:
    """Output scales at ``(base_width, base_lr_scale)``, then widths and step sizes at
    ``α = 1`` (duplicates of an earlier point dropped)."""
    out = [Setting("alpha", float(a), int(base_width), float(base_lr_scale)) for a in alphas]
    out += [Setting("width", 1.0, int(w), float(base_lr_scale)) for w in widths]
    out += [Setting("lr", 1.0, int(base_width), float(c)) for c in lr_scales]
    seen: set[str] = set()
    uniq = []
    for s in out:
        if s.key not in seen:
            seen.add(s.key)
            uniq.append(s)
    return uniq


def count_params(model: nn.Module) -> int:
    """Trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
