"""The trajectory store: the one owner of a recorded trajectory's format, on disk or in memory.

A recorded trajectory is metadata, arrays stored once (the training and probe data), and a
sequence of **records**: one JSON-able dict per snapshot (step, time, losses, ...) with the
**named arrays** of that snapshot. :class:`~tangentscope.dynamics.recorder.KernelRecorder`
writes through a store and :class:`~tangentscope.dynamics.trajectory.KernelTrajectory` reads
through one; nothing else touches the files.

Each record has a ``kind`` (``"kernel"`` for the dense recorder's snapshots: ``K_SS``, ``K_QS``,
``u``, ``g``, ``B``, ``U_Q``, ``dts``, ``D``; ``"checkpoint"`` for a checkpoint recording's
parameters, ``D``, ``u``, ``U_Q``, ``dts``: :mod:`~tangentscope.dynamics.matfree_record`); every
kind goes in the same store, the same files and the same crash guarantees, and readers ask for
the kind they understand.

On-disk layout (a directory)::

    trajectory.json        the metadata (``"format": 1``; written last when created)
    data.npz               arrays stored once
    index.jsonl            one line per record, appended and fsync-ed after its array file is in
                           place; a line ``{"truncate_after_step": s}`` discards the records
                           after step ``s`` (written when a recording resumes from an earlier
                           snapshot)
    snapshots/000007.npz   the named arrays of one record (written atomically)

A crash loses at most the record in flight: its array file is renamed into place before its
index line is appended, a line cut by a crash is repaired before the next append, and each
record carries ``seq`` (the number of records before it) so that a lost or garbled line in the
middle is reported, never silently skipped. Directories written before ``format`` and ``seq``
existed load unchanged.
"""

from __future__ import annotations

import abc
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._durable import (
    DamagedFileError,
    append_jsonl,
    atomic_write_json,
    atomic_write_npz,
    read_json,
    read_jsonl,
    read_npz,
    remove_stale_temporaries,
)
from ..errors import ConfigError

__all__ = ["TrajectoryStore", "DiskStore", "MemoryStore", "FORMAT", "DEFAULT_KIND", "INDEX_FIX"]

FORMAT = 1
DEFAULT_KIND = "kernel"

_FILE = re.compile(r"snapshots/(\d+)\.npz")
_META_FIX = ("trajectory.json holds the recording's metadata (n, p, loss, ...) and cannot be "
             "rebuilt from the snapshots: restore it from a copy, or record again into a new "
             "directory")
_DATA_FIX = ("data.npz holds the training/probe data of the recording: restore it from a copy, "
             "or record again into a new directory")
INDEX_FIX = ("restore index.jsonl from a copy, or delete that line and every line after it and "
              "resume the recording from the last snapshot before it (KernelRecorder(..., "
              "resume=True, step=...), with the model checkpoint of that step)")
_SNAPSHOT_FIX = ("delete the index.jsonl lines from this snapshot on and resume the recording "
                 "from the snapshot before it (KernelRecorder(..., resume=True, step=...), with "
                 "the model checkpoint of that step), or restore the file from a copy")


class TrajectoryStore(abc.ABC):
    """Where a trajectory's records live: :class:`DiskStore` (a directory) or
    :class:`MemoryStore`. Build one with :meth:`create` or :meth:`open`.

    Attributes:
        path: the directory (``None`` for a memory store).
        meta: the metadata given to :meth:`create` (plus ``format``).
    """

    path: Path | None
    meta: dict[str, Any]

    def __init__(self) -> None:
        self._arrays_cache: dict[Any, dict[str, Any]] = {}

    # -- construction ---------------------------------------------------------------------------
    @staticmethod
    def create(path: str | os.PathLike | None, meta: Mapping[str, Any],
               data: Mapping[str, Any]) -> TrajectoryStore:
        """A new, empty store: on disk at ``path``, or in memory when ``path`` is None.

        Args:
            path: the directory (created with its parents), or ``None``.
            meta: JSON-able metadata (``n``, ``p``, ``loss``, ...).
            data: arrays stored once (numpy arrays or CPU tensors).

        Raises:
            ConfigError: ``path`` already holds a trajectory (open it instead).
        """
        if path is None:
            return MemoryStore(meta, data)
        return DiskStore._create(Path(path), meta, data)

    @staticmethod
    def open(path: str | os.PathLike) -> DiskStore:
        """The store in directory ``path``.

        Raises:
            ConfigError: ``path`` holds no trajectory.
            DamagedFileError: ``trajectory.json`` is truncated or garbled.
        """
        return DiskStore(Path(path))

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        """Whether directory ``path`` holds a trajectory (its ``trajectory.json``)."""
        return (Path(path) / "trajectory.json").exists()

    # -- records --------------------------------------------------------------------------------
    @abc.abstractmethod
    def data(self) -> dict[str, Any]:
        """The arrays stored once (``x``, ``y``, ...)."""

    @abc.abstractmethod
    def records(self, kind: str | None = DEFAULT_KIND) -> list[dict[str, Any]]:
        """The live records of ``kind`` (all kinds with ``None``) in order, after truncations.

        Raises:
            DamagedFileError: a record in the middle of the index is missing or garbled.
        """

    @abc.abstractmethod
    def append(self, record: Mapping[str, Any], arrays: Mapping[str, Any], *,
               kind: str = DEFAULT_KIND) -> dict[str, Any]:
        """Store one record and its named arrays; returns the record as stored.

        The record must have an integer ``step``; the store adds ``kind``, ``seq`` and where
        its arrays are (``file``, ``bytes`` and the sorted ``arrays`` names on disk). On disk
        the arrays are in place (atomically) before the index line is appended and fsync-ed.
        """

    @abc.abstractmethod
    def truncate_after(self, step: int) -> None:
        """Discard every record after step ``step`` (all kinds)."""

    @abc.abstractmethod
    def arrays(self, record: Mapping[str, Any], names: Sequence[str] | None = None
               ) -> dict[str, Any]:
        """The named arrays of ``record`` (all, or those of ``names`` it has), read now.

        Raises:
            DamagedFileError: the record's array file is missing, truncated or garbled.
        """

    def array(self, record: Mapping[str, Any], name: str) -> Any | None:
        """One array of ``record`` (``None`` if it has none by that name), through a small
        cache of the last two records read (the big arrays are loaded on demand)."""
        key = self._slot(record)
        cache = self._arrays_cache
        if key not in cache:
            if len(cache) >= 2:
                cache.pop(next(iter(cache)))
            cache[key] = {}
        got = cache[key]
        if name not in got:
            got.update({name: None} | self.arrays(record, [name]))
        return got[name]

    # -- internals ------------------------------------------------------------------------------
    @abc.abstractmethod
    def _slot(self, record: Mapping[str, Any]) -> Any: ...


