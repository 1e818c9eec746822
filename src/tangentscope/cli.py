"""The ``tangentscope`` command line.

    tangentscope demo [--headless]            the main job (live page, or figures + JSON)
    tangentscope app [--host H] [--port P]    the live page
    tangentscope app RUN_DIR                  the page of a recorded run (trajectory, metrics)
    tangentscope list [EXP]                   the experiments; an experiment's fields
    tangentscope run EXP [--preset smoke|full] [--seed N] [--out DIR] [--resume DIR] [--field v ...]
    tangentscope run EXP --help               run's options and EXP's fields
    tangentscope plot RUN_DIR                 replot a run directory without retraining
    tangentscope compare EXP --optimizers a,b --seeds 0,1,2 [--vary field=a,b] [--field v ...]

Every bad input ends in one line ``tangentscope: error: ...`` naming the fix, and exit code 2
(argparse's own errors included); ``--field value`` overrides may come before or after ``EXP``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .app import serve
from .app.headless import run_headless
from .app.run_page import serve_run
from .errors import ConfigError, TangentscopeError
from .experiments import (
    DEFAULT_PRESET,
    compare,
    get_experiment,
    list_experiments,
    parse_overrides,
    plot_run,
    run_experiment,
)
from .experiments._fields import describe_experiment

# options of `run` / `compare` that take a value (the rest of `--field value` are overrides)
_VALUED = {"run": {"--preset", "--seed", "--out", "--resume"},
           "compare": {"--optimizers", "--vary", "--seeds", "--preset", "--metrics", "--out",
                       "--resume"}}
_FLAGS = {"--no-plot", "-h", "--help"}


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line and never expand abbreviations (the
    experiments take ``--field value`` overrides)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _seeds(text: str) -> list[int]:
    """``"0,1,2"`` / ``"0-4"`` / ``"0-2,7"`` → seeds.

    Raises:
        ConfigError: anything else (the message shows the accepted forms).
    """
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        a, sep, b = part.partition("-")
        try:
            if sep and a:
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ConfigError(f"--seeds: cannot read {part!r}; use integers and ranges such as "
                              "0,1,2 or 0-4") from None
    if not out:
        raise ConfigError(f"--seeds {text!r} names no seed; e.g. --seeds 0,1,2 or 0-4")
    return out


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port is an integer in 0..65535, got {text!r}") \
            from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is in 0..65535 (0 picks a free one), got "
                                         f"{port}")
    return port


def _check_out(out: str | None) -> None:
    """Refuse an ``--out`` that cannot become a run directory, before any work.

    Raises:
        ConfigError: ``out`` is a file, or its nearest existing ancestor is not a writable
            directory.
    """
    if out is None:
        return
    p = Path(out).expanduser().absolute()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory; choose another --out")
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create --out {out}: {parent} is not a writable directory; "
                          "choose another --out")


def _experiment_first(argv: list[str]) -> list[str]:
    """``run --lr 0.1 grokking`` → ``run grokking --lr 0.1``: the experiment is the first word
    that is neither an option nor an option's value (so a ``--field value`` before the name is
    never taken for it)."""
    if not argv or argv[0] not in _VALUED:
        return argv
    toks = argv[1:]
    i = 0
    while i < len(toks):
        t = toks[i]
        if t == "--":
            return argv
        if t.startswith("-") and not _is_number(t):
            i += 1 if ("=" in t or t in _FLAGS) else 2
            continue
        return [argv[0], t, *toks[:i], *toks[i + 1:]]
    return argv


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _help_for(argv: list[str]) -> str | None:
    """``run EXP --help`` / ``compare EXP --help``: the experiment's field table (for the
    epilog), ``None`` when no help for an experiment is asked.

    Raises:
        ConfigError: an unknown experiment.
    """
    if len(argv) < 3 or argv[0] not in _VALUED or not ({"-h", "--help"} & set(argv)):
        return None
    name = argv[1]
    if name.startswith("-"):
        return None
    return describe_experiment(get_experiment(name), width=_width())


def _width() -> int:
    import shutil

    return max(60, min(shutil.get_terminal_size((100, 24)).columns, 120))


def _parser(fields: str | None = None) -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    p = _Parser(prog="tangentscope", description="Empirical NTK, signal channel vs reservoir, "
                                                 "and the population-risk gate.")
    try:
        v = version("tangentscope")
    except PackageNotFoundError:
        v = "unknown"
    p.add_argument("--version", action="version", version=f"tangentscope {v}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    d = sub.add_parser("demo", help="the main job: the live page (or --headless figures + JSON)")
    d.add_argument("--headless", action="store_true",
                   help="no browser: train, then write figures and summary.json to --out")
    d.add_argument("--out", default=None, help="run directory for --headless")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=_port, default=0, help="0 picks a free port")
    d.add_argument("--no-browser", action="store_true", help="do not try to open a browser")

    a = sub.add_parser("app", help="start the live page, or the page of a recorded run",
                       description="Without RUN_DIR: the live page (a model training in the "
                                   "browser). With RUN_DIR: the page of a recorded run — a "
                                   "KernelRecorder trajectory directory, a run directory that "
                                   "holds one (e.g. a callback's record_dir) or an experiment "
                                   "run directory.")
    a.add_argument("run_dir", nargs="?", metavar="RUN_DIR",
                   help="a recorded trajectory or run directory to open")
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--port", type=_port, default=0, help="0 picks a free port")
    a.add_argument("--no-browser", action="store_true", help="do not try to open a browser")

    li = sub.add_parser("list", help="list the experiments, or one experiment's fields")
    li.add_argument("experiment", nargs="?", help="show this experiment's fields (type, "
                                                  "default, meaning) and presets")

    r = sub.add_parser("run", help="run an experiment into a run directory",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=fields or "Any config field can be set with --field value; "
                                        "`tangentscope list EXP` (or `tangentscope run EXP "
                                        "--help`) shows EXP's fields.")
    r.add_argument("experiment", nargs="?", help="experiment name (omit with --resume)")
    r.add_argument("--preset", default=None, help="smoke (CI-sized, default) or full; with "
                   "--resume, the saved preset unless given")
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--out", default=None, help="run directory (default runs/EXP/TIME-PRESET-seedN)")
    r.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run directory")
    r.add_argument("--no-plot", action="store_true", help="skip figures")

    pl = sub.add_parser("plot", help="regenerate a run directory's figures (no retraining)")
    pl.add_argument("run_dir")

    c = sub.add_parser("compare", help="run optimizers x seeds and write a median/spread table",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=fields or "`tangentscope list EXP` shows EXP's fields.")
    c.add_argument("experiment", nargs="?")
    c.add_argument("--optimizers", default=None, help="comma-separated values of the "
                                                        "config's `optimizer` field (optimizer "
                                                        "specs, e.g. adamw,gated@threshold=2)")
    c.add_argument("--vary", action="append", default=[], metavar="FIELD=A,B",
                   help="another field to sweep (repeatable)")
    c.add_argument("--seeds", default="0,1,2", help="e.g. 0,1,2 or 0-4")
    c.add_argument("--preset", default="smoke")
    c.add_argument("--metrics", default=None, help="comma-separated summary metrics for the table")
    c.add_argument("--out", default=None)
    c.add_argument("--resume", default=None, metavar="COMPARE_DIR")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = _experiment_first(list(sys.argv[1:] if argv is None else argv))
    try:
        fields = _help_for(argv)
    except TangentscopeError as e:
        return _fail(str(e))
    parser = _parser(fields)
    args, rest = parser.parse_known_args(argv)  # SystemExit: --help/--version, or a usage error
    try:
        return _dispatch(parser, args, rest)
    except TangentscopeError as e:
        return _fail(str(e))
    except OSError as e:  # a path that cannot be read or written, a port in use, ...
        where = f" {e.filename}" if e.filename else ""
        return _fail(f"cannot use{where}: {e.strerror or e}; check the path (--out, --resume, "
                     "RUN_DIR) or the port")
    except KeyboardInterrupt:
        print("tangentscope: interrupted; finished work is kept in the run directory "
              "(continue with --resume)", file=sys.stderr)
        return 130


def _fail(message: str) -> int:
    print(f"tangentscope: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> int:
    if args.command is None:
        parser.print_help()
        return 0
    if rest and args.command not in ("run", "compare"):
        raise ConfigError(f"unrecognized arguments for {args.command}: {' '.join(rest)}")
    if args.command in ("demo", "app"):
        if args.command == "demo" and args.headless:
            _check_out(args.out)
            run_headless(out=args.out)
            return 0
        if args.command == "app" and args.run_dir is not None:
            serve_run(args.run_dir, host=args.host, port=args.port,
                      open_browser=not args.no_browser)
            return 0
        serve(host=args.host, port=args.port, open_browser=not args.no_browser)
        return 0
    if args.command == "list":
        if args.experiment:
            print(describe_experiment(get_experiment(args.experiment), width=_width()))
            return 0
        for name, exp in sorted(list_experiments().items()):
            presets = ", ".join(exp.presets) or "-"
            print(f"{name:<22} [{presets}]  {exp.description}")
        print("\n`tangentscope list EXP` shows an experiment's fields (type, default, meaning).")
        return 0
    if args.command == "run":
        overrides: dict[str, object] = dict(parse_overrides(rest))
        if args.seed is not None:
            overrides["seed"] = args.seed
        if args.resume is None and not args.experiment:
            raise ConfigError("run needs an EXPERIMENT (see `tangentscope list`) or --resume "
                              "RUN_DIR")
        _check_out(args.out)
        preset = DEFAULT_PRESET if args.preset is None else args.preset
        run_experiment(args.experiment, preset=preset, overrides=overrides, out=args.out,
                       resume=args.resume, plot=not args.no_plot)
        return 0
    if args.command == "plot":
        for f in plot_run(args.run_dir):
            print(f)
        return 0
    if args.command == "compare":
        vary: dict[str, list[str]] = {}
        if args.optimizers:
            vary["optimizer"] = args.optimizers.split(",")
        for v in args.vary:
            if "=" not in v:
                raise ConfigError(f"--vary expects FIELD=A,B, got {v!r}")
            k, vals = v.split("=", 1)
            vary[k] = vals.split(",")
        if args.resume is None and not args.experiment:
            raise ConfigError("compare needs an EXPERIMENT (see `tangentscope list`) or --resume "
                              "DIR")
        seeds = _seeds(args.seeds)
        _check_out(args.out)
        compare(args.experiment, vary, seeds=seeds, preset=args.preset,
                overrides=parse_overrides(rest), out=args.out, resume=args.resume,
                metrics=args.metrics.split(",") if args.metrics else None)
        return 0
    raise ConfigError(f"unknown command {args.command}")  # pragma: no cover - argparse checks


if __name__ == "__main__":
    raise SystemExit(main())
