"""One cell of the ``operators-scale`` experiment: a checkpoint-recorded run and its matrix-free
analysis (see :mod:`tangentscope.experiments.operators_scale`), and the dense-agreement check."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data import load_classification
from ..dynamics import KernelRecorder, logspaced, window_operators
from ..dynamics.matfree import DISCRETIZATIONS, MatrixFreeOperators
from ..dynamics.matfree_channel import (
    gramian_topk,
    identity_residuals_matfree,
    kernel_density,
    kernel_topk,
    noise_gradients,
)
from ..dynamics.matfree_checkpoint import CheckpointKernelPath
from ..dynamics.matfree_path import CheckpointState, MemoryCheckpoints, capture_state
from ..dynamics.matfree_record import checkpoint_path
from ..errors import TangentscopeError
from ..linalg import slq_density
from ..models.mlp import mlp
from ._harness import CellOutput

F64 = torch.float64


def load_task(cfg: Any, seed: int, n: int, m: int) -> Any:
    """MNIST-1D generated at ``n + m`` (canonical generator seed 42, flips by ``seed``), or
    the 10-class Gaussian mixture when ``cfg.data == 'gmm'`` or mnist1d is not installed."""
    if cfg.data == "mnist1d":
        try:
            return load_classification("mnist1d", n, m, label_noise=cfg.label_noise, seed=seed)
        except TangentscopeError:
            pass
    return load_classification("gmm", n, m, label_noise=cfg.label_noise, seed=seed,
                               n_classes=10, dim=40, separation=3.0)


def _net(seed: int, d: int, width: int, depth: int, p: int) -> nn.Module:
    torch.manual_seed(seed)
    return mlp(d, width, depth, p, activation="tanh")


def _onehot(y: Tensor, p: int) -> Tensor:
    return nn.functional.one_hot(y, p).to(torch.float32)


def _lr(model: nn.Module, x: Tensor, y: Tensor, scale: float) -> float:
    """``scale · n / λ_max(K_SS(0))`` (the largest stable GD step on ``‖u − y‖²/(2n)`` is
    ``2n/λ_max``), λ_max by Lanczos on kernel products."""
    cap = capture_state(model)
    ck = MemoryCheckpoints((CheckpointState(cap["params"], cap["buffers"]),), np.zeros(1),
                           np.zeros(1, dtype=np.int64), (np.zeros(0),))
    path = CheckpointKernelPath(model, x, y, ck, compute_dtype=torch.float32)
    lam = float(kernel_topk(path, 0, 1, tol=1e-3).values[0])
    return scale * x.shape[0] / lam


def _train(model: nn.Module, x: Tensor, y: Tensor, steps: int, lr: float,
           rec_kw: dict[str, Any] | None = None) -> KernelRecorder | None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rec = None if rec_kw is None else KernelRecorder(model, x, y, optimizer=opt, **rec_kw)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((model(x) - y) ** 2).sum() / x.shape[0]).backward()
        opt.step()
    if rec is not None:
        rec.close()
    return rec


def _errors(model: nn.Module, x: Tensor, labels: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) != labels).float().mean())


def _shares_above(dens: Any, cut: float) -> list[float]:
    """Per probe row: the quadrature weight of nodes above ``cut``."""
    return (dens.weights * (dens.nodes > cut)).sum(1).tolist()


def scale_cell(cfg: Any, width: int, seed: int, spectra: bool, root: Path) -> CellOutput:
    """Train one noisy run (checkpoint-recorded into ``root``) and its clean twin; analyse the
    window ``[0, T]`` matrix-free."""
    t0 = time.perf_counter()
    data = load_task(cfg, seed, cfg.n_train, cfg.n_test)
    p, n = data.n_classes, data.n
    xq_all, yq_all = data.x_test, data.y_test
    probe = min(cfg.n_probe, xq_all.shape[0])
    y, y_clean = _onehot(data.y, p), _onehot(data.y_clean, p)
    model = _net(seed, data.dim, width, cfg.depth, p)
    twin = _net(seed, data.dim, width, cfg.depth, p)
    lr = _lr(model, data.x, y, cfg.lr_scale)
    if root.exists():                      # a cell killed mid-recording is recorded again
        shutil.rmtree(root)
    rec_kw = {"x_test": xq_all[:probe], "y_test": _onehot(yq_all[:probe], p),
              "schedule": logspaced(cfg.steps, cfg.snapshots), "total_steps": cfg.steps,
              "run_dir": root, "storage": "checkpoint", "verbose": False}
    _train(model, data.x, y, cfg.steps, lr, rec_kw)
    _train(twin, data.x, y_clean, cfg.steps, lr)
    train_seconds = time.perf_counter() - t0
    f32 = cfg.products == "float32"
    path = checkpoint_path(root, model, compute_dtype=torch.float32 if f32 else None,
                           memory_budget=cfg.memory_budget)
    ops = MatrixFreeOperators(path, discretization="exp", memory_budget=cfg.memory_budget)
    b = 1.0 / n                                     # B = I/n: 2bW_S saturates at 1
    g_clean, g_noise = noise_gradients(path, y_clean.to(F64))
    X = torch.stack([g_noise, g_clean], 1)
    steps_rows: list[dict[str, Any]] = []
    for st in ops.accumulate(X, transfer=True):     # growing windows [0, t_k]: one sweep
        e = torch.diagonal(st.VWV)
        vis = st.GV.norm(dim=0) / math.sqrt(st.GV.shape[0]) if st.GV is not None else e * 0
        steps_rows.append({"width": width, "seed": seed, "step": int(path.steps[st.stop]),
                           "time": float(path.times[st.stop]),
                           "noise_soft_fraction": float(2 * b * e[0] / X[:, 0].norm() ** 2),
                           "clean_soft_fraction": float(2 * b * e[1] / X[:, 1].norm() ** 2),
                           "noise_test_rms": float(vis[0]), "clean_test_rms": float(vis[1]),
                           "train_loss": path.loss(st.stop)})
    ids = identity_residuals_matfree(path, discretization="exp", krylov_tol=ops.krylov_tol,
                                     memory_budget=cfg.memory_budget).summary()
    with torch.no_grad():
        dU = (model(xq_all[:probe]) - twin(xq_all[:probe])).double()
    last = steps_rows[-1]
    P = sum(q.numel() for q in model.parameters())
    res: dict[str, Any] = {
        "width": width, "seed": seed, "num_params": P, "N": n * p, "params_over_N": P / (n * p),
        "data": data.name, "lr": lr, "train_error_noisy_labels": _errors(model, data.x, data.y),
        "flips_fitted": float((model(data.x).argmax(1)[data.flipped] ==
                               data.y[data.flipped]).float().mean()),
        "test_error": _errors(model, xq_all, yq_all), "twin_test_error":
        _errors(twin, xq_all, yq_all), "noise_soft_fraction": last["noise_soft_fraction"],
        "clean_soft_fraction": last["clean_soft_fraction"],
        "noise_test_rms": last["noise_test_rms"], "clean_test_rms": last["clean_test_rms"],
        "actual_noise_test_rms": float(dU.norm() / math.sqrt(dU.numel())),
        "dissipation_error": float(ids["dissipation_error"]),
        "displacement_error": float(ids["displacement_error"]),
        "gradient_error": float(ids["gradient_error"]), "final_train_loss": path.loss(-1),
        "products": path.products, "train_seconds": train_seconds}
    res["benign_index"] = (res["test_error"] - res["twin_test_error"]) / cfg.label_noise
    arrays: dict[str, np.ndarray] = {}
    if spectra:
        res.update(_spectra(cfg, path, ops, X, b, arrays))
    res["products"] = path.products
    res["analysis_seconds"] = time.perf_counter() - t0 - train_seconds
    return CellOutput(res, arrays, rows=steps_rows)


def _spectra(cfg: Any, path: CheckpointKernelPath, ops: MatrixFreeOperators, X: Tensor,
             b: float, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """``K_SS(t)`` top eigenvalues and SLQ density over training; ``W_S(0, T)``'s SLQ density
    (Rademacher probes plus the noise and clean vectors as probes: their shares above the
    cut) and top-k channel."""
    out: dict[str, Any] = {}
    snaps = sorted({0, len(path) // 2, len(path) - 1})
    tops, dens_k = [], []
    for k in snaps:
        tops.append(kernel_topk(path, k, cfg.k_kernel, tol=1e-4).values.cpu().numpy())
        d = kernel_density(path, k, probes=cfg.slq_probes, steps=cfg.slq_steps, seed=0)
        dens_k.append(np.stack([d.nodes.numpy(), d.weights.numpy()]))
    arrays["kernel_top"] = np.stack(tops)
    arrays["kernel_slq"] = np.stack(dens_k)
    arrays["kernel_snapshot_steps"] = np.asarray(path.steps)[snaps]
    gen = torch.Generator().manual_seed(1)
    R = (torch.randint(0, 2, (ops.N, cfg.slq_probes), generator=gen) * 2 - 1).to(F64)
    dw = slq_density(ops.integrated_entk, ops.N, start=torch.cat([R, X], 1),
                     steps=cfg.slq_steps, dtype=F64)
    arrays["gramian_slq"] = np.stack([dw.nodes.numpy(), dw.weights.numpy()]) * np.array(
        [2 * b, 1.0])[:, None, None]
    cut = cfg.cut / (2 * b)
    shares = _shares_above(dw, cut)
    q = cfg.slq_probes
    out["channel_dimension_slq"] = float(ops.N * np.mean(shares[:q]))
    out["channel_fraction_slq"] = float(np.mean(shares[:q]))
    out["noise_channel_share"] = shares[q]
    out["clean_channel_share"] = shares[q + 1]
    if cfg.k_channel > 0:
        ch = gramian_topk(ops, cfg.k_channel, tol=cfg.channel_tol)
        lam = (2 * b * ch.eigenvalues).cpu().numpy()
        arrays["channel_top"] = lam
        out["channel_top_fraction_of_saturation"] = float(lam[0])
        out["channel_kth_fraction_of_saturation"] = float(lam[-1])
        out["channel_converged"] = bool(ch.converged)
    out["kernel_lambda_max_first"] = float(arrays["kernel_top"][0][0])
    out["kernel_lambda_max_last"] = float(arrays["kernel_top"][-1][0])
    return out


def dense_agreement(cfg: Any) -> dict[str, Any]:
    """A small run recorded with both storages on one optimizer (float64 everywhere): the
    largest relative difference of the matrix-free maps (``P_g V``, ``G_Q V``, ``W_S V``,
    ``Vᵀ W_S V``, every discretization) to the dense operators (top-k and SLQ against
    ``eigh``: tests/test_matfree.py)."""
    t0 = time.perf_counter()
    data = load_task(cfg, cfg.seed, cfg.dense_n, 20)
    p = data.n_classes
    model = _net(cfg.seed, data.dim, 16, 1, p).double()
    x, y = data.x.double(), _onehot(data.y, p).double()
    xq = data.x_test.double()
    opt = torch.optim.SGD(model.parameters(), lr=_lr(model, x, y, cfg.lr_scale))
    kw = {"x_test": xq, "optimizer": opt, "schedule": logspaced(cfg.dense_steps, 3),
          "total_steps": cfg.dense_steps, "verbose": False}
    rec_k = KernelRecorder(model, x, y, **kw)
    rec_c = KernelRecorder(model, x, y, storage="checkpoint", **kw)
    for _ in range(cfg.dense_steps):
        opt.zero_grad()
        (0.5 * ((model(x) - y) ** 2).sum() / x.shape[0]).backward()
        opt.step()
    rec_k.close()
    rec_c.close()
    traj, path = rec_k.trajectory(), rec_c.kernel_path()
    V = torch.randn(traj.N, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    worst: dict[str, float] = {}
    for disc in DISCRETIZATIONS:
        ref = window_operators(traj, discretization=disc)  # type: ignore[arg-type]
        r = MatrixFreeOperators(path, discretization=disc).apply(  # type: ignore[arg-type]
            V, transfer=True, quadratic=True, gramian=True)
        assert ref.G is not None
        for name, got, want in (("P", r.PV, ref.P @ V), ("G", r.GV, ref.G @ V),
                                ("W", r.WV, ref.W @ V), ("VWV", r.VWV, V.T @ ref.W @ V)):
            assert got is not None
            worst[f"{disc}/{name}"] = float((got - want).norm() / want.norm())
    return {"dense_agreement": max(worst.values()), "dense_agreement_by_map": worst,
            "dense_N": traj.N, "dense_seconds": time.perf_counter() - t0}
