"""The Lightning callback in a real ``lightning.Trainer`` run (the example of
docs/integrations.md, run as written): TensorBoard event files and the CSV logger read back,
gradient accumulation, the recorded trajectory."""

from __future__ import annotations

import copy
import csv

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("lightning")
pytest.importorskip("tensorboard")

import lightning as L

import tangentscope as ts
from doc_examples import run_example
from tangentscope.integrations.lightning import TangentscopeCallback
from tangentscope.integrations.monitor import Probe
from tangentscope.integrations.tensorboard import read_scalars

# version skew between lightning 2.6 and torch 2.13's pytree, and Lightning's advice on workers
pytestmark = [
    pytest.mark.filterwarnings("ignore:`isinstance.treespec, LeafSpec.. is deprecated"
                               ":FutureWarning"),
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
]


def test_lightning_example_logs_to_every_logger(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_example("lightning")
    sc = read_scalars("runs/lightning")
    assert [s for s, _ in sc["entk/eig/0"]] == [0, 5, 10, 15, 20]
    assert [s for s, _ in sc["gate/fraction/0"]] == [5, 10, 15, 20]
    assert [s for s, _ in sc["poprisk/estimate"]] == [5, 10, 15, 20]
    assert [s for s, _ in sc["entk/motion"]] == [5, 10, 15, 20]
    assert all(0 <= v <= 1 for _, v in sc["gate/fraction/0"])
    eig = np.array([[dict(sc[f"entk/eig/{i}"])[20] for i in range(8)]])
    assert (np.diff(eig) <= 0).all()                            # descending

    # the gate fraction is the mean of the optimizer's per-step telemetry since the last log
    opt = ns["trainer"].optimizers[0]
    hist = {h["step"]: h["fraction_updated"][0] for h in opt.gate_history()}
    want = np.mean([hist[s] for s in range(16, 21)])
    assert dict(sc["gate/fraction/0"])[20] == pytest.approx(want, rel=1e-5)

    # the probe loss is the model's MSE/2 on the probe set (squared loss Φ = ‖u − y‖²/(2n))
    model, x, y = ns["trainer"].lightning_module, ns["x"], ns["y"]
    with torch.no_grad():
        want = float(((model(x[:16]) - y[:16]) ** 2).mean() / 2)
    assert dict(sc["probe/loss"])[20] == pytest.approx(want, rel=1e-5)

    # the CSV logger got the same rows
    files = list((tmp_path / "runs/lightning/lightning_logs").rglob("metrics.csv"))
    assert len(files) == 1
    with files[0].open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows if r["entk/eig/0"]] == [0, 5, 10, 15, 20]

    traj = ts.KernelTrajectory.load("runs/lightning/tangentscope/trajectory")
    assert traj.steps.tolist() == [0, 5, 10, 15, 20] and traj.n == 16
    assert traj.loss[-1] == pytest.approx(want, rel=1e-4)


class _Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2, 1)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        return ts.GatedAdamW(self.parameters(), lr=1e-2)


def test_accumulated_batches_give_one_row_per_optimizer_step():
    torch.manual_seed(0)
    x = torch.randn(64, 2)
    y = x.sum(1, keepdim=True)
    net = _Net()
    init = copy.deepcopy(net.net)
    rows = []
    cb = TangentscopeCallback(Probe(x[:4], y[:4]), every=2, log_every=1, estimator=True)
    cb.monitor.log_fn = lambda m, s: rows.append((s, m))   # no logger needed to see the rows
    trainer = L.Trainer(max_steps=4, accumulate_grad_batches=2, callbacks=[cb], logger=False,
                        accelerator="cpu", enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(net, DataLoader(TensorDataset(x, y), batch_size=8))
    assert [s for s, _ in rows] == [0, 1, 2, 3, 4]
    assert all("gate/fraction/0" in m for s, m in rows if s)
    assert [s for s, m in rows if "entk/eig/0" in m] == [0, 2, 4]
    est = cb.monitor.estimator
    assert est is not None and est.num_steps == 4
    # the estimate starts from the first step's loss: the two accumulated batches of 8
    with torch.no_grad():
        first = float(nn.functional.mse_loss(init(x[:16]), y[:16]))
    assert est.curve().estimate[0] == pytest.approx(first, rel=1e-5)
