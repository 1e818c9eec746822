"""Signal channel and reservoir on a real training run (docs/notation.md: the operators of a
training window).

``tangentscope run channels [--preset smoke|full] [--noise_fraction 0.25 ...]`` trains a small
MLP on noisy 1-D regression (a fraction of the labels corrupted) with a
:class:`~tangentscope.dynamics.KernelRecorder` on, then computes from the recorded trajectory
alone: the identity residuals on every window ``[0, t]`` and on consecutive windows, ``W_S`` and
``G_Q`` of the whole run, the channel/reservoir split, per-mode test visibility, kernel spectra,
rotation and the spectral schedule, and the benign-overfitting check (where the label noise
sits and the test error it causes through ``G_Q``). ``tangentscope plot RUN_DIR`` redraws the
figures from ``arrays.npz``/``summary.json`` without retraining.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..dynamics import (
    KernelRecorder,
    KernelTrajectory,
    channel_timeline,
    every,
    identity_residuals,
    kernel_rotation,
    kernel_spectra,
    label_noise_gradients,
    logspaced,
    mode_visibility,
    noise_transfer,
    spectral_schedule,
    split_channels,
    window_operators,
)
from ..errors import ConfigError
from ..io import RunDir
from ..optim.spec import build_optimizer
from ..viz import save_figure
from ..viz.spectrum import (
    plot_channel_energy,
    plot_eigenvalue_spectra,
    plot_fit,
    plot_identity_residuals,
    plot_residual_energy_map,
    plot_rotation_surface,
    plot_spectral_schedule,
    plot_visibility,
)
from ._framework import Experiment
from ._harness import (
    check_nonnegative,
    check_positive,
    regression_mlp,
    regression_task,
    train_recorded,
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Run configuration (``--field value`` on the command line).

    Attributes:
        seed: seed of the data draw and of the network initialization.
        width: hidden width of the float64 MLP ``1 → width → … → 1``.
        depth: number of hidden layers of the MLP.
        activation: hidden activation (relu, tanh, gelu, silu, softplus or sin).
        steps: full-batch gradient-descent steps, all recorded by the kernel recorder.
        spacing: kernel snapshot times: log-spaced (dense early) or every steps/snapshots.
        discretization: rule turning the recorded kernels into the window operators (exp,
            midpoint, gd: the recorded steps, euler).
        split_mode: channel/reservoir split of W_S: relative (λ_j > threshold · λ_max),
            absolute (λ_j > threshold) or gap (the largest eigenvalue ratio).
    """

    seed: int = 0
    n: int = 48                      # training points
    n_test: int = 128                # probe/test points (evenly spaced, clean targets)
    noise: float = 1.0               # std of the label noise on corrupted points
    noise_fraction: float = 0.25     # fraction of training labels corrupted
    width: int = 256
    depth: int = 2
    activation: str = "tanh"
    lr: float = 0.05                 # full-batch gradient descent
    steps: int = 20000
    snapshots: int = 100             # planned kernel snapshots
    spacing: Literal["log", "linear"] = "log"
    discretization: Literal["midpoint", "exp", "gd", "euler"] = "midpoint"
    split_mode: Literal["relative", "absolute", "gap"] = "relative"
    threshold: float = 1e-2          # channel: λ_j(W_S) > threshold · λ_max (relative mode)
    windows: int = 4                 # consecutive windows checked separately
    rotation_k: int = 8              # top-k eigenspace for the rotation surface
    schedule_fraction: float = 0.1   # a mode is "learned" below this fraction of its start

    def __post_init__(self) -> None:
        check_positive(self, "lr", "n", "n_test", "width", "depth", "steps", "snapshots",
                       "windows", "rotation_k", "threshold", "schedule_fraction")
        check_nonnegative(self, "noise", "noise_fraction")
        if self.noise_fraction > 1:
            raise ConfigError(f"--noise_fraction is a fraction in [0, 1], got "
                              f"{self.noise_fraction}")


