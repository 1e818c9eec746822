"""The main job: a ReLU MLP trained on noisy 1-D regression, watched through its eNTK spectrum.

One training recipe drives both the live page (:mod:`tangentscope.app`) and the headless run
(:func:`run_headless`): full-batch training of ``mlp(1, width, depth, 1)`` (float64) on
:func:`tangentscope.data.noisy_1d_regression`, squared loss ``Φ = ‖u − y‖²/(2n)``. At every
spectrum update the eNTK ``K_SS`` (``n × n``, p = 1) is computed at the current parameters and
decomposed, ``K_SS = Σ_i λ_i v_i v_iᵀ`` (λ descending), and the residual ``r = u − y`` is
projected on its eigenvectors: the *residual energy per eigenvector* is ``|⟨v_i, r⟩|²`` (they sum
to ``‖r‖² = 2nΦ``).

**Signal channel vs reservoir (the page's rule).** Under the frozen-kernel flow the residual
along ``v_i`` decays as ``exp(−λ_i t/n)``. A mode is in the *signal channel* once it has been
learned by the current training time, ``λ_i · t_eff / n > 1`` (its residual decayed by more than
a factor e); the others (``λ_i ≤ λ* = n / t_eff``) form the *reservoir*. ``t_eff`` is the
gradient-flow time the run has covered, measured from how the outputs actually moved: every step
adds the least-squares fit of ``Δu ≈ −Δt · K_SS g`` (:func:`flow_time_increment`), which is
``Δt = lr`` for plain gradient descent up to O(lr²) and gives Adam-type optimizers a clock in the
same units. ``K_SS g = J (Jᵀ g)`` is one Jacobian-vector product with the parameter gradient,
so the clock is exact at every step (no stale kernel).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError, NonFiniteError

__all__ = ["DemoConfig", "ControlError", "LIMITS", "validate_config", "available_optimizers",
           "DemoTrainer", "Snapshot", "channel_threshold", "reservoir_share",
           "flow_time_increment", "numerical_zero", "run_headless", "plot_headless"]

DTYPE = torch.float64
DIVERGED = 1e8  # a loss this many times its initial value counts as diverged


# -- configuration and validation ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The demo's training recipe (the page's controls and the headless run).

    Attributes:
        n: training points, uniform on ``[-1, 1]``.
        noise: standard deviation of the Gaussian label noise.
        width: hidden width of the ReLU MLP.
        depth: number of hidden layers.
        lr: learning rate.
        optimizer: ``"adamw"``, ``"gated_adamw"`` (when :mod:`tangentscope.optim` provides it)
            or ``"sgd"`` (full-batch gradient descent, no momentum).
        seed: seeds the data and the initialization.
        max_steps: training stops (state ``done``) after this many steps.
        steps_per_update: training steps between two spectrum updates.
        weight_decay: decoupled weight decay of (gated) AdamW; ignored by SGD.
        n_test: evenly spaced clean test points on ``[-1, 1]``.
    """

    n: int = 64
    noise: float = 0.3
    width: int = 256
    depth: int = 2
    lr: float = 3e-3
    optimizer: str = "adamw"
    seed: int = 0
    max_steps: int = 3000
    steps_per_update: int = 10
    weight_decay: float = 0.0
    n_test: int = 256


@dataclasses.dataclass(frozen=True)
class Limit:
    """Allowed values of one control: a number range (``lo_open`` excludes ``lo``) or choices."""

    kind: str  # "int" | "float" | "choice"
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    help: str = ""

    def describe(self, choices: tuple[str, ...] = ()) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in choices)
        noun = "an integer" if self.kind == "int" else "a number"
        op = "<" if self.lo_open else "≤"
        return f"{noun} with {self.lo:g} {op} value ≤ {self.hi:g}"


LIMITS: dict[str, Limit] = {
    "n": Limit("int", 2, 512, help="training points"),
    "noise": Limit("float", 0.0, 5.0, help="label-noise standard deviation"),
    "width": Limit("int", 1, 2048, help="hidden width"),
    "depth": Limit("int", 1, 6, help="hidden layers"),
    "lr": Limit("float", 0.0, 10.0, lo_open=True, help="learning rate"),
    "optimizer": Limit("choice", help="optimizer"),
    "seed": Limit("int", 0, 2**31 - 1, help="data and initialization seed"),
    "max_steps": Limit("int", 1, 1_000_000, help="training steps"),
    "steps_per_update": Limit("int", 1, 1000, help="training steps per spectrum update"),
    "weight_decay": Limit("float", 0.0, 1.0, help="AdamW weight decay"),
    "n_test": Limit("int", 2, 4096, help="test points"),
}


