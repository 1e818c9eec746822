"""Hugging Face helpers: tiny offline tokenizers and models, local checkpoints, optimizers.

Everything here works without network access: tokenizers are built in code from a symbol list,
models from a ``GPT2Config``, and user checkpoints are read with ``local_files_only=True``.
``transformers``/``tokenizers`` are imported inside the functions (the ``hf`` extra)::

    tok = char_tokenizer("abcdefuvwxyz|", eos_token="$")           # one character = one token
    model = tiny_causal_lm(len(tok), eos_token_id=tok.eos_token_id)  # GPT-2 from a config
    opt, sched = trainer_optimizers(model, "gated", lr=1e-3)        # for Trainer(optimizers=...)
    DPOTrainer(model=model, ref_model=ref, ..., optimizers=(opt, sched))
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["char_tokenizer", "tiny_causal_lm", "load_local_causal_lm", "trainer_optimizers",
           "decay_parameter_names", "dpo_trainer", "step_callback", "quiet_hf", "OPTIMIZERS"]

#: Names accepted by :func:`trainer_optimizers`.
OPTIMIZERS = ("adamw", "gated")


def char_tokenizer(symbols: str | Sequence[str], *, eos_token: str = "$",
                   pad_token: str | None = None) -> Any:
    """A character-level ``PreTrainedTokenizerFast`` built in code (nothing downloaded).

    Every symbol is one token; ids follow ``symbols`` order, then ``eos_token`` (and
    ``pad_token`` if it differs). Concatenating strings concatenates their ids, which is what
    TRL's prompt/completion tokenization needs.

    Args:
        symbols: the single-character symbols, e.g. ``"abc|"``.
        eos_token: end-of-sequence character (also the unknown and, by default, padding token).
        pad_token: padding character; ``None`` pads with ``eos_token`` (as TRL does).

    Returns:
        a ``transformers.PreTrainedTokenizerFast`` with ``len(tok) == len(symbols) + 1``
        (``+ 2`` with a separate ``pad_token``).

    Raises:
        ConfigError: a symbol is not one character or is repeated.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(symbols) + [eos_token] + ([pad_token] if pad_token not in (None, eos_token)
                                          else [])
    bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
    if bad:
        raise ConfigError(f"char_tokenizer needs single characters, got {bad!r}; use "
                          "load_local_causal_lm for a word- or subword-level tokenizer")
    if len(set(chars)) != len(chars):
        raise ConfigError(f"char_tokenizer symbols must be distinct (eos/pad included): {chars!r}")
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token=eos_token))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # bos = eos as in GPT-2 (no BOS is added when encoding; this only keeps Trainer from
    # "aligning" the model config's bos_token_id)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos_token,
                                   bos_token=eos_token, unk_token=eos_token,
                                   pad_token=pad_token or eos_token)


def tiny_causal_lm(vocab_size: int, *, n_embd: int = 64, n_layer: int = 2, n_head: int = 4,
                   n_positions: int = 32, eos_token_id: int | None = None,
                   pad_token_id: int | None = None, seed: int | None = None) -> nn.Module:
    """A GPT-2-style causal LM built from a ``GPT2Config`` (random init, nothing downloaded).

    Args:
        vocab_size: number of tokens (``len(tokenizer)``).
        n_embd, n_layer, n_head, n_positions: GPT-2 sizes (``n_embd % n_head == 0``).
        eos_token_id, pad_token_id: written into the config and generation config.
        seed: seeds ``torch`` before initialisation (``None``: the current RNG state).

    Returns:
        ``transformers.GPT2LMHeadModel`` in float32, dropout off (``*_pdrop = 0``).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if n_embd % n_head:
        raise ConfigError(f"n_embd={n_embd} must be a multiple of n_head={n_head}")
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd,
                     n_layer=n_layer, n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
                     pad_token_id=pad_token_id if pad_token_id is not None else eos_token_id)
    if seed is not None:
        torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def load_local_causal_lm(path: str | os.PathLike, *, dtype: torch.dtype | None = None
                         ) -> tuple[nn.Module, Any]:
    """Load ``AutoModelForCausalLM`` + ``AutoTokenizer`` from a local directory (no network).

    Args:
        path: a directory written by ``save_pretrained`` (``config.json``, weights, tokenizer).
        dtype: load the weights in this dtype (default: float32).

    Returns:
        ``(model, tokenizer)``; the tokenizer gets ``pad_token = eos_token`` if it had none.

    Raises:
        ConfigError: ``path`` is not a directory holding ``config.json`` and a tokenizer.
    """
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise ConfigError(f"--model_dir {p}: no config.json there; pass a directory written by "
                          "model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR) "
                          "(Hub ids are not accepted: nothing is downloaded)")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                           "vocab.json", "tokenizer.model")):
        raise ConfigError(f"--model_dir {p}: no tokenizer files there; save the tokenizer too "
                          "with tokenizer.save_pretrained(DIR)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_hf():
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(p, local_files_only=True,
                                                     dtype=dtype or torch.float32)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay: matrices, not biases or norm gains.

    The rule (``p.ndim >= 2``) matches Hugging Face ``Trainer``'s default grouping for
    GPT-2-style models (biases and LayerNorm parameters are 1-D).
    """
    return {n for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2}


