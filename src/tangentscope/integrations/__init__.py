"""Integrations with other libraries, imported lazily (optional extras).

* :mod:`.hf` — Hugging Face: tiny offline tokenizers/models, local checkpoints, tangentscope
  optimizers in ``Trainer``/TRL (``optimizers=``), a ``DPOTrainer`` builder and the TRL dataset
  of the synthetic preference task (extra ``hf``).

The preference losses are in :mod:`tangentscope.losses.preference`, the synthetic preference task
and its exact metrics in :mod:`tangentscope.data.preferences` and
:mod:`tangentscope.data.preference_metrics`. Importing this package imports neither
``transformers`` nor ``trl``.
"""

from . import hf
from .hf import (
                 char_tokenizer,
                 dpo_trainer,
                 load_local_causal_lm,
                 pairs_to_dataset,
                 tiny_causal_lm,
                 trainer_optimizers,
)

__all__ = ["hf", "char_tokenizer", "dpo_trainer", "load_local_causal_lm", "pairs_to_dataset",
           "tiny_causal_lm", "trainer_optimizers"]
