"""Damaged run files (issue 12): every file of a run directory and of a recorded trajectory,
truncated at any byte or garbled at any bytes, ends in a clear ``TangentscopeError`` naming the
file and the fix, or in a clean recovery (the resumed run reproduces the undamaged one) —
never in a raw ``JSONDecodeError``/``BadZipFile``/``EOFError``/``UnpicklingError``."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tangentscope import RunDir, TangentscopeError
from tangentscope.dynamics import KernelRecorder, KernelTrajectory, every
from tangentscope.errors import DamagedFileError
from tangentscope.experiments import Experiment, register, run_experiment
from zoo import make_mlp

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@dataclasses.dataclass(frozen=True)
class FuzzConfig:
    seed: int = 0
    steps: int = 5
    crash_at: int | None = None


def _run(cfg: FuzzConfig, rd: RunDir) -> dict:
    """Cells of one row each, then a long cell checkpointed after every row."""
    done = rd.cells()
    for k in range(2):
        if f"c{k}" not in done:
            rd.log(step=-1 - k, value=float(k + cfg.seed))
            rd.save_cell(f"c{k}", {"value": float(k + cfg.seed)})
    if "train" not in rd.cells():
        st_ = rd.load_state() or {"k": 0, "acc": 0.0}
        for k in range(st_["k"], cfg.steps):
            acc = st_["acc"] + 0.25 * (k + 1)
            rd.log(step=k, value=acc)
            if k == cfg.crash_at and not (rd.path / "crashed").exists():
                (rd.path / "crashed").touch()
                raise KeyboardInterrupt
            st_ = {"k": k + 1, "acc": acc}
            rd.save_state(st_)
            rd.save_arrays(acc=torch.tensor([acc]))
        rd.save_cell("train", {"acc": st_["acc"]})
    return {"acc": rd.cells()["train"]["acc"], "cells": len(rd.cells())}


register(Experiment("fuzz-store", FuzzConfig, _run, lambda rd: [], presets={"smoke": {}}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    done = run_experiment("fuzz-store", out=root / "done", quiet=True, plot=False)
    with pytest.raises(KeyboardInterrupt):
        run_experiment("fuzz-store", overrides={"crash_at": 3}, out=root / "crashed",
                       quiet=True, plot=False)
    x = torch.randn(5, 3, dtype=torch.float64)
    model = make_mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = KernelRecorder(model, x, torch.randn(5, 2, dtype=torch.float64),
                         x_test=torch.randn(3, 3, dtype=torch.float64), optimizer=opt,
                         schedule=every(1), run_dir=root / "traj", verbose=False)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    rec.close()
    return {"done": done.path, "crashed": root / "crashed", "traj": root / "traj",
            "reference_rows": _rows(done.path), "reference": done.read_summary()["acc"]}


def _rows(path: Path) -> list[tuple]:
    return [(r["step"], r["value"]) for r in RunDir.open(path).read_metrics()]


damage = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("garble"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                    st.integers(0, 255)), min_size=1,
                                          max_size=4)))


def _damage(f: Path, how) -> None:
    data = bytearray(f.read_bytes())
    kind, arg = how
    if kind == "truncate":
        data = data[: int(arg * len(data))]
    else:
        for where, byte in arg:
            if data:
                data[int(where * len(data))] = byte
    f.write_bytes(bytes(data))


def _clear_or_recovers(fn) -> None:
    """``fn()`` succeeds (recovery) or raises a TangentscopeError naming a fix."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # RecoveredFileWarning: a recovery, announced
        try:
            fn()
        except TangentscopeError as e:
            msg = str(e)
            assert len(msg) > 40 and ":" in msg, msg
            if isinstance(e, DamagedFileError):
                assert e.path.name in msg


def _copy(src: Path) -> Path:
    d = Path(tempfile.mkdtemp(prefix="fuzz-"))
    shutil.copytree(src, d / "r")
    return d / "r"


# -- run directories --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["config.json", "summary.json", "status.json", "cells.jsonl",
                                  "metrics.csv", "arrays.npz"])
@SETTINGS
@given(how=damage)
def test_damaged_file_of_a_finished_run(runs, name, how):
    d = _copy(runs["done"])
    try:
        _damage(d / name, how)
        rd = RunDir.open(d)
        for read in (rd.read_config, rd.read_summary, lambda: rd.status, rd.cells,
                     rd.read_metrics, rd.load_arrays):
            _clear_or_recovers(read)

        def resume():
            out = run_experiment(None, resume=d, quiet=True, plot=False)
            assert out.read_summary()["acc"] == runs["reference"]
        _clear_or_recovers(resume)
        _clear_or_recovers(lambda: RunDir.open(d).log(step=99, value=1.0))
    finally:
        shutil.rmtree(d.parent)


@pytest.mark.parametrize("name", ["state.pt", "state.pt.prev", "metrics.csv", "cells.jsonl"])
@SETTINGS
@given(how=damage)
def test_damaged_file_of_an_interrupted_run_resumes_cleanly(runs, name, how):
    # the checkpoint (or the rows, or the cells) of a run killed mid-cell: the resumed run
    # either reproduces the uninterrupted one row for row, or stops with a clear error
    d = _copy(runs["crashed"])
    try:
        _damage(d / name, how)

        def resume():
            run_experiment(None, resume=d, quiet=True, plot=False)
            assert RunDir.open(d).read_summary()["acc"] == runs["reference"]
            rows = _rows(d)
            if name == "metrics.csv":   # a garbled value in a kept row cannot be told
                assert len(rows) == len(runs["reference_rows"])
            else:
                assert rows == runs["reference_rows"]
        _clear_or_recovers(resume)
    finally:
        shutil.rmtree(d.parent)


# -- recorded trajectories ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["trajectory.json", "data.npz", "index.jsonl",
                                  "snapshots/000001.npz", "snapshots/000003.npz"])
@SETTINGS
@given(how=damage)
def test_damaged_file_of_a_recorded_trajectory(runs, name, how):
    d = _copy(runs["traj"])
    try:
        _damage(d / name, how)

        def load():
            traj = KernelTrajectory.load(d)
            for k in range(len(traj)):
                traj.kernel(k), traj.cross_kernel(k), traj.hessian(k)
        _clear_or_recovers(load)
    finally:
        shutil.rmtree(d.parent)
