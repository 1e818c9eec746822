"""One cell of the reservoir-gap experiment (private): a noisy-label run recorded with a
:class:`~tangentscope.dynamics.KernelRecorder`, its clean-label twin from the same
initialization, and the gap of ``W_S(0, t_k)`` against the test cost of the fitted noise at a
few training lengths ``t_k``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._utils import seed_everything
from ..data.vision import load_classification
from ..dynamics import KernelRecorder, Schedule, logspaced
from ..dynamics.label_noise import classification_error
from ..dynamics.linearized import gd_step_size
from ..dynamics.operators import identity_residuals
from ..dynamics.reservoir import gap_timeline
from ..models import mlp
from ..optim.spec import build_optimizer
from ._harness import CellOutput, optimizer_spec

__all__ = ["stop_steps", "gap_cell"]


def stop_steps(steps: int, stops: int, span: float) -> list[int]:
    """``stops`` training lengths, log-spaced over ``span`` decades ending at ``steps``."""
    raw = np.geomspace(max(1.0, steps / 10 ** span), steps, stops)
    return sorted({max(1, int(round(v))) for v in raw})


def _gd(net: nn.Module, opt: Any, x: Tensor, y: Tensor, xt: Tensor, steps: int,
        at: set[int]) -> dict[int, Tensor]:
    """Full-batch GD on ``Φ = ‖u − y‖²/(2n)``; test outputs after the steps in ``at``."""
    out: dict[int, Tensor] = {}
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        (0.5 * (net(x) - y).pow(2).sum(1).mean()).backward()
        opt.step()
        if step in at:
            with torch.no_grad():
                out[step] = net(xt).detach().clone()
    return out


def _spectrum_stats(K: Tensor) -> dict[str, float]:
    lam = torch.linalg.eigvalsh(0.5 * (K + K.T)).clamp_min(0.0)
    top = float(lam[-1])
    low = float(lam[0])
    return {"kernel_log_condition": math.log10(top / low) if low > top * 1e-15 else 15.0,
            "kernel_effective_rank": float(lam.sum() ** 2 / (lam ** 2).sum()),
            "kernel_top": top}


def gap_cell(cfg: Any, width: int, depth: int, seed: int) -> CellOutput:
    """Train and measure one ``(width, depth, seed)`` cell.

    ``cfg`` is the experiment's ``Config`` (see ``experiments/reservoir_gap.py``). Returns the
    cell record (with one entry per training length under ``stops``), one ``metrics.csv``
    row per training length and the spectra ``(K, N)`` of ``2b W_S(0, t_k)``.
    """
    data = load_classification("gmm", cfg.n_train, cfg.n_test, label_noise=cfg.label_noise,
                               seed=seed, dtype=torch.float64, dim=cfg.dim,
                               separation=cfg.separation)
    x, xt = data.x, data.x_test
    Y, Yc, Yt = data.targets("pm1"), data.targets("pm1", clean=True), data.test_targets("pm1")
    m = min(cfg.n_probe, xt.shape[0])
    seed_everything(seed)
    net = mlp(data.dim, width, depth, 1, activation=cfg.activation).to(torch.float64)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    lr = gd_step_size(net, x, cfg.lr_scale)
    stops = stop_steps(cfg.steps, cfg.stops, cfg.stop_span)
    log = logspaced(cfg.steps, cfg.log_snapshots).steps if cfg.log_snapshots else frozenset()
    sched = Schedule(every=cfg.snapshot_every, steps=frozenset(log) | frozenset(stops))
    opt = build_optimizer(optimizer_spec("gd"), net, lr=lr, weight_decay=0.0)
    rec = KernelRecorder(net, x, Y, loss="squared", x_test=xt[:m], y_test=Yt[:m],
                         optimizer=opt.optimizer, schedule=sched, total_steps=cfg.steps,
                         verbose=False)
    noisy = _gd(net, opt, x, Y, xt, cfg.steps, set(stops))
    with torch.no_grad():
        train_out = net(x)
    rec.close()
    traj = rec.trajectory()
    idx = [traj.index_of_step(s) for s in stops]
    tl = gap_timeline(traj, Yc, idx, discretization=cfg.discretization, cut=cfg.cut,
                      band=(cfg.band_lo, cfg.band_hi), slq_probes=cfg.slq_probes,
                      slq_steps=cfg.slq_steps, slq_seed=seed)
    ir = identity_residuals(traj, discretization=cfg.discretization).summary()
    net.load_state_dict(init)                  # the clean twin: same init, steps and step size
    opt2 = build_optimizer(optimizer_spec("gd"), net, lr=lr, weight_decay=0.0)
    clean = _gd(net, opt2, x, Yc, xt, cfg.steps, set(stops))
    g_noise_norm = float((Y - Yc).pow(2).sum().sqrt()) / data.n   # ‖g_noise‖ = ‖ε‖/n
    num_params = sum(p.numel() for p in net.parameters())
    rows = []
    for k, (step, i) in enumerate(zip(stops, idx)):
        un, uc = noisy[step], clean[step]
        gap, fr = tl.gaps[k], tl.frozen_gaps[k]
        actual = (un[:m] - uc[:m]).numpy()
        pred = tl.noise_displacement[k]
        rows.append({
            "width": width, "depth": depth, "seed": seed, "step": step,
            "time": float(tl.times[k]), "num_params": num_params, "lr": lr,
            "log_gap": gap.log_gap, "max_log_gap": gap.max_log_gap,
            "max_gap_rank": gap.max_gap_rank, "edge_channel": gap.edge_channel,
            "edge_reservoir": gap.edge_reservoir, "channel_rank": gap.rank,
            "band_fraction": gap.band_fraction, "gramian_effective_rank": gap.effective_rank,
            "slq_band_fraction": float(tl.slq_band[k]),
            "frozen_log_gap": fr.log_gap, "frozen_band_fraction": fr.band_fraction,
            "frozen_channel_rank": fr.rank,
            "noise_band_share": tl.noise_bands[k]["band"],
            "noise_reservoir_share": tl.noise_bands[k]["below"],
            "noise_channel_share": tl.noise_bands[k]["above"],
            "noise_dissipated": float(tl.noise_dissipated[k]),
            "noise_test_rms": float(np.sqrt((pred ** 2).mean())),
            "actual_noise_test_rms": float(np.sqrt((actual ** 2).mean())),
            "counterfactual_rel_error": float(np.linalg.norm(pred - actual)
                                              / max(float(np.linalg.norm(actual)), 1e-300)),
            "test_mse": float((un - Yt).pow(2).mean()),
            "test_mse_clean_trained": float((uc - Yt).pow(2).mean()),
            "excess_test_mse": float((un - Yt).pow(2).mean() - (uc - Yt).pow(2).mean()),
            "test_error": classification_error(un, data.y_test),
            "test_error_clean_trained": classification_error(uc, data.y_test),
            "excess_test_error": classification_error(un, data.y_test)
            - classification_error(uc, data.y_test),
            "train_error_noisy_labels": classification_error(traj.u[i], data.y),
            "g_noise_norm": g_noise_norm,
            **_spectrum_stats(traj.kernel(i))})
    result = {"width": width, "depth": depth, "seed": seed, "lr": lr, "steps": cfg.steps,
              "num_params": num_params, "n": data.n, "noise_rate": data.noise_rate,
              "final_train_error_noisy_labels": classification_error(train_out, data.y),
              "dissipation_error": ir["dissipation_error"],
              "displacement_error": ir.get("displacement_error", float("nan")),
              "gradient_error": ir["gradient_error"], "stops": rows}
    return CellOutput(result, arrays={"spectra": tl.spectra, "steps": np.asarray(stops)},
                      rows=rows)
