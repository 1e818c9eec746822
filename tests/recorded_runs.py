"""Small recorded runs for the tests of the run page: a KernelRecorder trajectory inside a run
directory with a metrics.csv (gate telemetry of two optimizers), as a user's run leaves them."""

from __future__ import annotations

from pathlib import Path

import torch

import tangentscope as ts
from tangentscope.dynamics import every
from tangentscope.models import mlp


def record(path: Path, *, steps: int = 20, snapshot_every: int = 5, seed: int = 0) -> Path:
    """Train a small MLP on 12 points with a recorder (probe set of 6) into ``path``."""
    torch.manual_seed(seed)
    x = torch.linspace(-1, 1, 12, dtype=torch.float64)[:, None]
    y = torch.sin(3 * x) + 0.3 * torch.randn(12, 1, dtype=torch.float64)
    xq = torch.linspace(-0.9, 0.9, 6, dtype=torch.float64)[:, None]
    model = mlp(1, 32, 1, 1, activation="tanh").double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    rec = ts.KernelRecorder(model, x, y, x_test=xq, y_test=torch.sin(3 * xq), optimizer=opt,
                            schedule=every(snapshot_every), run_dir=path, total_steps=steps,
                            verbose=False)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((model(x) - y) ** 2).mean()).backward()
        opt.step()
    rec.close()
    return path


def experiment_like(path: Path) -> Path:
    """A run directory: config/summary, metrics.csv with gate telemetry per optimizer, and a
    recorded trajectory below it."""
    rd = ts.RunDir.create(path, {"steps": 20}, meta={"experiment": "my-exp", "preset": "smoke"})
    for opt in ("adamw", "gated"):
        for step in range(0, 21, 5):
            row = {"optimizer": opt, "step": step, "loss": 1.0 / (step + 1)}
            if opt == "gated":
                row["gate/fraction/0"] = 1.0 - step / 40
            rd.log(**row)
    record(path / "trajectory")
    rd.write_summary({"final_loss": 0.05, "verdict": "text is not shown as a number"})
    rd.set_status("complete")
    return path
