"""Per-layer derivative rules: per-example gradients as activations ⊗ sensitivities, written
once per layer kind and shared by the structured eNTK, the per-example statistics of the gate
and the stacked ensembles (BackPACK's ``core/derivatives`` idea).

* :class:`LayerRule` — the interface (see :mod:`.base`); built-in rules for dense layers
  (:class:`LinearRule`), 1-d/2-d convolutions with groups and every padding mode
  (:class:`ConvRule`), embeddings (:class:`EmbeddingRule`) and affine normalizations
  (:class:`LayerNormRule`, :class:`RMSNormRule`, :class:`GroupNormRule`,
  :class:`BatchNormRule`), ``torch.addmm`` with the weight ``(d_in, d_out)``
  (:class:`AddmmRule`), and, registered lazily when ``transformers`` is imported (never
  imported here), Hugging Face's GPT-2 ``Conv1D`` and Llama/Mistral/Qwen2 RMSNorm
  (:class:`HFRMSNormRule`; :mod:`.hf`).
* :func:`register_rule` — add a layer (module type and/or torch function) once;
  :func:`rule_for_module`, :func:`rule_for_function`, :func:`registered_modules` read the
  registry.
* Tensor formulas with stack dimensions: :func:`outer_per_example`, :func:`outer_sum`,
  :func:`outer_sq_sum`, :func:`bias_sq_sum` (dense), :func:`token_sum`,
  :func:`token_sq_sum` (embeddings), :func:`unfold` (convolution patches).
"""

from .addmm import AddmmRule, group_rows
from .base import CallSizes, LayerRule, batch_reason
from .conv import ConvRule, unfold
from .embedding import EmbeddingRule, token_sq_sum, token_sum
from .hf import HFRMSNormRule
from .linear import LinearRule, bias_sq_sum, outer_per_example, outer_sq_sum, outer_sum
from .norm import BatchNormRule, GroupNormRule, LayerNormRule, NormRule, RMSNormRule
from .registry import register_rule, registered_modules, rule_for_function, rule_for_module

__all__ = [
    "CallSizes", "LayerRule", "batch_reason", "ConvRule", "unfold", "EmbeddingRule",
    "token_sq_sum", "token_sum", "LinearRule", "bias_sq_sum", "outer_per_example",
    "outer_sq_sum", "outer_sum",
    "BatchNormRule", "GroupNormRule", "LayerNormRule", "NormRule", "RMSNormRule",
    "register_rule", "registered_modules", "rule_for_function", "rule_for_module",
    "AddmmRule", "group_rows", "HFRMSNormRule",
]