class ControlError(ConfigError):
    """A control value out of range; ``field`` and ``allowed`` say which and what is allowed."""

    def __init__(self, field: str, message: str, allowed: dict[str, Any]):
        super().__init__(message)
        self.field = field
        self.allowed = allowed


def available_optimizers() -> dict[str, str]:
    """``name -> label`` of the optimizers this installation offers (gated AdamW if importable)."""
    out = {"adamw": "AdamW"}
    if _gated_adamw_class() is not None:
        out["gated_adamw"] = "gated AdamW"
    out["sgd"] = "SGD (full-batch GD)"
    return out


def _gated_adamw_class() -> Any:
    try:
        from .optim import GatedAdamW  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - absent, or a half-written module: not offered
        return None
    return GatedAdamW


def allowed(field: str) -> dict[str, Any]:
    """The JSON description of a control's allowed values (for error replies and the page)."""
    lim = LIMITS[field]
    if lim.kind == "choice":
        return {"type": "choice", "choices": list(available_optimizers())}
    return {"type": lim.kind, "min": lim.lo, "max": lim.hi, "min_exclusive": lim.lo_open}


def _coerce(field: str, value: Any) -> Any:
    if field not in LIMITS:
        raise ControlError(field, f"unknown control {field!r}; known controls: "
                           f"{', '.join(LIMITS)}", {"type": "unknown"})
    lim = LIMITS[field]
    if lim.kind == "choice":
        choices = tuple(available_optimizers())
        if not isinstance(value, str) or value not in choices:
            raise ControlError(field, f"{field} must be {lim.describe(choices)}, got {value!r}",
                               allowed(field))
        return value
    bad = ControlError(field, f"{field} ({lim.help}) must be {lim.describe()}, got {value!r}",
                       allowed(field))
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad
    try:
        num = float(value)
    except ValueError:
        raise bad from None
    if not math.isfinite(num) or num > lim.hi or num < lim.lo or (lim.lo_open and num == lim.lo):
        raise bad
    if lim.kind == "int":
        if num != int(num):
            raise bad
        return int(num)
    return num


def validate_config(updates: Mapping[str, Any], base: DemoConfig | None = None) -> DemoConfig:
    """``base`` (default :class:`DemoConfig`) with ``updates`` applied, every value checked.

    Accepts numbers, or strings holding numbers (form fields); rejects booleans, NaN/Inf,
    non-integers for integer fields and unknown names.

    Raises:
        ControlError: the first bad field, with a message naming it, its allowed range and how
            to fix it; nothing is applied.
    """
    if not isinstance(updates, Mapping):
        raise ControlError("", f"controls must be a JSON object of name: value, got "
                           f"{type(updates).__name__}", {"type": "object"})
    clean = {k: _coerce(str(k), v) for k, v in updates.items()}
    return dataclasses.replace(base or DemoConfig(), **clean)


# -- the math shown on the page --------------------------------------------------------------
def channel_threshold(t_eff: float, n: int) -> float:
    """``λ* = n / t_eff``: modes with ``λ > λ*`` are learned (signal channel); ``inf`` at t = 0."""
    return n / t_eff if t_eff > 0 else math.inf


def reservoir_share(eigenvalues: np.ndarray, energies: np.ndarray, threshold: float) -> float:
    """Share of ``Σ energies`` on the reservoir modes ``{i : λ_i ≤ threshold}`` (NaN if 0)."""
    total = float(np.sum(energies))
    return float(np.sum(energies[eigenvalues <= threshold])) / total if total > 0 else math.nan


def numerical_zero(eigenvalues: np.ndarray | Tensor) -> float:
    """``λ_max · N · eps(float64)``: eigenvalues below it are zero up to rounding (plots floor
    them here)."""
    lam = np.asarray(eigenvalues, dtype=float)
    return max(float(np.abs(lam).max()), 1e-300) * lam.shape[0] * float(np.finfo(np.float64).eps)


