"""The ``tangentscope`` command line.

    tangentscope demo [--headless]            the main job (live page, or figures + JSON)
    tangentscope app [--host H] [--port P]    the live page
    tangentscope list                         the experiments
    tangentscope run EXP [--preset smoke|full] [--seed N] [--out DIR] [--resume DIR] [--field v ...]
    tangentscope plot RUN_DIR                 replot a run directory without retraining
    tangentscope compare EXP --optimizers a,b --seeds 0,1,2 [--vary field=a,b] [--field v ...]
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence

from .errors import TangentscopeError


def _seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        if "-" in part.strip("-") and not part.startswith("-"):
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tangentscope", allow_abbrev=False,
        description="Empirical NTK, signal channel vs reservoir, and the population-risk gate.",
    )
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("tangentscope")
    except PackageNotFoundError:
        v = "unknown"
    p.add_argument("--version", action="version", version=f"tangentscope {v}")
    # experiments take `--field value` overrides: argparse must never expand an abbreviation
    sub = p.add_subparsers(dest="command", metavar="COMMAND",
                           parser_class=functools.partial(argparse.ArgumentParser,
                                                          allow_abbrev=False))

    d = sub.add_parser("demo", help="the main job: the live page (or --headless figures + JSON)")
    d.add_argument("--headless", action="store_true",
                   help="no browser: train, then write figures and summary.json to --out")
    d.add_argument("--out", default=None, help="run directory for --headless")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=0, help="0 picks a free port")
    d.add_argument("--no-browser", action="store_true", help="do not try to open a browser")

    a = sub.add_parser("app", help="start the live page on a local server")
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--port", type=int, default=0, help="0 picks a free port")
    a.add_argument("--no-browser", action="store_true", help="do not try to open a browser")

    sub.add_parser("list", help="list the experiments and their presets")

    r = sub.add_parser("run", help="run an experiment into a run directory",
                       epilog="Any config field can be set with --field value "
                              "(see `tangentscope list`).")
    r.add_argument("experiment", nargs="?", help="experiment name (omit with --resume)")
    r.add_argument("--preset", default="smoke", help="smoke (CI-sized, default) or full")
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--out", default=None, help="run directory (default runs/EXP/TIME-PRESET-seedN)")
    r.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run directory")
    r.add_argument("--no-plot", action="store_true", help="skip figures")

    pl = sub.add_parser("plot", help="regenerate a run directory's figures (no retraining)")
    pl.add_argument("run_dir")

    c = sub.add_parser("compare", help="run optimizers x seeds and write a median/spread table")
    c.add_argument("experiment", nargs="?")
    c.add_argument("--optimizers", default=None, help="comma-separated values of the "
                                                        "config's `optimizer` field")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    try:
        return _dispatch(parser, args, rest)
    except TangentscopeError as e:
        print(f"tangentscope: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tangentscope: interrupted; finished work is kept in the run directory "
              "(continue with --resume)", file=sys.stderr)
        return 130


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> int:
    from .experiments import _framework as fw

    if args.command is None:
        parser.print_help()
        return 0
    if rest and args.command not in ("run", "compare"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command in ("demo", "app"):
        if args.command == "demo" and args.headless:
            from .demo import run_headless

            run_headless(out=args.out)
            return 0
        from .app import serve

        serve(host=args.host, port=args.port, open_browser=not args.no_browser)
        return 0
    if args.command == "list":
        for name, exp in sorted(fw.list_experiments().items()):
            presets = ", ".join(exp.presets) or "-"
            print(f"{name:<22} [{presets}]  {exp.description}")
        return 0
    if args.command == "run":
        overrides = fw.parse_overrides(rest)
        if args.seed is not None:
            overrides["seed"] = args.seed
        if args.resume is None and not args.experiment:
            parser.error("run needs an EXPERIMENT (or --resume RUN_DIR)")
        fw.run_experiment(args.experiment, preset=args.preset, overrides=overrides, out=args.out,
                          resume=args.resume, plot=not args.no_plot)
        return 0
    if args.command == "plot":
        for f in fw.plot_run(args.run_dir):
            print(f)
        return 0
    if args.command == "compare":
        vary: dict[str, list[str]] = {}
        if args.optimizers:
            vary["optimizer"] = args.optimizers.split(",")
        for v in args.vary:
            if "=" not in v:
                parser.error(f"--vary expects FIELD=A,B, got {v!r}")
            k, vals = v.split("=", 1)
            vary[k] = vals.split(",")
        if args.resume is None and not args.experiment:
            parser.error("compare needs an EXPERIMENT (or --resume DIR)")
        fw.compare(args.experiment, vary, seeds=_seeds(args.seeds), preset=args.preset,
                   overrides=fw.parse_overrides(rest), out=args.out, resume=args.resume,
                   metrics=args.metrics.split(",") if args.metrics else None)
        return 0
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
