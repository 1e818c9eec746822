"""The experiment framework: a ``Config`` dataclass + ``run`` + ``plot`` per experiment.

An experiment module in :mod:`tangentscope.experiments` defines a module-level ``EXPERIMENT``::

    @dataclass(frozen=True)
    class Config:
        seed: int = 0
        steps: int = 1000

    def run(cfg: Config, rd: RunDir) -> dict: ...      # returns the summary; logs as it goes
    def plot(rd: RunDir) -> list[Path]: ...             # figures from the run dir alone

    EXPERIMENT = Experiment("my-exp", Config, run, plot,
                            presets={"smoke": dict(steps=50), "full": dict(steps=20000)},
                            description="one line")

``run`` must write results incrementally (``rd.log``, ``rd.save_cell``) and, when called again
on the same directory (``--resume``), skip the cells ``rd.cells()`` already holds.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import importlib
import io
import itertools
import json
import math
import pkgutil
import statistics
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DamagedFileError
from ..io import RunDir, to_jsonable

__all__ = [
    "Experiment", "get_experiment", "list_experiments", "make_config", "parse_overrides",
    "register", "run_experiment", "plot_run", "compare",
]

_EXTRA: dict[str, Experiment] = {}


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One runnable experiment.

    Attributes:
        name: CLI name (``tangentscope run NAME``).
        config: the frozen ``Config`` dataclass type.
        run: ``run(cfg, rd) -> summary dict``; logs metrics/cells incrementally.
        plot: ``plot(rd) -> list of figure paths``; must need nothing but the run directory.
        presets: named overrides of ``config``'s defaults; ``smoke`` (CI, < 1 min) and ``full``.
        description: one line for ``tangentscope list``.
    """

    name: str
    config: type
    run: Callable[[Any, RunDir], Mapping[str, Any]]
    plot: Callable[[RunDir], Sequence[Path]]
    presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    description: str = ""


def register(experiment: Experiment) -> Experiment:
    """Make an experiment defined outside this package runnable by name (returns it).

    Note that ``tangentscope plot``/``--resume`` in a new process only find it if the module
    that registers it has been imported.
    """
    _EXTRA[experiment.name] = experiment
    return experiment


def _module_names() -> list[str]:
    here = [str(Path(__file__).parent)]
    return sorted(m.name for m in pkgutil.iter_modules(here) if not m.name.startswith("_"))


def list_experiments() -> dict[str, Experiment]:
    """All experiments, by name (imports each experiment module; their heavy deps stay lazy)."""
    out = dict(_EXTRA)
    for mod in _module_names():
        m = importlib.import_module(f"{__package__}.{mod}")
        exp = getattr(m, "EXPERIMENT", None)
        if isinstance(exp, Experiment):
            out[exp.name] = exp
    return out


def get_experiment(name: str) -> Experiment:
    """The experiment called ``name`` (module ``name`` with ``-`` read as ``_`` tried first).

    Raises:
        ConfigError: no such experiment (the message lists the known ones).
    """
    if name in _EXTRA:
        return _EXTRA[name]
    mod = name.replace("-", "_")
    if mod in _module_names():
        exp = getattr(importlib.import_module(f"{__package__}.{mod}"), "EXPERIMENT", None)
        if isinstance(exp, Experiment) and exp.name == name:
            return exp
    known = list_experiments()
    if name in known:
        return known[name]
    raise ConfigError(f"unknown experiment {name!r}; known: {', '.join(sorted(known))}")