def _check_step(record: Mapping[str, Any]) -> int:
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise ConfigError(f"a trajectory record needs an integer 'step', got {step!r}")
    return int(step)


def _apply(out: list[dict[str, Any]], rec: dict[str, Any]) -> list[dict[str, Any]]:
    """One index entry applied to the live records ``out``."""
    if "truncate_after_step" in rec:
        return [r for r in out if r["step"] <= rec["truncate_after_step"]]
    out.append(rec)
    return out


class MemoryStore(TrajectoryStore):
    """A store in memory (recordings with ``run_dir=None``, synthetic trajectories)."""

    def __init__(self, meta: Mapping[str, Any], data: Mapping[str, Any]):
        super().__init__()
        self.path = None
        self.meta = {**dict(meta), "format": FORMAT}
        self._data = dict(data)
        self._records: list[dict[str, Any]] = []
        self._arrays: dict[int, dict[str, Any]] = {}
        self._next = 0

    def data(self) -> dict[str, Any]:
        return dict(self._data)

    def records(self, kind: str | None = DEFAULT_KIND) -> list[dict[str, Any]]:
        return [r for r in self._records if kind is None or r["kind"] == kind]

    def append(self, record: Mapping[str, Any], arrays: Mapping[str, Any], *,
               kind: str = DEFAULT_KIND) -> dict[str, Any]:
        _check_step(record)
        rec = {**dict(record), "kind": kind, "seq": len(self._records), "slot": self._next}
        self._arrays[self._next] = dict(arrays)
        self._next += 1
        self._records.append(rec)
        return rec

    def truncate_after(self, step: int) -> None:
        self._records = _apply(self._records, {"truncate_after_step": int(step)})
        live = {r["slot"] for r in self._records}
        self._arrays = {k: v for k, v in self._arrays.items() if k in live}
        self._arrays_cache.clear()

    def discard_before(self, step: int) -> None:
        """Forget the records before step ``step`` and their arrays (a streaming recording
        that keeps only its newest snapshots; memory stores only)."""
        self._records = [r for r in self._records if r["step"] >= step]
        live = {r["slot"] for r in self._records}
        self._arrays = {k: v for k, v in self._arrays.items() if k in live}
        self._arrays_cache = {k: v for k, v in self._arrays_cache.items() if k in live}

    def arrays(self, record: Mapping[str, Any], names: Sequence[str] | None = None
               ) -> dict[str, Any]:
        got = self._arrays[record["slot"]]
        return dict(got) if names is None else {k: got[k] for k in names if k in got}

    def _slot(self, record: Mapping[str, Any]) -> Any:
        return record["slot"]

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._records)} records)"


