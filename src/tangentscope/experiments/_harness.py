"""The experiments' shared machinery (private): training loops, cells, seeds and the job pool.

- :func:`train_network` — one small full-batch or minibatch training loop (squared or
  cross-entropy loss) that a :class:`~tangentscope.dynamics.KernelRecorder` can watch, logging
  a :class:`TrainHistory`; :func:`train_recorded`, the plain loop of the operator experiments;
- :func:`regression_task` / :func:`regression_mlp` — the noisy 1-D regression and the float64
  MLP of the channels and identities experiments;
- :func:`snapshot_schedule` — every ``k`` steps plus a few log-spaced ones;
- :data:`OPTIMIZERS` / :func:`optimizer_spec` — the optimizers the phenomena experiments compare,
  as optimizer specs;
- :func:`run_cells` — the one training-cell runner: ``key → fn()`` cells in order, skipping
  those a resumed run directory already holds;
- :func:`seed_table` — per-metric median/min/max over the seeds of a list of records (built on
  the one :func:`~tangentscope.experiments._framework.seed_stats`);
- :func:`censored_stats` / :func:`censored_median` / :func:`censored_ratio` — steps-to-target
  statistics over seeds where a seed that never reached the target counts as ∞;
- :func:`run_jobs` — the one job pool: jobs in this process, or in ``workers`` spawned processes
  (``cuda_workers`` of them on the GPU);
- :func:`progress` — the experiments' one progress reporter: a bar on a terminal, periodic
  lines with an ETA otherwise (a log file);
- :func:`torch_threads`, :func:`param_vector`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing as mp
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import numpy as np
import torch
from torch import Tensor, nn

from .._durable import read_torch
from .._utils import progress as _bar
from ..data import noisy_1d_regression
from ..dynamics import Schedule, logspaced
from ..dynamics.label_noise import classification_error
from ..errors import ConfigError, DamagedFileError, RecoveredFileWarning, ShapeError
from ..io import RunDir
from ..losses import SquaredLoss
from ..models import mlp
from ..optim.spec import OptimizerSpec, parse_optimizer
from ._framework import seed_stats

__all__ = ["TrainHistory", "train_network", "train_recorded", "regression_task",
           "regression_mlp", "snapshot_schedule", "OPTIMIZERS", "optimizer_spec", "CellOutput",
           "run_cells", "seed_table", "censored_stats", "censored_median", "censored_ratio",
           "run_jobs", "torch_threads", "param_vector", "check_positive", "check_nonnegative",
           "load_checkpoint", "progress"]

LossName = Literal["squared", "cross_entropy"]
J = TypeVar("J")
T = TypeVar("T")


# -- progress -------------------------------------------------------------------------------------
def progress(iterable: Iterable[T], *, desc: str = "", total: int | None = None,
             interval: float | None = None) -> Iterator[T]:
    """Report the progress of a long loop of an experiment.

    On a terminal (stderr a TTY, or ``TANGENTSCOPE_PROGRESS=1``) a tqdm bar; otherwise — a log
    file, CI — one line to stderr a few seconds after the start and then every ``interval``
    seconds, ``[tangentscope] desc: 120/1000 (12%), 0:00:31 elapsed, ETA 0:03:47``, and a last
    line when the loop ends; ``TANGENTSCOPE_PROGRESS=0`` silences both.

    Args:
        iterable: the loop; ``total`` defaults to its ``len()`` when it has one.
        desc: what is being done.
        total: number of items (for the percentage and the ETA).
        interval: seconds between lines (default ``TANGENTSCOPE_PROGRESS_INTERVAL``, else 30);
            the first line comes after ``min(interval, 5)`` seconds.
    """
    env = os.environ.get("TANGENTSCOPE_PROGRESS")
    if total is None and hasattr(iterable, "__len__"):
        total = len(cast(Sequence[T], iterable))
    if env == "0":
        return iter(iterable)
    if env == "1" or sys.stderr.isatty():
        return _bar(iterable, desc=desc, total=total, disable=False)
    if interval is None:
        try:
            interval = float(os.environ.get("TANGENTSCOPE_PROGRESS_INTERVAL", "30"))
        except ValueError:
            interval = 30.0
    return _progress_lines(iterable, desc, total, max(interval, 0.0))


def _progress_lines(iterable: Iterable[T], desc: str, total: int | None, interval: float
                    ) -> Iterator[T]:
    t0 = time.monotonic()
    last, printed, n = t0, 0, 0
    for item in iterable:
        yield item
        n += 1
        now = time.monotonic()
        if now - last >= (min(interval, 5.0) if not printed else interval):
            print(_progress_line(desc, n, total, now - t0), file=sys.stderr, flush=True)
            last, printed = now, printed + 1
    if printed:
        print(_progress_line(desc, n, total, time.monotonic() - t0, done=True), file=sys.stderr,
              flush=True)


def _progress_line(desc: str, n: int, total: int | None, elapsed: float, done: bool = False
                   ) -> str:
    def hms(s: float) -> str:
        s = int(round(s))
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"

    what = f"{n}/{total} ({100 * n / total:.0f}%)" if total else f"{n}"
    if done:
        return f"[tangentscope] {desc}: done, {what} in {hms(elapsed)}"
    eta = f", ETA {hms(elapsed / n * (total - n))}" if total and n else ""
    return f"[tangentscope] {desc}: {what}, {hms(elapsed)} elapsed{eta}"


# -- training loops -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainHistory:
    """Losses and errors logged during :func:`train_network`.

    Attributes:
        steps: ``(L,)`` optimizer steps at which the row was logged.
        train_loss: ``(L,)`` full-batch training loss ``Φ``.
        train_error: ``(L,)`` error against the observed (possibly noisy) labels.
        test_error: ``(L,)`` error on the clean test labels (NaN without a test set).
        seconds: wall time of training (logging excluded).
    """

    steps: np.ndarray
    train_loss: np.ndarray
    train_error: np.ndarray
    test_error: np.ndarray
    seconds: float

    def first_zero_error_step(self) -> int | None:
        """The first logged step with zero training error (``None``: never interpolated)."""
        hit = np.nonzero(self.train_error == 0)[0]
        return int(self.steps[hit[0]]) if hit.size else None


def _loss_fn(loss: LossName) -> Callable[[Tensor, Tensor], Tensor]:
    if loss == "squared":
        return lambda out, y: 0.5 * (out - y).pow(2).sum(1).mean()
    if loss == "cross_entropy":
        return lambda out, y: nn.functional.cross_entropy(out, y)
    raise ConfigError(f"loss must be 'squared' or 'cross_entropy', got {loss!r}")


def train_network(model: nn.Module, x: Tensor, y: Tensor, labels: Tensor,
                  optimizer: Any, steps: int, *, loss: LossName = "squared",
                  batch_size: int | None = None, seed: int = 0, x_test: Tensor | None = None,
                  labels_test: Tensor | None = None, log_every: int = 0,
                  stop_at_zero_error: bool = False,
                  on_log: Callable[[int, dict[str, float]], None] | None = None) -> TrainHistory:
    """Train ``model`` on ``(x, y)``; log full-batch loss and errors every ``log_every`` steps.

    The loss on a batch ``b`` is ``Φ_b = Σ_{i∈b} ‖u_i − y_i‖²/(2|b|)`` (squared; ``Φ`` of
    docs/notation.md, so a :class:`KernelRecorder` needs ``loss_scale=1``) or the mean
    cross-entropy.

    Args:
        model: the network (``(n, d) → (n, p)``).
        x: ``(n, d)`` inputs; ``y``: targets (``(n, p)`` floats for squared loss, ``(n,)``
            class indices for cross-entropy); ``labels``: ``(n,)`` observed labels for the error.
        optimizer: anything with ``zero_grad``/``step`` (a ``torch.optim.Optimizer`` or the
            result of :func:`tangentscope.optim.spec.build_optimizer`; a recorder may be
            attached to it).
        steps: optimizer steps.
        batch_size: ``None`` or ``>= n`` → full batch; else reshuffled minibatches per epoch.
        seed: seed of the minibatch order.
        x_test, labels_test: clean test set for the logged test error.
        log_every: log every this many steps (0: only at the start and the end).
        stop_at_zero_error: stop at the first logged step with zero training error.
        on_log: ``fn(step, row)`` after each log.

    Raises:
        ShapeError: inputs and targets of different lengths.
    """
    n = x.shape[0]
    if y.shape[0] != n or labels.shape[0] != n:
        raise ShapeError(f"x has {n} rows but y has {y.shape[0]} and labels {labels.shape[0]}")
    if steps < 0:
        raise ConfigError(f"steps must be >= 0, got {steps}")
    lossf = _loss_fn(loss)
    full = batch_size is None or batch_size >= n
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(n, generator=gen), 0
    rows: list[tuple[int, float, float, float]] = []

    def log(step: int) -> bool:
        with torch.no_grad():
            out = model(x)
            row = (step, float(lossf(out, y)), classification_error(out, labels),
                   float("nan") if x_test is None or labels_test is None
                   else classification_error(model(x_test), labels_test))
        rows.append(row)
        if on_log is not None:
            on_log(step, {"train_loss": row[1], "train_error": row[2], "test_error": row[3]})
        return stop_at_zero_error and row[2] == 0.0

    elapsed, t0 = 0.0, time.perf_counter()
    done = log(0)
    for step in range(1, steps + 1):
        if done:
            break
        t0 = time.perf_counter()
        if full:
            xb, yb = x, y
        else:
            assert batch_size is not None
            if pos + batch_size > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos:pos + batch_size]
            pos += batch_size
            xb, yb = x[idx], y[idx]
        optimizer.zero_grad(set_to_none=True)
        lossf(model(xb), yb).backward()
        optimizer.step()
        elapsed += time.perf_counter() - t0
        if (log_every and step % log_every == 0) or step == steps:
            done = log(step)
    a = np.array(rows, dtype=float)
    return TrainHistory(a[:, 0].astype(int), a[:, 1], a[:, 2], a[:, 3], elapsed)


def train_recorded(model: nn.Module, opt: Any, x: Tensor, y: Tensor, steps: int, *,
                   start: int = 0, batch_size: int | None = None, seed: int = 0,
                   desc: str = "train", on_step: Callable[[int], None] | None = None) -> None:
    """Plain training loop (full batch, or minibatches of ``batch_size`` drawn with ``seed``) on
    ``Φ = ‖f(x) − y‖²/(2·batch)``; a recorder attached to ``opt`` does the snapshots."""
    loss = SquaredLoss()
    gen = torch.Generator().manual_seed(seed * 7919 + start)
    for step in progress(range(start, steps), desc=desc, total=steps - start):
        idx = (slice(None) if batch_size is None
               else torch.randperm(x.shape[0], generator=gen)[:batch_size])
        opt.zero_grad()
        loss.value(model(x[idx]), y[idx]).backward()
        opt.step()
        if on_step is not None:
            on_step(step + 1)


def regression_task(n: int, noise: float, n_test: int, noise_fraction: float, seed: int) -> Any:
    """Noisy 1-D regression in float64 with a ``noise_fraction`` of corrupted labels (the data
    of the channels and identities experiments)."""
    return noisy_1d_regression(n, noise, n_test=n_test, outlier_fraction=noise_fraction,
                               seed=seed, dtype=torch.float64)


def regression_mlp(seed: int, width: int, depth: int, activation: str) -> nn.Module:
    """``mlp(1, width, depth, 1)`` in float64, initialized after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return mlp(1, width, depth, 1, activation=activation).double()


