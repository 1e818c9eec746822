"""The command line shows each experiment's fields (type, default, meaning), and long runs show
progress when the output goes to a log file."""

from __future__ import annotations

import ast
import dataclasses
import itertools
from pathlib import Path

import pytest

from tangentscope.cli import main
from tangentscope.experiments import Experiment, list_experiments, register
from tangentscope.experiments import _framework as F
from tangentscope.experiments import _harness as H
from tangentscope.experiments._fields import config_fields, describe_experiment

EXPERIMENTS = Path(H.__file__).parent


def test_list_exp_shows_every_field_with_type_default_and_meaning(capsys):
    assert main(["list", "benign-overfitting"]) == 0
    out = capsys.readouterr().out
    exp = list_experiments()["benign-overfitting"]
    for f in dataclasses.fields(exp.config):
        assert f"--{f.name} " in out, f.name
    line = next(ln for ln in out.splitlines() if ln.lstrip().startswith("--seeds "))
    assert line.split()[1:4] == ["int", "3", "number"]
    assert "--tasks" in out and "gmm,mnist" in out              # tuple default as on the CLI
    assert "preset smoke:" in out and "--scale 0.4" in out
    assert "``" not in out and ":data:" not in out               # docstring markup stripped


def test_run_exp_help_shows_the_fields_and_run_help_points_there(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "channels", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--preset" in out and "--resume" in out               # run's own options
    assert "--noise_fraction" in out and "fraction of training labels corrupted" in out
    assert "{log, linear}" in out                                 # a Literal's choices
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "tangentscope list EXP" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["compare", "dpo", "--help"])
    out = capsys.readouterr().out
    assert "--noise_rates" in out and "--optimizers" in out
    assert main(["run", "nosuch", "--help"]) == 2
    assert "unknown experiment 'nosuch'" in capsys.readouterr().err
    assert main(["list"]) == 0
    assert "tangentscope list EXP" in capsys.readouterr().out


@dataclasses.dataclass(frozen=True)
class _Cfg:
    """A config.

    Attributes:
        a, b: two numbers read
            over two lines.
        c: one; ``d``: another.
    """

    a: int = 1
    b: float | None = None
    c: tuple[str, ...] = ("x", "y")
    d: bool = False
    e: str = "z"          # from the comment
    f: int = 0


def test_meanings_come_from_the_docstring_then_the_comment():
    got = {f.name: f for f in config_fields(_Cfg)}
    assert got["a"].meaning == got["b"].meaning == "two numbers read over two lines."
    assert got["c"].meaning == "one" and got["d"].meaning == "another."
    assert got["e"].meaning == "from the comment" and got["f"].meaning == ""
    assert (got["b"].type, got["b"].default) == ("float | None", "None")
    assert (got["c"].type, got["c"].default) == ("tuple[str, ...]", "x,y")
    assert got["d"].default == "false"
    text = describe_experiment(Experiment("t", _Cfg, lambda c, r: {}, lambda r: [],
                                          presets={"smoke": {"a": 2}}))
    assert "preset smoke: --a 2" in text and "(undocumented)" in text


def test_every_experiment_lists_all_its_fields():
    for name, exp in list_experiments().items():
        text = describe_experiment(exp)
        for f in dataclasses.fields(exp.config):
            assert f"--{f.name} " in text, (name, f.name)


def test_no_builtin_experiment_has_an_undocumented_field(capsys):
    """Every field of every built-in experiment's Config has a meaning (its ``Attributes:``
    entry or its line comment), so ``tangentscope list EXP`` never shows "(undocumented)"."""
    builtin = {name: exp for name, exp in list_experiments().items()   # not tests' registrations
               if exp.config.__module__.startswith("tangentscope.experiments.")}
    assert len(builtin) >= 16
    gaps = {name: [f.name for f in config_fields(exp.config) if not f.meaning.strip()]
            for name, exp in builtin.items()}
    assert {k: v for k, v in gaps.items() if v} == {}
    for name in builtin:
        assert main(["list", name]) == 0
        assert "(undocumented)" not in capsys.readouterr().out, name


def test_progress_lines_with_an_eta_when_not_a_terminal(monkeypatch, capsys):
    monkeypatch.delenv("TANGENTSCOPE_PROGRESS", raising=False)
    clock = itertools.count(0.0, 2.0)                   # every item takes 2 s
    monkeypatch.setattr(H.time, "monotonic", lambda: next(clock))
    assert list(H.progress(range(10), desc="training", interval=6)) == list(range(10))
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "[tangentscope] training: 3/10 (30%), 0:00:06 elapsed, ETA 0:00:14"
    assert lines[1].startswith("[tangentscope] training: 6/10 (60%), 0:00:12 elapsed, ETA")
    assert lines[-1] == "[tangentscope] training: done, 10/10 (100%) in 0:00:22"
    monkeypatch.setenv("TANGENTSCOPE_PROGRESS", "0")
    assert list(H.progress(range(3), desc="quiet", interval=0)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_a_run_to_a_log_file_prints_progress(monkeypatch, capsys, tmp_path):
    @dataclasses.dataclass(frozen=True)
    class Cfg:
        steps: int = 5

    def run(cfg, rd):
        for step in H.progress(range(cfg.steps), desc="slow loop"):
            rd.log(step=step)
        return {"steps": cfg.steps}

    monkeypatch.setattr(F, "_EXTRA", dict(F._EXTRA))       # registered for this test only
    register(Experiment("progress-probe", Cfg, run, lambda rd: [], presets={"smoke": {}}))
    monkeypatch.setenv("TANGENTSCOPE_PROGRESS_INTERVAL", "0")
    monkeypatch.delenv("TANGENTSCOPE_PROGRESS", raising=False)
    assert main(["run", "progress-probe", "--out", str(tmp_path / "r"), "--no-plot"]) == 0
    err = capsys.readouterr().err
    assert "[tangentscope] slow loop: 1/5 (20%)" in err and "ETA" in err
    assert "slow loop: done, 5/5" in err


def test_every_experiment_reports_progress_through_the_harness():
    """No experiment module uses the terminal-only bar of tangentscope._utils directly."""
    for f in sorted(EXPERIMENTS.glob("*.py")):
        if f.name == "_harness.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "_utils" and node.level == 2:
                assert "progress" not in {a.name for a in node.names}, f.name