def _record(cfg: Config, rd: RunDir) -> None:
    """Train with the recorder on; resumable from the checkpoint saved with each snapshot."""
    data = regression_task(cfg.n, cfg.noise, cfg.n_test, cfg.noise_fraction, cfg.seed)
    model = regression_mlp(cfg.seed, cfg.width, cfg.depth, cfg.activation)
    opt = build_optimizer("sgd", model, lr=cfg.lr).optimizer     # full-batch gradient descent
    tdir = rd.path / "trajectory"
    state = rd.load_state()
    sched = (logspaced(cfg.steps, cfg.snapshots) if cfg.spacing == "log"
             else every(max(1, cfg.steps // cfg.snapshots)))

    def checkpoint(index: int, step: int) -> None:
        rd.save_state({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step})

    common = dict(x_test=data.x_test, y_test=data.y_test, optimizer=opt, schedule=sched,
                  run_dir=tdir, total_steps=cfg.steps, on_snapshot=checkpoint)
    if state is not None and (tdir / "trajectory.json").exists():
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        rec = KernelRecorder(model, data.x, data.y, resume=True, step=start, **common)
    else:
        if tdir.exists():
            shutil.rmtree(tdir)                          # crashed before its first checkpoint
        start = 0
        rec = KernelRecorder(model, data.x, data.y,
                             extra_data={"y_clean": data.y_clean, "noise": data.noise}, **common)
    train_recorded(model, opt, data.x, data.y, cfg.steps, start=start, desc="train + record")
    rec.close()


def _windows(S: int, k: int) -> list[tuple[int, int]]:
    b = np.unique(np.round(np.linspace(0, S - 1, k + 1)).astype(int))
    return list(zip(b[:-1].tolist(), b[1:].tolist()))


def run(cfg: Config, rd: RunDir) -> dict[str, Any]:
    """Record, then analyse the trajectory (cells: train, operators, windows, spectrum)."""
    done = rd.cells()
    if "train" not in done:
        _record(cfg, rd)
        rd.save_cell("train", {})
    traj = KernelTrajectory.load(rd.path / "trajectory")
    test_loss = traj.test_loss
    assert traj.U_Q is not None and test_loss is not None     # recorded with a test set
    S, d = len(traj), traj.data
    y_clean, noise = d["y_clean"].to(torch.float64), d["noise"].to(torch.float64)
    vectors = {"noise": noise, "clean signal": y_clean, "residual g(0)": traj.g[0]}
    split_kw: dict[str, Any] = dict(threshold=cfg.threshold, mode=cfg.split_mode)

    if "operators" not in done:
        res = identity_residuals(traj, discretization=cfg.discretization)
        assert res.displacement_error is not None                  # recorded with a test set
        for i, T in enumerate(res.stops):
            rd.log(step=int(traj.steps[T]), time=float(res.times[i]), loss=traj.loss[T],
                   test_loss=test_loss[T], dissipation_error=res.dissipation_error[i],
                   displacement_error=res.displacement_error[i],
                   gradient_error=res.gradient_error[i])
        ops = window_operators(traj, discretization=cfg.discretization)
        split = split_channels(ops.W, vectors=vectors, **split_kw)
        assert ops.G is not None
        vis = mode_visibility(split, ops.G, ops.test_gram_integral)
        g_clean, g_noise = label_noise_gradients(traj, y_clean)
        nt = noise_transfer(split, ops.G, g_noise, g_clean, U_Q_final=traj.U_Q[-1],
                            y_test=d["y_test"], hessian_scale=traj.hessian_scale())
        rd.save_arrays(
            id_times=res.times, dissipation_error=res.dissipation_error,
            displacement_error=res.displacement_error, gradient_error=res.gradient_error,
            W_eigenvalues=vis.eigenvalues, visibility=vis.visibility,
            visibility_bound=vis.bound if vis.bound is not None else np.zeros(0),
            noise_per_mode=split.energies["noise"].per_mode,
            clean_per_mode=split.energies["clean signal"].per_mode,
            x=d["x"], y=d["y"], noisy=(noise != 0), x_test=d["x_test"], y_test=d["y_test"],
            prediction=traj.U_Q[-1], prediction_without_noise=traj.U_Q[-1].reshape(-1)
            - nt.displacement, loss=traj.loss, test_loss=traj.test_loss, times=traj.times)
        rd.save_cell("operators", {
            "identities": res.summary(), "rank": split.rank, "N": traj.N, "cut": split.cut,
            "gap": split.gap, "energies": {k: e.summary() for k, e in split.energies.items()},
            "visibility": vis.summary(), "noise_transfer": nt.summary(),
            "final_train_loss": float(traj.loss[-1]), "final_test_loss": float(traj.test_loss[-1]),
            "snapshots": S, "test_gram_integral": ops.test_gram_integral})

    for i, (a, b) in enumerate(_windows(S, cfg.windows)):
        key = f"window{i}"
        if key in done:
            continue
        ops = window_operators(traj, a, b, discretization=cfg.discretization)
        split = split_channels(ops.W, vectors={"g(s)": traj.g[a]}, **split_kw)
        assert ops.G is not None
        rd.save_cell(key, {
            "start_step": int(traj.steps[a]), "stop_step": int(traj.steps[b]),
            **identity_residuals(traj, a, b, discretization=cfg.discretization).summary(),
            "rank": split.rank, "gap": split.gap,
            **mode_visibility(split, ops.G, ops.test_gram_integral).summary()})

    if "spectrum" not in done:
        every_k = max(1, S // 40)
        spec = kernel_spectra(traj, every=every_k)
        rot = kernel_rotation(traj, k=min(cfg.rotation_k, traj.N), every=every_k)
        sch = spectral_schedule(traj, fraction=cfg.schedule_fraction)
        tl = channel_timeline(traj, vectors={"noise": noise, "clean signal": y_clean},
                              discretization=cfg.discretization, every=max(1, S // 20),
                              **split_kw)
        rd.save_arrays(
            spec_times=spec.times, spec_eigenvalues=spec.eigenvalues,
            spec_residual_energy=spec.residual_energy, rot_times=rot.times,
            rot_mode_angles=rot.mode_angles, rot_subspace_angles=rot.subspace_angles,
            rot_alignment=rot.alignment, sched_eigenvalues=sch.eigenvalues,
            sched_learned=sch.learned_time,
            sched_predicted=sch.predicted_time if sch.predicted_time is not None else
            np.zeros(0), tl_times=tl.times, tl_rank=tl.rank,
            tl_noise=tl.channel_fraction["noise"], tl_clean=tl.channel_fraction["clean signal"])
        rd.save_cell("spectrum", {
            "final_alignment": float(rot.alignment[-1]),
            "final_max_subspace_angle_deg": float(np.degrees(rot.subspace_angles[-1].max())),
            "schedule_rank_correlation": sch.rank_correlation,
            "modes_learned": int(np.isfinite(sch.learned_time).sum()),
            "noise_channel_fraction_start": float(tl.channel_fraction["noise"][0]),
            "noise_channel_fraction_end": float(tl.channel_fraction["noise"][-1])})
    return _summary(rd.cells(), cfg)


def _summary(cells: dict[str, Any], cfg: Config) -> dict[str, Any]:
    op, sp = cells["operators"], cells["spectrum"]
    nt, ident = op["noise_transfer"], op["identities"]
    out = {
        "snapshots": op["snapshots"], "N": op["N"], "channel_rank": op["rank"],
        "gap": op["gap"], "final_train_loss": op["final_train_loss"],
        "final_test_loss": op["final_test_loss"],
        "dissipation_error": ident["dissipation_error"],
        "displacement_error": ident["displacement_error"],
        "gradient_error": ident["gradient_error"],
        **nt,
        **{f"visibility_{k}": v for k, v in op["visibility"].items()}, **sp,
        "energies": op["energies"],
        "windows": [cells[k] for k in sorted(c for c in cells if c.startswith("window"))],
    }
    out["verdict"] = (
        f"label noise: {100 * nt['noise_reservoir_fraction']:.1f}% of its energy in the "
        f"reservoir (clean signal: {100 * nt['clean_reservoir_fraction']:.2f}%), "
        f"{100 * nt['noise_fitted']:.0f}% of it fitted; the noise moves test outputs by "
        f"{nt['noise_test_rms']:.3g} rms through G_Q ({nt['noise_test_rms_reservoir']:.2g} "
        f"from its reservoir part), test MSE {nt['test_mse']:.3g} vs "
        f"{nt['test_mse_without_noise']:.3g} without it (first order). Identities on [0, T] "
        f"({cfg.discretization}): dissipation {ident['dissipation_error']:.2g}, displacement "
        f"{ident['displacement_error']:.2g} relative error.")
    return out


def plot(rd: RunDir) -> list[Path]:
    """Figures from ``arrays.npz`` alone."""
    a = rd.load_arrays()
    s = rd.read_summary()
    cut = rd.cells().get("operators", {}).get("cut")
    out = []
    ax = plot_fit(a["x"], a["y"], a["noisy"], a["x_test"],
                  {"network at T": a["prediction"],
                   "minus noise displacement −G_Q g_noise": a["prediction_without_noise"]},
                  a["y_test"], title="fit; and without the noise's first-order effect")
    out.append(save_figure(ax.figure, rd.figure_path("fit")))
    ax = plot_identity_residuals(a["id_times"], {"dissipation Φ(0)−Φ(t) vs gᵀWg":
                                                 a["dissipation_error"],
                                                 "test displacement vs −G g":
                                                 a["displacement_error"],
                                                 "gradient g(t) vs P g(0)": a["gradient_error"]})
    out.append(save_figure(ax.figure, rd.figure_path("identities")))
    ax = plot_eigenvalue_spectra(a["spec_times"], a["spec_eigenvalues"])
    out.append(save_figure(ax.figure, rd.figure_path("spectra")))
    ax = plot_residual_energy_map(a["spec_times"], a["spec_residual_energy"])
    out.append(save_figure(ax.figure, rd.figure_path("residual_energy")))
    ax = plot_channel_energy(a["tl_times"], {"label noise": a["tl_noise"],
                                             "clean signal": a["tl_clean"]}, rank=a["tl_rank"])
    out.append(save_figure(ax.figure, rd.figure_path("channel_energy")))
    ax = plot_rotation_surface(a["rot_times"], a["rot_mode_angles"])
    out.append(save_figure(ax.figure, rd.figure_path("rotation")))
    ax = plot_visibility(a["W_eigenvalues"], a["visibility"],
                         bound=a["visibility_bound"] if a["visibility_bound"].size else None,
                         cut=cut)
    out.append(save_figure(ax.figure, rd.figure_path("visibility")))
    ax = plot_spectral_schedule(a["sched_eigenvalues"], a["sched_learned"],
                                predicted_time=a["sched_predicted"] if a["sched_predicted"].size
                                else None)
    out.append(save_figure(ax.figure, rd.figure_path("schedule")))
    if s.get("verdict"):
        rd.write_text("verdict.txt", s["verdict"] + "\n")
    return out


EXPERIMENT = Experiment(
    "channels", Config, run, plot,
    presets={"smoke": dict(n=16, n_test=32, width=32, steps=300, snapshots=30, windows=3,
                           rotation_k=6),
             "full": dict()},
    description="MLP on noisy 1-D regression with the kernel recorder: W_S, G_Q, identities, "
                "channel/reservoir split, benign-overfitting check")
