"""Hugging Face helpers: tiny offline tokenizers and models, local checkpoints, optimizers, and
the ``Trainer`` callback.

Everything here works without network access: tokenizers are built in code from a symbol list,
models from a ``GPT2Config``, and user checkpoints are read with ``local_files_only=True``.
``transformers``/``tokenizers`` are imported inside the functions (the ``hf`` extra)::

    tok = char_tokenizer("abcdefuvwxyz|", eos_token="$")           # one character = one token
    model = tiny_causal_lm(len(tok), eos_token_id=tok.eos_token_id)  # GPT-2 from a config
    opt, sched = trainer_optimizers(model, "gated-streaming", lr=1e-3)  # Trainer(optimizers=...)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, sched))
    trainer.add_callback(TangentscopeCallback(trainer, probe=causal_lm_probe(ids), every=50))

:class:`TangentscopeCallback` (gate telemetry, population-risk estimate, probe eNTK metrics
through ``Trainer.log``) is documented in :mod:`tangentscope.integrations.hf_callback` and in
docs/integrations.md.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from ..data.preferences import PreferencePairs, PreferenceTask
from ..errors import ConfigError, ShapeError
from ..losses.preference import trl_loss_kwargs
from ..optim.spec import OptimizerSpec, build_optimizer, parse_optimizer
from .monitor import Probe

__all__ = ["char_tokenizer", "tiny_causal_lm", "load_local_causal_lm", "hf_optimizer_spec",
           "trainer_optimizers", "decay_parameter_names", "dpo_trainer", "pairs_to_dataset",
           "step_callback", "quiet_hf", "causal_lm_probe", "sequence_logprob", "SequenceNLL"]
# also TangentscopeCallback (module __getattr__ below; not in __all__, so that a star import does
# not import transformers)


def __getattr__(name: str) -> Any:
    # the callback subclasses transformers.TrainerCallback: built (and transformers imported)
    # on first use, so that importing this module stays free of transformers
    if name == "TangentscopeCallback":
        from .hf_callback import callback_class

        return callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        eos_token_id: written into the config and the generation config.
        pad_token_id: written into the generation config only (default ``eos_token_id``):
            with a ``pad_token_id`` in the model config, GPT-2's forward looks for padding in
            ``input_ids`` when no attention mask is given — data-dependent control flow that
            ``torch.func.vmap`` (and so :func:`tangentscope.entk`) cannot trace. A ``Trainer``
            with a tokenizer copies the tokenizer's pad token into the config again;
            :func:`sequence_logprob` (the probes' output) works either way.
        seed: seeds ``torch`` before initialisation (``None``: the current RNG state).

    Returns:
        ``transformers.GPT2LMHeadModel`` in float32, dropout off (``*_pdrop = 0``).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if n_embd % n_head:
        raise ConfigError(f"n_embd={n_embd} must be a multiple of n_head={n_head}")
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd,
                     n_layer=n_layer, n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=eos_token_id, eos_token_id=eos_token_id)
    if seed is not None:
        torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    model.generation_config.pad_token_id = (pad_token_id if pad_token_id is not None
                                            else eos_token_id)
    return model


@contextlib.contextmanager
def _no_padding_check(model: nn.Module) -> Iterator[None]:
    """``config.pad_token_id = None`` inside the block: GPT-2-style models then skip their
    "is there padding in input_ids?" check, a data-dependent branch ``vmap`` cannot trace (the
    probe sequences are unpadded by construction)."""
    config = getattr(model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    if config is None or pad is None:
        yield
        return
    config.pad_token_id = None
    try:
        yield
    finally:
        config.pad_token_id = pad


def sequence_logprob(model: nn.Module, input_ids: Tensor) -> Tensor:
    """``log p(x_2 … x_T | x_1)`` of each sequence under a causal LM, shape ``(n, 1)`` (nats).

    This is the scalar output the probe kernel is taken of: ``K_ij = ∇_w log p(x_i) ·
    ∇_w log p(x_j)``, one number per sequence whatever the vocabulary (the eNTK of the full
    logits would be ``(n T V)²``). The sequences must be unpadded and of equal length.
    """
    with _no_padding_check(model):
        logits = model(input_ids=input_ids).logits
    logp = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return logp.sum(1, keepdim=True)


class SequenceNLL:
    """The output-space loss of :func:`sequence_logprob` outputs: ``Φ = −(1/n) Σ_i u_i`` (the
    mean negative log-likelihood of the probe sequences), ``g = −1/n``, ``B = 0``; targets are
    ignored."""

    name = "sequence_nll"
    reduction: Literal["mean", "sum"] = "mean"

    def value(self, u: Tensor, y: Tensor) -> Tensor:
        return -u.reshape(u.shape[0], -1).sum(1).mean()

    def grad(self, u: Tensor, y: Tensor) -> Tensor:
        u = u.reshape(u.shape[0], -1)
        return torch.full_like(u, -1.0 / u.shape[0])

    def hessian(self, u: Tensor, y: Tensor) -> Tensor:
        u = u.reshape(u.shape[0], -1)
        return torch.zeros(u.shape[0], u.shape[1], u.shape[1], dtype=u.dtype, device=u.device)

    def __repr__(self) -> str:
        return "SequenceNLL()"


def causal_lm_probe(input_ids: Tensor | Sequence[Sequence[int]]) -> Probe:
    """A :class:`~tangentscope.integrations.monitor.Probe` of a causal LM on fixed sequences:
    outputs :func:`sequence_logprob` (``p = 1``), loss :class:`SequenceNLL`.

    Args:
        input_ids: ``(n, T)`` token ids, ``n >= 2``, ``T >= 2``, unpadded (e.g.
            ``tok(texts)["input_ids"]`` of texts of equal token length, or a slice of the
            training set).

    Raises:
        ShapeError: not an ``(n, T)`` integer array with ``n, T >= 2``.
    """
    ids = torch.as_tensor(input_ids)
    if ids.dim() != 2 or ids.shape[0] < 2 or ids.shape[1] < 2 or ids.is_floating_point():
        raise ShapeError(f"causal_lm_probe needs (n, T) integer token ids with n >= 2 sequences "
                         f"of T >= 2 tokens, got shape {tuple(ids.shape)} ({ids.dtype}); "
                         "truncate the probe texts to one length")
    return Probe(ids.long(), None, SequenceNLL(), sequence_logprob)


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


def hf_optimizer_spec(optimizer: str | OptimizerSpec = "adamw", **gate_kwargs: Any
                      ) -> OptimizerSpec:
    """``optimizer`` (an optimizer spec, :mod:`tangentscope.optim.spec`) with ``gate_kwargs``
    set as its keys (``threshold=2, gate_on="grad", stats="microbatch"``, ...); a ``stats``
    source object is left out (pass it to :func:`trainer_optimizers` as ``stats=``).

    Raises:
        ConfigError: a bad name, or gate keys on an optimizer without gate.
    """
    keys = {k: v for k, v in gate_kwargs.items() if not (k == "stats" and
                                                          not isinstance(v, str))}
    spec = parse_optimizer(optimizer)
    return spec.replace(**keys) if keys else spec


def trainer_optimizers(model: nn.Module, optimizer: str | OptimizerSpec = "adamw", *,
                       lr: float = 1e-3, weight_decay: float = 0.0,
                       betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                       **gate_kwargs: Any
                       ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """An ``(optimizer, scheduler)`` pair for ``Trainer``/``DPOTrainer(optimizers=...)``.

    Parameters are grouped like ``Trainer`` does (weight decay on matrices only, see
    :func:`decay_parameter_names`); the scheduler is a constant ``LambdaLR`` (wrap your own for
    warm-up/decay). Create it after moving the model to its device.

    Args:
        model: the policy being trained.
        optimizer: an optimizer spec, e.g. ``"adamw"`` (``torch.optim.AdamW``),
            ``"gated-streaming"`` (``tangentscope.optim.GatedAdamW`` with streaming
            statistics) or ``"gated@stats=microbatch"`` (each microbatch of a
            ``gradient_accumulation_steps`` cycle is one leave-one-out contribution: one pair
            per microbatch = the exact per-example gate).
        lr, weight_decay, betas, eps: AdamW hyper-parameters (identical for every spec).
        **gate_kwargs: keys of the spec (e.g. ``threshold=``, ``gate_on=``, ``stats=``), as in
            :func:`hf_optimizer_spec`; ``stats=`` may also be a ``StatsSource`` object (with a
            spec whose statistics are exact).

    Raises:
        ConfigError: unknown optimizer name, or gate options given to plain AdamW.
    """
    spec = hf_optimizer_spec(optimizer, **gate_kwargs)
    source = gate_kwargs.get("stats")
    decay = decay_parameter_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kw: dict[str, Any] = {} if spec.rule == "sgd" else {"betas": betas, "eps": eps}
    built = build_optimizer(spec, groups, lr=lr, **kw, model=model,
                            stats=None if isinstance(source, str) else source)
    if built.grad_filter is not None:
        raise ConfigError(f"{spec}: a Trainer runs optimizer.step() only, so a gradient filter "
                          "(grokfast) would never run; drop @grokfast")
    opt = built.optimizer
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def dpo_trainer(policy: nn.Module, reference: nn.Module, tokenizer: Any, train_dataset: Any, *,
                loss: str = "dpo", eps: float = 0.0, beta: float = 0.1,
                optimizer: str | OptimizerSpec = "adamw", lr: float = 1e-3,
                weight_decay: float = 0.0,
                epochs: float = 1.0, batch_size: int = 16, microbatch_size: int | None = None,
                max_length: int | None = None, max_grad_norm: float = 1.0, seed: int = 0,
                output_dir: str | os.PathLike | None = None, callbacks: Sequence[Any] = (),
                gate_kwargs: dict[str, Any] | None = None, device: str | None = None,
                bf16: bool = False, report_to: str | Sequence[str] = "none",
                logging_steps: int | None = None) -> Any:
    """A TRL ``DPOTrainer`` wired with a tangentscope optimizer through ``optimizers=``.

    Args:
        policy, reference: the model to train and the frozen reference (a separate copy: TRL
            would otherwise try to reload the policy from the Hub by name).
        tokenizer: the tokenizer (``processing_class``).
        train_dataset: ``datasets.Dataset`` with ``prompt``/``chosen``/``rejected`` strings.
        loss, eps: ``"dpo"``, ``"cdpo"`` or ``"rdpo"`` with label smoothing / flip rate ``ε``
            (see :func:`tangentscope.losses.preference.trl_loss_kwargs`).
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
        report_to: the trainer's loggers (``"tensorboard"``, ``"wandb"``, a list; default
            none), e.g. for a :class:`TangentscopeCallback`.
        logging_steps: log every this many steps (``None``: no periodic logging).

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

    mb = batch_size if microbatch_size is None else microbatch_size
    if mb < 1 or batch_size % mb:
        raise ConfigError(f"batch_size={batch_size} must be a multiple of microbatch_size={mb}")
    accum = batch_size // mb
    gate_kwargs = dict(gate_kwargs or {})
    if hf_optimizer_spec(optimizer, **gate_kwargs).stats == "microbatch" and accum < 2:
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
    extra: dict[str, Any] = {ckpt: False, **trl_loss_kwargs(loss, eps)}
    args = DPOConfig(
        output_dir=str(output_dir or tempfile.mkdtemp(prefix="tangentscope-dpo-")),
        per_device_train_batch_size=mb, gradient_accumulation_steps=accum,
        num_train_epochs=epochs, learning_rate=lr, weight_decay=weight_decay,
        lr_scheduler_type="constant", max_grad_norm=max_grad_norm, beta=beta,
        max_length=max_length, seed=seed, data_seed=seed, dataloader_drop_last=True,
        bf16=bf16, report_to=report_to if isinstance(report_to, str) else list(report_to),
        save_strategy="no", logging_strategy="no" if logging_steps is None else "steps",
        logging_steps=logging_steps or 500,
        disable_tqdm=True, use_cpu=device == "cpu", **extra)
    from transformers.trainer_callback import PrinterCallback

    with quiet_hf():
        trainer = DPOTrainer(model=policy, ref_model=cast(Any, reference), args=args,
                             train_dataset=train_dataset, processing_class=tokenizer,
                             optimizers=(opt, sched), callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)     # it prints the end-of-training metrics dict
    return trainer


def pairs_to_dataset(task: PreferenceTask, pairs: PreferencePairs) -> Any:
    """A ``datasets.Dataset`` with ``prompt``/``chosen``/``rejected`` strings for TRL.

    Strings are concatenations of the symbol strings (``tokenizer.decode`` would insert
    spaces for some tokenizers); :func:`~tangentscope.data.preferences.make_preference_task`
    checked that they tokenize back exactly.
    """
    import datasets

    sym = dict(zip(task.symbol_ids, task.symbols))

    def text(ids: Tensor) -> list[str]:
        try:
            return ["".join(sym[t] for t in row) for row in ids.tolist()]
        except KeyError as e:
            raise ConfigError(f"response token {e} is not a task symbol; pairs must be made "
                              "of task symbols (make_pairs samples them that way)") from None

    prompts = [task.prefix + "".join(task.symbols[i] for i in row)
               for row in pairs.prompts.tolist()]
    return datasets.Dataset.from_dict({"prompt": prompts, "chosen": text(pairs.chosen),
                                       "rejected": text(pairs.rejected)})


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
