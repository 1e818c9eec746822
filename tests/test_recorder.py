"""KernelRecorder and KernelTrajectory: snapshots against brute-force autograd (float64), time
and learning-rate bookkeeping, Adam's J D Jᵀ, streaming, crash and resume, size estimates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tangentscope as ts
from tangentscope.dynamics import (
    KernelRecorder,
    KernelTrajectory,
    at_steps,
    every,
    identity_residuals,
    logspaced,
    manual,
)
from tangentscope.errors import ConfigError, ShapeError
from zoo import brute_force_jacobian, make_mlp

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
    ts.losses.SquaredLoss().value(model(x), y).backward()
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
    L = ts.losses.SquaredLoss()
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
    g0 = torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        ts.losses.SquaredLoss().value(model(x), y), list(model.parameters()))])
    for _ in range(2):
        _sgd_step(model, opt, x, y)
    params = list(model.parameters())
    loss = ts.losses.SquaredLoss().value(model(x), y)
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
        errs[scale] = identity_residuals(rec.trajectory(), discretization="gd").summary()
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


# -- reliability (issue 12.4 / 12.9) -------------------------------------------------------------
def test_an_estimate_that_does_not_fit_is_refused_before_anything_is_written(tmp_path, capsys):
    # no total_steps (the case that used to print the estimate, write the directory, allocate
    # and only then refuse): one snapshot's eNTK is over the budget -> nothing is created
    x, y, xq, _ = _data()
    run = tmp_path / "deep" / "run"
    with pytest.raises(ts.KernelTooLargeError, match="memory budget"):
        KernelRecorder(make_mlp(2), x, y, x_test=xq, schedule=every(5), run_dir=run,
                       entk_options={"memory_budget": 2000})
    assert not (tmp_path / "deep").exists()
    out = capsys.readouterr().out
    assert "total unknown" in out and "pass total_steps=" in out


def test_without_total_steps_each_snapshot_is_checked_and_earlier_ones_kept(tmp_path,
                                                                             monkeypatch):
    from tangentscope.dynamics import recorder as recorder_mod

    x, y, _, _ = _data()
    model = make_mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = KernelRecorder(model, x, y, optimizer=opt, schedule=every(1), run_dir=tmp_path / "r",
                         verbose=False)
    _sgd_step(model, opt, x, y)
    monkeypatch.setattr(recorder_mod, "_free_disk", lambda path: 100)
    with pytest.raises(ConfigError, match="snapshots so far are kept"):
        _sgd_step(model, opt, x, y)
    rec.close(final=False)
    assert KernelTrajectory.load(tmp_path / "r").steps.tolist() == [0, 1]


def test_planned_snapshots_are_counted_in_constant_time_and_exactly():
    import time

    t0 = time.perf_counter()
    assert every(7, start=3).planned(10**12) == (10**12 - 3) // 7 + 1 + 1
    assert logspaced(10**9, 40).planned(10**9) <= 41
    assert time.perf_counter() - t0 < 0.5
    for sched in (every(3), every(4, start=5), at_steps([0, 3, 8, 20]), logspaced(50, 7),
                  manual(), ts.dynamics.Schedule(every=5, start=2, steps=frozenset({1, 4, 7}))):
        for T in range(30):
            brute = len({s for s in range(T + 1) if sched.due(s)} | {0})
            assert sched.planned(T) == brute, (sched, T)


def test_every_submodules_mode_is_restored_exactly():
    # a deliberately frozen BatchNorm inside a train-mode model stays frozen (issue 12.4)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                                torch.nn.Dropout(0.1), torch.nn.Linear(8, 2)).double().train()
    model[1].eval()
    x, y, xq, _ = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = [m.training for m in model.modules()]
    rec = KernelRecorder(model, x, y, x_test=xq, optimizer=opt, schedule=every(1),
                         verbose=False)
    for _ in range(3):
        assert [m.training for m in model.modules()] == before
        _sgd_step(model, opt, x, y)
    rec.close()
    assert [m.training for m in model.modules()] == before
    assert not model[1].training and model[3].training


def test_the_estimate_gets_the_arguments_entk_gets(monkeypatch):
    import functools

    from tangentscope.dynamics import recorder as recorder_mod

    calls = {}
    real_entk, real_est = recorder_mod.entk, recorder_mod.estimate_memory

    def spy_entk(fm, x1, x2=None, **kw):
        calls["entk"] = (x1.shape, None if x2 is None else x2.shape, set(kw))
        return real_entk(fm, x1, x2, **kw)

    @functools.wraps(real_est)              # same signature: the recorder reads it
    def spy_est(fm, x1, x2=None, **kw):
        calls.setdefault("est", (x1.shape, None if x2 is None else x2.shape, set(kw)))
        return real_est(fm, x1, x2, **kw)

    monkeypatch.setattr(recorder_mod, "entk", spy_entk)
    monkeypatch.setattr(recorder_mod, "estimate_memory", spy_est)
    x, y, xq, _ = _data()
    model = make_mlp(2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    KernelRecorder(model, x, y, x_test=xq, optimizer=opt, test_gram=False, verbose=False,
                   entk_options={"implementation": "jacobian", "chunk_size": 4})
    import inspect

    accepted = set(inspect.signature(real_est).parameters)
    e_x1, e_x2, e_kw = calls["entk"]
    s_x1, s_x2, s_kw = calls["est"]
    assert (s_x1, s_x2) == (e_x1, e_x2) == ((10, 3), (6, 3))
    assert s_kw == {k for k in e_kw if k in accepted or "kwargs" in accepted}
    assert {"implementation", "chunk_size", "dtype"} <= s_kw


# -- checkpoint storage: one recorder, two storages -----------------------------------------
def _two_storage_run(tmp_path, loss, opt_name, steps=9):
    """One run recorded twice on the same optimizer: kernels in memory, checkpoints on disk."""
    from tangentscope.dynamics.matfree_record import checkpoint_path

    g = torch.Generator().manual_seed(3)
    n, m, p = 10, 5, 3
    x, xq = torch.randn(n, 3, generator=g, dtype=F64), torch.randn(m, 3, generator=g, dtype=F64)
    if loss == "cross_entropy":
        y, yq = torch.randint(0, p, (n,), generator=g), torch.randint(0, p, (m,), generator=g)
    else:
        y, yq = torch.randn(n, p, generator=g, dtype=F64), torch.randn(m, p, generator=g,
                                                                         dtype=F64)
    torch.manual_seed(0)
    model = make_mlp(p, width=8)
    sched = None
    opt: torch.optim.Optimizer
    if opt_name == "adam":
        head = list(list(model.children())[-1].parameters())
        body = [q for q in model.parameters() if all(q is not h for h in head)]
        groups: list[dict] = [{"params": body}, {"params": head, "lr": 0.01}]
        opt = torch.optim.Adam(groups, lr=0.02)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.4)
        sched = torch.optim.lr_scheduler.StepLR(opt, 4, gamma=0.5)
    kw = {"loss": loss, "x_test": xq, "y_test": yq, "optimizer": opt, "schedule": every(3),
          "verbose": False, "total_steps": steps}
    rec_k = KernelRecorder(model, x, y, save_preconditioner=True, **kw)
    rec_c = KernelRecorder(model, x, y, storage="checkpoint", run_dir=tmp_path / "ck", **kw)
    L = ts.losses.get_loss(loss)
    for _ in range(steps):
        opt.zero_grad()
        L.value(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()
    rec_k.close()
    rec_c.close()
    return rec_k.trajectory(), checkpoint_path(tmp_path / "ck", model), rec_c


@pytest.mark.parametrize("loss,opt_name", [("squared", "sgd"), ("cross_entropy", "adam")])
def test_checkpoint_storage_maps_equal_the_dense_operators_of_the_same_run(tmp_path, loss,
                                                                          opt_name):
    from tangentscope.dynamics import window_operators
    from tangentscope.dynamics.matfree import DISCRETIZATIONS, MatrixFreeOperators

    traj, path, rec = _two_storage_run(tmp_path, loss, opt_name)
    assert len(path) == len(traj) == 4 and rec.num_snapshots == 4
    np.testing.assert_array_equal(path.steps, traj.steps)
    np.testing.assert_allclose(path.times, traj.times, rtol=1e-15)
    for k in range(len(traj)):
        torch.testing.assert_close(path.u(k), traj.u[k], rtol=1e-13, atol=1e-14)
        assert np.asarray(path.dts[k]).tolist() == pytest.approx(traj.dts[k].tolist())
    recs = rec.store.records("checkpoint")
    np.testing.assert_allclose([r["loss"] for r in recs], traj.loss, rtol=1e-12)
    np.testing.assert_allclose([r["test_loss"] for r in recs], traj.test_loss, rtol=1e-12)
    np.testing.assert_allclose([r["lr"] for r in recs], traj.lrs, rtol=0)
    V = torch.randn(traj.N, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    worst = 0.0
    for disc in DISCRETIZATIONS:
        ref = window_operators(traj, discretization=disc)
        r = MatrixFreeOperators(path, discretization=disc).apply(
            V, transfer=True, quadratic=True, gramian=True)
        for got, want in ((r.PV, ref.P @ V), (r.GV, ref.G @ V), (r.WV, ref.W @ V),
                          (r.VWV, V.T @ ref.W @ V)):
            worst = max(worst, float((got - want).norm() / want.norm()))
    assert worst <= 1e-8                             # measured 1.4e-15 to 4.1e-15


def test_checkpoint_storage_size_estimate_and_readers_that_need_kernels(tmp_path, capsys):
    x, y, xq, _ = _data()
    model = make_mlp(2)
    P = sum(q.numel() for q in model.parameters())
    rec = KernelRecorder(model, x, y, x_test=xq, schedule=every(5), total_steps=100,
                         run_dir=tmp_path / "c", storage="checkpoint")
    out = capsys.readouterr().out
    per = 8 * (P + (6 + 4) * 2) + 4096                  # O(P + N) per snapshot, no N²
    assert "checkpoint storage" in out and "21 snapshots" in out
    assert ts._utils.format_bytes(per) in out
    assert rec.estimate["bytes_per_snapshot"] == per
    with pytest.raises(ConfigError, match="storage='checkpoint'"):
        KernelTrajectory.load(tmp_path / "c")
    with pytest.raises(ConfigError, match="kernel_path"):
        rec.trajectory()
    with pytest.raises(ConfigError, match="storage must be"):
        KernelRecorder(model, x, y, storage="dense", verbose=False)
    with pytest.raises(ConfigError, match="do not apply"):
        KernelRecorder(model, x, y, storage="checkpoint", verbose=False,
                       entk_options={"implementation": "jacobian"})
    with pytest.raises(ConfigError, match="run_dir=None"):
        KernelRecorder(model, x, y, storage="checkpoint", keep_last=2, run_dir=tmp_path / "d",
                       verbose=False)
    from tangentscope.dynamics.matfree_record import checkpoint_path

    KernelRecorder(model, x, y, run_dir=tmp_path / "k", verbose=False)
    with pytest.raises(ConfigError, match="storage='kernel'"):
        checkpoint_path(tmp_path / "k", model)


def test_checkpoint_recording_resumed_after_a_kill_loses_only_the_checkpoint_in_flight(
        tmp_path):
    from tangentscope.dynamics.matfree import MatrixFreeOperators
    from tangentscope.dynamics.matfree_record import checkpoint_path

    x, y, xq, _ = _data()

    def run(run_dir, steps, kill_after=None):
        torch.manual_seed(0)
        model = make_mlp(2)
        opt = torch.optim.Adam(model.parameters(), lr=0.02)
        saved = {}

        def keep(index, step):
            saved[step] = (copy_state(model), copy_state(opt))

        rec = KernelRecorder(model, x, y, x_test=xq, optimizer=opt, schedule=every(2),
                             run_dir=run_dir, storage="checkpoint", on_snapshot=keep,
                             verbose=False)
        for _ in range(steps if kill_after is None else kill_after):
            _sgd_step(model, opt, x, y)
        rec.close(final=kill_after is None)
        return model, opt, saved

    def copy_state(obj):
        import copy

        return copy.deepcopy(obj.state_dict())

    ref_model, _, _ = run(tmp_path / "ref", 8)
    model, opt, saved = run(tmp_path / "cut", 8, kill_after=6)
    # the kill: the snapshot at step 6 was being written -- its file is in place, its index
    # line cut in half -- and a temporary of the next is left behind
    index = tmp_path / "cut" / "index.jsonl"
    lines = index.read_bytes().splitlines(keepends=True)
    index.write_bytes(b"".join(lines[:-1]) + lines[-1][:len(lines[-1]) // 2])
    (tmp_path / "cut" / "snapshots" / "000009.npz.tmp").write_bytes(b"partial")
    path = checkpoint_path(tmp_path / "cut", model)
    assert path.steps.tolist() == [0, 2, 4]                 # only step 6 was lost
    model.load_state_dict(saved[4][0])
    opt.load_state_dict(saved[4][1])
    rec = KernelRecorder(model, x, y, x_test=xq, optimizer=opt, schedule=every(2),
                         run_dir=tmp_path / "cut", storage="checkpoint", resume=True,
                         verbose=False)
    assert rec.step_count == 4
    for _ in range(4):
        _sgd_step(model, opt, x, y)
    rec.close()
    got, want = checkpoint_path(tmp_path / "cut", model), checkpoint_path(tmp_path / "ref",
                                                                            ref_model)
    assert got.steps.tolist() == want.steps.tolist() == [0, 2, 4, 6, 8]
    np.testing.assert_allclose(got.times, want.times, rtol=1e-15)
    V = torch.randn(got.N, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    a = MatrixFreeOperators(got, discretization="gd").apply(V, gramian=True, transfer=True)
    b = MatrixFreeOperators(want, discretization="gd").apply(V, gramian=True, transfer=True)
    assert float((a.WV - b.WV).norm() / b.WV.norm()) < 1e-12
    assert float((a.GV - b.GV).norm() / b.GV.norm()) < 1e-12