def snapshot_schedule(total_steps: int, every_k: int, num_log: int = 20) -> Schedule:
    """Snapshots every ``every_k`` steps plus about ``num_log`` log-spaced ones (dense early,
    where the kernel and the Adam preconditioner move fastest)."""
    if every_k < 1:
        raise ConfigError(f"snapshot interval must be >= 1 step, got {every_k}")
    log = logspaced(max(total_steps, 1), num_log).steps if num_log > 0 else frozenset()
    return Schedule(every=every_k, steps=frozenset(log))


def param_vector(params: Iterable[Tensor]) -> Tensor:
    """The trainable parameters as one flat float64 vector (for ``‖w_T − w_0‖``)."""
    return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params
                      if p.requires_grad])


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``torch.set_num_threads(n)`` (``n ≤ 0``: leave it), restoring it afterwards.

    The experiments' models are small: on a shared CPU one thread is often many times faster
    than two (threads spin waiting for each other), so they default to 1.
    """
    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# -- the optimizers the phenomena experiments compare ------------------------------------------
#: Experiment label → optimizer spec (:mod:`tangentscope.optim.spec`). ``gd`` — full-batch
#: gradient descent, the label of the recorded runs — is plain SGD (its step size is the
#: experiment's: :func:`~tangentscope.dynamics.linearized.gd_step_size`).
OPTIMIZERS: dict[str, str] = {"gd": "sgd", "adam": "adam", "gated": "gated",
                              "gated_streaming": "gated-streaming"}


def optimizer_spec(label: str) -> OptimizerSpec:
    """The spec of one of :data:`OPTIMIZERS` (build it with
    :func:`~tangentscope.optim.spec.build_optimizer`, ``weight_decay=0``: the gated ones with
    ``gate=False`` equal ``adam``).

    Raises:
        ConfigError: not one of :data:`OPTIMIZERS`.
    """
    if label not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {label!r}; one of {tuple(OPTIMIZERS)}")
    return parse_optimizer(OPTIMIZERS[label])


# -- config checks ------------------------------------------------------------------------------
def check_positive(cfg: Any, *names: str) -> None:
    """Every field ``names`` of ``cfg`` (a number, ``None`` = unset, or a tuple of numbers) is a
    finite number > 0 (learning rates, step-size scales, training times).

    Raises:
        ConfigError: naming the field, the value and what it takes.
    """
    _check(cfg, names, lambda v: v > 0, "a finite number > 0")


def check_nonnegative(cfg: Any, *names: str) -> None:
    """Like :func:`check_positive` for fields that may be 0 (weight decay, noise levels)."""
    _check(cfg, names, lambda v: v >= 0, "a finite number >= 0")


def _check(cfg: Any, names: Sequence[str], ok: Callable[[float], bool], what: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        for v in value if isinstance(value, tuple) else (value,):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or \
                    not (math.isfinite(v) and ok(v)):
                raise ConfigError(f"--{name} must be {what}, got {value!r}")


# -- checkpoints outside RunDir (job files a worker process writes) ----------------------------
def load_checkpoint(path: str | os.PathLike, *, redo: str, map_location: Any = None
                    ) -> Any | None:
    """A checkpoint written with :func:`~tangentscope._durable.atomic_write_torch`, or ``None``
    when there is none — or when it is damaged: then it is set aside (``<name>.damaged``) with
    a :class:`~tangentscope._durable.RecoveredFileWarning` saying ``redo`` (what is done again).
    """
    p = Path(path)
    if not p.exists():
        return None
    try:
        return read_torch(p, fix=redo, map_location=map_location)
    except DamagedFileError as e:
        warnings.warn(f"{e}; set aside as {p.name}.damaged", RecoveredFileWarning, stacklevel=2)
        p.replace(p.with_name(p.name + ".damaged"))
        return None


# -- cells and seeds ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CellOutput:
    """What one cell hands to :func:`run_cells`.

    Attributes:
        result: the cell's record (``cells.jsonl``).
        arrays: saved as ``<key>/<name>`` in ``arrays.npz``.
        rows: rows for ``metrics.csv`` (``None``: one row of ``result``'s scalar fields).
        extra_arrays: saved under their own names in ``arrays.npz``.
    """

    result: Mapping[str, Any]
    arrays: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    rows: Sequence[Mapping[str, Any]] | None = None
    extra_arrays: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def run_cells(rd: RunDir, cells: Iterable[tuple[str, Callable[[], CellOutput | tuple]]], *,
              desc: str | None = None) -> dict[str, dict[str, Any]]:
    """Run ``key → fn()`` cells in order, skipping keys already in ``rd.cells()`` (resume).

    ``fn()`` returns a :class:`CellOutput` or a ``(result, arrays)`` pair. Each cell's rows go to
    ``metrics.csv``, its arrays to ``arrays.npz`` (``<key>/<name>``) and its result to
    ``cells.jsonl`` — in that order, so a cell is done exactly when its record is written.

    Args:
        desc: progress-bar label (``None``: no bar).

    Returns:
        every cell's result, by key (the ones found and the ones run).
    """
    done = rd.cells()
    todo = list(cells)
    it = todo if desc is None else progress(todo, desc=desc, total=len(todo))
    for key, fn in it:
        if key in done:
            continue
        out = fn()
        if not isinstance(out, CellOutput):
            out = CellOutput(*out)
        rows = out.rows if out.rows is not None else [
            {k: v for k, v in out.result.items() if not isinstance(v, (list, dict))}]
        for row in rows:
            rd.log(**row)
        rd.save_arrays(**{f"{key}/{k}": v for k, v in out.arrays.items()}, **out.extra_arrays)
        rd.save_cell(key, out.result)
        done[key] = dict(out.result)
    return done


def seed_table(records: Iterable[Mapping[str, Any]], keys: Iterable[str] | None = None
               ) -> dict[str, dict[str, float]]:
    """``{metric: {median, min, max, n}}`` over seeds of the finite numeric fields of
    ``records`` (all numeric fields of the first record when ``keys`` is None); metrics with no
    finite value are left out."""
    recs = list(records)
    if keys is None:
        keys = [k for k, v in recs[0].items() if isinstance(v, (int, float))
                and not isinstance(v, bool)] if recs else []
    out = {}
    for k in keys:
        vals = [float(r[k]) for r in recs if isinstance(r.get(k), (int, float))
                and math.isfinite(float(r[k]))]
        if vals:
            s = seed_stats(vals)
            out[k] = {"median": float(s["median"]), "min": s["min"], "max": s["max"],
                      "n": s["n"]}
    return out


def censored_stats(values: Sequence[float | None], cap: int) -> dict[str, Any]:
    """Median / quartiles with censoring: a seed that never reached the target counts as ∞.

    A statistic that lands on a censored seed is ``None`` (read: "> cap"); ``reached`` counts
    the seeds that did reach it.
    """
    xs = sorted(math.inf if v is None else float(v) for v in values)
    n = len(xs)
    if n == 0:
        return {"median": None, "q25": None, "q75": None, "min": None, "max": None, "n": 0,
                "reached": 0, "cap": cap}
    fin = lambda x: x if math.isfinite(x) else None
    q = lambda f: fin(float(np.quantile(np.array(xs), f, method="inverted_cdf")))
    med = float(np.median(xs)) if all(math.isfinite(x) for x in xs) else q(0.5)
    return {"median": med, "q25": q(0.25), "q75": q(0.75), "min": fin(xs[0]),
            "max": fin(xs[-1]), "n": n, "reached": sum(math.isfinite(x) for x in xs),
            "cap": cap}


def censored_median(xs: Sequence[float | None]) -> float | None:
    """Median of ratios where ``None`` (both censored) is dropped; ∞ means "at least"."""
    v = sorted(x for x in xs if x is not None)
    if not v:
        return None
    m = float(np.quantile(np.array(v), 0.5, method="inverted_cdf"))
    return m if math.isfinite(m) else None


def censored_ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` of two step counts where ``None`` means "never" (censored): ``None`` unless
    both are finite."""
    return None if a is None or b is None else a / b


# -- the job pool -----------------------------------------------------------------------------
def _worker(conn: Any, fn: Callable[[Any, str], Any], device: str) -> None:
    """A pool process: run the jobs the parent sends until it sends ``None``."""
    torch.set_num_threads(1)
    conn.send(("ready", None))
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            conn.send(("done", fn(job, device)))
        except Exception:  # report, then keep serving (the parent decides)
            conn.send(("error", traceback.format_exc()))


def run_jobs(fn: Callable[[J, str], Any], jobs: Sequence[J], *, workers: int = 1,
             cuda_workers: int = 0, device: str = "cpu") -> Iterator[tuple[J, Any]]:
    """Yield ``(job, fn(job, device))`` as jobs finish.

    ``workers == 1``: in this process, on ``device`` (``auto`` picks CUDA when available; an
    exception propagates). Otherwise ``workers`` spawned processes of one thread each,
    ``cuda_workers`` of them on the GPU; a job that raises in a worker yields the traceback
    text (a ``str``) as its result and the other jobs go on. ``fn`` must be a module-level
    function (it is pickled by name). ``jobs`` should come longest first: with GPU workers, a
    GPU worker takes the longest job left and a CPU worker the shortest (so a slow CPU worker
    never holds the last long job); without, every worker takes the next job in order.

    Raises:
        ConfigError: a CUDA device or CUDA workers asked for where torch sees no GPU.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if (device.startswith("cuda") or cuda_workers) and not torch.cuda.is_available():
        raise ConfigError("a CUDA device was asked for but torch sees no GPU; use --device cpu "
                          "and --cuda_workers 0")
    if workers <= 1:
        for job in jobs:
            yield job, fn(job, device)
        return
    ctx = mp.get_context("spawn")
    pending = list(jobs)
    conns: dict[Connection, str] = {}
    running: dict[Connection, Any] = {}
    procs = []
    for i in range(min(workers, max(len(pending), 1))):
        parent, child = ctx.Pipe()
        dev = "cuda" if i < cuda_workers else "cpu"
        proc = ctx.Process(target=_worker, args=(child, fn, dev), daemon=True)
        proc.start()
        conns[parent], running[parent] = dev, None
        procs.append(proc)
    try:
        while conns:
            for ready in wait(list(conns)):
                c = cast(Connection, ready)
                kind, payload = c.recv()
                if kind in ("done", "error"):
                    yield running[c], payload
                if pending:
                    shortest = cuda_workers > 0 and conns[c] != "cuda"
                    running[c] = pending.pop(-1 if shortest else 0)
                    c.send(running[c])
                else:
                    c.send(None)
                    del conns[c]
    finally:
        for p in procs:
            p.join(timeout=1)
            if p.is_alive():
                p.terminate()
