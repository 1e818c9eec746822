"""Preference losses for DPO under noisy labels, and their TRL spelling.

Losses of the implicit reward margin ``Δ = [log π(y_w|x) − log π_ref(y_w|x)] −
[log π(y_l|x) − log π_ref(y_l|x)]`` (nats, per pair), with ``L± = −log σ(±βΔ)``:

- DPO (Rafailov et al. 2023): ``L+``.
- conservative DPO, cDPO (Mitchell 2023; label smoothing ε): ``(1−ε) L+ + ε L−``. Its gradient
  vanishes at ``βΔ = log((1−ε)/ε)``, so margins stay bounded.
- robust DPO, rDPO (Chowdhury et al. 2024; flip rate ε): ``[(1−ε) L+ − ε L−] / (1−2ε)``, an
  unbiased estimate of the clean-label DPO loss when labels flip with probability ε.

TRL 1.16's ``loss_type="sigmoid"`` ignores ``label_smoothing`` (``dpo_trainer.py`` computes
``-F.logsigmoid(self.beta * delta_score)`` for it; only ``robust``, ``exo_pair``, ``aot`` and
``aot_unpaired`` read ``label_smoothing``), so cDPO is not available by name. Because TRL sums
weighted loss types, :func:`trl_loss_kwargs` obtains cDPO exactly from TRL's own terms:
``cDPO(ε) = 2(1−ε)·DPO − (1−2ε)·rDPO(ε)`` (tested against :func:`conservative_dpo_loss`).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

__all__ = ["PREFERENCE_LOSSES", "dpo_loss", "conservative_dpo_loss", "robust_dpo_loss",
           "preference_loss", "trl_loss_kwargs"]

#: Loss names accepted by :func:`preference_loss` and :func:`trl_loss_kwargs`.
PREFERENCE_LOSSES = ("dpo", "cdpo", "rdpo")


def dpo_loss(delta: Tensor, beta: float) -> Tensor:
    """DPO loss ``−log σ(βΔ)`` per pair. ``delta``: (n,) margins in nats → (n,)."""
    return -F.logsigmoid(beta * delta)


def _check_eps(eps: float, name: str) -> None:
    if not 0.0 <= eps < 0.5:
        raise ConfigError(f"{name} needs label_smoothing ε in [0, 0.5), got {eps}; ε is the "
                          "assumed probability that a preference label is flipped")


def conservative_dpo_loss(delta: Tensor, beta: float, eps: float) -> Tensor:
    """Conservative DPO ``(1−ε)(−log σ(βΔ)) + ε(−log σ(−βΔ))`` per pair → (n,)."""
    _check_eps(eps, "cdpo")
    return -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)


def robust_dpo_loss(delta: Tensor, beta: float, eps: float) -> Tensor:
    """Robust DPO ``[(1−ε)(−log σ(βΔ)) − ε(−log σ(−βΔ))] / (1−2ε)`` per pair → (n,)."""
    _check_eps(eps, "rdpo")
    return (-(1 - eps) * F.logsigmoid(beta * delta)
            + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)


def preference_loss(name: str, delta: Tensor, beta: float, eps: float = 0.0) -> Tensor:
    """Per-pair loss by name: ``"dpo"``, ``"cdpo"`` or ``"rdpo"`` (see module docstring)."""
    if name == "dpo":
        return dpo_loss(delta, beta)
    if name == "cdpo":
        return conservative_dpo_loss(delta, beta, eps)
    if name == "rdpo":
        return robust_dpo_loss(delta, beta, eps)
    raise ConfigError(f"loss must be one of {PREFERENCE_LOSSES}, got {name!r}")


def trl_loss_kwargs(name: str, eps: float = 0.0) -> dict[str, Any]:
    """``DPOConfig`` keyword arguments that make TRL (1.16) optimise loss ``name``.

    ``"dpo"`` → ``loss_type=["sigmoid"]``; ``"rdpo"`` → ``["robust"]`` with
    ``label_smoothing=ε``; ``"cdpo"`` → ``["sigmoid", "robust"]`` with weights
    ``[2(1−ε), −(1−2ε)]``, which equals ``(1−ε) L+ + ε L−`` exactly (TRL's ``sigmoid`` alone
    ignores ``label_smoothing``).
    """
    if name == "dpo":
        return {"loss_type": ["sigmoid"], "label_smoothing": 0.0}
    if name == "rdpo":
        _check_eps(eps, "rdpo")
        return {"loss_type": ["robust"], "label_smoothing": float(eps)}
    if name == "cdpo":
        _check_eps(eps, "cdpo")
        if eps == 0.0:
            return {"loss_type": ["sigmoid"], "label_smoothing": 0.0}
        return {"loss_type": ["sigmoid", "robust"], "label_smoothing": float(eps),
                "loss_weights": [2.0 * (1.0 - eps), -(1.0 - 2.0 * eps)]}
    raise ConfigError(f"loss must be one of {PREFERENCE_LOSSES}, got {name!r}")
