"""Integrations with other libraries, imported lazily (optional extras).

* :mod:`.hf` — Hugging Face: tiny offline tokenizers/models, local checkpoints, tangentscope
  optimizers in ``Trainer``/TRL (``optimizers=``), a ``DPOTrainer`` builder (extra ``hf``).
* :mod:`.dpo` — DPO under noisy preferences: cDPO/rDPO losses, a synthetic preference task with
  a known reward, exact KL to the reference, likelihood displacement (torch only).

Importing this package imports neither ``transformers`` nor ``trl``.
"""

from . import dpo, hf
from .dpo import (PolicyStats, PreferenceEvaluator, PreferencePairs, PreferenceTask,
                  conservative_dpo_loss, dpo_loss, exact_kl, make_task, robust_dpo_loss,
                  trl_loss_kwargs)
from .hf import (char_tokenizer, dpo_trainer, load_local_causal_lm, tiny_causal_lm,
                 trainer_optimizers)

__all__ = [
    "dpo", "hf", "PolicyStats", "PreferenceEvaluator", "PreferencePairs", "PreferenceTask",
    "conservative_dpo_loss", "dpo_loss", "exact_kl", "make_task", "robust_dpo_loss",
    "trl_loss_kwargs", "char_tokenizer", "dpo_trainer", "load_local_causal_lm", "tiny_causal_lm",
    "trainer_optimizers",
]
