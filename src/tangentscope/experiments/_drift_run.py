"""One drift-vs-diffusion training run (private to :mod:`.drift_diffusion`).

Plain SGD ``w ← w − η ĝ_B`` on ``Φ_B = Σ_{i∈B} ‖u_i − y_i‖²/(2b)``; each step's gradient is split
into three parts that sum to it,

    ĝ_B = ḡ_P  +  (ĝ_S − ḡ_P)  +  (ĝ_B − ĝ_S)
        = population + idiosyncratic + minibatch,

with ``ĝ_S`` the full training-set gradient and ``ḡ_P`` the gradient on a fresh pool drawn from
the data distribution (same label-noise rate). Two more parts are tracked (they overlap the
three): ``noise = ĝ_B − ḡ_P`` (idiosyncratic + minibatch), the noise around the population
gradient of the two-way split with a population pool, and ``fullbatch = ĝ_S`` (population +
idiosyncratic), the drift of the two-way split with the full batch as the population part.
A :class:`~tangentscope.dynamics.diffusion.DriftNoiseSplit` follows every part in output
space on the training set, with the quadratic variation along a frame of directions.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..dynamics.diffusion import DriftNoiseCurves, DriftNoiseSplit
from ..errors import ConfigError

__all__ = ["PARTS", "SplitRun", "split_training", "batch_sampler"]

PARTS = ("population", "idiosyncratic", "minibatch", "noise", "fullbatch")
Sampling = Literal["replacement", "reshuffle"]


@dataclasses.dataclass(frozen=True)
class SplitRun:
    """What :func:`split_training` returns.

    Attributes:
        curves: the split's recorded sums (parts :data:`PARTS`).
        u_change: ``(T, N)`` the actual ``u(t) − u(0)`` on the training set at the recorded steps.
        train_loss: ``(T,)`` full-batch ``Φ_S`` at the recorded steps.
        seconds: wall time of the loop.
    """

    curves: DriftNoiseCurves
    u_change: np.ndarray
    train_loss: np.ndarray
    seconds: float


def batch_sampler(n: int, batch_size: int, sampling: Sampling, seed: int
                  ) -> Callable[[], Tensor]:
    """Indices of the next minibatch: i.i.d. with replacement (the noise is then a martingale
    difference given the past) or epoch-wise reshuffled without replacement (standard SGD).

    Raises:
        ConfigError: an unknown sampling or a batch size outside ``[1, n]``.
    """
    if sampling not in ("replacement", "reshuffle"):
        raise ConfigError(f"sampling must be 'replacement' or 'reshuffle', got {sampling!r}")
    if not 1 <= batch_size <= n:
        raise ConfigError(f"batch size must be in [1, n={n}], got {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    order = [torch.randperm(n, generator=gen)]
    pos = [0]

    def draw() -> Tensor:
        if sampling == "replacement":
            return torch.randint(n, (batch_size,), generator=gen)
        if pos[0] + batch_size > n:
            order[0], pos[0] = torch.randperm(n, generator=gen), 0
        p = pos[0]
        pos[0] = p + batch_size
        return order[0][p:p + batch_size]

    return draw


def _grad(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    (0.5 * (model(x) - y).pow(2).sum(1).mean()).backward()
    return {k: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for k, p in model.named_parameters() if p.requires_grad}


def split_training(model: nn.Module, x: Tensor, y: Tensor,
                   pool: Callable[[], tuple[Tensor, Tensor]], *, lr: float, steps: int,
                   batch_size: int, sampling: Sampling, record_at: Sequence[int] | np.ndarray,
                   frame: Tensor | None, seed: int) -> SplitRun:
    """Train ``model`` by plain SGD on ``(x, y)`` and split every step (see the module docstring).

    Args:
        model: ``(n, d) → (n, p)`` network (trained in place).
        x, y: ``(n, d)`` inputs and ``(n, p)`` observed targets.
        pool: ``pool() -> (x_P, y_P)``, a population sample drawn afresh for each step.
        lr: SGD step size ``η``.
        steps: optimizer steps.
        batch_size, sampling: minibatches (:func:`batch_sampler`).
        record_at: steps at which the sums are stored.
        frame: ``(N, F)`` directions for the quadratic variation (or ``None``).
        seed: seed of the minibatch order.

    Raises:
        ConfigError: non-positive ``lr`` or ``steps``; see :func:`batch_sampler`.
    """
    if not (lr > 0 and steps >= 1):
        raise ConfigError(f"lr must be > 0 and steps >= 1, got lr={lr!r}, steps={steps!r}")
    draw = batch_sampler(x.shape[0], batch_size, sampling, seed)
    rec = {int(s) for s in record_at}
    split = DriftNoiseSplit(model, x, frame=frame, record_at=sorted(rec))
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        u0 = model(x).detach().reshape(-1)
    du, losses = [], []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        idx = draw()
        xp, yp = pool()
        gB, gS, gP = _grad(model, x[idx], y[idx]), _grad(model, x, y), _grad(model, xp, yp)
        split.observe_parts({"population": gP,
                             "idiosyncratic": {k: gS[k] - gP[k] for k in gS},
                             "minibatch": {k: gB[k] - gS[k] for k in gS},
                             "noise": {k: gB[k] - gP[k] for k in gS},
                             "fullbatch": gS}, lr)
        with torch.no_grad():
            for p, k in zip(params, gB):
                p.sub_(lr * gB[k])
        if step in rec:
            with torch.no_grad():
                u = model(x)
                du.append((u.reshape(-1) - u0).cpu().numpy())
                losses.append(float(0.5 * (u - y).pow(2).sum(1).mean()))
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return SplitRun(split.curves(), np.stack(du), np.array(losses), seconds)