# -- configs ------------------------------------------------------------------------------------
def _coerce(value: Any, tp: Any, field: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))) \
                and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, field)
            except ConfigError:
                continue
        raise ConfigError(f"--{field}: cannot read {value!r} as {tp}")
    if origin is typing.Literal:
        for a in args:
            if str(a) == str(value):
                return a
        raise ConfigError(f"--{field} must be one of {list(args)}, got {value!r}")
    if origin in (tuple, list):
        items = value if isinstance(value, (list, tuple)) else [
            v for v in str(value).split(",") if v != ""]
        inner = args[0] if args else str
        coerced = [_coerce(v, inner, field) for v in items]
        return tuple(coerced) if origin is tuple else coerced
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{field} expects true/false, got {value!r}")
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, str):
                f = float(value)
                if f != int(f):
                    raise ValueError
                return int(f)
            return tp(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int("inf")
            raise ConfigError(f"--{field} expects {tp.__name__}, got {value!r}") from None
    return value


def make_config(config_cls: type, overrides: Mapping[str, Any] | None = None) -> Any:
    """Instantiate ``config_cls`` with ``overrides`` coerced to the fields' types.

    Raises:
        ConfigError: unknown field or a value of the wrong type (the message lists the fields).
    """
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    kwargs = {}
    for k, v in (overrides or {}).items():
        key = k.replace("-", "_")
        if key not in fields:
            raise ConfigError(f"unknown config field --{k} for {config_cls.__module__}; "
                              f"fields: {', '.join(sorted(fields))}")
        kwargs[key] = _coerce(v, hints[key], key)
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config: {e}") from e


def parse_overrides(tokens: Sequence[str]) -> dict[str, str]:
    """``['--lr', '3e-3', '--width=64']`` → ``{'lr': '3e-3', 'width': '64'}``.

    Raises:
        ConfigError: a token that is not ``--field value`` / ``--field=value``.
    """
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"expected --field value, got {tok!r}")
        if "=" in tok:
            k, v = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens):
                raise ConfigError(f"{tok} needs a value")
            k, v = tok[2:], tokens[i + 1]
            i += 2
        out[k] = v
    return out


def resolve_config(exp: Experiment, preset: str | None, overrides: Mapping[str, Any]) -> Any:
    """Defaults ← preset ← overrides."""
    merged: dict[str, Any] = {}
    if preset is not None:
        if preset not in exp.presets:
            raise ConfigError(f"{exp.name} has no preset {preset!r}; presets: "
                              f"{', '.join(exp.presets) or '(none)'}")
        merged.update(exp.presets[preset])
    merged.update(overrides)
    return make_config(exp.config, merged)


def _default_out(name: str, preset: str | None, cfg: Any) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    seed = getattr(cfg, "seed", None)
    tag = "-".join(x for x in (preset or "default", None if seed is None else f"seed{seed}") if x)
    return Path("runs") / name / f"{stamp}-{tag}"


# -- running ------------------------------------------------------------------------------------
class _DefaultPreset(str):
    """The preset a caller did not choose: ``"smoke"``, told apart from an explicit ``"smoke"``
    by identity (a resumed run keeps its saved preset unless one is given)."""


DEFAULT_PRESET: str = _DefaultPreset("smoke")
_BOOKKEEPING = {"config.json", "env.json", "status.json"}


