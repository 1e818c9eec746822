"""The interface of a per-layer derivative rule, and the helpers every rule shares.

A *layer call* is one application of a layer to a batch: ``z = layer(x; θ)`` with ``B``
examples first. Its parameters' per-example gradients factor into what the forward saw
(activations, token ids, normalized inputs) and the sensitivity ``δ = ∂(Σ_i ℓ_i)/∂z`` of the
call's output. A :class:`LayerRule` holds that factorization once, for every front-end:

* the structured eNTK (:mod:`tangentscope.kernels.structured`) records calls of torch
  *functions* (``F.linear``, ...) and asks the rule for per-example gradients ``(B, P, m)``
  with ``P`` output sensitivities per example, and for the Gram factors it contracts;
* :class:`~tangentscope.optim.stats.PerExampleStats` hooks *modules* (``nn.Linear``, ...)
  and asks for ``Σ_i c_i`` and ``Σ_i c_i²`` (BackPACK's SumGradSquared), materializing
  per-example gradients only where no closed form exists;
* stacked ensembles (:class:`~tangentscope.models.EmbeddingMLPEnsemble`) use the tensor
  formulas of :mod:`.linear` and :mod:`.embedding`, which take leading stack dimensions.

A call is described by a plain dict ``data`` (what :meth:`LayerRule.data` extracts from the
call's bound arguments); every other method reads it. Notation: ``docs/notation.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["CallSizes", "LayerRule", "batch_reason"]

CallSizes = tuple[int, int, int, int]
"""``(d_out, d_in features, positions L, input floats)`` of one call on one example."""


def batch_reason(x: Tensor, batch: int | None, min_dim: int) -> str | None:
    """Why ``x`` is not a per-example input with ``batch`` examples first (None if it is)."""
    if batch is None:
        return None
    if x.dim() < min_dim or x.shape[0] != batch:
        return (f"its input of shape {tuple(x.shape)} is not per-example (batch {batch} first), "
                "e.g. a positional table indexed without the batch")
    return None


class LayerRule:
    """Per-example derivatives of one kind of layer (subclass it to add a layer).

    A rule serves a torch function (``register_rule(F.linear, rule)``, for the structured
    eNTK) and/or a module type (``register_rule(nn.Linear, rule)``, for
    :class:`~tangentscope.optim.stats.PerExampleStats`). Override:

    * :attr:`kind` — ``"linear"`` (the eNTK may then use the Gram routes through
      :meth:`positions`), ``"embedding"`` (token routes, :meth:`positions` gives ids), or any
      other name (the eNTK contracts materialized per-example gradients);
    * :attr:`roles` — the parameter slots (argument names of the function / attribute names
      of the module), e.g. ``("weight", "bias")``;
    * :attr:`arg_names` / :attr:`defaults` — the function's positional signature (for binding
      recorded calls), and :meth:`module_call` — the same arguments from a module;
    * :meth:`reason` (cheap validity check), :meth:`data` (what the factorization keeps),
      :meth:`sizes` and :meth:`per_example`; :meth:`grad_sum` / :meth:`grad_sq_sum` default
      to reductions of :meth:`per_example` and are overridden where a closed form is cheaper.
    """

    kind: str = "custom"
    roles: tuple[str, ...] = ("weight", "bias")
    arg_names: tuple[str, ...] = ()
    defaults: ClassVar[Mapping[str, Any]] = {}
    #: the argument holding the per-example input (checked for a leading batch dimension)
    input_arg: str = "input"

    # -- binding ---------------------------------------------------------------------------
    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The function call's arguments by name (defaults filled in)."""
        out = dict(self.defaults)
        out.update(zip(self.arg_names, args))
        out.update(kwargs)
        return out

    def module_call(self, module: nn.Module, x: Tensor) -> dict[str, Any]:
        """The bound arguments of the function call ``module(x)`` amounts to."""
        raise NotImplementedError(f"{type(self).__name__} does not describe modules")

    def module_params(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """``(role, parameter)`` for the module's trainable parameters in :attr:`roles`."""
        out = []
        for r in self.roles:
            v = getattr(module, r, None)
            if isinstance(v, nn.Parameter) and v.requires_grad:
                out.append((r, v))
        return out

    def module_reason(self, module: nn.Module) -> str | None:
        """Why this module's configuration has no per-example closed form (None: it has).

        Checked when statistics are set up; :meth:`reason` is checked on every call.
        """
        return None

    # -- one call ------------------------------------------------------------------------
    def reason(self, bound: Mapping[str, Any], batch: int | None) -> str | None:
        """Why this call cannot be factored per example (None if it can). ``batch``: the
        model's batch size to check the input against (None: do not check)."""
        return batch_reason(bound[self.input_arg], batch, 2)

    def data(self, bound: Mapping[str, Any]) -> dict[str, Any]:
        """What the factorization keeps of the call (inputs detached)."""
        raise NotImplementedError

    def sizes(self, data: Mapping[str, Any], z: Tensor) -> CallSizes:
        """``(d_out, d_in features, positions, input floats)`` per example; ``z (B, ...)``."""
        raise NotImplementedError

    def per_example(self, data: Mapping[str, Any], delta: Tensor, roles: tuple[str, ...]
                    ) -> Tensor:
        """Per-example gradients of the parameters in ``roles``, laid out as one block.

        Args:
            data: the call (:meth:`data`), ``B`` examples.
            delta: sensitivities ``(B, P, *z.shape[1:])`` (``P`` outputs per example).
            roles: the parameters, e.g. ``("weight", "bias")`` for one augmented ``[W | b]``
                block (bias as the last input column), or ``("bias",)``.

        Returns:
            ``(B, P, m)`` with ``m`` the block's scalars.
        """
        raise NotImplementedError

    def grad_sum(self, data: Mapping[str, Any], delta: Tensor, role: str) -> Tensor:
        """``Σ_i c_i`` of one parameter, flat; ``delta (B, *z.shape[1:])``."""
        return self.per_example(data, delta.unsqueeze(1), (role,)).sum((0, 1))

    def grad_sq_sum(self, data: Mapping[str, Any], delta: Tensor, role: str, *,
                    pair_limit: int = 3, chunk_bytes: int = 2 ** 20) -> Tensor:
        """``Σ_i c_i²`` (elementwise) of one parameter, flat; ``delta (B, *z.shape[1:])``.

        ``pair_limit`` and ``chunk_bytes`` tune the sequence closed forms
        (:func:`tangentscope.derivatives.linear.outer_sq_sum`).
        """
        return self.per_example(data, delta.unsqueeze(1), (role,))[:, 0].square_().sum(0)

    def positions(self, data: Mapping[str, Any], c: int) -> Tensor:
        """For ``kind`` ``"linear"``: inputs ``(c, L, d_in)``; ``"embedding"``: ids ``(c, L)``
        (``-1`` where no gradient flows)."""
        raise NotImplementedError(f"{type(self).__name__} has no positional factors")


def ones_column(a: Tensor) -> Tensor:
    """``[a, 1]`` along the last dimension."""
    return torch.cat([a, a.new_ones((*a.shape[:-1], 1))], dim=-1)
