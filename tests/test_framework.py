"""The experiment framework: configs, run directories, resume, plot, compare, CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from tangentscope import ConfigError, RunDir
from tangentscope.cli import main
from tangentscope.errors import RecoveredFileWarning as ts_RecoveredFileWarning
from tangentscope.experiments import Experiment, compare, make_config, register, run_experiment
from tangentscope.experiments._framework import parse_overrides


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    seed: int = 0
    steps: int = 5
    lr: float = 0.1
    optimizer: Literal["sgd", "adam"] = "sgd"
    widths: tuple[int, ...] = (4, 8)
    verbose: bool = False
    crash_at: int | None = None


CALLS: list[str] = []


def _toy_run(cfg: ToyConfig, rd: RunDir) -> dict:
    done = rd.cells()
    total = 0.0
    for k in range(cfg.steps):
        key = f"step{k}"
        if key in done:
            total += done[key]["value"]
            continue
        if cfg.crash_at is not None and k == cfg.crash_at and not (rd.path / "crashed").exists():
            (rd.path / "crashed").touch()
            raise KeyboardInterrupt
        CALLS.append(key)
        value = cfg.lr * (k + 1) * (2 if cfg.optimizer == "adam" else 1) + cfg.seed
        rd.log(step=k, value=value)
        rd.save_cell(key, {"value": value})
        total += value
    rd.save_arrays(values=np.arange(cfg.steps))
    return {"total": total, "final_lr": cfg.lr}


def _toy_plot(rd: RunDir) -> list[Path]:
    f = rd.figure_path("toy")
    f.write_bytes(b"not really a png")
    return [f]


TOY = register(Experiment("toy", ToyConfig, _toy_run, _toy_plot,
                          presets={"smoke": {"steps": 3}, "full": {"steps": 10}},
                          description="a test experiment"))


def test_make_config_coerces_and_rejects():
    cfg = make_config(ToyConfig, {"lr": "3e-3", "steps": "7", "widths": "1,2,3",
                                  "verbose": "true", "optimizer": "adam", "crash_at": "none"})
    assert cfg == ToyConfig(lr=3e-3, steps=7, widths=(1, 2, 3), verbose=True, optimizer="adam")
    with pytest.raises(ConfigError, match="unknown config field --nope"):
        make_config(ToyConfig, {"nope": 1})
    with pytest.raises(ConfigError, match="expects int"):
        make_config(ToyConfig, {"steps": "many"})
    with pytest.raises(ConfigError, match="must be one of"):
        make_config(ToyConfig, {"optimizer": "lbfgs"})
    assert parse_overrides(["--lr", "1", "--steps=2"]) == {"lr": "1", "steps": "2"}
    with pytest.raises(ConfigError):
        parse_overrides(["lr", "1"])


def test_run_writes_a_self_describing_directory(tmp_path):
    rd = run_experiment("toy", preset="smoke", overrides={"lr": 0.5}, out=tmp_path / "r",
                        quiet=True)
    for f in ("config.json", "env.json", "metrics.csv", "cells.jsonl", "arrays.npz",
              "summary.json", "status.json", "figures/toy.png"):
        assert (rd.path / f).exists(), f
    cfg = json.loads((rd.path / "config.json").read_text())
    assert cfg["experiment"] == "toy" and cfg["config"]["steps"] == 3
    assert rd.read_summary()["total"] == pytest.approx(0.5 * (1 + 2 + 3))
    assert rd.status == "complete"
    assert [r["step"] for r in rd.read_metrics()] == [0, 1, 2]
    env = json.loads((rd.path / "env.json").read_text())
    assert env["torch"] and env["python"]
    with pytest.raises(ConfigError, match="--resume"):
        run_experiment("toy", out=tmp_path / "r", quiet=True)


def test_interrupted_run_resumes_without_redoing_work(tmp_path):
    CALLS.clear()
    with pytest.raises(KeyboardInterrupt):
        run_experiment("toy", preset="full", overrides={"crash_at": 4}, out=tmp_path / "c",
                       quiet=True)
    rd = RunDir.open(tmp_path / "c")
    assert rd.status == "interrupted" and len(rd.cells()) == 4
    CALLS.clear()
    run_experiment(None, resume=tmp_path / "c", quiet=True)
    assert [f"step{k}" for k in range(4, 10)] == CALLS
    assert rd.status == "complete"
    assert rd.read_summary()["total"] == pytest.approx(0.1 * sum(range(1, 11)))


def test_compare_table_and_resume(tmp_path):
    rd = compare("toy", {"optimizer": ["sgd", "adam"]}, seeds=[0, 1, 2], out=tmp_path / "cmp",
                 quiet=True)
    rows = {(r["setting"], r["metric"]): r for r in rd.read_summary()["table"]}
    sgd = rows[("optimizer=sgd", "total")]
    # 3 steps, each + seed (median seed 1)
    assert sgd["n"] == 3 and sgd["median"] == pytest.approx(0.6 + 3)
    assert (rd.path / "table.md").read_text().count("|") > 10
    CALLS.clear()
    compare(None, {}, resume=tmp_path / "cmp", quiet=True)
    assert CALLS == []
    with pytest.raises(ConfigError, match="no field 'momentum'"):
        compare("toy", {"momentum": [1]}, out=tmp_path / "bad", quiet=True)


def test_cli_run_plot_compare(tmp_path, capsys):
    assert main(["run", "toy", "--out", str(tmp_path / "cli"), "--lr", "2", "--seed", "1"]) == 0
    rd = RunDir.open(tmp_path / "cli")
    assert rd.read_config()["config"]["lr"] == 2.0 and rd.read_config()["config"]["seed"] == 1
    (rd.path / "figures" / "toy.png").unlink()
    assert main(["plot", str(tmp_path / "cli")]) == 0
    assert (rd.path / "figures" / "toy.png").exists()
    assert main(["run", "toy", "--bogus", "1", "--out", str(tmp_path / "x")]) == 2
    assert "unknown config field --bogus" in capsys.readouterr().err
    # an abbreviation is never silently expanded to a CLI option (`--pre` is not `--preset`)
    assert main(["run", "toy", "--pre", "full", "--out", str(tmp_path / "y")]) == 2
    assert "unknown config field --pre" in capsys.readouterr().err
    assert main(["run", "no-such-experiment"]) == 2
    assert main(["compare", "toy", "--optimizers", "sgd,adam", "--seeds", "0-1",
                 "--out", str(tmp_path / "cc")]) == 0
    assert "optimizer=adam" in (tmp_path / "cc" / "table.md").read_text()
    assert main(["list"]) == 0
    assert "toy" in capsys.readouterr().out


def test_cli_help_and_version(capsys):
    assert main([]) == 0
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert "tangentscope" in capsys.readouterr().out


def test_seed_stats_drops_none_and_nan_and_matches_numpy():
    import math

    import numpy as np

    from tangentscope.experiments._framework import seed_stats

    vals = [3.0, None, 1.0, float("nan"), 2.0, 10.0]
    s = seed_stats(vals)
    xs = np.array([3.0, 1.0, 2.0, 10.0])
    assert s["n"] == 4 and s["missing"] == 2
    assert s["median"] == np.median(xs) and s["min"] == 1.0 and s["max"] == 10.0
    assert s["q25"] == pytest.approx(np.quantile(xs, 0.25)) and \
        s["q75"] == pytest.approx(np.quantile(xs, 0.75))
    assert seed_stats([math.inf, 1.0])["max"] == math.inf      # "never reached" is kept
    empty = seed_stats([None], empty=None)
    assert empty["median"] is None and empty["n"] == 0 and empty["missing"] == 1


# -- run/resume semantics and durable run files (issue 12.8 / 12.9) -------------------------------
@dataclasses.dataclass(frozen=True)
class StateConfig:
    seed: int = 0
    steps: int = 6
    lr: float = 0.5
    crash_at: int | None = None


def _state_run(cfg: StateConfig, rd: RunDir) -> dict:
    """One long cell that checkpoints after every logged step (like a training loop)."""
    if cfg.lr < 0:
        raise ConfigError("--lr must be >= 0")
    if "train" not in rd.cells():
        st = rd.load_state() or {"k": 0, "acc": 0.0}
        for k in range(st["k"], cfg.steps):
            acc = st["acc"] + cfg.lr * (k + 1) + cfg.seed
            rd.log(step=k, acc=acc)
            if k == cfg.crash_at and not (rd.path / "crashed").exists():
                (rd.path / "crashed").touch()
                raise KeyboardInterrupt          # after the row, before its checkpoint
            st = {"k": k + 1, "acc": acc}
            rd.save_state(st)
        rd.save_cell("train", {"acc": st["acc"]})
    return {"acc": rd.cells()["train"]["acc"]}


STATE = register(Experiment("toy-state", StateConfig, _state_run, _toy_plot,
                            presets={"smoke": {}, "full": {"steps": 8}}))


def _rows(rd):
    return [(r["step"], r["acc"]) for r in rd.read_metrics()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return run_experiment("toy-state", out=tmp_path_factory.mktemp("u") / "r", quiet=True)


@pytest.mark.parametrize("damage", ["none", "state", "state+prev"])
def test_resume_after_a_crash_mid_cell_duplicates_no_row(tmp_path, uninterrupted, damage):
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        run_experiment("toy-state", overrides={"crash_at": 3}, out=out, quiet=True)
    rd = RunDir.open(out)
    assert len(rd.read_metrics()) == 4                     # row 3 logged, its checkpoint not
    if damage != "none":
        (out / "state.pt").write_bytes((out / "state.pt").read_bytes()[:50])
    if damage == "state+prev":
        (out / "state.pt.prev").write_bytes(b"")
    if damage == "none":
        run_experiment(None, resume=out, quiet=True)
    else:
        with pytest.warns(ts_RecoveredFileWarning, match=r"state\.pt(\.prev)? is damaged"):
            run_experiment(None, resume=out, quiet=True)
    assert _rows(rd) == _rows(uninterrupted)
    assert rd.read_summary()["acc"] == uninterrupted.read_summary()["acc"]


def test_a_metrics_row_cut_mid_write_is_repaired_on_append(tmp_path):
    rd = RunDir.create(tmp_path / "r", {"a": 1})
    rd.log(step=0, loss=1.5)
    rd.log(step=1, loss=0.5)
    with (rd.path / "metrics.csv").open("a") as fh:
        fh.write("2,0.2")                                  # killed mid-row
    rd = RunDir.open(tmp_path / "r")
    rd.log(step=2, loss=0.25)
    assert [r["step"] for r in rd.read_metrics()] == [0, 1, 2]
    assert rd.read_metrics()[-1]["loss"] == 0.25


def test_resume_refuses_a_different_seed_preset_or_experiment(tmp_path):
    out = tmp_path / "r"
    run_experiment("toy", preset="full", overrides={"seed": 1}, out=out, quiet=True)
    for kw, match in (({"overrides": {"seed": 2}}, r"--seed 2 \(saved: 1\)"),
                      ({"preset": "smoke", "overrides": {"steps": 3}}, "--steps 3"),
                      ({"preset": None}, "preset 'full', not None"),
                      ({"name": "toy-state"}, "holds a run of 'toy'")):
        name = kw.pop("name", None)
        with pytest.raises(ConfigError, match=match) as e:
            run_experiment(name, resume=out, quiet=True, **kw)
        assert "--resume" in str(e.value) and "--out" in str(e.value)
    assert RunDir.open(out).status == "complete"           # a refused resume changes nothing
    # the same values are fine: nothing is ignored, nothing contradicts the saved run
    run_experiment("toy", resume=out, preset="full", overrides={"seed": "1"}, quiet=True)
    assert main(["run", "--resume", str(out), "--seed", "2"]) == 2
    assert main(["run", "--resume", str(out), "--seed", "1"]) == 0
    # an explicit --preset smoke is a contradiction too; no --preset keeps the saved one
    with pytest.raises(ConfigError, match="preset 'full', not 'smoke'"):
        run_experiment(None, resume=out, preset="smoke", quiet=True)
    assert main(["run", "--resume", str(out), "--preset", "smoke"]) == 2
    assert main(["run", "--resume", str(out)]) == 0


def test_resuming_a_finished_run_keeps_its_wall_seconds(tmp_path):
    import time

    out = tmp_path / "r"
    rd = run_experiment("toy", out=out, quiet=True)
    before = rd.read_summary()["wall_seconds"]
    t0 = time.perf_counter()
    run_experiment(None, resume=out, quiet=True)
    after = rd.read_summary()["wall_seconds"]
    assert before <= after <= before + (time.perf_counter() - t0)
    assert json.loads((out / "status.json").read_text())["wall_seconds"] == after


def test_a_value_rejected_inside_run_leaves_no_directory(tmp_path):
    out = tmp_path / "runs" / "bad"
    with pytest.raises(ConfigError, match="lr must be"):
        run_experiment("toy-state", overrides={"lr": -1}, out=out, quiet=True)
    assert not (tmp_path / "runs").exists()
    assert main(["run", "toy-state", "--lr", "-1", "--out", str(out)]) == 2
    assert not out.exists()
    # a failure after results were written keeps the directory (it can be resumed)
    with pytest.raises(KeyboardInterrupt):
        run_experiment("toy-state", overrides={"crash_at": 1}, out=out, quiet=True)
    assert RunDir.open(out).status == "interrupted"


def test_resume_of_a_compare_directory_names_the_right_command(tmp_path):
    compare("toy", {}, seeds=[0], out=tmp_path / "c", quiet=True)
    with pytest.raises(ConfigError, match="tangentscope compare --resume"):
        run_experiment(None, resume=tmp_path / "c", quiet=True)