def run_experiment(name: str | None, *, preset: str | None = DEFAULT_PRESET,
                   overrides: Mapping[str, Any] | None = None, out: str | Path | None = None,
                   resume: str | Path | None = None, plot: bool = True, quiet: bool = False
                   ) -> RunDir:
    """Run (or resume) an experiment into a run directory and return it.

    Resuming (``resume=DIR``, ``tangentscope run --resume DIR``) continues the run with the
    configuration saved in ``DIR/config.json``; nothing given here may contradict it:

    - ``name``, if given, must be the saved experiment;
    - every override (``--seed``, ``--field value``) must equal the saved value — a different
      value is refused (start a new run with ``--out`` to change it), an equal one is accepted;
    - ``preset``, if given, must be the saved preset (not given: the saved one is used).

    A resumed run first drops the ``metrics.csv`` rows logged after its last commit point
    (:meth:`RunDir.discard_uncommitted`; not for a run that had completed), so rows are never
    duplicated. ``wall_seconds`` in the summary is the total over the sessions that ended
    (the first run and every resume; a session killed by a signal cannot count its time), so
    resuming a finished run adds the few seconds of the resume, never replaces the total.

    A fresh run whose ``run`` raises before it has written any result (a value rejected while
    validating, say) leaves no directory behind: the files written here are removed again.

    Args:
        name: experiment name (``tangentscope list``); may be None with ``resume``.
        preset: ``smoke``, ``full`` or ``None`` (the dataclass defaults).
        overrides: field → value (strings are coerced to the field's type).
        out: run directory to create (default ``runs/<name>/<time>-<preset>-seed<N>``).
        resume: an existing run directory to continue; its saved config is used.
        plot: write figures at the end.
        quiet: print nothing.

    Raises:
        ConfigError: an unknown experiment, preset or field; a bad value; an existing ``out``;
            a resume that contradicts the saved run (the message names the fix).
        DamagedFileError: a resumed run's ``config.json`` is damaged.
    """
    prior, created = 0.0, None
    if resume is not None:
        rd = RunDir.open(resume)
        exp, cfg, prev = _check_resume(rd, name, preset, overrides or {}, quiet)
        prior = _prior_seconds(rd, prev)
        if prev == "complete":
            rd.verify_cells()
        else:
            dropped = rd.discard_uncommitted()
            if dropped and not quiet:
                print(f"[tangentscope] {rd.path}: dropped {dropped} metrics.csv row(s) of "
                      "unfinished work (it is done again)", flush=True)
        rd.set_status("running", resumed=True, wall_seconds=prior)
    else:
        if name is None:
            raise ConfigError("run_experiment needs an experiment name (or resume=RUN_DIR)")
        exp = get_experiment(name)
        cfg = resolve_config(exp, preset, overrides or {})
        target = Path(out) if out is not None else _default_out(exp.name, preset, cfg)
        created = _new_paths(target)
        rd = RunDir.create(target, cfg, meta={"experiment": exp.name, "preset": preset})
    if not quiet:
        print(f"[tangentscope] {exp.name}: writing to {rd.path}", flush=True)
    t0 = time.perf_counter()
    try:
        summary = dict(exp.run(cfg, rd))
    except BaseException as e:
        if created is not None and isinstance(e, Exception) and _remove_if_empty(rd, created):
            raise
        rd.set_status("failed" if not isinstance(e, KeyboardInterrupt) else "interrupted",
                      error=repr(e), wall_seconds=prior + time.perf_counter() - t0)
        raise
    total = prior + time.perf_counter() - t0
    summary.setdefault("wall_seconds", total)
    rd.write_summary(summary)
    if plot:
        plot_run(rd)
    rd.set_status("complete", wall_seconds=total)
    if not quiet:
        print(json.dumps(to_jsonable(_headline(summary)), indent=2))
        print(f"[tangentscope] done: {rd.path}", flush=True)
    return rd


def _check_resume(rd: RunDir, name: str | None, preset: str | None,
                  overrides: Mapping[str, Any], quiet: bool) -> tuple[Experiment, Any, str | None]:
    """The saved experiment and config of ``rd``, after checking that ``name``, ``preset`` and
    ``overrides`` agree with them; also the status the run had."""
    saved = rd.read_config()
    fix = f"resume it with `tangentscope run --resume {rd.path}` and no other options"
    if saved.get("kind") == "compare":
        raise ConfigError(f"{rd.path} is a compare directory: continue it with "
                          f"`tangentscope compare --resume {rd.path}`")
    if not isinstance(saved.get("experiment"), str) or not isinstance(saved.get("config"), dict):
        raise ConfigError(f"{rd.path}/config.json names no experiment and config: it was not "
                          "written by `tangentscope run` (or was edited); restore it from a copy, "
                          "or start a new run with --out")
    exp = get_experiment(saved["experiment"])
    if name is not None and get_experiment(name).name != exp.name:
        raise ConfigError(f"{rd.path} holds a run of {exp.name!r}, not {name!r}: {fix}, or "
                          f"start a new {name} run with --out")
    hints = typing.get_type_hints(exp.config)
    fields = {f.name for f in dataclasses.fields(exp.config)}
    diffs = []
    for k, v in overrides.items():
        key = k.replace("-", "_")
        if key not in fields:
            raise ConfigError(f"unknown config field --{k} for {exp.name}; fields: "
                              f"{', '.join(sorted(fields))}")
        want = to_jsonable(_coerce(v, hints[key], key))
        if want != saved["config"].get(key):
            diffs.append(f"--{key} {v} (saved: {saved['config'].get(key)!r})")
    if diffs:
        raise ConfigError(f"{rd.path} was run with a different configuration than "
                          f"{', '.join(diffs)}; a resumed run keeps the configuration it was "
                          f"started with: {fix}, or start a new run with --out to change it")
    saved_preset = saved.get("preset")
    if preset != saved_preset:
        if preset is not DEFAULT_PRESET:
            raise ConfigError(f"{rd.path} was run with preset {saved_preset!r}, not {preset!r}; "
                              f"a resumed run keeps its configuration: {fix}, or start a new "
                              "run with --out")
        if not quiet:
            print(f"[tangentscope] resuming {rd.path} with its saved preset {saved_preset!r}",
                  flush=True)
    cfg = make_config(exp.config, saved["config"])
    try:
        prev = rd.status
    except DamagedFileError:
        prev = None
    return exp, cfg, prev


