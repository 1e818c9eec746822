"""Diagonal preconditioners read from optimizer state, for the kernel ``J D Jᵀ``.

For Adam/AdamW the parameter update is ``Δw = −lr · m̂ / (√v̂ + ε)``; to first order in the
gradient it is ``−lr · D ∇L`` with ``D = 1 / (√v̂ + ε)``, so outputs move by ``−lr · J D Jᵀ g``.
Momentum makes ``m̂`` differ from the current gradient, so this kernel is an approximation whose
error tangentscope measures (see the operators docs) rather than hides.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ShapeError

__all__ = ["adam_preconditioner"]


def adam_preconditioner(optimizer: torch.optim.Optimizer, model: nn.Module | None = None,
                        names: dict[int, str] | None = None) -> dict[str, Tensor]:
    """``D = 1/(√v̂ + ε)`` per parameter from an Adam-like optimizer's ``exp_avg_sq`` state.

    Args:
        optimizer: ``torch.optim.Adam``/``AdamW`` or any optimizer whose state has
            ``exp_avg_sq`` and ``step`` (tangentscope's gated AdamW included).
        model: names the parameters (``model.named_parameters()``); or pass ``names``
            mapping ``id(param) -> name``.

    Returns:
        ``name -> D`` shaped like each parameter. A parameter with no state yet (before the
        first step) gets ``D = 1/ε`` only if the optimizer has never stepped; otherwise an error.

    Raises:
        ShapeError: no way to name the parameters, or the state lacks ``exp_avg_sq``.
    """
    if names is None:
        if model is None:
            raise ShapeError("pass the model (or names={id(p): name}) to name the parameters")
        names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, Tensor] = {}
    for group in optimizer.param_groups:
        eps = group.get("eps", 1e-8)
        beta2 = group.get("betas", (0.9, 0.999))[1]
        for p in group["params"]:
            if id(p) not in names or not p.requires_grad:
                continue
            st = optimizer.state.get(p, {})
            if "exp_avg_sq" not in st:
                if st:
                    raise ShapeError(f"optimizer state for {names[id(p)]} has no exp_avg_sq: "
                                     "not an Adam-like optimizer")
                out[names[id(p)]] = torch.full_like(p, 1.0 / eps).detach()
                continue
            step = float(st.get("step", 1))
            v_hat = st["exp_avg_sq"] / (1 - beta2 ** max(step, 1.0))
            out[names[id(p)]] = (1.0 / (v_hat.sqrt() + eps)).detach().to(p.dtype)
    return out
