"""Rules for Hugging Face ``transformers`` layers, registered lazily.

``import tangentscope`` never imports ``transformers``. The registry
(:mod:`.registry`) looks the classes below up in ``sys.modules`` whenever it is asked for a
module's rule: a model built from ``transformers`` has imported them, so its layers are found,
and a user's own :func:`~tangentscope.derivatives.register_rule` for one of these classes
(made before or after) always wins.

* GPT-2 (and GPT, CTRL, ...): ``transformers.pytorch_utils.Conv1D`` — ``z = x W + b`` with
  ``W (d_in, d_out)`` through ``torch.addmm`` (:class:`~.addmm.AddmmRule`; the function
  ``torch.addmm`` itself is a built-in rule, so the structured eNTK factors these layers too).
* Llama, Mistral, Qwen2: ``LlamaRMSNorm``, ``MistralRMSNorm``, ``Qwen2RMSNorm`` —
  ``z = w ⊙ cast(x̂)``, ``x̂ = x / √(mean(x²) + ε)`` computed in float32 and cast back to the
  input dtype (:class:`HFRMSNormRule`, which recomputes ``x̂`` the same way).

Other layers with the same math (a model's own copy of the Llama RMSNorm, say) are added with
``register_rule(MyRMSNorm, HFRMSNormRule())``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .addmm import AddmmRule
from .base import LayerRule
from .norm import RMSNormRule

__all__ = ["HFRMSNormRule", "LAZY_RULES"]


class HFRMSNormRule(RMSNormRule):
    """Hugging Face's RMSNorm (``LlamaRMSNorm`` and its copies): weight only, attribute
    ``variance_epsilon``, the normalization in float32 then cast to the input dtype."""

    def module_call(self, module: nn.Module, x: Tensor) -> dict[str, Any]:
        w = module.weight
        assert isinstance(w, Tensor)
        return {"input": x, "normalized_shape": tuple(w.shape), "weight": w,
                "eps": module.variance_epsilon}

    def normalize(self, bound: Mapping[str, Any]) -> Tensor:
        x = bound["input"]
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + bound["eps"])
        return h.to(x.dtype)


LAZY_RULES: tuple[tuple[str, str, Callable[[], LayerRule]], ...] = (
    ("transformers.pytorch_utils", "Conv1D", AddmmRule),
    ("transformers.models.llama.modeling_llama", "LlamaRMSNorm", HFRMSNormRule),
    ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm", HFRMSNormRule),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm", HFRMSNormRule),
)
"""``(module path, class name, rule factory)`` registered once the module is imported."""
