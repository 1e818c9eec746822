"""TRL integration: the trained loss equals ours, the gate through ``DPOTrainer(optimizers=)``
and gradient accumulation equals the brute-force per-pair gate, the experiment (smoke preset,
resume, replot) and local Hugging Face directories."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("trl")

from tangentscope import ConfigError
from tangentscope.data import preference_metrics as M
from tangentscope.data import preferences as T
from tangentscope.experiments import dpo as X
from tangentscope.experiments import run_experiment
from tangentscope.experiments._framework import make_config
from tangentscope.integrations import hf as H
from tangentscope.losses import preference as L
from tangentscope.optim import gate_from_sums


@pytest.fixture(scope="module")
def world():
    tok = H.char_tokenizer("abcdxy|", eos_token="$")
    task = T.make_preference_task(tok, list("abcd"), prefix="|", prompt_len=2, response_len=3)
    ref = H.tiny_causal_lm(len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=8,
                           eos_token_id=tok.eos_token_id, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    T.pretrain_reference(ref, task, steps=20, batch_size=32, generator=g)
    ref.requires_grad_(False)
    pairs = T.flip_preferences(T.make_pairs(task, ref, 8, g), 0.25, torch.arange(8))
    return tok, task, ref, pairs


def _fresh(world):
    """(tok, task, ref, pairs) with a reference TRL has not patched (DPOTrainer wraps the
    models' forward in a closure over the original object, so copies must be taken first)."""
    tok, task, ref, pairs = world
    return tok, task, copy.deepcopy(ref), pairs


def _policy(ref, seed=1):
    pol = copy.deepcopy(ref).requires_grad_(True)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in pol.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return pol


def _seq_logp(model, x, y):
    """Differentiable Σ_j log π(y_j | x, y_<j), (n,)."""
    ids = torch.cat([x, y], 1)
    lp = torch.log_softmax(model(input_ids=ids).logits, -1)[:, x.shape[1] - 1:-1]
    return lp.gather(-1, y[..., None]).squeeze(-1).sum(1)


@pytest.mark.parametrize("loss,eps", [("dpo", 0.0), ("cdpo", 0.25), ("rdpo", 0.25)])
def test_trl_trains_exactly_our_loss(world, loss, eps, tmp_path):
    """TRL's loss on a batch = our loss of our margins (EOS cut by max_length; cDPO by weights)."""
    tok, task, ref, pairs = _fresh(world)
    pol = _policy(ref)
    tr = H.dpo_trainer(pol, ref, tok, H.pairs_to_dataset(task, pairs), loss=loss, eps=eps,
                       beta=0.7, batch_size=len(pairs), max_length=task.max_length,
                       output_dir=tmp_path, device="cpu")
    batch = next(iter(tr.get_train_dataloader()))
    assert batch["input_ids"].shape[1] == task.max_length      # TRL's trailing EOS is cut
    with H.quiet_hf(), torch.no_grad():
        pol.eval()
        trl_loss = tr.compute_loss(pol, batch).item()
    ours = L.preference_loss(loss, M.implicit_margins(pol, ref, task, pairs), 0.7, eps)
    assert trl_loss == pytest.approx(ours.mean().item(), rel=1e-5, abs=1e-6)


def test_gate_through_trainer_grad_accumulation_is_the_exact_per_pair_gate(world, tmp_path):
    """One step of GatedAdamW with MicrobatchStats under gradient_accumulation_steps = 4 (one
    pair per microbatch) updates exactly the coordinates the brute-force per-pair gate opens."""
    tok, task, ref, pairs = _fresh(world)
    sub = T.PreferencePairs(*(getattr(pairs, f)[:4] for f in
                              ("prompts", "chosen", "rejected", "reward_chosen",
                               "reward_rejected", "flipped")))
    pol = _policy(ref)
    before = {n: p.detach().clone() for n, p in pol.named_parameters()}
    # brute force: per-pair DPO gradients at the initial parameters
    x = T.prompt_token_ids(task, sub.prompts)
    with torch.no_grad():
        rc, rr = _seq_logp(ref, x, sub.chosen), _seq_logp(ref, x, sub.rejected)
    names = [n for n, _ in pol.named_parameters()]
    S1 = dict.fromkeys(names, 0.0)
    S2 = dict.fromkeys(names, 0.0)
    for i in range(4):
        delta = (_seq_logp(pol, x[i:i + 1], sub.chosen[i:i + 1]) - rc[i]) - (
            _seq_logp(pol, x[i:i + 1], sub.rejected[i:i + 1]) - rr[i])
        grads = torch.autograd.grad(L.dpo_loss(delta, 0.5).sum(), list(pol.parameters()))
        for n, c in zip(names, grads):
            S1[n] = S1[n] + c
            S2[n] = S2[n] + c * c
    tr = H.dpo_trainer(pol, ref, tok, H.pairs_to_dataset(task, sub), beta=0.5,
                       optimizer="gated", lr=1e-3, weight_decay=0.0, epochs=1, batch_size=4,
                       microbatch_size=1, max_length=task.max_length, max_grad_norm=0.0,
                       gate_kwargs={"stats": "microbatch"}, output_dir=tmp_path, device="cpu")
    opt = tr.optimizer              # Trainer wraps it in an AcceleratedOptimizer in train()
    with H.quiet_hf():
        tr.train()
    assert tr.state.global_step == 1 and tr.args.gradient_accumulation_steps == 4
    assert opt.gate_stats()["step"] == 1
    checked = closed = 0
    for n, p in pol.named_parameters():
        gate = gate_from_sums(S1[n], S2[n], 4).bool()
        moved = p.detach() != before[n]
        nu = (4 * S2[n] - S1[n] ** 2) / 3
        clear = ((S1[n] ** 2 - nu).abs() > 1e-3 * (S1[n] ** 2 + nu)) & (S1[n].abs() > 1e-6)
        assert torch.equal(moved[clear], gate[clear]), n
        checked += int(clear.sum())
        closed += int((~gate[clear]).sum())
    assert checked > 1000 and 0 < closed < checked          # the gate did close coordinates


def test_method_names_aliases_and_validation():
    assert X.parse_method("cdpo+gated_exact") == ("cdpo", "gated_exact")
    with pytest.raises(ConfigError, match="LOSS\\+OPTIMIZER"):
        X.parse_method("dpo-adamw")
    cfg = X.Config()
    assert X._canonical(cfg, "rdpo+adamw", 0.0) == "dpo+adamw"
    assert X._canonical(cfg, "rdpo+adamw", 0.2) == "rdpo+adamw"
    assert X._canonical(X.Config(label_smoothing=0.1), "cdpo+adamw", 0.0) == "cdpo+adamw"
    for bad, match in [({"n_pairs": 100}, "multiple of batch_size"),
                       ({"label_smoothing": 0.5, "methods": ("rdpo+adamw",)}, "below 0.5"),
                       ({"noise_rates": (1.0,)}, "noise_rates"),
                       ({"methods": ("dpo+sgd",)}, "OPTIMIZER")]:
        with pytest.raises(ConfigError, match=match):
            X.validate(make_config(X.Config, bad))


def test_accuracy_at_matched_kl_interpolates_along_the_trajectory():
    traj = [(0.0, 0.5), (1.0, 0.7), (3.0, 0.6), (2.0, 0.9)]      # KL need not be monotone
    assert X._acc_at_kl(traj, 0.5) == pytest.approx(0.6)
    assert X._acc_at_kl(traj, 2.0) == pytest.approx(0.65)        # first crossing wins
    assert X._acc_at_kl(traj, 1.0) == pytest.approx(0.7)
    assert X._acc_at_kl(traj, 9.0) == 0.9                         # never that far: final


def test_smoke_preset_runs_resumes_and_replots(tmp_path):
    rd = run_experiment("dpo", preset="smoke", out=tmp_path / "r", quiet=True)
    s = rd.read_summary()
    cells = rd.cells()
    keys = [k for k in cells if not k.startswith("ref-")]
    assert sorted(keys) == sorted(f"seed0-noise0.4-{m}" for m in X.PRESETS["smoke"]["methods"])
    for k in keys:
        f = cells[k]["final"]
        assert 0 <= f["heldout_acc"] <= 1 and f["kl"] > 0 and f["exact"]
        assert cells[k]["steps"] == 3 * 64 // 16
    assert "accuracy" in s["verdict"] and s["table"][0]["heldout_acc"]["n"] == 1
    for c in s["comparisons"]:          # the controls are computed from the logged trajectories
        assert c["acc_gain_points_matched_kl"]["n"] == 1 and c["peak_gain_points"]["n"] == 1
    assert "gain at matched KL" in (rd.path / "table.md").read_text()
    assert (rd.path / "figures" / "dpo_summary.png").stat().st_size > 10_000
    assert (rd.path / "refs" / "seed0.pt").exists()
    gated = [r for r in rd.read_metrics() if r["method"] == "dpo+gated"]
    assert gated[-1]["gate_open"] is not None and 0 < gated[-1]["gate_open"] <= 1
    # resume after losing the last cell: only that cell is recomputed, identically
    lines = (rd.path / "cells.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    (rd.path / "cells.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    rows = rd.read_metrics()
    redo = [r for r in rows if r["cell"] == last["key"]]
    rd2 = run_experiment(None, resume=rd.path, quiet=True, plot=False)
    again = rd2.cells()[last["key"]]["final"]
    assert again["heldout_acc"] == last["result"]["final"]["heldout_acc"]
    assert again["kl"] == pytest.approx(last["result"]["final"]["kl"], rel=1e-6)
    assert len(rd2.read_metrics()) == len(rows) + len(redo)     # nothing else recomputed
    for f in X.plot(rd2):
        f.unlink()
    assert len(X.plot(rd2)) == 2


def test_local_model_directory(tmp_path, world):
    tok, _task, ref, _ = _fresh(world)
    d = tmp_path / "tiny-lm"
    ref.save_pretrained(d)
    tok.save_pretrained(d)
    model, tok2 = H.load_local_causal_lm(d)
    assert tok2("|ab")["input_ids"] == tok("|ab")["input_ids"]
    x = torch.tensor([[6, 0, 1]])
    torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits)
    with pytest.raises(ConfigError, match="save_pretrained"):
        H.load_local_causal_lm(tmp_path / "missing")
    rd = run_experiment("dpo", preset="smoke", out=tmp_path / "run", quiet=True, plot=False,
                        overrides={"model_dir": str(d), "symbols": "abcd", "methods": "dpo+adamw",
                                   "prompt_len": 2, "sft_steps": 5, "epochs": 1})
    (cell,) = [v for k, v in rd.cells().items() if not k.startswith("ref-")]
    assert cell["final"]["exact"] and cell["steps"] == 64 // 16