def trainer_optimizers(model: nn.Module, optimizer: str = "adamw", *, lr: float = 1e-3,
                       weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                       eps: float = 1e-8, **gate_kwargs: Any
                       ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """An ``(optimizer, scheduler)`` pair for ``Trainer``/``DPOTrainer(optimizers=...)``.

    Parameters are grouped like ``Trainer`` does (weight decay on matrices only, see
    :func:`decay_parameter_names`); the scheduler is a constant ``LambdaLR`` (wrap your own for
    warm-up/decay). Create it after moving the model to its device.

    Args:
        model: the policy being trained.
        optimizer: ``"adamw"`` (``torch.optim.AdamW``) or ``"gated"``
            (``tangentscope.optim.GatedAdamW``: AdamW with the population-risk gate).
        lr, weight_decay, betas, eps: AdamW hyper-parameters (identical for both).
        **gate_kwargs: passed to ``GatedAdamW`` (e.g. ``threshold=``, ``gate_on=``, ``stats=``);
            ``stats="microbatch"`` builds a ``MicrobatchStats(model)``: each microbatch of a
            ``gradient_accumulation_steps`` cycle is one leave-one-out contribution (one pair
            per microbatch = the exact per-example gate). Refused for ``"adamw"``.

    Raises:
        ConfigError: unknown optimizer name, or gate options given to plain AdamW.
    """
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    decay = decay_parameter_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if optimizer == "adamw":
        if gate_kwargs:
            raise ConfigError(f"gate options {sorted(gate_kwargs)} need optimizer='gated'")
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    else:
        from ..optim import GatedAdamW, MicrobatchStats

        if gate_kwargs.get("stats") == "microbatch":
            gate_kwargs = {**gate_kwargs, "stats": MicrobatchStats(model)}
        opt = GatedAdamW(groups, lr=lr, betas=betas, eps=eps, **gate_kwargs)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def dpo_trainer(policy: nn.Module, reference: nn.Module, tokenizer: Any, train_dataset: Any, *,
                loss: str = "dpo", eps: float = 0.0, beta: float = 0.1,
                optimizer: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0,
                epochs: float = 1.0, batch_size: int = 16, microbatch_size: int | None = None,
                max_length: int | None = None, max_grad_norm: float = 1.0, seed: int = 0,
                output_dir: str | os.PathLike | None = None, callbacks: Sequence[Any] = (),
                gate_kwargs: dict[str, Any] | None = None, device: str | None = None,
                bf16: bool = False) -> Any:
    """A TRL ``DPOTrainer`` wired with a tangentscope optimizer through ``optimizers=``.

    Args:
        policy, reference: the model to train and the frozen reference (a separate copy: TRL
            would otherwise try to reload the policy from the Hub by name).
        tokenizer: the tokenizer (``processing_class``).
        train_dataset: ``datasets.Dataset`` with ``prompt``/``chosen``/``rejected`` strings.
        loss, eps: ``"dpo"``, ``"cdpo"`` or ``"rdpo"`` with label smoothing / flip rate ``ε``
            (see :func:`tangentscope.integrations.dpo.trl_loss_kwargs`).
        beta: DPO β (nats⁻¹ of the log-ratio margin).
        optimizer, lr, weight_decay, gate_kwargs: see :func:`trainer_optimizers`; constant lr.
        epochs, batch_size: passes over the data and pairs per optimizer step.
        microbatch_size: pairs per forward/backward; ``batch_size / microbatch_size`` becomes
            ``gradient_accumulation_steps`` (the microbatch statistics source sees each one).
        max_length: prompt + response tokens kept (cuts TRL's appended EOS when set to exactly
            that length).
        max_grad_norm: gradient clipping as in ``Trainer`` (0 disables).
        output_dir: TRL's output directory (nothing is saved: ``save_strategy="no"``); default
            a temporary directory.
        callbacks: ``transformers.TrainerCallback`` instances (e.g. :func:`step_callback`).
        device: ``"cpu"``, ``"cuda"``; default cuda when available.
        bf16: bf16 autocast (GPU).

    Returns:
        the ``trl.DPOTrainer``; call ``trainer.train()`` (inside :func:`quiet_hf` to silence
        TRL/transformers version-skew deprecation notices). TRL replaces both models'
        ``forward`` by a closure over the original object: ``copy.deepcopy`` them *before*
        this call, never after (a copy would run the original's weights).

    Raises:
        ConfigError: ``batch_size`` not a multiple of ``microbatch_size``, or the microbatch
            statistics source with fewer than two microbatches per step.
    """
    import tempfile

    from trl import DPOConfig, DPOTrainer

    from .dpo import trl_loss_kwargs

    mb = batch_size if microbatch_size is None else microbatch_size
    if mb < 1 or batch_size % mb:
        raise ConfigError(f"batch_size={batch_size} must be a multiple of microbatch_size={mb}")
    accum = batch_size // mb
    gate_kwargs = dict(gate_kwargs or {})
    if gate_kwargs.get("stats") == "microbatch" and accum < 2:
        raise ConfigError("stats='microbatch' needs >= 2 microbatches per optimizer step; set "
                          "microbatch_size < batch_size (1 = the exact per-pair gate)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    policy.to(device)
    reference.to(device)
    opt, sched = trainer_optimizers(policy, optimizer, lr=lr, weight_decay=weight_decay,
                                    **gate_kwargs)
    # transformers >= 5.2x renamed gradient_checkpointing (TRL defaults it to True)
    ckpt = ("activation_checkpointing" if "activation_checkpointing" in
            DPOConfig.__dataclass_fields__ else "gradient_checkpointing")
    args = DPOConfig(
        output_dir=str(output_dir or tempfile.mkdtemp(prefix="tangentscope-dpo-")),
        per_device_train_batch_size=mb, gradient_accumulation_steps=accum,
        num_train_epochs=epochs, learning_rate=lr, weight_decay=weight_decay,
        lr_scheduler_type="constant", max_grad_norm=max_grad_norm, beta=beta,
        max_length=max_length, seed=seed, data_seed=seed, dataloader_drop_last=True,
        bf16=bf16, report_to="none", save_strategy="no", logging_strategy="no",
        disable_tqdm=True, use_cpu=device == "cpu", **{ckpt: False},
        **trl_loss_kwargs(loss, eps))
    from transformers.trainer_callback import PrinterCallback

    with quiet_hf():
        trainer = DPOTrainer(model=policy, ref_model=reference, args=args,
                             train_dataset=train_dataset, processing_class=tokenizer,
                             optimizers=(opt, sched), callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)     # it prints the end-of-training metrics dict
    return trainer


def step_callback(fn: Any, every: int) -> Any:
    """A ``TrainerCallback`` that calls ``fn(step)`` after every ``every``-th optimizer step."""
    from transformers import TrainerCallback

    class _Every(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if every > 0 and state.global_step % every == 0:
                fn(state.global_step)

    return _Every()


# Deprecation notices that transformers 5 raises on TRL 1.x's own calls; nothing a user of this
# package can act on, and pytest turns warnings into errors.
_THIRD_PARTY_NOISE = (
    r"`is_gradient_checkpointing` is deprecated",
    r"`gradient_checkpointing` is deprecated",
)


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """Silence third-party deprecation notices and ``datasets`` progress bars inside the block.

    Only the known TRL/transformers version-skew ``FutureWarning`` messages are filtered;
    everything else still warns.
    """
    with warnings.catch_warnings():
        for msg in _THIRD_PARTY_NOISE:
            warnings.filterwarnings("ignore", message=msg, category=FutureWarning)
        try:
            import datasets

            was_enabled = datasets.is_progress_bar_enabled()
            datasets.disable_progress_bars()
        except ImportError:  # transformers without datasets: nothing to silence
            was_enabled = False
        try:
            yield
        finally:
            if was_enabled:
                import datasets

                datasets.enable_progress_bars()
