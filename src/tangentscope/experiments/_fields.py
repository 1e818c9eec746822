"""The fields of an experiment's ``Config``: type, default and meaning, for the command line
(``tangentscope list EXP``, ``tangentscope run EXP --help``).

A field's meaning is its entry in the ``Attributes:`` section of the ``Config`` docstring
(Google style; one entry may name several fields, ``n_embd, n_layer: ...``), or else the comment
at the end of the line that declares it (``lr: float = 0.05  # full-batch gradient descent``).
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing
from typing import Any

from ._framework import Experiment

__all__ = ["FieldInfo", "config_fields", "describe_experiment"]


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """One ``--field value`` of an experiment.

    Attributes:
        name: the field (``--name`` on the command line).
        type: its type as text (``int``, ``float | None``, ``tuple[str, ...]``, ``{a, b}``).
        default: the default as it is written on the command line (tuples comma-joined).
        meaning: the docstring's or the comment's text (``""`` when undocumented).
    """

    name: str
    type: str
    default: str
    meaning: str


def _type_text(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "None"
    if origin is typing.Literal:
        return "{" + ", ".join(str(a) for a in args) + "}"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a) for a in args)
    if origin in (tuple, list):
        inner = ", ".join("..." if a is Ellipsis else _type_text(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return _value_text(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return _value_text(f.default_factory())
    return "(required)"


def _value_text(v: Any) -> str:
    """``v`` as it is written on the command line (tuples comma-joined, booleans lower-case)."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (tuple, list)):
        return ",".join(str(x) for x in v) or '""'
    if isinstance(v, str):
        return v if v else '""'
    return str(v)


def _docstring_meanings(cls: type) -> dict[str, str]:
    doc = inspect.getdoc(cls) or ""
    m = re.search(r"^Attributes:\n(.*?)(?=^\S|\Z)", doc, re.S | re.M)
    if m is None:
        return {}
    out: dict[str, str] = {}
    names: list[str] = []
    indent: int | None = None
    for line in m.group(1).splitlines():
        if not line.strip():
            continue
        lead = len(line) - len(line.lstrip())
        entry = re.match(r"^\s*([\w`][\w`, /]*):\s*(.*)$", line)
        if entry and (indent is None or lead <= indent):
            indent = lead
            names = [n.strip("` ") for n in re.split(r"[,/]", entry.group(1)) if n.strip("` ")]
            for n in names:
                out[n] = entry.group(2).strip()
        elif names:
            for n in names:
                out[n] = f"{out[n]} {line.strip()}".strip()
    # "steps: optimizer steps; ``batch_size``: None = full batch." documents two fields
    for name, text in list(out.items()):
        parts = re.split(r";\s*``(\w+)``:\s*", text)
        out[name] = parts[0]
        for extra, more in zip(parts[1::2], parts[2::2]):
            out.setdefault(extra, more)
    return out


def _plain(text: str) -> str:
    """Docstring markup to plain text: ``x`` → x, :func:`~a.b` → b."""
    text = re.sub(r":\w+:`~?([^`]*)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return " ".join(text.replace("``", "").split())


def _comment_meanings(cls: type) -> dict[str, str]:
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    field_at: dict[int, str] = {}
    for i, line in enumerate(src.splitlines(), 1):
        m = re.match(r"^\s{4}(\w+)\s*:", line)
        if m:
            field_at[i] = m.group(1)
    try:
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT and tok.start[0] in field_at:
                out.setdefault(field_at[tok.start[0]], tok.string.lstrip("#").strip())
    except (tokenize.TokenError, SyntaxError):
        pass
    return out


def config_fields(config_cls: type) -> list[FieldInfo]:
    """Every field of a ``Config`` dataclass, in declaration order (see the module docstring)."""
    hints = typing.get_type_hints(config_cls)
    doc, comments = _docstring_meanings(config_cls), _comment_meanings(config_cls)
    return [FieldInfo(f.name, _type_text(hints.get(f.name, f.type)), _default_text(f),
                      _plain(doc.get(f.name) or comments.get(f.name, "")))
            for f in dataclasses.fields(config_cls)]


def describe_experiment(exp: Experiment, width: int = 100) -> str:
    """The text of ``tangentscope list EXP``: description, presets, and a table of the fields
    (name, type, default, meaning wrapped to ``width`` columns)."""
    lines = [f"{exp.name}: {exp.description}".rstrip(": ")]
    for name, over in exp.presets.items():
        sets = " ".join(f"--{k} {_value_text(v)}" for k, v in over.items())
        lines.append(f"  preset {name}: {sets or '(the defaults)'}")
    fields = config_fields(exp.config)
    lines += ["", "fields (--field value; defaults before any preset):"]
    nw = max(len(f.name) for f in fields) + 2
    tw = min(max(len(f.type) for f in fields), 28)
    dw = min(max(len(f.default) for f in fields), 18)
    for f in fields:
        head = f"  --{f.name:<{nw - 2}} {f.type:<{tw}} {f.default:<{dw}} "
        if len(head) > width - 30:   # a long type or default: the meaning on the next line
            lines.append(head.rstrip())
            head = " " * (nw + tw + dw + 5)
        text = textwrap.wrap(f.meaning or "(undocumented)", max(width - len(head), 30)) or [""]
        lines.append(head + text[0])
        lines += [" " * len(head) + t for t in text[1:]]
    return "\n".join(lines)