def _prior_seconds(rd: RunDir, prev: str | None) -> float:
    """Seconds the earlier sessions of ``rd`` spent in ``run`` (those that ended)."""
    try:
        rec = rd.status_record()
        if isinstance(rec.get("wall_seconds"), (int, float)):
            return float(rec["wall_seconds"])
        if prev == "complete":
            w = rd.read_summary().get("wall_seconds")
            return float(w) if isinstance(w, (int, float)) else 0.0
    except DamagedFileError:
        pass
    return 0.0


def _new_paths(target: Path) -> list[Path]:
    """``target`` and its parents that do not exist yet (what creating it adds)."""
    out, p = [], target
    while not p.exists() and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def _remove_if_empty(rd: RunDir, created: list[Path]) -> bool:
    """Remove the run directory ``RunDir.create`` just made if ``run`` wrote no result into it
    (only config/env/status and temporary files); returns whether it did."""
    files = [f for f in rd.path.rglob("*") if not f.is_dir()]
    if any(f.parent != rd.path or (f.name not in _BOOKKEEPING and not f.name.endswith(".tmp"))
           for f in files):
        return False
    for f in files:
        f.unlink(missing_ok=True)
    for d in sorted((d for d in rd.path.rglob("*") if d.is_dir()), reverse=True):
        d.rmdir()
    for d in created:            # innermost first; stop at a directory something else uses
        try:
            d.rmdir()
        except OSError:
            break
    return True


def _headline(summary: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if not isinstance(v, (list, dict)) or k == "verdict"}


def plot_run(run_dir: str | Path | RunDir) -> list[Path]:
    """Regenerate the figures of a run directory (no retraining)."""
    rd = run_dir if isinstance(run_dir, RunDir) else RunDir.open(run_dir)
    exp = get_experiment(rd.read_config()["experiment"])
    return list(exp.plot(rd))


# -- compare ------------------------------------------------------------------------------------
def _quantiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    if len(xs) == 1:
        return {"median": xs[0], "q25": xs[0], "q75": xs[0], "min": xs[0], "max": xs[0]}
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": statistics.median(xs), "q25": q[0], "q75": q[2], "min": xs[0],
            "max": xs[-1]}


