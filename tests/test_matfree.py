"""Matrix-free P_g, W_S, G_Q against the dense operators of the *same* recorded run (float64):
every discretization, squared loss and cross-entropy, GD / SGD (minibatches, LR schedule) /
Adam (two parameter groups), on the dense path and on the checkpoint path (J D Jᵀ by VJP/JVP);
top-k and SLQ against eigh; identities, vector reports, streaming probes, memory plans, errors;
a 2-process gloo group equal to one process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tangentscope.dynamics import (
    KernelRecorder,
    every,
    identity_residuals,
    window_operators,
)
from tangentscope.dynamics.matfree import DISCRETIZATIONS, MatrixFreeOperators
from tangentscope.dynamics.matfree_channel import (
    gramian_density,
    gramian_topk,
    identity_residuals_matfree,
    kernel_density,
    kernel_topk,
    mode_visibility_matfree,
    noise_gradients,
    vector_report,
)
from tangentscope.dynamics.matfree_checkpoint import CheckpointKernelPath
from tangentscope.dynamics.matfree_collect import CheckpointCollector, StreamingProbes
from tangentscope.dynamics.matfree_path import (
    DenseKernelPath,
    capture_state,
    state_arrays,
    state_from_arrays,
)
from tangentscope.errors import ConfigError, KernelTooLargeError, ShapeError
from tangentscope.linalg import KrylovConvergenceError, dense_function
from tangentscope.losses import get_loss

F64 = torch.float64
TOL = 1e-8                                     # the bound on relative differences


def _data(loss, n=24, m=9, d=4, p=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, xq = torch.randn(n, d, generator=g, dtype=F64), torch.randn(m, d, generator=g, dtype=F64)
    if loss == "cross_entropy":
        return x, torch.randint(0, p, (n,), generator=g), xq, torch.randint(0, p, (m,),
                                                                           generator=g)
    return x, torch.randn(n, p, generator=g, dtype=F64), xq, torch.randn(m, p, generator=g,
                                                                          dtype=F64)


def _model(p=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(),
                         nn.Linear(12, p)).double()


def _record(loss, opt_name, steps=12, every_k=3, collector=False):
    """A real run recorded by KernelRecorder (dense kernels) with the model states captured at
    its snapshots; optionally a CheckpointCollector on the same optimizer."""
    x, y, xq, yq = _data(loss)
    model = _model()
    L = get_loss(loss)
    sched = None
    if opt_name == "gd":
        opt = torch.optim.SGD(model.parameters(), lr=0.8)
    elif opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        sched = torch.optim.lr_scheduler.StepLR(opt, 5, gamma=0.7)
    else:
        head = list(model[-1].parameters())
        body = [q for q in model.parameters() if all(q is not h for h in head)]
        opt = torch.optim.Adam([{"params": body}, {"params": head, "lr": 0.01}], lr=0.02)
    states = []
    rec = KernelRecorder(model, x, y, loss=loss, x_test=xq, y_test=yq, optimizer=opt,
                         schedule=every(every_k), verbose=False, save_preconditioner=True,
                         on_snapshot=lambda i, s: states.append(capture_state(model)))
    col = (CheckpointCollector(model, x, y, loss=loss, x_test=xq, y_test=yq, optimizer=opt,
                               schedule=every(every_k)) if collector else None)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randperm(x.shape[0], generator=g)[:8] if opt_name == "sgd" else slice(None)
        opt.zero_grad()
        L.value(model(x[idx]), y[idx]).backward()
        opt.step()
        if sched is not None:
            sched.step()
    rec.close()
    if col is not None:
        col.close()
    traj = rec.trajectory()
    return traj, model, states, col


RUNS = [(loss, opt) for loss in ("squared", "cross_entropy") for opt in ("gd", "sgd", "adam")]


@pytest.fixture(scope="module")
def runs():
    torch.set_num_threads(1)
    out = {}
    for loss, opt in RUNS:
        traj, model, states, _ = _record(loss, opt)
        out[loss, opt] = (traj, CheckpointKernelPath.from_trajectory(traj, model, states))
    return out


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# -- the checkpoint path reproduces the recorded kernels --------------------------------------
@pytest.mark.parametrize("loss,opt", RUNS)
def test_checkpoint_kernel_equals_recorded_kernel(runs, loss, opt):
    traj, cp = runs[loss, opt]
    X = torch.randn(traj.N, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    for k in range(len(traj)):
        KX, KQX = cp.kernel_pair(k, X, X)
        assert _rel(KX, traj.kernel(k) @ X) < 1e-12
        assert _rel(KQX, traj.cross_kernel(k) @ X) < 1e-12
        torch.testing.assert_close(cp.u(k), traj.u[k], rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(cp.U_Q(k), traj.U_Q[k], rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(cp.gradient(k), traj.g[k], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(cp.hessian(k), traj.hessian(k), rtol=1e-12, atol=1e-15)
        assert abs(cp.loss(k) - traj.loss[k]) <= 1e-12 * abs(traj.loss[k])
        assert abs(cp.test_gram_norm(k) - traj.test_gram_norm[k]) <= 1e-10 * traj.test_gram_norm[k]
    np.testing.assert_array_equal(cp.times, traj.times)


def test_collector_forms_the_recorders_adam_preconditioner():
    traj, _, _, col = _record("cross_entropy", "adam", collector=True)
    path = col.path()
    assert len(path) == len(traj)
    np.testing.assert_allclose(path.times, traj.times, rtol=1e-15)
    X = torch.randn(traj.N, 2, dtype=F64)
    for k in range(len(traj)):
        D = torch.cat([v.reshape(-1) for v in col.checkpoints().state(k).preconditioner.values()])
        torch.testing.assert_close(D, traj.preconditioner(k), rtol=1e-12, atol=0)
        assert _rel(path.kernel_matvec(k, X), traj.kernel(k) @ X) < 1e-12


class _StoreCheckpoints:
    """A store-backed ``Checkpoints``: records of kind 'checkpoint' in a TrajectoryStore."""

    def __init__(self, store):
        self.store, self.recs = store, store.records("checkpoint")
        self.times = np.array([r["time"] for r in self.recs])
        self.steps = np.array([r["step"] for r in self.recs])
        self.dts = tuple(np.asarray(store.array(r, "dts")) for r in self.recs)

    def __len__(self):
        return len(self.recs)

    def state(self, k):
        arrays = self.store.arrays(self.recs[k])
        return state_from_arrays({n: v for n, v in arrays.items() if n != "dts"})


def test_a_store_backed_checkpoint_path_is_a_drop_in(runs, tmp_path):
    store_mod = pytest.importorskip("tangentscope.dynamics.store")
    traj, cp = runs["cross_entropy", "adam"]
    store = store_mod.TrajectoryStore.create(tmp_path / "run", {"n": traj.n, "p": traj.p},
                                             {"x": traj.data["x"].numpy()})
    for k in range(len(cp.ckpt)):
        st = cp.ckpt.state(k)
        back = state_from_arrays(state_arrays(st))
        assert set(back.params) == set(st.params) and set(back.preconditioner) == set(
            st.preconditioner)
        store.append({"step": int(cp.steps[k]), "time": float(cp.times[k])},
                     {**state_arrays(st), "dts": cp.dts[k]}, kind="checkpoint")
    reopened = store_mod.TrajectoryStore.open(tmp_path / "run")
    d = traj.data
    sp = CheckpointKernelPath(cp.model, d["x"], d["y"], _StoreCheckpoints(reopened),
                              loss="cross_entropy", x_test=d["x_test"], y_test=d["y_test"])
    V = torch.randn(traj.N, 2, dtype=F64, generator=torch.Generator().manual_seed(9))
    a = MatrixFreeOperators(sp, discretization="gd").apply(V, gramian=True, transfer=True)
    b = MatrixFreeOperators(cp, discretization="gd").apply(V, gramian=True, transfer=True)
    assert _rel(a.WV, b.WV) < 1e-13 and _rel(a.GV, b.GV) < 1e-13
    with pytest.raises(ShapeError, match="param/"):
        state_from_arrays({"K_SS": np.zeros((2, 2))})


# -- every map equals the dense operators --------------------------------------------------------
@pytest.mark.parametrize("disc", DISCRETIZATIONS)
@pytest.mark.parametrize("loss,opt", RUNS)
def test_maps_equal_dense_operators(runs, loss, opt, disc):
    traj, cp = runs[loss, opt]
    ref = window_operators(traj, 1, discretization=disc)
    V = torch.randn(traj.N, 4, dtype=F64, generator=torch.Generator().manual_seed(6))
    for path in (DenseKernelPath(traj), cp):
        ops = MatrixFreeOperators(path, 1, discretization=disc)
        r = ops.apply(V, transfer=True, quadratic=True, gramian=True)
        assert _rel(r.PV, ref.P @ V) < TOL
        assert _rel(r.GV, ref.G @ V) < TOL
        assert _rel(r.WV, ref.W @ V) < TOL
        assert _rel(r.VWV, V.T @ ref.W @ V) < TOL
        rec = MatrixFreeOperators(path, 1, discretization=disc, strategy="recompute")
        assert rec.plan(4).strategy == "recompute"
        assert _rel(rec.integrated_entk(V), ref.W @ V) < TOL
        assert abs(ops.test_gram_integral() - ref.test_gram_integral) <= 1e-10 * abs(
            ref.test_gram_integral)


@pytest.mark.parametrize("loss", ["squared", "cross_entropy"])
def test_one_step_intervals_equal_dense_operators(loss):
    """One optimizer step per interval: ``gd`` and ``euler`` take the product-only path."""
    traj, model, states, _ = _record(loss, "adam", steps=4, every_k=1)
    cp = CheckpointKernelPath.from_trajectory(traj, model, states)
    V = torch.randn(traj.N, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    for disc in ("gd", "euler", "exp"):
        ref = window_operators(traj, discretization=disc)
        for path in (DenseKernelPath(traj), cp):
            r = MatrixFreeOperators(path, discretization=disc).apply(
                V, transfer=True, quadratic=True, gramian=True)
            assert max(_rel(r.PV, ref.P @ V), _rel(r.GV, ref.G @ V), _rel(r.WV, ref.W @ V),
                       _rel(r.VWV, V.T @ ref.W @ V)) < TOL


@pytest.mark.parametrize("disc", DISCRETIZATIONS)
def test_identity_residuals_equal_the_dense_ones(runs, disc):
    traj, cp = runs["cross_entropy", "adam"]
    want = identity_residuals(traj, discretization=disc)
    for path in (DenseKernelPath(traj), cp):
        got = identity_residuals_matfree(path, discretization=disc)
        np.testing.assert_array_equal(got.stops, want.stops)
        np.testing.assert_allclose(got.dissipation_predicted, want.dissipation_predicted,
                                   rtol=TOL)
        np.testing.assert_allclose(got.dissipation_actual, want.dissipation_actual, rtol=1e-12)
        np.testing.assert_allclose(got.displacement_error, want.displacement_error, rtol=1e-6,
                                   atol=1e-12)
        np.testing.assert_allclose(got.gradient_error, want.gradient_error, rtol=1e-6,
                                   atol=1e-12)


# -- spectra -------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["squared", "cross_entropy"])
def test_gramian_and_kernel_topk_match_eigh(runs, loss):
    traj, cp = runs[loss, "gd"]
    ref = window_operators(traj, discretization="exp")
    lam, vec = torch.linalg.eigh(ref.W)
    lam, vec = lam.flip(0), vec.flip(1)
    ops = MatrixFreeOperators(DenseKernelPath(traj), discretization="exp")
    # squared loss: the fitted modes are a cluster 2bλ = 1 of multiplicity 7 here, which only
    # a block at least that wide resolves; the default block finds eigenpairs (small
    # residuals) that interlace the true top ones
    ch = gramian_topk(ops, 6, tol=1e-10, block_size=8 if loss == "squared" else None)
    torch.testing.assert_close(ch.eigenvalues, lam[:6], rtol=1e-9, atol=0)
    assert float(((ref.W @ ch.eigenvectors - ch.eigenvectors * ch.eigenvalues).norm(dim=0)
                  / lam[0]).max()) < 1e-9
    if loss == "squared":
        d = gramian_topk(ops, 6, tol=1e-10)
        assert bool((d.eigenvalues <= lam[:6] * (1 + 1e-12)).all())
        assert float((d.eigenvalues[:, None] - lam[None, :]).abs().min(1).values.max()) < 1e-8
        assert float(lam[:6].max() - d.eigenvalues.min()) < 1e-4 * float(lam[0])
    ny = gramian_topk(ops, 3, method="nystrom", power_iters=3, oversample=20)
    assert float(((ny.eigenvalues - lam[:3]).abs() / lam[:3]).max()) < 1e-2
    # on the checkpoint path: K_SS(t) top-k, and two W_S pairs
    Kl = torch.linalg.eigvalsh(traj.kernel(2)).flip(0)
    kt = kernel_topk(cp, 2, 5, tol=1e-11)
    torch.testing.assert_close(kt.values, Kl[:5], rtol=1e-10, atol=0)
    if loss == "cross_entropy":
        chc = gramian_topk(MatrixFreeOperators(cp, discretization="exp"), 2, tol=1e-9)
        torch.testing.assert_close(chc.eigenvalues, lam[:2], rtol=1e-8, atol=0)
    # visibility of the channel's modes and the channel share of a vector
    vis = mode_visibility_matfree(ops, ch)
    torch.testing.assert_close(vis, (ref.G @ ch.eigenvectors).norm(dim=0), rtol=1e-8, atol=0)
    g0 = traj.g[0].reshape(-1)
    e = ch.energy(g0)
    want = float(((ch.eigenvectors.T @ g0) ** 2).sum())
    assert abs(e.channel - want) <= 1e-12 * e.total
    if loss == "cross_entropy":                          # distinct eigenvalues: same subspace
        assert abs(e.channel - float(((vec[:, :6].T @ g0) ** 2).sum())) <= 1e-7 * e.total


def test_slq_densities_match_eigh(runs):
    traj, cp = runs["squared", "adam"]
    ref = window_operators(traj, discretization="midpoint")
    ops = MatrixFreeOperators(DenseKernelPath(traj), discretization="midpoint")
    N = traj.N
    d = gramian_density(ops, probes=2, steps=3, seed=3)   # Gauss: exact to degree 5
    g = torch.Generator().manual_seed(3)
    P = (torch.randint(0, 2, (N, 2), generator=g) * 2 - 1).to(F64) / N ** 0.5
    for j in range(6):
        want = (P * (torch.linalg.matrix_power(ref.W, j) @ P)).sum(0)
        torch.testing.assert_close((d.weights * d.nodes ** j).sum(1), want, rtol=1e-8, atol=0)
    K = traj.kernel(3)
    lamK = torch.linalg.eigvalsh(K)
    dk = kernel_density(cp, 3, probes=2, steps=N, seed=1)  # full Lanczos: exact measure
    g = torch.Generator().manual_seed(1)
    P = (torch.randint(0, 2, (N, 2), generator=g) * 2 - 1).to(F64) / N ** 0.5
    want = (P * (dense_function(K, torch.sqrt) @ P)).sum(0)    # a non-polynomial f
    got = (dk.weights * dk.nodes.clamp_min(0).sqrt()).sum(1)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=0)
    dm = kernel_density(DenseKernelPath(traj), 3, probes=64, steps=30, seed=0)
    assert abs(dm.trace(lambda t: t) - float(lamK.sum())) < 0.1 * float(lamK.sum())
    assert abs(dm.fraction_below(float(lamK[N // 2])) - 0.5) < 0.1


def test_vector_report_equals_dense_forms(runs):
    traj, cp = runs["squared", "gd"]
    ref = window_operators(traj, discretization="exp")
    ops = MatrixFreeOperators(DenseKernelPath(traj), discretization="exp")
    y_clean = traj.data["y"] + 0.3
    g_clean, g_noise = noise_gradients(cp, y_clean)
    ch = gramian_topk(ops, 5, tol=1e-10, block_size=8)
    vecs = {"noise": g_noise, "clean": g_clean, "g": traj.g[0]}
    rep = vector_report(ops, vecs, channel=ch)
    rep_cp = vector_report(MatrixFreeOperators(cp, discretization="exp"), vecs)
    for name, v in (("noise", g_noise), ("clean", g_clean), ("g", traj.g[0].reshape(-1))):
        for r in (rep[name], rep_cp[name]):
            assert abs(r.energy - float(v @ ref.W @ v)) <= TOL * float(v @ ref.W @ v)
            assert abs(r.visibility - float((ref.G @ v).norm())) <= TOL * float(
                (ref.G @ v).norm())
            assert r.visibility <= r.bound * (1 + 1e-9)
            assert abs(r.dissipated_fraction - 2 / traj.n * r.energy / r.norm2) < 1e-12
        assert abs(rep[name].channel_fraction + rep[name].rest_fraction - 1) < 1e-12
        assert abs(rep[name].bound - rep_cp[name].bound) <= 1e-9 * rep[name].bound
    assert abs(rep["g"].energy - (traj.loss[0] - traj.loss[-1])) < 0.5 * abs(
        traj.loss[0] - traj.loss[-1])


def test_streaming_probes_equal_the_window_sweep():
    x, y, xq, yq = _data("cross_entropy")
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.8)
    probe = torch.randn(x.shape[0] * 3, dtype=F64, generator=torch.Generator().manual_seed(7))
    sp = StreamingProbes(model, x, y, {"xi": probe}, include_gradient=True,
                         loss="cross_entropy", x_test=xq, y_test=yq, optimizer=opt,
                         schedule=every(3))
    col = CheckpointCollector(model, x, y, loss="cross_entropy", x_test=xq, y_test=yq,
                              optimizer=opt, schedule=every(3))
    for _ in range(9):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    sp.close()
    col.close()
    h = sp.history()
    path = col.path()
    assert len(sp.collector.checkpoints()) == 2 and len(h.steps) == len(path) - 1
    V = torch.stack([probe, path.gradient(0).reshape(-1)], 1)
    ops = MatrixFreeOperators(path, discretization="exp")
    r = ops.apply(V, transfer=True, quadratic=True)
    np.testing.assert_allclose(h.energy["xi"][-1], float(r.VWV[0, 0]), rtol=1e-10)
    np.testing.assert_allclose(h.energy["g(s)"][-1], float(r.VWV[1, 1]), rtol=1e-10)
    np.testing.assert_allclose(h.visibility["xi"][-1], float(r.GV[:, 0].norm()), rtol=1e-10)
    np.testing.assert_allclose(h.propagated["xi"][-1], float(r.PV[:, 0].norm()), rtol=1e-10)


# -- memory plans and errors ----------------------------------------------------------------------
def test_memory_plan_stores_recomputes_or_refuses():
    traj, *_ = _record("squared", "gd", steps=12, every_k=1)      # 12 intervals
    path = DenseKernelPath(traj)
    V = torch.randn(traj.N, 4, dtype=F64)
    big = MatrixFreeOperators(path, memory_budget="1G").plan(4)
    assert big.strategy == "store" and big.bytes["total"] <= big.budget
    blk = traj.N * 4 * 8
    per_col = big.bytes["krylov"] // big.krylov_chunk
    # room for the 3 + 4 states of recomputation (segments of 4) but not the 12 of storing
    budget = big.bytes["work"] + big.bytes["products"] + per_col + 8 * blk
    ops = MatrixFreeOperators(path, memory_budget=budget)
    plan = ops.plan(4)
    assert plan.strategy == "recompute" and plan.segment == 4 and plan.krylov_chunk == 1
    assert plan.bytes["total"] <= budget
    ref = window_operators(traj, discretization="exp")
    assert _rel(ops.integrated_entk(V), ref.W @ V) < TOL
    with pytest.raises(KernelTooLargeError, match="fewer columns.*memory_budget"):
        MatrixFreeOperators(path, memory_budget=1000).plan(4)
    with pytest.raises(KernelTooLargeError, match="memory_budget"):
        MatrixFreeOperators(path, memory_budget=1000).integrated_entk(torch.ones(traj.N))


def test_bad_inputs_raise_clear_errors(runs):
    traj, _ = runs["squared", "gd"]
    path = DenseKernelPath(traj)
    with pytest.raises(ShapeError, match="0 <= start < stop"):
        MatrixFreeOperators(path, 3, 2)
    with pytest.raises(ConfigError, match="discretization"):
        MatrixFreeOperators(path, discretization="rk4")
    with pytest.raises(ShapeError, match="N = "):
        MatrixFreeOperators(path).propagator(torch.ones(5))
    with pytest.raises(KrylovConvergenceError, match="krylov_max_dim"):
        MatrixFreeOperators(path, krylov_max_dim=2).propagator(torch.randn(traj.N, 2))
    with pytest.raises(ConfigError, match="save_preconditioner=True"):
        traj2, model, states, _ = _record("squared", "adam", steps=3)
        traj2.meta["preconditioned"] = True
        CheckpointKernelPath.from_trajectory(
            traj2.__class__(**{**traj2.__dict__, "_source": _NoD(traj2._source)}), model, states)
    with pytest.raises(KernelTooLargeError, match="keep_last"):
        CheckpointCollector(_model(), *_data("squared")[:2], schedule=every(1),
                            total_steps=10 ** 6, memory_budget=10 ** 6)


class _NoD:
    """A trajectory source that lost its saved preconditioner."""

    def __init__(self, src):
        self.src = src

    def get(self, k, name):
        return None if name == "D" else self.src.get(k, name)


# -- distributed: 2-process gloo group equals one process ----------------------------------------
def _dist_worker(rank, world, init, payload, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        d = torch.load(payload, weights_only=False)
        n, m = d["x"].shape[0], d["xq"].shape[0]
        lo, hi = (0, 13) if rank == 0 else (13, n)
        qlo, qhi = (0, 4) if rank == 0 else (4, m)
        path = CheckpointKernelPath(d["model"], d["x"][lo:hi], d["y"][lo:hi], d["ckpt"],
                                    loss="cross_entropy", x_test=d["xq"][qlo:qhi],
                                    y_test=d["yq"][qlo:qhi], group=True, chunk_size=5)
        ops = MatrixFreeOperators(path, discretization="midpoint")
        r = ops.apply(d["V"], transfer=True, quadratic=True, gramian=True)
        res = {"PV": r.PV, "GV": r.GV, "WV": r.WV, "VWV": r.VWV,
               "KX": path.kernel_matvec(1, d["V"]), "grad": path.parameter_gradient(2),
               "gram": path.test_gram_norm(1), "loss": path.loss(2),
               "u": path.u(2), "U_Q": path.U_Q(2)}
        if rank == 0:
            torch.save(res, out)
        dist.barrier()      # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_distributed_two_gloo_processes_equal_one(tmp_path):
    mp = pytest.importorskip("torch.multiprocessing")
    x, y, xq, yq = _data("cross_entropy", n=25)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    col = CheckpointCollector(model, x, y, loss="cross_entropy", x_test=xq, y_test=yq,
                              optimizer=opt, schedule=every(2))
    for _ in range(6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    col.close()
    V = torch.randn(x.shape[0] * 3, 3, dtype=F64, generator=torch.Generator().manual_seed(8))
    payload = tmp_path / "payload.pt"
    torch.save({"model": model, "x": x, "y": y, "xq": xq, "yq": yq, "ckpt": col.checkpoints(),
                "V": V}, payload)
    out = tmp_path / "rank0.pt"
    mp.start_processes(_dist_worker, args=(2, f"file://{tmp_path / 'init'}", str(payload),
                                           str(out)), nprocs=2, join=True, start_method="spawn")
    got = torch.load(out, weights_only=False)
    path = col.path(chunk_size=7)
    ops = MatrixFreeOperators(path, discretization="midpoint")
    r = ops.apply(V, transfer=True, quadratic=True, gramian=True)
    for key, want in (("PV", r.PV), ("GV", r.GV), ("WV", r.WV), ("VWV", r.VWV),
                      ("KX", path.kernel_matvec(1, V)), ("u", path.u(2)),
                      ("U_Q", path.U_Q(2))):
        assert _rel(got[key], want) < 1e-11, key
    for k, v in path.parameter_gradient(2).items():
        torch.testing.assert_close(got["grad"][k], v, rtol=1e-11, atol=1e-15)
    assert abs(got["gram"] - path.test_gram_norm(1)) < 1e-10 * path.test_gram_norm(1)
    assert abs(got["loss"] - path.loss(2)) < 1e-13
