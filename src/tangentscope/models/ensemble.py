"""Stacked ensembles: ``E`` copies of a module trained as one (one forward, one optimizer)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

__all__ = ["StackedEnsemble"]


class StackedEnsemble(nn.Module):
    """``E`` copies of any module as one: parameters stacked on a leading axis, the forward
    ``vmap``-ed over it (``torch.func.stack_module_state`` + ``functional_call``).

    Inputs ``(B, E, ...)`` → outputs ``(B, E, ...)`` (batch first, like
    :class:`~tangentscope.models.embedding_mlp.EmbeddingMLPEnsemble`). With elementwise
    optimizers, training the stack equals training the ``E`` members separately.

    Args:
        models: the members, all of the same architecture (their parameters are copied).
    """

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        params, buffers = stack_module_state(list(models))
        self.n_members = len(models)
        self._names = list(params)
        self.stacked = nn.ParameterList(nn.Parameter(params[k].detach().clone())
                                        for k in self._names)
        self._buffers_stacked = buffers
        self._base = [copy.deepcopy(models[0]).to("meta")]

    def forward(self, x: Tensor) -> Tensor:
        base = self._base[0]

        def one(params: tuple[Tensor, ...], xe: Tensor) -> Tensor:
            return functional_call(base, dict(zip(self._names, params)), (xe,))

        return vmap(one, in_dims=(0, 1), out_dims=1)(tuple(self.stacked), x)
