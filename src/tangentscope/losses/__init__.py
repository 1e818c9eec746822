"""``tangentscope.losses``: the losses of the theory, in one place.

* Output-space losses (``Φ``, ``g = ∇_uΦ``, ``B = ∇²_uΦ``) for the kernels and the operators:
  :mod:`.output` (:class:`SquaredLoss`, :class:`SoftmaxCrossEntropy`, :class:`PerExampleLoss`,
  :func:`get_loss`, :func:`dense_hessian`, :func:`hessian_matvec`).
* Preference losses (DPO, conservative DPO, robust DPO): :mod:`.preference` (area E).
"""

from .output import (
    OutputLoss,
    PerExampleLoss,
    SoftmaxCrossEntropy,
    SquaredLoss,
    dense_hessian,
    get_loss,
    hessian_matvec,
    sqrt_blocks,
)
from .preference import (  # area E: the preference losses
    PREFERENCE_LOSSES,
    conservative_dpo_loss,
    dpo_loss,
    preference_loss,
    robust_dpo_loss,
    trl_loss_kwargs,
)

__all__ = ["OutputLoss", "SquaredLoss", "SoftmaxCrossEntropy", "PerExampleLoss", "get_loss",
           "dense_hessian", "hessian_matvec", "sqrt_blocks"]
__all__ += ["PREFERENCE_LOSSES", "dpo_loss", "conservative_dpo_loss", "robust_dpo_loss",
            "preference_loss", "trl_loss_kwargs"]