def seed_stats(values: Sequence[float | None], *, empty: Any = math.nan) -> dict[str, Any]:
    """Median, quartiles, min and max of ``values`` (one per seed), with ``n`` (values used)
    and ``missing`` (``None`` and NaN dropped; ±inf, e.g. "never reached", is kept); every
    statistic is ``empty`` when nothing is left."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    stats = _quantiles(xs) if xs else dict.fromkeys(("median", "q25", "q75", "min", "max"), empty)
    return {**stats, "n": len(xs), "missing": len(values) - len(xs)}


def compare(name: str, vary: Mapping[str, Iterable[Any]], *, seeds: Sequence[int] = (0, 1, 2),
            preset: str | None = "smoke", overrides: Mapping[str, Any] | None = None,
            out: str | Path | None = None, resume: str | Path | None = None,
            metrics: Sequence[str] | None = None, quiet: bool = False) -> RunDir:
    """Run ``experiment × (grid of vary) × seeds``; write ``table.csv`` and ``table.md``.

    Each combination is its own run directory under the compare directory; finished ones are
    recorded in the compare directory's ``cells.jsonl`` and skipped on ``resume``. The table has,
    per combination and numeric summary metric, the median, quartiles, min, max and seed count.
    """
    if resume is not None:
        rd = RunDir.open(resume)
        saved = rd.read_config()
        name, preset = saved["experiment"], saved["preset"]
        vary, seeds, overrides = saved["vary"], saved["seeds"], saved["overrides"]
        metrics = saved.get("metrics")
        exp = get_experiment(name)
    else:
        exp = get_experiment(name)
        vary = {k: list(v) for k, v in vary.items()}
        fields = {f.name for f in dataclasses.fields(exp.config)}
        for k in list(vary) + ["seed"]:
            if k.replace("-", "_") not in fields:
                raise ConfigError(f"{exp.name}'s config has no field {k!r} to vary; fields: "
                                  f"{', '.join(sorted(fields))}")
        if not seeds:
            raise ConfigError("compare needs at least one seed, e.g. --seeds 0,1,2")
        for combo in itertools.product(*vary.values()):  # every cell's config, before any work
            for seed in seeds:
                resolve_config(exp, preset, {**(overrides or {}), **dict(zip(vary, combo)),
                                             "seed": seed})
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        rd = RunDir.create(out or Path("runs") / exp.name / f"compare-{stamp}", None,
                           meta={"experiment": exp.name, "preset": preset, "vary": vary,
                                 "seeds": list(seeds), "overrides": dict(overrides or {}),
                                 "metrics": list(metrics) if metrics else None,
                                 "kind": "compare"})
    done = rd.cells()
    keys = list(vary)
    combos = list(itertools.product(*(vary[k] for k in keys)))
    for combo in combos:
        for seed in seeds:
            tag = "-".join(f"{k}={v}" for k, v in zip(keys, combo)) or "base"
            key = f"{tag}-seed{seed}"
            if key in done:
                continue
            ov = dict(overrides or {})
            ov.update(dict(zip(keys, combo)))
            ov["seed"] = seed
            sub = rd.path / key.replace("/", "_")
            if (sub / "config.json").exists():
                sub_rd = run_experiment(exp.name, resume=sub, plot=False, quiet=quiet)
            else:
                sub_rd = run_experiment(exp.name, preset=preset, overrides=ov, out=sub,
                                        plot=False, quiet=quiet)
            rd.save_cell(key, {"combo": dict(zip(keys, combo)), "seed": seed,
                               "summary": sub_rd.read_summary()})
    table = compare_table(rd, metrics)
    rd.write_summary({"table": table})
    rd.set_status("complete")
    if not quiet:
        print((rd.path / "table.md").read_text())
    return rd


def compare_table(rd: RunDir, metrics: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Aggregate a compare directory's cells into rows; writes ``table.csv`` and ``table.md``."""
    cells = rd.cells()
    groups: dict[str, list[dict[str, Any]]] = {}
    for rec in cells.values():
        tag = ", ".join(f"{k}={v}" for k, v in rec["combo"].items()) or "base"
        groups.setdefault(tag, []).append(rec)
    rows: list[dict[str, Any]] = []
    for tag, recs in groups.items():
        names = metrics or sorted({k for r in recs for k, v in r["summary"].items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for m in names:
            vals = [float(r["summary"][m]) for r in recs
                    if isinstance(r["summary"].get(m), (int, float))]
            if not vals:
                continue
            rows.append({"setting": tag, "metric": m, "n": len(vals), **_quantiles(vals),
                         "seeds": sorted(r["seed"] for r in recs)})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["setting", "metric", "n", "median", "q25", "q75",
                                        "min", "max", "seeds"], lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "seeds": " ".join(map(str, r["seeds"]))})
    rd.write_text("table.csv", buf.getvalue())
    lines = ["| setting | metric | n | median | q25–q75 | min–max |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['metric']} | {r['n']} | {r['median']:.4g} | "
                     f"{r['q25']:.4g}–{r['q75']:.4g} | {r['min']:.4g}–{r['max']:.4g} |")
    rd.write_text("table.md", "\n".join(lines) + "\n")
    return rows
