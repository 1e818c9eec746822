"""DPO under noisy preferences: the population-risk gate against AdamW, cDPO and rDPO.

The claim (preprint abstract, seed 004): the gate "improves DPO fine-tuning under noisy
preferences while staying 3x closer to the reference policy" (summaries: +13–16% accuracy,
Qwen 0.5B). Here: TRL's ``DPOTrainer`` with the optimizer passed through ``optimizers=``, a
GPT-2-style policy built from a config and pretrained locally (or any local Hugging Face
causal-LM directory, ``--model_dir``), a synthetic task with a known reward
(:mod:`tangentscope.data.preferences`), labels flipped at each rate in ``noise_rates``.

Cells are ``seed × noise rate × method``; a method is ``LOSS+OPTIMIZER`` with LOSS in
``dpo``/``cdpo``/``rdpo`` and OPTIMIZER a label of :data:`METHOD_OPTIMIZERS` (the labels of the
recorded cells; each is an optimizer spec of :mod:`tangentscope.optim.spec`): ``adamw``,
``gated`` (``gated-streaming``: ``GatedAdamW`` with streaming statistics, one extra state vector)
or ``gated_exact`` (``gated@stats=microbatch``: per-pair statistics from
``gradient_accumulation_steps`` microbatches of one pair, the exact leave-one-out gate).
Per seed the reference (SFT) and all pairs are made once and stored under ``refs/``.

    tangentscope run dpo --preset smoke          # CI-sized (~20 s)
    tangentscope run dpo --preset full           # the CPU table of docs/dpo.md
    tangentscope run dpo --preset gpu            # the larger GPU version (workers share a GPU)
    tangentscope run dpo --model_dir PATH        # a local HF causal LM (no network)
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .._durable import atomic_write_torch, read_torch
from ..data.preference_metrics import PreferenceEvaluator
from ..data.preferences import (
    PreferencePairs,
    flip_preferences,
    make_pairs,
    make_preference_task,
    preference_task_from_letters,
    pretrain_reference,
    sample_prompts,
)
from ..errors import ConfigError
from ..integrations import hf as H
from ..io import RunDir
from ..optim.spec import parse_optimizer
from ..viz.dpo import dpo_figures
from ._framework import Experiment, seed_stats
from ._harness import check_nonnegative, check_positive, load_checkpoint, progress, run_jobs

LOSS_NAMES = ("dpo", "cdpo", "rdpo")
#: Method optimizer label → optimizer spec; the gated ones also take ``threshold``/``gate_on``.
METHOD_OPTIMIZERS: dict[str, str] = {"adamw": "adamw", "gated": "gated-streaming",
                                     "gated_exact": "gated@stats=microbatch"}
OPTIMIZER_NAMES = tuple(METHOD_OPTIMIZERS)
METRICS = ("heldout_acc", "train_acc", "train_acc_clean", "flipped_fit", "kl", "nontask_mass",
           "reward")


@dataclasses.dataclass(frozen=True)
class Config:
    """DPO-under-noise experiment (defaults = the CPU ``full`` preset).

    Task: prompts ``prefix + prompt_len`` symbols, responses ``response_len`` symbols; reward =
    number of response symbols equal to the prompt's first symbol. ``nontask_symbols`` are
    tokens in the vocabulary that never occur in the task.

    Attributes:
        n_seeds: number of seeds (each its own SFT reference, pairs and flip order).
        noise_rates: preference flip rates swept, each in [0, 1) (exact fraction of pairs).
        methods: LOSS+OPTIMIZER cells, LOSS in dpo/cdpo/rdpo and OPTIMIZER in adamw, gated
            (streaming statistics), gated_exact (one pair per microbatch).
        symbols: the task alphabet (single characters).
        nontask_symbols: extra vocabulary characters the task never uses (their probability
            mass is a metric).
        prefix: the character that starts every prompt.
        prompt_len: prompt symbols after the prefix.
        response_len: response symbols (the reward counts matches with the first prompt symbol).
        n_pairs: training preference pairs (a multiple of batch_size, at least two batches).
        n_heldout: held-out clean pairs for the preference accuracy.
        n_eval_prompts: prompts on which KL, non-task mass and reward of the policy are measured.
        n_embd: width of the tiny GPT-2 policy/reference.
        n_layer: transformer blocks of the tiny GPT-2.
        n_head: attention heads of the tiny GPT-2.
        sft_steps: AdamW steps of the supervised pretraining that makes the reference.
        sft_batch: sequences per supervised pretraining step.
        sft_lr: learning rate of the supervised pretraining.
        beta: DPO's β (scale of the implicit reward β log π/π_ref).
        lr: learning rate of the preference optimization.
        weight_decay: decoupled weight decay of the preference optimizer.
        epochs: passes over the training pairs.
        batch_size: pairs per optimizer step.
        max_grad_norm: gradient-norm clipping of the trainer (0 = off).
        threshold: the gate's τ for the gated methods (1 = the leave-one-out rule).
        gate_on: where the gate multiplies: the Adam update, the gradient entering the moments,
            or the moment increments (docs/gate.md).
        device: auto (a GPU when visible), cpu or cuda.
        bf16: bf16 autocast in the trainer (GPU).
    """

    seed: int = 0                      # first seed; seeds are seed .. seed + n_seeds - 1
    n_seeds: int = 3
    noise_rates: tuple[float, ...] = (0.0, 0.2, 0.4)
    methods: tuple[str, ...] = ("dpo+adamw", "dpo+gated", "dpo+gated_exact", "cdpo+adamw",
                                "rdpo+adamw")
    label_smoothing: float | None = None   # ε of cdpo/rdpo; None = the true flip rate (oracle)
    # task
    symbols: str = "abcdef"
    nontask_symbols: str = "uvwxyz"
    prefix: str = "|"
    prompt_len: int = 4
    response_len: int = 3
    n_pairs: int = 320
    n_heldout: int = 500
    n_eval_prompts: int = 24
    # policy and reference
    model_dir: str | None = None       # local HF causal LM (+ tokenizer) instead of tiny GPT-2
    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 4
    sft_steps: int = 300
    sft_batch: int = 64
    sft_lr: float = 3e-3
    # DPO
    beta: float = 0.5
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 40
    batch_size: int = 16
    max_grad_norm: float = 1.0
    # the gate
    threshold: float = 1.0
    gate_on: Literal["update", "grad", "moments"] = "update"
    # evaluation and execution
    n_evals: int = 8                   # evaluations during training (plus step 0)
    samples: int = 16                  # responses per prompt when V^L is too large to enumerate
    workers: int = 1                   # parallel cells (processes; they share one GPU)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = False

    def __post_init__(self) -> None:
        validate(self)


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(n_seeds=1, noise_rates=(0.4,), methods=("dpo+adamw", "dpo+gated", "cdpo+adamw"),
                  n_pairs=64, n_heldout=64, n_eval_prompts=4, n_embd=32, n_head=2, sft_steps=40,
                  epochs=3, n_evals=2),
    "full": {},
    "gpu": dict(n_seeds=5, n_pairs=512, n_heldout=1000, n_eval_prompts=48, n_embd=256,
                n_layer=4, sft_steps=600, epochs=25, workers=14, device="cuda"),
}


# -- config -------------------------------------------------------------------------------------
def parse_method(method: str) -> tuple[str, str]:
    """``"cdpo+adamw"`` → ``("cdpo", "adamw")``.

    Raises:
        ConfigError: not ``LOSS+OPTIMIZER`` with known names.
    """
    loss, _, opt = method.partition("+")
    if loss not in LOSS_NAMES or opt not in OPTIMIZER_NAMES:
        raise ConfigError(f"method {method!r} must be LOSS+OPTIMIZER with LOSS in {LOSS_NAMES} "
                          f"and OPTIMIZER in {OPTIMIZER_NAMES}, e.g. 'dpo+gated'")
    return loss, opt


def _eps(cfg: Config, loss: str, noise: float) -> float:
    if loss == "dpo":
        return 0.0
    return noise if cfg.label_smoothing is None else cfg.label_smoothing


def _canonical(cfg: Config, method: str, noise: float) -> str:
    """cDPO/rDPO with ε = 0 are DPO: such cells reuse the ``dpo+OPT`` cell."""
    loss, opt = parse_method(method)
    return f"dpo+{opt}" if loss != "dpo" and _eps(cfg, loss, noise) == 0.0 else method


def validate(cfg: Config) -> None:
    """Check the config before any work (raises :class:`ConfigError` naming the fix)."""
    check_positive(cfg, "lr", "sft_lr", "beta", "batch_size", "n_pairs", "n_heldout",
                   "n_eval_prompts", "prompt_len", "response_len", "n_embd", "n_layer", "n_head",
                   "sft_steps", "sft_batch", "epochs", "samples")
    check_nonnegative(cfg, "weight_decay", "max_grad_norm", "threshold")
    if not cfg.noise_rates or any(not 0.0 <= r < 1.0 for r in cfg.noise_rates):
        raise ConfigError(f"--noise_rates must be in [0, 1), got {cfg.noise_rates}")
    if not cfg.methods:
        raise ConfigError("--methods is empty; e.g. --methods dpo+adamw,dpo+gated")
    for m in cfg.methods:
        loss, _ = parse_method(m)
        for rho in cfg.noise_rates:
            eps = _eps(cfg, loss, rho)
            if loss != "dpo" and not 0.0 <= eps < 0.5:
                raise ConfigError(f"{m} at noise {rho} needs ε in [0, 0.5), got {eps}; set "
                                  "--label_smoothing to a value below 0.5")
    if cfg.n_seeds < 1 or cfg.workers < 1 or cfg.n_evals < 1:
        raise ConfigError("n_seeds, workers and n_evals must be >= 1")
    if cfg.n_pairs % cfg.batch_size or cfg.n_pairs < 2 * cfg.batch_size:
        raise ConfigError(f"n_pairs={cfg.n_pairs} must be a multiple of batch_size="
                          f"{cfg.batch_size} (and >= 2 batches) so every method takes the same "
                          "steps on full batches")
    if any("gated_exact" in m for m in cfg.methods) and cfg.batch_size < 2:
        raise ConfigError("gated_exact needs batch_size >= 2 (one pair per microbatch)")
    if cfg.model_dir is None:
        chars = cfg.symbols + cfg.nontask_symbols + cfg.prefix
        if len(set(chars)) != len(chars) or "$" in chars:
            raise ConfigError("symbols, nontask_symbols and prefix must be distinct single "
                              "characters other than '$' (the EOS token)")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no GPU is visible; use --device cpu")


def _device(cfg: Config) -> str:
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def _seeds(cfg: Config) -> list[int]:
    return list(range(cfg.seed, cfg.seed + cfg.n_seeds))


# -- building blocks (library calls) ------------------------------------------------------------
def _tokenizer_and_task(cfg: Config) -> tuple[Any, Any]:
    if cfg.model_dir is not None:
        from transformers import AutoTokenizer

        with H.quiet_hf():
            tok = AutoTokenizer.from_pretrained(cfg.model_dir, local_files_only=True)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        task = preference_task_from_letters(tok, cfg.symbols, prefix=cfg.prefix,
                                            prompt_len=cfg.prompt_len,
                                            response_len=cfg.response_len)
    else:
        tok = H.char_tokenizer(cfg.symbols + cfg.nontask_symbols + cfg.prefix, eos_token="$")
        task = make_preference_task(tok, list(cfg.symbols), prefix=cfg.prefix,
                                    prompt_len=cfg.prompt_len, response_len=cfg.response_len)
    return tok, task


def _new_model(cfg: Config, tok: Any, task: Any, seed: int) -> torch.nn.Module:
    if cfg.model_dir is not None:
        return H.load_local_causal_lm(cfg.model_dir)[0]
    return H.tiny_causal_lm(len(tok), n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                            n_positions=task.max_length + 1, eos_token_id=tok.eos_token_id,
                            seed=seed)


def _bundle_path(run_path: Path, seed: int) -> Path:
    return run_path / "refs" / f"seed{seed}.pt"


_BUNDLE_REDO = "the seed's reference and pairs are made again"


def _make_bundle(cfg: Config, seed: int, run_path: str) -> dict[str, Any]:
    """SFT reference + clean pairs + held-out pairs + eval prompts + flip order for one seed."""
    _init_process(cfg)
    tok, task = _tokenizer_and_task(cfg)
    model = _new_model(cfg, tok, task, seed).to(_device(cfg))
    g = torch.Generator().manual_seed(1_000_003 * seed + 17)
    sft = pretrain_reference(model, task, steps=cfg.sft_steps, batch_size=cfg.sft_batch,
                             lr=cfg.sft_lr, generator=g)
    train = make_pairs(task, model, cfg.n_pairs, g)
    heldout = make_pairs(task, model, cfg.n_heldout, g)
    bundle = {"state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
              "train": dataclasses.asdict(train), "heldout": dataclasses.asdict(heldout),
              "prompts": sample_prompts(task, cfg.n_eval_prompts, g),
              "order": torch.randperm(cfg.n_pairs, generator=g),
              "sft_loss": float(np.mean(sft[-10:]))}
    path = _bundle_path(Path(run_path), seed)
    path.parent.mkdir(exist_ok=True)
    atomic_write_torch(path, bundle)
    return {"seed": seed, "sft_loss": bundle["sft_loss"]}


def _init_process(cfg: Config) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if cfg.workers > 1:
        torch.set_num_threads(1)


def run_cell(cfg: Config, seed: int, noise: float, method: str, run_path: str) -> dict[str, Any]:
    """Train one (seed, noise, method) cell from the seed's bundle; return its rows and finals."""
    _init_process(cfg)
    t0 = time.perf_counter()
    dev = _device(cfg)
    tok, task = _tokenizer_and_task(cfg)
    b = read_torch(_bundle_path(Path(run_path), seed), fix=f"--resume the run: {_BUNDLE_REDO}")
    reference = _new_model(cfg, tok, task, seed)
    reference.load_state_dict(b["state_dict"])
    reference.to(dev).eval().requires_grad_(False)
    policy = copy.deepcopy(reference).requires_grad_(True)
    pairs = flip_preferences(PreferencePairs(**b["train"]), noise, b["order"])
    evaluator = PreferenceEvaluator(task, reference, pairs, PreferencePairs(**b["heldout"]),
                                    b["prompts"], samples=cfg.samples, seed=seed)
    loss, opt_name = parse_method(method)
    spec = parse_optimizer(METHOD_OPTIMIZERS[opt_name])
    if spec.rule == "gated-adamw":
        spec = spec.replace(threshold=cfg.threshold, gate_on=cfg.gate_on)
    microbatch = 1 if spec.stats == "microbatch" else None     # one pair per microbatch
    trainer = H.dpo_trainer(
        policy, reference, tok, H.pairs_to_dataset(task, pairs), loss=loss,
        eps=_eps(cfg, loss, noise), beta=cfg.beta, optimizer=spec, lr=cfg.lr,
        weight_decay=cfg.weight_decay, epochs=cfg.epochs, batch_size=cfg.batch_size,
        microbatch_size=microbatch, max_length=task.max_length, max_grad_norm=cfg.max_grad_norm,
        seed=seed, device=dev, bf16=cfg.bf16)
    opt = trainer.optimizer
    total = cfg.epochs * (cfg.n_pairs // cfg.batch_size)
    every = max(1, total // cfg.n_evals)
    rows: list[dict[str, Any]] = []

    def evaluate(step: int) -> None:
        row = {"step": step, **evaluator(policy)}
        if hasattr(opt, "gate_history"):
            hist = [h["fraction_updated"] for h in opt.gate_history() if not h["skipped"]]
            numel = opt.gate_stats()["numel"]
            if hist and numel:
                w = np.asarray([n or 0 for n in numel], float)
                row["gate_open"] = float(np.mean([np.dot(np.nan_to_num(np.asarray(
                    f, float)), w) / w.sum() for f in hist]))
        rows.append(row)

    evaluate(0)
    trainer.add_callback(H.step_callback(evaluate, every))
    with H.quiet_hf():
        trainer.train()
    steps = trainer.state.global_step
    if rows[-1]["step"] != steps:
        evaluate(steps)
    final = dict(rows[-1])
    final["heldout_acc_peak"] = max(r["heldout_acc"] for r in rows)
    final["exact"] = evaluator.exact
    return {"seed": seed, "noise": noise, "method": method, "rows": rows, "final": final,
            "steps": steps, "wall_seconds": time.perf_counter() - t0, "device": dev}


# -- run ----------------------------------------------------------------------------------------
def _cell_key(seed: int, noise: float, method: str) -> str:
    return f"seed{seed}-noise{noise:g}-{method}"


def _call(job: tuple[Any, tuple], device: str) -> Any:
    """A pool job ``(fn, args)`` → ``fn(*args)`` (each cell picks its own device)."""
    fn, args = job
    return fn(*args)


def _map(cfg: Config, fn: Any, jobs: list[tuple], desc: str) -> Iterator[Any]:
    """Yield ``fn(*job)`` results as they finish (the job pool's processes when
    ``workers > 1``; a job that failed in a worker raises here with its traceback)."""
    workers = cfg.workers if len(jobs) > 1 else 1
    for _, res in progress(run_jobs(_call, [(fn, job) for job in jobs], workers=workers),
                           desc=desc, total=len(jobs)):
        if workers > 1 and isinstance(res, str):
            raise RuntimeError(f"a dpo job failed in a worker process:\n{res}")
        yield res


def run(cfg: Config, rd: RunDir) -> dict[str, Any]:
    _init_process(dataclasses.replace(cfg, workers=1))
    _tokenizer_and_task(cfg)       # fail fast on tokenizer / symbol problems
    done = rd.cells()
    seeds = _seeds(cfg)
    # a damaged bundle (a crash mid-write of an older version) is set aside and made again
    need = [(cfg, s, str(rd.path)) for s in seeds
            if load_checkpoint(_bundle_path(rd.path, s), redo=_BUNDLE_REDO) is None]
    for info in _map(cfg, _make_bundle, need, "dpo: SFT references"):
        rd.save_cell(f"ref-seed{info['seed']}", info)
    jobs, aliases, queued = [], [], set()
    for s in seeds:
        for rho in cfg.noise_rates:
            for m in cfg.methods:
                canon = _canonical(cfg, m, rho)
                key, ckey = _cell_key(s, rho, m), _cell_key(s, rho, canon)
                if ckey != key and key not in done:
                    aliases.append((key, ckey))
                if ckey in done or ckey in queued:
                    continue
                queued.add(ckey)
                jobs.append((cfg, s, rho, canon, str(rd.path)))
    jobs.sort(key=lambda j: "gated_exact" not in j[3])     # slowest first: better packing
    for res in _map(cfg, run_cell, jobs, "dpo: cells"):
        key = _cell_key(res["seed"], res["noise"], res["method"])
        for r in res["rows"]:
            rd.log(cell=key, seed=res["seed"], noise=res["noise"], method=res["method"],
                   **{k: r.get(k) for k in ("step", *METRICS, "gate_open")})
        rd.save_cell(key, {k: v for k, v in res.items() if k != "rows"})
        done[key] = res
    done = rd.cells()
    for key, canon in aliases:
        if key not in done:
            rd.save_cell(key, {**done[canon], "alias_of": canon})
    return summarize(cfg, rd)


# -- summary ------------------------------------------------------------------------------------
def _finals(cfg: Config, cells: Mapping[str, Any], method: str, noise: float
            ) -> dict[int, dict[str, Any]]:
    out = {}
    for s in _seeds(cfg):
        c = cells.get(_cell_key(s, noise, method))
        if c is not None:
            out[s] = c["final"]
    return out


def _paired(cfg: Config, cells: Mapping[str, Any], a: str, b: str, noise: float, metric: str,
            op: Any) -> list[float]:
    fa, fb = _finals(cfg, cells, a, noise), _finals(cfg, cells, b, noise)
    return [op(fa[s][metric], fb[s][metric]) for s in sorted(fa.keys() & fb.keys())]


def _acc_at_kl(traj: list[tuple[float, float]], kl: float) -> float:
    """Held-out accuracy where a ``[(kl, acc), ...]`` trajectory (in step order) first reaches
    ``kl`` (linear in KL between evaluations; the final accuracy if it never gets that far)."""
    for (k0, a0), (k1, a1) in zip(traj, traj[1:]):
        if k0 <= kl <= k1:
            return a0 if k1 == k0 else a0 + (a1 - a0) * (kl - k0) / (k1 - k0)
    return traj[-1][1]


def _matched_kl_gain(cfg: Config, cells: Mapping[str, Any], rows: list[dict[str, Any]],
                     method: str, base: str, noise: float) -> list[float]:
    """Per seed: method's final held-out accuracy minus the baseline's at the same KL(π‖π_ref)
    along the baseline's trajectory (early-stopping the baseline at the method's KL), in points."""
    by_cell: dict[str, list[tuple[float, float]]] = {}
    for r in sorted(rows, key=lambda r: r["step"]):
        if r.get("kl") is not None and r.get("heldout_acc") is not None:
            by_cell.setdefault(r["cell"], []).append((r["kl"], r["heldout_acc"]))
    out = []
    for s in _seeds(cfg):
        fm, cb = cells.get(_cell_key(s, noise, method)), cells.get(_cell_key(s, noise, base))
        if fm is None or cb is None:
            continue
        traj = by_cell.get(cb.get("alias_of", _cell_key(s, noise, base)))
        if traj:
            out.append(100 * (fm["final"]["heldout_acc"] - _acc_at_kl(traj, fm["final"]["kl"])))
    return out


def summarize(cfg: Config, rd: RunDir) -> dict[str, Any]:
    """Median/spread table over seeds and the two claims' comparisons (paired by seed).

    Besides the final accuracy gain and KL ratio, each comparison carries two controls for "the
    gate only moves less": the gain over the baseline early-stopped at the method's KL
    (``acc_gain_points_matched_kl``) and the gain of peak over peak held-out accuracy during
    training (``peak_gain_points``, oracle early stopping for both).
    """
    cells = rd.cells()
    rows = rd.read_metrics()
    table = []
    for rho in cfg.noise_rates:
        for m in cfg.methods:
            fin = _finals(cfg, cells, m, rho)
            row: dict[str, Any] = {"noise": rho, "method": m, "seeds": sorted(fin)}
            for k in (*METRICS, "heldout_acc_peak"):
                row[k] = seed_stats([f.get(k) for f in fin.values()])
            table.append(row)
    claims: list[dict[str, Any]] = []
    gated = [m for m in cfg.methods if parse_method(m)[1] != "adamw"]
    baselines = [m for m in cfg.methods if parse_method(m)[1] == "adamw"]
    for rho in cfg.noise_rates:
        for g in gated:
            for base in baselines:
                gain = _paired(cfg, cells, g, base, rho, "heldout_acc", lambda x, y: 100 * (x - y))
                ratio = _paired(cfg, cells, base, g, rho, "kl",
                                lambda x, y: x / y if y > 0 else math.inf)
                if gain:
                    peak = _paired(cfg, cells, g, base, rho, "heldout_acc_peak",
                                   lambda x, y: 100 * (x - y))
                    claims.append({"noise": rho, "method": g, "vs": base,
                                   "acc_gain_points": seed_stats(gain),
                                   "kl_ratio_base_over_method": seed_stats(ratio),
                                   "acc_gain_points_matched_kl": seed_stats(
                                       _matched_kl_gain(cfg, cells, rows, g, base, rho)),
                                   "peak_gain_points": seed_stats(peak)})
    summary: dict[str, Any] = {"table": table, "comparisons": claims, "verdict": _verdict(claims),
                               "reference": {k: v for k, v in cells.items()
                                             if k.startswith("ref-")}}
    for c in claims:
        if c["vs"] == "dpo+adamw" and c["noise"] > 0:
            tag = f"{c['method']}@{c['noise']:g}"
            summary[f"acc_gain_pts[{tag}]"] = c["acc_gain_points"]["median"]
            summary[f"kl_ratio[{tag}]"] = c["kl_ratio_base_over_method"]["median"]
            summary[f"acc_gain_matched_kl_pts[{tag}]"] = c["acc_gain_points_matched_kl"]["median"]
    rd.save_arrays(**_arrays(cfg, cells))
    rd.write_text("table.md", table_markdown(summary))
    return summary


def table_markdown(summary: Mapping[str, Any]) -> str:
    """The summary table as Markdown: median [min–max] over seeds per (noise, method)."""
    cols = [("heldout_acc", "held-out acc", 3), ("flipped_fit", "flips fitted", 2),
            ("train_acc", "train acc (noisy)", 2), ("kl", "KL(π‖π_ref)", 2),
            ("nontask_mass", "non-task mass", 3), ("reward", "E_π r*", 2)]
    lines = ["| flip rate | method | seeds | " + " | ".join(c[1] for c in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for row in summary["table"]:
        cells = []
        for key, _, nd in cols:
            q = row[key]
            cells.append("–" if q["n"] == 0 or math.isnan(q["median"]) else
                         f"{q['median']:.{nd}f} [{q['min']:.{nd}f}–{q['max']:.{nd}f}]")
        lines.append(f"| {row['noise']:g} | {row['method']} | {len(row['seeds'])} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Paired by seed, against each AdamW baseline (gain in points; KL ratio = "
              "baseline KL / method KL; at matched KL = against the baseline early-stopped at "
              "the method's final KL; peak = best held-out accuracy during training, both "
              "sides): median [min–max]", "",
              "| flip rate | method | vs | acc gain (points) | KL ratio | gain at matched KL "
              "| peak gain |", "|---|---|---|---|---|---|---|"]

    def pts(q: Mapping[str, float] | None) -> str:
        if not q or q["n"] == 0:
            return "–"
        return f"{q['median']:+.1f} [{q['min']:+.1f}–{q['max']:+.1f}]"

    for c in summary["comparisons"]:
        k = c["kl_ratio_base_over_method"]
        lines.append(f"| {c['noise']:g} | {c['method']} | {c['vs']} | {pts(c['acc_gain_points'])}"
                     f" | {k['median']:.2f} [{k['min']:.2f}–{k['max']:.2f}] | "
                     f"{pts(c.get('acc_gain_points_matched_kl'))} | "
                     f"{pts(c.get('peak_gain_points'))} |")
    return "\n".join(lines) + "\n"


def _verdict(claims: list[dict[str, Any]]) -> dict[str, str]:
    """Plain-language verdicts on the two claims, against ``dpo+adamw`` at noise > 0."""
    rel = [c for c in claims if c["vs"] == "dpo+adamw" and c["noise"] > 0]
    if not rel:
        return {"accuracy": "not measured", "kl": "not measured"}

    def fmt(c: dict[str, Any], key: str, unit: str) -> str:
        q = c[key]
        return (f"{c['method']} at noise {c['noise']:g}: {q['median']:+.1f}{unit} "
                f"(range {q['min']:+.1f}..{q['max']:+.1f}, {q['n']} seeds)")

    best = max(rel, key=lambda c: c["acc_gain_points"]["median"])
    acc = best["acc_gain_points"]
    if acc["median"] >= 13 and acc["min"] > 0:
        a = "reproduced"
    elif acc["min"] > 0:
        a = "partly reproduced (gain on every seed, below +13 points)"
    else:
        a = "not reproduced"
    closest = max(rel, key=lambda c: c["kl_ratio_base_over_method"]["median"])
    kr = closest["kl_ratio_base_over_method"]
    k = ("reproduced" if kr["median"] >= 3 and kr["min"] > 1 else
         "partly reproduced (closer on every seed, less than 3x)" if kr["min"] > 1 else
         "not reproduced")
    return {"accuracy": f"{a}; best: {fmt(best, 'acc_gain_points', ' points')}",
            "kl": (f"{k}; best: {closest['method']} at noise {closest['noise']:g}: AdamW's KL / "
                   f"gated KL = {kr['median']:.2f}x (range {kr['min']:.2f}..{kr['max']:.2f})")}


def _arrays(cfg: Config, cells: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``final_<metric>[noise, method, seed]`` (NaN where missing)."""
    seeds = _seeds(cfg)
    out = {}
    for k in (*METRICS, "heldout_acc_peak"):
        a = np.full((len(cfg.noise_rates), len(cfg.methods), len(seeds)), np.nan)
        for i, rho in enumerate(cfg.noise_rates):
            for j, m in enumerate(cfg.methods):
                for s, f in _finals(cfg, cells, m, rho).items():
                    a[i, j, seeds.index(s)] = np.nan if f.get(k) is None else f[k]
        out[f"final_{k}"] = a
    out["noise_rates"] = np.asarray(cfg.noise_rates, float)
    return out


# -- figures --------------------------------------------------------------------------------------
def plot(rd: RunDir) -> list[Path]:
    """Figures from the run directory: accuracy/KL/displacement vs noise, and trajectories."""
    return dpo_figures(rd)


EXPERIMENT = Experiment(
    "dpo", Config, run, plot, presets=PRESETS,
    description="DPO under noisy preferences: gated AdamW vs AdamW, cDPO, rDPO (TRL)")