def flow_time_increment(u_before: Tensor, u_after: Tensor, Kg: Tensor) -> float:
    """Gradient-flow time ``Δt`` that best explains one step: ``argmin ‖Δu + Δt K g‖²``.

    Args:
        u_before, u_after: stacked training outputs before and after the step.
        Kg: ``K_SS g`` at ``u_before`` (``g = ∇_u Φ``), same shape.

    Returns:
        ``−⟨Δu, K g⟩ / ‖K g‖²`` (0 when ``K g = 0``); equals ``lr`` for one gradient-descent step
        on a model linear in its parameters.
    """
    kg = Kg.reshape(-1)
    den = float(kg @ kg)
    if den == 0.0:
        return 0.0
    return -float((u_after - u_before).reshape(-1) @ kg) / den


# -- the trainer (the stateful shell) ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The state shown at one spectrum update (numpy arrays, float64).

    Attributes:
        step: training steps taken.
        t_eff: gradient-flow time covered (see module docstring).
        train_loss: ``Φ_S = ‖u − y‖²/(2n)`` on the noisy training labels.
        test_loss: ``‖U_Q − y_Q‖²/(2m)`` against the clean function on ``x_test``.
        eigenvalues: ``(n,)`` eNTK eigenvalues, descending.
        energies: ``(n,)`` residual energy ``|⟨v_i, r⟩|²`` in the same order.
        noise_energies: ``(n,)`` energy of the known label noise ``|⟨v_i, ε⟩|²`` (``y = f* + ε``).
        threshold: ``λ* = n / t_eff`` (``inf`` before training).
        reservoir_fraction: share of ``‖r‖²`` on modes with ``λ_i ≤ λ*``.
        fit: ``(n_test,)`` current predictions on ``x_test``.
        spectrum_seconds: wall time of the eNTK + eigendecomposition.
    """

    step: int
    t_eff: float
    train_loss: float
    test_loss: float
    eigenvalues: np.ndarray
    energies: np.ndarray
    noise_energies: np.ndarray
    threshold: float
    reservoir_fraction: float
    fit: np.ndarray
    spectrum_seconds: float


_BUILD_LOCK = threading.Lock()


class DemoTrainer:
    """Full-batch training of the demo MLP with the eNTK spectrum on request.

    Args:
        cfg: a validated :class:`DemoConfig`.
        implementation: the :func:`tangentscope.entk` implementation (``"auto"``: fastest).
    """

    def __init__(self, cfg: DemoConfig, *, implementation: str = "auto"):
        from .data import noisy_1d_regression
        from .models import mlp

        self.cfg = cfg
        self.implementation = implementation
        self.data = noisy_1d_regression(cfg.n, cfg.noise, n_test=cfg.n_test, seed=cfg.seed,
                                        dtype=DTYPE)
        with _BUILD_LOCK, torch.random.fork_rng():  # reproducible init even with many sessions
            torch.manual_seed(cfg.seed)
            self.model = mlp(1, cfg.width, cfg.depth, 1).to(DTYPE)
        self.optimizer = _make_optimizer(cfg, self.model)
        self.step = 0
        self.t_eff = 0.0
        self._last: tuple[Tensor, Tensor] | None = None  # (u, K g) of the previous step
        self._loss0: float | None = None

    def set_lr(self, lr: float) -> None:
        """Change the learning rate in place (the run continues)."""
        self.cfg = dataclasses.replace(self.cfg, lr=lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train(self, steps: int) -> float:
        """Take ``steps`` full-batch steps; return the last step's training loss.

        Raises:
            NonFiniteError: the loss became NaN/Inf or grew ``1e8``-fold over its initial value
                (the learning rate is too large).
        """
        import torch.autograd.forward_ad as fwad
        from torch.func import functional_call

        x, y, n = self.data.x, self.data.y, self.cfg.n
        params = dict(self.model.named_parameters())
        loss = math.nan
        for _ in range(steps):
            u = self.model(x)
            if self._last is not None:
                self.t_eff += flow_time_increment(self._last[0], u.detach(), self._last[1])
            phi = 0.5 * ((u - y) ** 2).sum() / n
            loss = float(phi.detach())
            if self._loss0 is None:
                self._loss0 = loss
            if not math.isfinite(loss) or loss > DIVERGED * max(self._loss0, 1e-12):
                raise NonFiniteError(self.divergence_message())
            self.optimizer.zero_grad(set_to_none=True)
            phi.backward()
            # K g = J (Jᵀ g) and Jᵀ g is the parameter gradient: one forward-mode pass
            with torch.no_grad(), fwad.dual_level():
                dual = {k: fwad.make_dual(p.detach(), p.grad) for k, p in params.items()}
                Kg = fwad.unpack_dual(functional_call(self.model, dual, (x,))).tangent
            self._last = (u.detach(), Kg)
            self.optimizer.step()
            self.step += 1
        return loss

    def divergence_message(self) -> str:
        return (f"training diverged at step {self.step} (the loss blew up) with "
                f"lr={self.cfg.lr:g}: lower the learning rate and press reset (full-batch GD on "
                "this loss is stable only for lr < 2n/λ_max, shown with the spectrum)")

    def snapshot(self) -> Snapshot:
        """eNTK spectrum, residual energies and losses at the current parameters."""
        from .dynamics.channels import split_channels
        from .kernels.entk import entk

        d, n = self.data, self.cfg.n
        with torch.no_grad():
            u = self.model(d.x)
            fit = self.model(d.x_test)
        t0 = time.perf_counter()
        K = entk(self.model, d.x, implementation=self.implementation)
        thr = channel_threshold(self.t_eff, n)
        split = split_channels(K.reshape(n, n), threshold=thr, mode="absolute",
                               vectors={"residual": u - d.y, "noise": d.noise})
        seconds = time.perf_counter() - t0
        res, noise = split.energies["residual"], split.energies["noise"]
        return Snapshot(
            step=self.step, t_eff=self.t_eff,
            train_loss=float(0.5 * ((u - d.y) ** 2).sum() / n),
            test_loss=float(0.5 * ((fit - d.y_test) ** 2).mean()),
            eigenvalues=split.eigenvalues.numpy(), energies=res.per_mode,
            noise_energies=noise.per_mode, threshold=thr,
            reservoir_fraction=res.reservoir_fraction,
            fit=fit.reshape(-1).numpy(), spectrum_seconds=seconds)


def _make_optimizer(cfg: DemoConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr)
    if cfg.optimizer == "gated_adamw":
        cls = _gated_adamw_class()
        if cls is None:
            raise ControlError("optimizer", "gated AdamW is not available in this installation "
                               "(tangentscope.optim.GatedAdamW); choose adamw or sgd",
                               allowed("optimizer"))
        return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


# -- headless run ------------------------------------------------------------------------------
def run_headless(out: str | Path | None = None, *, log_every: int | None = None,
                 show_progress: bool | None = None, torch_threads: int | None = 1,
                 **config: Any) -> dict[str, Any]:
    """Train the page's default configuration without a browser; write figures and a summary.

    Args:
        out: run directory (default ``runs/demo/<time>``); must not already hold a run.
        log_every: steps between spectrum snapshots logged to ``metrics.csv`` (default
            ``max_steps // 30``, at least ``steps_per_update``).
        show_progress: progress bar (default: when stderr is a terminal).
        torch_threads: intra-op threads while training (restored afterwards; ``None``: leave
            as is). One is fastest for this small model, above all on a busy machine.
        **config: :class:`DemoConfig` fields overriding the page's defaults.

    Returns:
        The summary written to ``summary.json`` (plus ``run_dir``): final train/test loss,
        eigenvalues and residual energies before/after, the fraction of residual energy in the
        reservoir before/after under the final threshold ``λ* = n / t_eff``, and timings.

    Raises:
        ControlError: a bad config value (before any work).
        ConfigError: ``out`` already holds a run.
    """
    from .io import RunDir

    cfg = validate_config(config)
    if cfg.optimizer not in available_optimizers():
        raise ControlError("optimizer", f"optimizer {cfg.optimizer!r} is not available here",
                           allowed("optimizer"))
    every = log_every or max(cfg.steps_per_update, cfg.max_steps // 30)
    path = Path(out) if out is not None else Path("runs/demo") / _dt.datetime.now().strftime(
        "%Y%m%d-%H%M%S")
    if (path / "config.json").exists():
        raise ConfigError(f"{path} already holds a run: choose another --out directory")
    rd = RunDir.create(path, cfg, meta={"experiment": "demo", "log_every": every})
    print(f"tangentscope demo --headless: writing {path}", flush=True)
    threads = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    try:
        summary = _train_headless(cfg, rd, every, show_progress)
    finally:
        torch.set_num_threads(threads)
    figures = plot_headless(path)
    rd.set_status("complete")
    print(f"train loss {summary['initial_train_loss']:.4g} → {summary['final_train_loss']:.4g}, "
          f"test loss {summary['initial_test_loss']:.4g} → {summary['final_test_loss']:.4g}; "
          f"residual energy in the reservoir (λ ≤ {summary['channel_threshold']:.3g}) "
          f"{summary['reservoir_fraction_before']:.1%} → "
          f"{summary['reservoir_fraction_after']:.1%}", flush=True)
    for f in figures:
        print(f"  {f}")
    print(f"  {path / 'summary.json'}", flush=True)
    return {**summary, "run_dir": str(path)}


def _train_headless(cfg: DemoConfig, rd: Any, every: int, show_progress: bool | None
                    ) -> dict[str, Any]:
    from ._utils import progress

    t_start = time.perf_counter()
    trainer = DemoTrainer(cfg)
    before = trainer.snapshot()
    rd.log(**_row(before))
    train_s, spec_s, n_spec = 0.0, before.spectrum_seconds, 1
    snap = before
    for k in progress(range(0, cfg.max_steps, every), desc="demo",
                      total=math.ceil(cfg.max_steps / every),
                      disable=None if show_progress is None else not show_progress):
        t0 = time.perf_counter()
        trainer.train(min(every, cfg.max_steps - k))
        train_s += time.perf_counter() - t0
        snap = trainer.snapshot()
        spec_s += snap.spectrum_seconds
        n_spec += 1
        rd.log(**_row(snap))
    after = snap
    thr = after.threshold
    d = trainer.data
    rd.save_arrays(x=d.x.reshape(-1), y=d.y.reshape(-1), x_test=d.x_test.reshape(-1),
                   y_test=d.y_test.reshape(-1), fit_before=before.fit, fit_after=after.fit,
                   eigenvalues_before=before.eigenvalues, eigenvalues_after=after.eigenvalues,
                   energies_before=before.energies, energies_after=after.energies,
                   noise_energies_before=before.noise_energies,
                   noise_energies_after=after.noise_energies)
    summary = {
        "config": dataclasses.asdict(cfg),
        "steps": trainer.step,
        "t_eff": trainer.t_eff,
        "final_train_loss": after.train_loss,
        "final_test_loss": after.test_loss,
        "initial_train_loss": before.train_loss,
        "initial_test_loss": before.test_loss,
        "channel_threshold": thr,
        "threshold_rule": "reservoir = {i : λ_i ≤ n / t_eff} (not yet learned under the "
                          "frozen-kernel flow at the final time t_eff)",
        "n_reservoir_before": int((before.eigenvalues <= thr).sum()),
        "n_reservoir_after": int((after.eigenvalues <= thr).sum()),
        "reservoir_fraction_before": reservoir_share(before.eigenvalues, before.energies, thr),
        "reservoir_fraction_after": after.reservoir_fraction,
        "noise_reservoir_fraction_before": reservoir_share(before.eigenvalues,
                                                           before.noise_energies, thr),
        "noise_reservoir_fraction_after": reservoir_share(after.eigenvalues,
                                                          after.noise_energies, thr),
        "eigenvalues_before": before.eigenvalues,
        "eigenvalues_after": after.eigenvalues,
        "energies_before": before.energies,
        "energies_after": after.energies,
        "noise_energies_before": before.noise_energies,
        "noise_energies_after": after.noise_energies,
        "timings": {"total_s": time.perf_counter() - t_start, "train_s": train_s,
                    "spectrum_s_mean": spec_s / n_spec, "spectra": n_spec,
                    "steps_per_s": trainer.step / max(train_s, 1e-12),
                    "torch_threads": torch.get_num_threads()},
    }
    rd.write_summary(summary)
    return summary


def _row(s: Snapshot) -> dict[str, Any]:
    return {"step": s.step, "t_eff": s.t_eff, "train_loss": s.train_loss,
            "test_loss": s.test_loss, "threshold": s.threshold,
            "reservoir_fraction": s.reservoir_fraction, "lambda_max": float(s.eigenvalues[0]),
            "lambda_min": float(s.eigenvalues[-1]), "spectrum_s": s.spectrum_seconds}


def plot_headless(run_dir: str | Path) -> list[Path]:
    """Draw ``fit.png``, ``spectrum.png`` and ``losses.png`` from a headless run directory."""
    from .io import RunDir
    from .viz._mpl import pyplot, save_figure

    rd = RunDir.open(run_dir)
    a, s = rd.load_arrays(), rd.read_summary()
    plt = pyplot()
    out = []

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(a["x_test"], a["y_test"], color="0.4", lw=1.5, label="clean function")
    ax.scatter(a["x"], a["y"], s=12, color="k", zorder=3, label="noisy training data")
    ax.plot(a["x_test"], a["fit_before"], color="#9aa5b1", lw=1, ls="--", label="fit at init")
    ax.plot(a["x_test"], a["fit_after"], color="#1f77b4", lw=1.8,
            label=f"fit after {s['steps']} steps")
    ax.set(xlabel="x", ylabel="f(x)", title="Data and fit")
    ax.legend(loc="best")
    out.append(save_figure(fig, rd.figure_path("fit")))

    thr = s["channel_threshold"]
    fig, axes = plt.subplots(2, 2, figsize=(9, 5.2), sharex=True)
    for col, (when, lam, en, noise) in enumerate((
            ("before training", a["eigenvalues_before"], a["energies_before"],
             a["noise_energies_before"]),
            (f"after {s['steps']} steps", a["eigenvalues_after"], a["energies_after"],
             a["noise_energies_after"]))):
        idx = np.arange(1, len(lam) + 1)
        res = lam <= thr
        colors = np.where(res, "#e6862a", "#1f77b4")
        zero = numerical_zero(lam)
        axes[0, col].bar(idx, np.maximum(lam, zero), color=colors, width=0.9)
        axes[0, col].set_yscale("log")
        axes[0, col].set_ylim(zero / 2, lam.max() * 3)
        axes[0, col].axhline(thr, color="k", lw=0.8, ls=":")
        axes[0, col].set_title(f"eNTK eigenvalues λ_i, {when}")
        floor = max(en.max(), 1e-300) * 1e-12
        axes[1, col].bar(idx, np.maximum(en, floor), color=colors, width=0.9)
        axes[1, col].scatter(idx, np.maximum(noise, floor), marker="_", color="k", s=25,
                             lw=1.2, zorder=3)
        axes[1, col].set_yscale("log")
        frac = s["reservoir_fraction_before" if col == 0 else "reservoir_fraction_after"]
        axes[1, col].set_title(f"residual energy |⟨v_i, r⟩|²  ({frac:.0%} in reservoir)")
        axes[1, col].set_xlabel("eigenvector i (λ descending)")
    axes[0, 0].set_ylabel("λ_i")
    axes[1, 0].set_ylabel("|⟨v_i, r⟩|²")
    fig.suptitle(f"blue: signal channel (λ > n/t_eff = {thr:.3g}), orange: reservoir;  black "
                 "ticks: the known label noise |⟨v_i, ε⟩|²", fontsize=9)
    out.append(save_figure(fig, rd.figure_path("spectrum")))

    m = rd.metrics_columns("step", "train_loss", "test_loss", "reservoir_fraction")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(m["step"], m["train_loss"], label="train Φ (noisy labels)")
    ax.plot(m["step"], m["test_loss"], color="#2ca02c", label="test (clean function)")
    ax.set(yscale="log", xlabel="step", ylabel="½ · mean squared error", title="Losses")
    ax2 = ax.twinx()
    ax2.plot(m["step"], m["reservoir_fraction"], color="#e6862a", lw=1, ls="--",
             label="share of residual energy in reservoir (λ_i ≤ n/t_eff, right axis)")
    ax2.set(ylim=(0, 1.02), ylabel="fraction in reservoir")
    ax2.grid(False)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    out.append(save_figure(fig, rd.figure_path("losses")))
    return out
