"""Every bad command line ends in one clear line ``tangentscope...: error: ...``, exit code 2, no
traceback and no half-made run directory (issue 12's unclear errors: ``--lr -1``, an unwritable
``--out``, ``compare --seeds abc``, ``app --port 99999``, a ``--field value`` before the
experiment name, ...), checked case by case and over generated inputs (hypothesis)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import socket
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tangentscope import ConfigError
from tangentscope.cli import _experiment_first, _seeds, main
from tangentscope.experiments import list_experiments, parse_overrides

_BUILTIN = {name: exp for name, exp in list_experiments().items()
            if exp.run.__module__.startswith("tangentscope.experiments.")}


class _WouldRun(Exception):
    """Raised by the stubbed experiments: the command line was accepted."""


@pytest.fixture
def stubbed(monkeypatch, tmp_path):
    """Every experiment's ``run`` replaced by a stub (nothing trains); cwd = a temp dir."""
    monkeypatch.chdir(tmp_path)
    for exp in _BUILTIN.values():
        mod = importlib.import_module(exp.run.__module__)

        def run(cfg, rd):
            raise _WouldRun(cfg)

        monkeypatch.setattr(mod, "EXPERIMENT", dataclasses.replace(exp, run=run))
    return tmp_path


def outcome(argv: list[str]) -> tuple[str, int | None, str]:
    """``('accepted' | 'error', exit code, stderr)`` of ``tangentscope argv``; any other
    exception escapes (a traceback: the test fails)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except _WouldRun:
            return "accepted", None, err.getvalue()
        except SystemExit as e:          # argparse's own errors (and --help)
            code = e.code if isinstance(e.code, int) else 2
    return "error", code, err.getvalue()


def assert_clear_error(argv: list[str], *words: str) -> str:
    kind, code, err = outcome(argv)
    assert kind == "error" and code == 2, (argv, kind, code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tangentscope"), err
    assert ": error: " in lines[0] and "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# -- the issue's cases, one by one ------------------------------------------------------------
@pytest.mark.parametrize("argv,words", [
    (["run", "grokking", "--lr", "-1"], ["--lr", "> 0"]),
    (["run", "channels", "--lr", "nan"], ["--lr"]),
    (["run", "inr", "--lr", "0"], ["--lr"]),
    (["run", "--lr", "-1", "grokking"], ["--lr"]),            # not "unknown experiment '-1'"
    (["run", "--max_steps", "0", "grokking"], ["max_steps"]),
    (["compare", "grokking", "--seeds", "abc"], ["--seeds", "abc"]),
    (["compare", "grokking", "--seeds", "3-1"], ["--seeds"]),
    (["compare", "grokking", "--vary", "lr"], ["--vary", "FIELD=A,B"]),
    (["compare", "grokking", "--optimizers", "adamw,lbfgs"], ["unknown optimizer 'lbfgs'"]),
    (["compare", "grokking", "--vary", "lr=1e-3,-1"], ["--lr"]),
    (["run", "grokking", "--seed", "abc"], ["--seed"]),
    (["run", "grokking", "--preset", "nope"], ["preset"]),
    (["run", "grokking", "--optimizer", "gated@thresh=2"], ["thresh"]),
    (["run", "grokking", "--optimizer", "lbfgs"], ["unknown optimizer"]),
    (["run", "grokking", "--setting", "nope"], ["unknown setting"]),
    (["run", "grokking", "--bogus", "1"], ["bogus"]),
    (["run", "grokking", "--workers"], ["needs a value"]),
    (["run", "no-such-experiment"], ["unknown experiment"]),
    (["run"], ["EXPERIMENT"]),
    (["compare"], ["EXPERIMENT"]),
    (["app", "--port", "99999"], ["--port", "65535"]),
    (["app", "--port", "abc"], ["--port"]),
    (["demo", "--port", "-5"], ["--port"]),
    (["list", "--bogus"], ["--bogus"]),
    (["plot", "no-such-run"], ["no-such-run"]),
    (["frobnicate"], ["frobnicate"]),
])
def test_the_issues_bad_inputs_end_in_one_clear_line(stubbed, argv, words):
    assert_clear_error(argv, *words)
    assert not (stubbed / "runs").exists()       # refused before any run directory exists


def test_an_unwritable_out_is_refused_before_any_work(stubbed):
    (stubbed / "a-file").write_text("not a directory")
    for cmd in (["run", "channels"], ["compare", "channels"], ["demo", "--headless"]):
        assert_clear_error([*cmd, "--out", str(stubbed / "a-file")], "--out")
        assert_clear_error([*cmd, "--out", str(stubbed / "a-file" / "sub")], "--out")
    assert (stubbed / "a-file").read_text() == "not a directory"


def test_a_port_in_use_is_a_clear_error(stubbed):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_clear_error(["app", "--port", str(port), "--no-browser"], "cannot listen", "--port")


def test_a_field_before_the_experiment_name_is_an_override():
    assert _experiment_first(["run", "--lr", "0.1", "grokking", "--seed", "1"]) == [
        "run", "grokking", "--lr", "0.1", "--seed", "1"]
    assert _experiment_first(["run", "--no-plot", "--x=1", "-1", "inr"]) == [
        "run", "-1", "--no-plot", "--x=1", "inr"]      # a bare number is not an option
    assert _experiment_first(["compare", "--seeds", "0-2", "dpo"]) == [
        "compare", "dpo", "--seeds", "0-2"]
    assert _experiment_first(["run", "--resume", "d"]) == ["run", "--resume", "d"]


def test_valid_command_lines_still_reach_the_experiment(stubbed):
    for argv in (["run", "grokking", "--lr", "1e-3"], ["run", "--lr", "1e-3", "grokking"],
                 ["run", "channels", "--steps=50", "--seed", "3"],
                 ["compare", "grokking", "--optimizers", "adamw,gated@threshold=2",
                  "--seeds", "0-1"]):
        kind, code, err = outcome(argv)
        assert kind == "accepted", (argv, code, err)


# -- generated inputs -----------------------------------------------------------------------------
_FIELDS = sorted((name, f.name) for name, exp in _BUILTIN.items()
                 for f in dataclasses.fields(exp.config))
_BAD = ["-1", "0", "-0.5", "nan", "inf", "-inf", "abc", "", "1e999", "1.5", "None", ",", "@",
        "true", "99999999999", "-", "0x10", "1,2,abc", "gated@", "=", "--x"]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(field=st.sampled_from(_FIELDS),
       value=st.one_of(st.sampled_from(_BAD), st.text(max_size=12)))
def test_any_field_value_is_accepted_or_a_one_line_error(stubbed, field, value):
    exp, name = field
    out = Path(tempfile.mkdtemp(dir=stubbed)) / "run"
    kind, code, err = outcome(["run", exp, f"--{name}", value, "--out", str(out)])
    if kind == "error":
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and ": error: " in lines[0], err
        assert not out.exists()                          # refused before any work


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789-, a", max_size=12))
def test_seed_lists_parse_or_fail_clearly(text):
    try:
        seeds = _seeds(text)
    except ConfigError as e:
        assert "--seeds" in str(e)
    else:
        assert seeds and all(isinstance(s, int) for s in seeds)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["--lr", "1", "--x=2", "-", "--", "v", "--y", ""]), max_size=6))
def test_overrides_parse_or_fail_clearly(tokens):
    try:
        out = parse_overrides(tokens)
    except ConfigError as e:
        assert "--field value" in str(e) or "needs a value" in str(e)
    else:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in out.items())
