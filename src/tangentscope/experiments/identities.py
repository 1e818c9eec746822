"""Convergence of the operator identities (operators issue): the table in docs/operators.md.

``tangentscope run identities [--preset smoke|full]`` trains a small MLP on noisy 1-D
regression for a fixed training time ``τ = Σ lr`` with snapshots at *every* step, for each
optimizer (full-batch GD, minibatch SGD, Adam with the preconditioned kernel ``J D Jᵀ``) and
each learning rate, then thins the snapshots to every ``k``-th step and reports, for each
discretization, the relative errors of

- the dissipation identity ``Φ(0) − Φ(T) = g(0)ᵀ W_S g(0)`` and
- the test-displacement identity ``U_Q(T) − U_Q(0) = −G_Q g(0)``

on the whole window. ``table.md`` in the run directory is the table; ``metrics.csv`` has one row
per (optimizer, activation, lr, spacing, discretization).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..dynamics import KernelRecorder, every, identity_residuals
from ..dynamics.operators import Discretization
from ..errors import ConfigError
from ..io import RunDir
from ..optim.spec import build_optimizer
from ..viz import pyplot, save_figure
from ._framework import Experiment
from ._harness import check_positive, regression_mlp, regression_task, train_recorded

#: The training protocols compared → their optimizer spec: full-batch gradient descent (``gd``),
#: minibatch SGD (``sgd``, ``batch_size`` examples per step) and full-batch Adam (``adam``).
PROTOCOLS = {"gd": "sgd", "sgd": "sgd", "adam": "adam"}


@dataclasses.dataclass(frozen=True)
class Config:
    """Run configuration (``--field value``; tuples as ``a,b,c``).

    Attributes:
        seed: seed of the data draw, the network initialization and the SGD batch order.
        n: training points of the noisy 1-D regression.
        n_test: test points for the test-displacement identity (evenly spaced).
        noise: std of the label noise on corrupted points.
        noise_fraction: fraction of training labels corrupted.
        width: hidden width of the float64 MLP ``1 → width → … → 1``.
        depth: number of hidden layers of the MLP.
        activations: hidden activations, one run each (relu, tanh, gelu, silu, softplus, sin).
        optimizers: training protocols: gd (full-batch), sgd (minibatches) and adam.
        adam_lrs: Adam learning rates, one run each.
        adam_precondition: kernel preconditioner of the Adam runs: adam (the next step's
            1/(√v̂ + ε), current gradient included) and/or adam_state (the stored state only).
        spacings: keep every k-th snapshot, one evaluation per k (coarser discretization).
        discretizations: rules turning the recorded kernels into the window operators (exp,
            midpoint, gd: the recorded steps, euler).
    """

    seed: int = 0
    n: int = 24
    n_test: int = 48
    noise: float = 1.0
    noise_fraction: float = 0.25
    width: int = 64
    depth: int = 2
    activations: tuple[str, ...] = ("tanh", "relu")
    optimizers: tuple[str, ...] = ("gd", "sgd", "adam")
    tau: float = 4.0                                  # GD/SGD training time Σ lr
    lrs: tuple[float, ...] = (0.2, 0.1, 0.05, 0.025)  # GD/SGD learning rates
    batch_size: int = 8                               # SGD minibatch
    adam_tau: float = 0.4                             # Adam training time Σ lr
    adam_lrs: tuple[float, ...] = (0.01, 0.005, 0.0025)
    adam_precondition: tuple[str, ...] = ("adam", "adam_state")
    spacings: tuple[int, ...] = (1, 4, 16)
    discretizations: tuple[str, ...] = ("midpoint", "exp", "gd", "euler")

    def __post_init__(self) -> None:
        check_positive(self, "tau", "adam_tau", "lrs", "adam_lrs")
        bad = [o for o in self.optimizers if o not in PROTOCOLS]
        if bad:
            raise ConfigError(f"unknown optimizer(s) {bad}; one of {tuple(PROTOCOLS)}")


def _cell(cfg: Config, opt_kind: str, act: str, lr: float) -> list[dict[str, Any]]:
    """Train one run with every-step snapshots; errors for every spacing × discretization."""
    data = regression_task(cfg.n, cfg.noise, cfg.n_test, cfg.noise_fraction, cfg.seed)
    model = regression_mlp(cfg.seed, cfg.width, cfg.depth, act)
    opt = build_optimizer(PROTOCOLS[opt_kind], model, lr=lr).optimizer
    tau = cfg.adam_tau if opt_kind == "adam" else cfg.tau
    steps = int(round(tau / lr))
    kinds = cfg.adam_precondition if opt_kind == "adam" else (None,)
    recs = {k: KernelRecorder(model, data.x, data.y, x_test=data.x_test, y_test=data.y_test,
                              optimizer=opt, schedule=every(1), precondition=k, verbose=False,
                              test_gram=False) for k in kinds}
    train_recorded(model, opt, data.x, data.y, steps,
                   batch_size=cfg.batch_size if opt_kind == "sgd" else None, seed=cfg.seed,
                   desc=f"{opt_kind} {act} lr={lr:g}")
    rows = []
    for kind, rec in recs.items():
        rec.close()
        traj = rec.trajectory()
        if not np.isfinite(traj.loss).all():
            raise RuntimeError(f"{opt_kind} lr={lr} diverged; lower the learning rates")
        for k in cfg.spacings:
            if k > steps:
                continue
            sub = traj.select(list(range(0, steps + 1, k)) + ([steps] if steps % k else []))
            for disc in cfg.discretizations:
                r = identity_residuals(sub, discretization=cast(Discretization, disc)).summary()
                rows.append({"optimizer": opt_kind if kind is None else f"{opt_kind}[{kind}]",
                             "activation": act, "lr": lr, "steps": steps, "spacing": k,
                             "discretization": disc,
                             "dissipation_error": r["dissipation_error"],
                             "displacement_error": r["displacement_error"],
                             "loss_drop": r["dissipation_actual"]})
    return rows


def run(cfg: Config, rd: RunDir) -> dict[str, Any]:
    """One cell per (optimizer, activation, learning rate); then the table."""
    done = rd.cells()
    for opt_kind in cfg.optimizers:
        lrs = cfg.adam_lrs if opt_kind == "adam" else cfg.lrs
        for act in cfg.activations:
            for lr in lrs:
                key = f"{opt_kind}-{act}-lr{lr:g}"
                if key in done:
                    continue
                rows = _cell(cfg, opt_kind, act, lr)
                for r in rows:
                    rd.log(**r)
                rd.save_cell(key, {"rows": rows})
    rows = [r for c in rd.cells().values() for r in c["rows"]]
    table = convergence_table(rows, cfg.discretizations)
    rd.write_text("table.md", table)
    best = {}
    for r in rows:
        if r["optimizer"] == "gd" and r["spacing"] == 1 and r["discretization"] == "midpoint":
            best[f"gd_{r['activation']}_lr{r['lr']:g}_dissipation"] = r["dissipation_error"]
            best[f"gd_{r['activation']}_lr{r['lr']:g}_displacement"] = r["displacement_error"]
    return {"rows": len(rows), **best, "table": table}


def convergence_table(rows: list[dict[str, Any]], discretizations: tuple[str, ...]) -> str:
    """Markdown tables, cells ``dissipation / displacement`` relative error, one line per
    (optimizer, activation, lr): the first discretization at every snapshot spacing, then every
    discretization at the smallest and at the largest spacing."""
    spacings = sorted({r["spacing"] for r in rows})
    index = {(r["optimizer"], r["activation"], r["lr"], r["spacing"], r["discretization"]): r
             for r in rows}
    keys = list(dict.fromkeys((r["optimizer"], r["activation"], r["lr"], r["steps"])
                              for r in rows))

    def table(title: str, cols: list[tuple[int, str]]) -> list[str]:
        out = [f"**{title}**", "", "| optimizer | act | lr | steps | "
               + " | ".join(f"{d} k={k}" for k, d in cols) + " |",
               "|" + "---|" * (4 + len(cols))]
        for opt, act, lr, steps in keys:
            vals = []
            for k, d in cols:
                r = index.get((opt, act, lr, k, d))
                vals.append("–" if r is None else
                            f"{r['dissipation_error']:.1e} / {r['displacement_error']:.1e}")
            out.append(f"| {opt} | {act} | {lr:g} | {steps} | " + " | ".join(vals) + " |")
        return out + [""]

    first = discretizations[0]
    lines = table(f"{first}, by snapshot spacing k (steps between snapshots)",
                  [(k, first) for k in spacings])
    for k in sorted({spacings[0], spacings[-1]}):
        lines += table(f"all discretizations, k={k}", [(k, d) for d in discretizations])
    return "\n".join(lines)


def plot(rd: RunDir) -> list[Path]:
    """``table.md`` and the errors against learning rate, per spacing (midpoint)."""

    rows = [r for c in rd.cells().values() for r in c["rows"]]
    disc = tuple(dict.fromkeys(r["discretization"] for r in rows))
    rd.write_text("table.md", convergence_table(rows, disc))
    plt = pyplot()
    from matplotlib.ticker import NullFormatter

    opts = list(dict.fromkeys(r["optimizer"] for r in rows))
    spacings = sorted({r["spacing"] for r in rows})
    colors = dict(zip(spacings, plt.get_cmap("viridis")(np.linspace(0, 0.85, len(spacings)))))
    out = []
    for which in ("dissipation_error", "displacement_error"):
        cols = min(len(opts), 2)
        nrows = -(-len(opts) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
        for ax, opt in zip(axes.flat, opts):
            for act, ls in zip(sorted({r["activation"] for r in rows}), ("-", "--", ":")):
                for k in spacings:
                    sel = sorted((r["lr"], r[which]) for r in rows if r["optimizer"] == opt
                                 and r["activation"] == act and r["spacing"] == k
                                 and r["discretization"] == "midpoint")
                    if sel:
                        x, y = zip(*sel)
                        ax.plot(x, np.maximum(y, 1e-17), ls, marker="o", ms=3, lw=1.2,
                                color=colors[k], label=f"{act}, k={k}")
            ax.set(xscale="log", yscale="log", title=opt, xlabel="learning rate",
                   ylabel="relative error")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(opts):]:
            ax.set_visible(False)
        fig.suptitle(f"{which.split('_')[0]} identity (midpoint); k = steps between snapshots")
        fig.tight_layout()
        out.append(save_figure(fig, rd.figure_path(which.split("_")[0])))
    return out


EXPERIMENT = Experiment(
    "identities", Config, run, plot,
    presets={"smoke": dict(n=12, n_test=16, width=32, activations=("tanh",), tau=1.0,
                           lrs=(0.1, 0.05), adam_tau=0.1, adam_lrs=(0.01,),
                           spacings=(1, 4)),
             "full": dict()},
    description="identity errors vs learning rate and snapshot spacing (GD, SGD, Adam J D Jᵀ)")
