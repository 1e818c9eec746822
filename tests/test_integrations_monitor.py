"""The framework-free monitor behind the callbacks: the plain-loop example of
docs/integrations.md (TensorBoard read back), the probe metrics against brute-force twins, the
lazy imports and the errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import tangentscope as ts
from doc_examples import run_example
from tangentscope import ConfigError, ShapeError
from tangentscope.integrations.monitor import Probe, ProbeModule, TrainingMonitor, probe_metrics
from tangentscope.models import mlp


def test_plain_loop_example(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tangentscope.integrations.tensorboard import read_scalars

    monkeypatch.chdir(tmp_path)
    ns = run_example("plain-loop")
    sc = read_scalars("runs/plain")
    assert [s for s, _ in sc["entk/eig/0"]] == [0, 10, 20, 30, 40]
    assert [s for s, _ in sc["gate/fraction/0"]] == list(range(5, 41, 5))
    hist = {h["step"]: h["fraction_updated"][0] for h in ns["opt"].gate_history()}
    assert dict(sc["gate/fraction/0"])[40] == pytest.approx(
        np.mean([hist[s] for s in range(36, 41)]), rel=1e-5)
    assert [s for s, _ in ns["monitor"].history] == [0] + list(range(5, 41, 5))
    traj = ts.KernelTrajectory.load("runs/plain/tangentscope/trajectory")
    assert traj.steps.tolist() == [0, 10, 20, 30, 40]
    with pytest.raises(ConfigError, match="no TensorBoard event file"):
        read_scalars(tmp_path / "nothing")


def _brute(model, x):
    """Stacked eNTK by an autograd loop over outputs (float64)."""
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i:i + 1]).reshape(-1)
        for a in range(out.shape[0]):
            g = torch.autograd.grad(out[a], list(model.parameters()), retain_graph=True)
            rows.append(torch.cat([t.reshape(-1) for t in g]))
    J = torch.stack(rows)
    return J @ J.T


def test_probe_metrics_match_a_brute_force_kernel():
    torch.manual_seed(0)
    model = mlp(3, 16, 2, 2).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    K = _brute(model, x)
    lam, V = torch.linalg.eigh(K)
    lam, V = lam.flip(0), V.flip(1)
    with torch.no_grad():
        u = model(x)
    g = ((u - y) / 6).reshape(-1)                           # squared loss: g = (u − y)/n
    out, state = probe_metrics(ProbeModule(model, None), Probe(x, y), topk=4, threshold=0.05)
    assert torch.allclose(state, K, rtol=1e-10, atol=1e-12)
    assert [out[f"entk/eig/{i}"] for i in range(4)] == pytest.approx(lam[:4].tolist(), rel=1e-9)
    assert out["entk/trace"] == pytest.approx(float(lam.sum()) / 12, rel=1e-9)
    assert out["entk/effective_rank"] == pytest.approx(float(lam.sum() ** 2 / (lam ** 2).sum()))
    r = int((lam > 0.05 * lam[0]).sum())
    assert out["channel/rank"] == r
    frac = float(((V[:, :r].T @ g) ** 2).sum() / (g @ g))
    assert out["channel/residual_fraction"] == pytest.approx(frac, rel=1e-9)
    assert out["reservoir/residual_fraction"] == pytest.approx(1 - frac, rel=1e-9)
    assert out["probe/loss"] == pytest.approx(float(((u - y) ** 2).sum() / 12))

    # motion: 1 − alignment with the reference; zero against itself
    K2 = 2 * K + 0.1 * torch.eye(12, dtype=K.dtype)
    out2, _ = probe_metrics(ProbeModule(model, None), Probe(x, y), reference=K2, previous=K)
    want = 1 - float((K * K2).sum() / (K.norm() * K2.norm()))
    assert out2["entk/motion"] == pytest.approx(want, rel=1e-9)
    assert out2["entk/motion_step"] == pytest.approx(0.0, abs=1e-12)

    # the matrix-free top-k path finds the same top eigenvalues and channel share
    top, _ = probe_metrics(ProbeModule(model, None), Probe(x, y), topk=4, threshold=0.05,
                           spectrum="topk")
    assert [top[f"entk/eig/{i}"] for i in range(4)] == pytest.approx(lam[:4].tolist(), rel=1e-6)
    if r <= 4:
        assert top["channel/residual_fraction"] == pytest.approx(frac, rel=1e-6)


def test_probe_with_class_labels_uses_cross_entropy():
    torch.manual_seed(0)
    model = mlp(2, 8, 1, 3).double()
    x, labels = torch.randn(5, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    out, _ = probe_metrics(ProbeModule(model, None), Probe(x, labels, loss="cross_entropy"))
    with torch.no_grad():
        want = float(torch.nn.functional.cross_entropy(model(x), labels))
    assert out["probe/loss"] == pytest.approx(want, rel=1e-9)


def test_monitor_refuses_bad_options_before_any_work(tmp_path):
    x = torch.randn(4, 2)
    with pytest.raises(ConfigError, match="every"):
        TrainingMonitor(Probe(x, x), every=0)
    with pytest.raises(ConfigError, match="topk"):
        TrainingMonitor(Probe(x, x), topk=0)
    with pytest.raises(ConfigError, match="threshold"):
        TrainingMonitor(Probe(x, x), threshold=2)
    with pytest.raises(ConfigError, match="spectrum"):
        TrainingMonitor(Probe(x, x), spectrum="eig")
    with pytest.raises(ConfigError, match="probe="):
        TrainingMonitor(record_dir=tmp_path / "r")
    with pytest.raises(ShapeError, match=">= 2 examples"):
        Probe(x[:1])
    with pytest.raises(ShapeError, match="one row per input"):
        Probe(x, x[:3])
    with pytest.raises(ShapeError, match="unknown loss"):
        Probe(x, x, loss="hinge")
    model = mlp(2, 4, 1, 2)
    with pytest.raises(ConfigError, match="optimizer"):
        TrainingMonitor(Probe(x, x), record_dir=tmp_path / "r").start(model, None)
    with pytest.raises(ConfigError, match="GatedAdamW"):
        TrainingMonitor(estimator=True).start(model, torch.optim.SGD(model.parameters(), lr=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    TrainingMonitor(Probe(x, x), record_dir=tmp_path / "r").start(model, opt)
    with pytest.raises(ConfigError, match="already holds"):
        TrainingMonitor(Probe(x, x), record_dir=tmp_path / "r").start(model, opt)


def test_without_a_gated_optimizer_there_is_no_gate_telemetry():
    model = mlp(2, 4, 1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = TrainingMonitor()
    assert mon.start(model, opt) == {}
    model(torch.randn(3, 2)).sum().backward()
    opt.step()
    assert mon.after_step(1, telemetry=True) == {} and mon.history == []


def test_importing_the_integrations_needs_no_optional_dependency():
    code = ("import sys, tangentscope.integrations.hf, tangentscope.integrations.lightning, "
            "tangentscope.integrations.tensorboard, tangentscope.integrations.monitor\n"
            "bad = [m for m in ('transformers', 'lightning', 'tensorboard', 'trl', 'datasets') "
            "if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
