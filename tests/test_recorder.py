"""KernelRecorder and KernelTrajectory: snapshots against brute-force autograd (float64), time
and learning-rate bookkeeping, Adam's J D Jᵀ, streaming, crash and resume, size estimates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from zoo import brute_force_jacobian, make_mlp

import tangentscope as ts
from tangentscope.dynamics import (KernelRecorder, KernelTrajectory, at_steps, every,
                                   identity_residuals, logspaced, manual)
from tangentscope.errors import ConfigError, ShapeError

F64 = torch.float64


def _data(n=6, m=4, p=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, generator=g, dtype=F64), torch.randn(n, p, generator=g, dtype=F64),
            torch.randn(m, 3, generator=g, dtype=F64), torch.randn(m, p, generator=g, dtype=F64))


def _stacked(J1, J2, D=None):
    """``(n1 p, n2 p)`` kernel from brute-force Jacobian rows ``(n, p, P)``."""
    A = J1.reshape(-1, J1.shape[-1])
    return (A * D if D is not None else A) @ J2.reshape(-1, J2.shape[-1]).T


def _sgd_step(model, opt, x, y):
    opt.zero_grad()
    ts.SquaredLoss().value(model(x), y).backward()
    opt.step()


def test_snapshots_match_brute_force_autograd(tmp_path):
    x, y, xq, yq = _data()
    model = make_mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, gamma=0.5)
    rec = KernelRecorder(model, x, y, x_test=xq, y_test=yq, optimizer=opt, schedule=every(2),
                         run_dir=tmp_path / "run", verbose=False)
    want, lrs = {}, []
    for step in range(1, 7):
        lrs.append(opt.param_groups[0]["lr"])
        _sgd_step(model, opt, x, y)
        sched.step()
        if step % 2 == 0:
            J, JQ = brute_force_jacobian(model, x), brute_force_jacobian(model, xq)
            u, uq = model(x).detach(), model(xq).detach()
            want[step] = (_stacked(J, J), _stacked(JQ, J), u, uq,
                          float(torch.linalg.eigvalsh(_stacked(JQ, JQ))[-1]))
    rec.close()
    traj = KernelTrajectory.load(tmp_path / "run")
    assert traj.steps.tolist() == [0, 2, 4, 6]
    np.testing.assert_allclose(traj.times, np.concatenate([[0], np.cumsum(lrs)[1::2]]),
                               rtol=1e-14)
    L = ts.SquaredLoss()
    for step, (K, KQ, u, uq, gram) in want.items():
        k = traj.index_of_step(step)
        torch.testing.assert_close(traj.kernel(k), K, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(traj.cross_kernel(k), KQ, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(traj.u[k], u, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(traj.U_Q[k], uq, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(traj.g[k], L.grad(u, y))
        torch.testing.assert_close(traj.hessian(k), L.hessian(u, y))
        assert traj.loss[k] == pytest.approx(float(L.value(u, y)), rel=1e-12)
        assert traj.test_loss[k] == pytest.approx(float(L.value(uq, yq)), rel=1e-12)
        assert traj.test_gram_norm[k] == pytest.approx(gram, rel=1e-10)
    assert [len(d) for d in traj.dts] == [0, 2, 2, 2]
    assert traj.meta["n"] == 6 and traj.meta["p"] == 2 and traj.meta["m"] == 4
    torch.testing.assert_close(traj.data["x_test"], xq)


def test_manual_stepping_equals_the_optimizer_hook_and_memory_equals_disk(tmp_path):
    x, y, xq, _ = _data()
    trajs = []
    for attach, run_dir in ((True, None), (False, tmp_path / "r")):
        torch.manual_seed(1)
        model = make_mlp(2)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        rec = KernelRecorder(model, x, y, x_test=xq, optimizer=opt, schedule=at_steps([1, 3]),
                             attach=attach, run_dir=run_dir, verbose=False)
        for _ in range(3):
            _sgd_step(model, opt, x, y)
            if not attach:
                rec.step()
        rec.close(final=False)
        trajs.append(rec.trajectory())
    a, b = trajs
    assert a.steps.tolist() == b.steps.tolist() == [0, 1, 3]
    np.testing.assert_allclose(a.times, b.times, rtol=1e-15)
    for k in range(3):
        torch.testing.assert_close(a.kernel(k), b.kernel(k))
        torch.testing.assert_close(a.cross_kernel(k), b.cross_kernel(k))
    torch.testing.assert_close(a.g, b.g)


def test_adam_kernel_is_the_next_step_preconditioned_kernel():
    x, y, _, _ = _data(p=1)
    y = y[:, :1]
    model = make_mlp(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.95), eps=1e-6)
    recs = {k: KernelRecorder(model, x, y, optimizer=opt, schedule=every(2), precondition=k,
                              save_preconditioner=True, verbose=False)
            for k in ("adam", "adam_state")}
    g0 = torch.autograd.grad(ts.SquaredLoss().value(model(x), y), list(model.parameters()))
    g0 = torch.cat([g.reshape(-1) for g in g0])
    for _ in range(2):
        _sgd_step(model, opt, x, y)
    params = [q for q in model.parameters()]
    loss = ts.SquaredLoss().value(model(x), y)
    grads = torch.autograd.grad(loss, params)
    v = torch.cat([opt.state[q]["exp_avg_sq"].reshape(-1) for q in params])
    gflat = torch.cat([g.reshape(-1) for g in grads])
    d_next = 1 / (((0.95 * v + 0.05 * gflat ** 2) / (1 - 0.95 ** 3)).sqrt() + 1e-6)
    d_state = 1 / ((v / (1 - 0.95 ** 2)).sqrt() + 1e-6)
    J = brute_force_jacobian(model, x)
    for kind, D in (("adam", d_next), ("adam_state", d_state)):
        traj = recs[kind].trajectory()
        assert traj.meta["preconditioned"] and traj.meta["precondition"] == kind
        torch.testing.assert_close(traj.preconditioner(1), D, rtol=1e-10, atol=0)
        torch.testing.assert_close(traj.kernel(1), _stacked(J, J, D), rtol=1e-10, atol=1e-10)
    # at step 0 the state is empty: the next-step D is Adam's first step 1/(|∇L| + ε), not 1/ε
    torch.testing.assert_close(recs["adam"].trajectory().preconditioner(0),
                               1 / (g0.abs() + 1e-6), rtol=1e-10, atol=0)


def test_loss_scale_makes_time_match_a_torch_mse_loop():
    # nn.MSELoss averages over n·p, i.e. (2/p)·Φ: with loss_scale=2/p (p = 3) the "gd"
    # operators are exact for this linear model; without it they are off by the factor
    x, y3, xq, _ = _data(n=8, p=3)
    errs = {}
    for scale in (1.0, 2 / 3):
        model = torch.nn.Linear(3, 3).double()
        torch.manual_seed(0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rec = KernelRecorder(model, x, y3, x_test=xq, optimizer=opt, schedule=every(2),
                             loss_scale=scale, verbose=False)
        for _ in range(6):
            opt.zero_grad()
            torch.nn.MSELoss()(model(x), y3).backward()
            opt.step()
        rec.close()
        errs[scale] = identity_residuals(rec.trajectory(), discretization="gd").final()
    assert errs[2 / 3]["dissipation_error"] < 1e-10
    assert errs[2 / 3]["displacement_error"] < 1e-10
    assert errs[1.0]["dissipation_error"] > 0.05


def test_crash_loses_at_most_the_snapshot_in_flight_and_resume_appends(tmp_path):
    x, y, xq, _ = _data()
    model = make_mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    saved = {}

    def checkpoint(index, step):
        saved[step] = ({k: v.clone() for k, v in model.state_dict().items()})

    run = tmp_path / "run"
    rec = KernelRecorder(model, x, y, x_test=xq, optimizer=opt, schedule=every(1), run_dir=run,
                         on_snapshot=checkpoint, verbose=False)
    for _ in range(5):
        _sgd_step(model, opt, x, y)
    rec.close(final=False)
    # a crash mid-snapshot: a half-written file and a cut index line
    (run / "snapshots" / "000006.npz.tmp").write_bytes(b"partial")
    with (run / "index.jsonl").open("a") as fh:
        fh.write('{"index": 6, "step": 6, "ti')
    traj = KernelTrajectory.load(run)
    assert traj.steps.tolist() == [0, 1, 2, 3, 4, 5]
    # resuming needs the model as it was at the snapshot
    with pytest.raises(ConfigError, match="restore the model"):
        KernelRecorder(model, x, y, x_test=xq, optimizer=opt, run_dir=run, resume=True, step=3,
                       verbose=False)
    model.load_state_dict(saved[3])
    opt2 = torch.optim.SGD(model.parameters(), lr=0.02)
    rec = KernelRecorder(model, x, y, x_test=xq, optimizer=opt2, schedule=every(1),
                         run_dir=run, resume=True, step=3, verbose=False)
    assert rec.step_count == 3 and rec.time == pytest.approx(0.15)
    _sgd_step(model, opt2, x, y)
    rec.close()
    traj = KernelTrajectory.load(run)
    assert traj.steps.tolist() == [0, 1, 2, 3, 4]
    assert traj.times[-1] == pytest.approx(0.17)
    torch.testing.assert_close(traj.u[-1], model(x).detach())
    with pytest.raises(ConfigError, match="already holds"):
        KernelRecorder(model, x, y, run_dir=run, verbose=False)
    with pytest.raises(ConfigError, match="recorded with"):
        KernelRecorder(model, x[:4], y[:4], run_dir=run, resume=True, verbose=False)


def test_size_estimate_is_printed_and_a_run_that_does_not_fit_is_refused(tmp_path, capsys,
                                                                         monkeypatch):
    x, y, xq, _ = _data()
    model = make_mlp(2)
    KernelRecorder(model, x, y, x_test=xq, schedule=every(5), total_steps=100,
                   run_dir=tmp_path / "a")
    out = capsys.readouterr().out
    per = (12 * 12 + 8 * 12 + 6 * 2 * 4 + 8) * 8 + 2048           # floats × 8 bytes + slack
    assert "21 snapshots" in out and ts._utils.format_bytes(per) in out and "free" in out
    from tangentscope.dynamics import recorder as recorder_mod

    monkeypatch.setattr(recorder_mod, "_free_disk", lambda path: 10_000)
    with pytest.raises(ConfigError, match="snapshot less often"):
        KernelRecorder(model, x, y, x_test=xq, schedule=every(5), total_steps=100,
                       run_dir=tmp_path / "b", verbose=False)
    assert not (tmp_path / "b").exists()


def test_schedules():
    assert [s for s in range(10) if every(3).due(s)] == [0, 3, 6, 9]
    assert every(3).planned(10) == 4 and every(3).planned(None) is None
    ls = logspaced(1000, 10)
    assert ls.due(1) and ls.due(1000) and ls.planned(1000) == 11
    assert at_steps([2, 5]).planned(None) == 3 and manual().planned(10) == 1
    with pytest.raises(ConfigError, match="k >= 1"):
        every(0)


def test_bad_inputs_are_refused_with_the_fix():
    x, y, _, _ = _data()
    model = make_mlp(2)
    with pytest.raises(ShapeError, match="one target per example"):
        KernelRecorder(model, x, y[:3], verbose=False)
    with pytest.raises(ConfigError, match="loss_scale"):
        KernelRecorder(model, x, y, loss_scale=0.0, verbose=False)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="Adam-like"):
        KernelRecorder(model, x, y, optimizer=sgd, precondition="adam", verbose=False)
    with pytest.raises(ConfigError, match="holds none"):
        KernelRecorder(model, x, y, optimizer=torch.optim.SGD(make_mlp(2).parameters(), lr=1),
                       verbose=False)
    rec = KernelRecorder(model, x, y, optimizer=sgd, verbose=False)
    with pytest.raises(ConfigError, match="attach=False"):
        rec.step()
    rec.close(final=False)
    with pytest.raises(ConfigError, match="needs lr="):
        KernelRecorder(model, x, y, verbose=False).step()


def test_dropout_model_is_recorded_in_eval_mode_and_its_mode_restored():
    x, y, _, _ = _data(p=1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                                torch.nn.Linear(8, 1)).double().train()
    rec = KernelRecorder(model, x, y[:, :1], schedule=manual(), verbose=False)
    assert model.training
    model.eval()
    J = brute_force_jacobian(model, x)
    torch.testing.assert_close(rec.trajectory().kernel(0), _stacked(J, J), rtol=1e-10, atol=1e-12)


def test_select_merges_step_increments():
    x, y, _, _ = _data()
    model = make_mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = KernelRecorder(model, x, y, optimizer=opt, schedule=every(1), verbose=False)
    for _ in range(6):
        _sgd_step(model, opt, x, y)
    traj = rec.trajectory()
    sub = traj.subsample(3)
    assert sub.steps.tolist() == [0, 3, 6]
    assert [len(d) for d in sub.dts] == [0, 3, 3]
    np.testing.assert_allclose([d.sum() for d in sub.dts[1:]], np.diff(sub.times))
    torch.testing.assert_close(sub.kernel(1), traj.kernel(3))
    assert traj.window(2, 4).steps.tolist() == [2, 3, 4]
    with pytest.raises(ShapeError, match="nearest snapshot steps"):
        traj.index_of_step(17)
    with pytest.raises(ConfigError, match="no recorded trajectory"):
        KernelTrajectory.load(".")


def test_index_lines_are_valid_json_with_sizes(tmp_path):
    x, y, _, _ = _data()
    KernelRecorder(make_mlp(2), x, y, run_dir=tmp_path, verbose=False)
    rec = json.loads((tmp_path / "index.jsonl").read_text().splitlines()[0])
    assert rec["step"] == 0 and rec["bytes"] == (tmp_path / rec["file"]).stat().st_size