class DiskStore(TrajectoryStore):
    """A store in a directory (see the module docstring for the layout).

    Args:
        path: the directory; it must hold a trajectory (use :meth:`TrajectoryStore.create`
            for a new one).

    Raises:
        ConfigError: ``path`` holds no trajectory.
        DamagedFileError: ``trajectory.json`` is truncated or garbled.
    """

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)
        f = self.path / "trajectory.json"
        if not f.exists():
            raise ConfigError(f"{self.path} holds no recorded trajectory (no trajectory.json); "
                              "pass the run_dir given to KernelRecorder")
        meta = read_json(f, fix=_META_FIX)
        if not isinstance(meta, dict):
            raise DamagedFileError(f, "not a JSON object", _META_FIX)
        self.meta = meta
        self._next: int | None = None    # number of the next array file
        self._live: int | None = None    # live records (the next record's seq)

    @classmethod
    def _create(cls, path: Path, meta: Mapping[str, Any], data: Mapping[str, Any]
                ) -> DiskStore:
        if TrajectoryStore.exists(path):
            raise ConfigError(f"{path} already holds a recorded trajectory; open it "
                              "(TrajectoryStore.open) to append, or choose another directory")
        if (path / "index.jsonl").exists():
            raise ConfigError(f"{path} holds snapshots but no trajectory.json (a damaged "
                              "recording): delete the directory, or choose another one")
        (path / "snapshots").mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        remove_stale_temporaries(path / "snapshots")
        atomic_write_npz(path / "data.npz", {k: _numpy(v) for k, v in data.items()})
        atomic_write_json(path / "trajectory.json", {**dict(meta), "format": FORMAT})
        return cls(path)

    @property
    def root(self) -> Path:
        assert self.path is not None
        return self.path

    def data(self) -> dict[str, Any]:
        return read_npz(self.root / "data.npz", fix=_DATA_FIX)

    def _index(self) -> list[dict[str, Any]]:
        """Every record in index order after truncations (files not checked)."""
        f = self.root / "index.jsonl"
        lines, _ = read_jsonl(f)   # undecodable lines: records cut by a crash (never counted)
        out: list[dict[str, Any]] = []
        for i, rec in enumerate(lines):
            if isinstance(rec, dict) and isinstance(rec.get("truncate_after_step"), int):
                out = _apply(out, rec)
                continue
            if not (isinstance(rec, dict) and isinstance(rec.get("file"), str)
                    and _FILE.fullmatch(rec["file"]) and isinstance(rec.get("step"), int)):
                raise DamagedFileError(f, f"entry {i + 1} is not a snapshot record: "
                                       f"{str(rec)[:80]}", INDEX_FIX)
            seq = rec.get("seq")
            if seq is not None and seq != len(out):
                raise DamagedFileError(f, f"record {rec['file']} was appended after {seq} "
                                       f"records but follows {len(out)}: a line before it is "
                                       "missing or garbled", INDEX_FIX)
            out.append(rec)
        return out

    def records(self, kind: str | None = DEFAULT_KIND) -> list[dict[str, Any]]:
        out = [r for r in self._index() if kind is None or r.get("kind", DEFAULT_KIND) == kind]
        for r in out:   # an index line is written only once its file is in place
            if not (self.root / r["file"]).exists():
                raise DamagedFileError(self.root / r["file"], "the file is missing",
                                       _SNAPSHOT_FIX)
        return out

    def _next_number(self) -> int:
        if self._next is None:
            nums = [int(m.group(1)) for f in (self.root / "snapshots").glob("*.npz")
                    if (m := _FILE.fullmatch(f"snapshots/{f.name}"))]
            nums += [int(m.group(1)) for r in self._index() if (m := _FILE.fullmatch(r["file"]))]
            self._next = max(nums, default=-1) + 1
        return self._next

    def append(self, record: Mapping[str, Any], arrays: Mapping[str, Any], *,
               kind: str = DEFAULT_KIND) -> dict[str, Any]:
        _check_step(record)
        num = self._next_number()
        name = f"snapshots/{num:06d}.npz"
        size = atomic_write_npz(self.root / name, {k: _numpy(v) for k, v in arrays.items()})
        self._next = num + 1
        if self._live is None:
            self._live = len(self._index())
        rec = {**dict(record), "kind": kind, "seq": self._live, "file": name, "bytes": size,
               "arrays": sorted(arrays)}
        append_jsonl(self.root / "index.jsonl", rec)
        self._live += 1
        return rec

    def truncate_after(self, step: int) -> None:
        append_jsonl(self.root / "index.jsonl", {"truncate_after_step": int(step)})
        self._live = None
        self._arrays_cache.clear()

    def arrays(self, record: Mapping[str, Any], names: Sequence[str] | None = None
               ) -> dict[str, Any]:
        f = self.root / record["file"]
        got = read_npz(f, names, fix=_SNAPSHOT_FIX)
        listed = record.get("arrays")
        if isinstance(listed, list):   # what was written (records of earlier versions: unknown)
            want = listed if names is None else [k for k in names if k in listed]
            missing = [k for k in want if k not in got]
            if missing:
                raise DamagedFileError(f, f"arrays {missing} are missing", _SNAPSHOT_FIX)
        return got

    def clean_temporaries(self) -> int:
        """Delete the temporary files a killed writer left (only while nothing else writes to
        this store, e.g. when a recording resumes); returns how many."""
        return remove_stale_temporaries(self.root) + remove_stale_temporaries(
            self.root / "snapshots")

    def _slot(self, record: Mapping[str, Any]) -> Any:
        return record["file"]

    def __repr__(self) -> str:
        return f"DiskStore({str(self.path)!r})"


def _numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu().numpy()
    return np.asarray(v)
