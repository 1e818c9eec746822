"""The Hugging Face callback in real ``transformers.Trainer`` and TRL runs (the examples of
docs/integrations.md, run as written), read back from TensorBoard event files; the tiny GPT-2's
pad token and ``vmap``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("tensorboard")

import tangentscope as ts
from doc_examples import run_example
from tangentscope import ConfigError
from tangentscope.integrations import hf as H
from tangentscope.integrations.monitor import ProbeModule, probe_metrics, unwrap_optimizer
from tangentscope.integrations.tensorboard import read_scalars

# torch's notice that vmap falls back to a loop for CPU flash attention (the tests' own eNTKs)
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop because:UserWarning")


def steps(scalars, tag):
    return [s for s, _ in scalars[tag]]


def value(scalars, tag, step):
    return dict(scalars[tag])[step]


def test_trainer_example_logs_gate_poprisk_and_probe_through_tensorboard(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_example("hf-trainer")
    sc = read_scalars("runs/hf")
    # gate and population-risk rows on the trainer's logging_steps (2), probe rows every 4
    for tag in ("train/gate/fraction/0", "train/gate/fraction/1", "train/poprisk/estimate",
                "train/poprisk/change"):
        assert steps(sc, tag) == [2, 4, 6, 8], tag
    for tag in ("train/entk/eig/0", "train/entk/eig/7", "train/channel/residual_fraction",
                "train/entk/effective_rank"):
        assert steps(sc, tag) == [0, 4, 8], tag
    assert steps(sc, "train/entk/motion") == [4, 8]
    assert "train/loss" in sc                        # the trainer's own rows share the writer

    # the gate fraction is the mean of the optimizer's own per-step telemetry since the last log
    hist = {h["step"]: h["fraction_updated"] for h in ns["opt"].gate_history()}
    for g in (0, 1):
        want = np.mean([hist[7][g], hist[8][g]])
        assert value(sc, f"train/gate/fraction/{g}", 8) == pytest.approx(want, rel=1e-5)
        assert 0 <= want <= 1

    # the last probe's top eigenvalue is that of the final model's log-likelihood kernel
    model, ids = ns["model"], ns["ids"]
    with torch.no_grad():
        K = ts.entk(ProbeModule(model.eval(), H.sequence_logprob), ids[:8], dtype=torch.float64)
    lam = torch.linalg.eigvalsh(K.reshape(8, 8))
    assert value(sc, "train/entk/eig/0", 8) == pytest.approx(float(lam[-1]), rel=1e-3)
    assert value(sc, "train/entk/eig/7", 8) == pytest.approx(float(lam[0]), rel=1e-2, abs=1e-3)

    # the estimator anchors at the first batch loss the model returned (its outputs' .loss)
    first_loss = next(r["loss"] for r in ns["trainer"].state.log_history if "loss" in r)
    assert value(sc, "train/poprisk/estimate", 2) == pytest.approx(first_loss, rel=0.05)

    traj = ts.KernelTrajectory.load("runs/hf/tangentscope/trajectory")
    assert traj.steps.tolist() == [0, 4, 8] and traj.n == 8 and traj.p == 1
    assert traj.meta["loss"] == "sequence_nll"
    rows = ts.RunDir.open("runs/hf/tangentscope").read_metrics()
    assert [r["step"] for r in rows if r.get("entk/eig/0") not in (None, "")] == [0, 4, 8]


def test_trl_example_logs_through_the_dpo_trainer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_example("trl")
    sc = read_scalars("runs/dpo")
    assert steps(sc, "train/entk/eig/0") == [0, 2, 4]
    assert steps(sc, "train/gate/fraction/0") == [1, 2, 3, 4]
    assert all(0 <= v <= 1 for _, v in sc["train/gate/fraction/0"])
    assert any(t.startswith("train/rewards/") for t in sc)     # TRL's own rows, same writer


class _LastLogits(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, x):
        return self.lm(input_ids=x).logits[:, -1]


def test_tiny_causal_lm_pad_token_leaves_vmap_working():
    """A pad token in GPT-2's config makes its forward branch on the data (no attention mask):
    vmap, hence the eNTK, fails. tiny_causal_lm keeps it in the generation config only."""
    lm = H.tiny_causal_lm(6, n_embd=8, n_layer=1, n_head=2, n_positions=8, pad_token_id=5,
                          eos_token_id=5, seed=0).eval()
    assert lm.config.pad_token_id is None and lm.generation_config.pad_token_id == 5
    ids = torch.randint(0, 5, (3, 4), generator=torch.Generator().manual_seed(0))
    K = ts.entk(_LastLogits(lm), ids, implementation="jacobian")
    assert K.shape == (3, 3, 6, 6) and torch.isfinite(K).all()

    lm.config.pad_token_id = 5                # what Trainer's token alignment does
    with pytest.raises(ts.UnsupportedModelError):
        ts.entk(_LastLogits(lm), ids, implementation="jacobian")
    out, K = probe_metrics(ProbeModule(lm, H.sequence_logprob), H.causal_lm_probe(ids), topk=3)
    assert K.shape == (3, 3) and out["entk/eig/0"] > 0
    assert lm.config.pad_token_id == 5        # restored


def test_callback_without_trainer_and_bad_probe_say_what_to_do():
    cb = H.TangentscopeCallback(probe=None)
    assert cb.__class__.__module__ == "tangentscope.integrations.hf"
    state = type("S", (), {"is_world_process_zero": True, "global_step": 0, "max_steps": 1})()
    with pytest.raises(ConfigError, match="add_callback"):
        cb.on_train_begin(None, state, None, model=nn.Linear(1, 1))
    with pytest.raises(ts.ShapeError, match="one length"):
        H.causal_lm_probe(torch.ones(5, dtype=torch.long))
    with pytest.raises(ConfigError, match="log_every"):
        H.TangentscopeCallback(log_every=0)


def test_accelerate_wrapper_is_unwrapped():
    from accelerate.optimizer import AcceleratedOptimizer

    opt = ts.GatedAdamW(nn.Linear(2, 1).parameters(), lr=1e-3)
    assert unwrap_optimizer(AcceleratedOptimizer(opt, device_placement=False)) is opt
    plain = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
    assert unwrap_optimizer(plain) is plain and unwrap_optimizer(None) is None
