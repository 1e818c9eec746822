"""Durable files: the one place tangentscope writes and reads run files.

Every run file (a run directory's config, summary, status, arrays, checkpoints and metrics; a
recorded trajectory's metadata, snapshots and index) is written by one of these functions, so
crash handling is the same everywhere:

- **whole files** (:func:`atomic_write_bytes`, ``_text``, ``_json``, ``_npz``, ``_torch``,
  :func:`atomic_writer`) go to a temporary sibling, are flushed and ``fsync``-ed, then renamed
  over the target (and the directory is ``fsync``-ed): a reader sees the old file or the new
  one, never a mix, even after ``kill -9`` or a power cut;
- **JSON lines** (:func:`append_jsonl`) are appended in one write and ``fsync``-ed; a last line
  cut by a crash is repaired first (kept when it is still a complete record, else dropped), so a
  new record never glues onto it;
- **CSV rows** (:func:`append_csv_row`) are appended and flushed; a last row cut by a crash is
  dropped first. Rows are made durable by :func:`fsync_file` at the caller's commit points;
- **readers** (:func:`read_json`, :func:`read_jsonl`, :func:`read_npz`, :func:`read_torch`,
  :func:`read_csv`) turn ``JSONDecodeError``/``BadZipFile``/``EOFError``/unpickling errors into
  a :class:`DamagedFileError` that names the file and the fix.

Every byte reaches a file through ``_write`` (the crash tests stop a process half-way through
it to check that each writer survives being cut at any write).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import DamagedFileError

__all__ = [
    "to_jsonable", "atomic_writer",
    "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_write_npz",
    "atomic_write_torch", "atomic_write_state", "append_jsonl", "append_csv_row",
    "repair_cut_tail", "fsync_file", "fsync_dir", "remove_stale_temporaries", "read_json",
    "read_jsonl", "read_npz", "read_torch", "read_state", "read_csv",
]

TMP_SUFFIX = ".tmp"


def to_jsonable(obj: Any) -> Any:
    """Convert dataclasses, tensors, numpy scalars/arrays and paths into JSON-able values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if type(obj).__module__.startswith("torch") and hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None if np.isnan(obj) else (1e308 if obj > 0 else -1e308)
    return obj


# -- the one write ------------------------------------------------------------------------------
def _write(fh: BinaryIO, data: bytes) -> None:
    """Write ``data`` to ``fh``: every byte tangentscope writes to a run file passes here."""
    fh.write(data)


class _Sink(io.RawIOBase):
    """A file object over an open binary file whose writes go through :func:`_write` (what
    ``np.savez`` and ``torch.save`` write to)."""

    def __init__(self, fh: BinaryIO):
        super().__init__()
        self._fh = fh

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        _write(self._fh, data)
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def flush(self) -> None:
        self._fh.flush()


def fsync_file(path: str | os.PathLike) -> None:
    """``fsync`` an existing file (make what was appended to it durable)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """``fsync`` a directory so a rename inside it survives a power cut (no-op where the
    platform does not support it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")


def remove_stale_temporaries(directory: str | os.PathLike) -> int:
    """Delete the temporary files a killed writer left in ``directory``; returns how many."""
    d = Path(directory)
    if not d.is_dir():
        return 0
    n = 0
    for f in d.glob(f"*{TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            f.unlink()
            n += 1
    return n


# -- whole files --------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file object whose content replaces ``path`` atomically when the block ends.

    The data go to a temporary sibling, are flushed and fsync-ed, then renamed over ``path``
    and the directory is fsync-ed. If the block raises, ``path`` is untouched and the
    temporary file removed. The parent directory must exist.
    """
    target = Path(path)
    tmp = _tmp_path(target)
    fh = open(tmp, "wb")  # noqa: SIM115 - closed below, before the rename
    try:
        sink = _Sink(fh)
        yield sink  # type: ignore[misc]
        fh.flush()
        os.fsync(fh.fileno())
        fh.close()
        os.replace(tmp, target)
    except BaseException:
        fh.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> int:
    """Replace ``path`` by ``data`` atomically (see :func:`atomic_writer`); returns the size."""
    with atomic_writer(path) as fh:
        fh.write(data)
    return len(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> int:
    """Replace ``path`` by ``text`` (UTF-8) atomically; returns the size in bytes."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> int:
    """Replace ``path`` by ``obj`` as JSON (through :func:`to_jsonable`) atomically."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=indent))


def atomic_write_npz(path: str | os.PathLike, arrays: Mapping[str, Any], *,
                     compress: bool = False) -> int:
    """Replace ``path`` by an ``.npz`` of ``arrays`` atomically; returns the size in bytes."""
    arrs: dict[str, Any] = {k: np.asarray(v) for k, v in arrays.items()}
    with atomic_writer(path) as fh:
        (np.savez_compressed if compress else np.savez)(fh, **arrs)
    return Path(path).stat().st_size


def atomic_write_torch(path: str | os.PathLike, obj: Any) -> int:
    """Replace ``path`` by ``torch.save(obj)`` atomically; returns the size in bytes."""
    import torch

    with atomic_writer(path) as fh:
        torch.save(obj, fh)
    return Path(path).stat().st_size


STATE_MAGIC = b"TSSTATE1\n"


def _state_crc(info: Mapping[str, Any], blob: bytes) -> int:
    head = json.dumps(dict(info), sort_keys=True, separators=(",", ":")).encode("utf-8")
    return zlib.crc32(blob, zlib.crc32(head))


def atomic_write_state(path: str | os.PathLike, obj: Any,
                       meta: Mapping[str, Any] | None = None) -> int:
    """Replace ``path`` by a checksummed checkpoint of ``obj`` atomically; returns its size.

    Layout: ``TSSTATE1\\n``, one JSON header line (``meta`` plus the payload's ``bytes`` and
    ``crc``, the CRC-32 of ``meta`` and the payload), then the ``torch.save`` payload.
    :func:`read_state` checks the checksum, so a garbled checkpoint is reported instead of
    loading wrong numbers. Read it with :func:`read_state` (not ``torch.load``).
    """
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    blob = buf.getvalue()
    info = to_jsonable(dict(meta or {}))
    header = {**info, "bytes": len(blob), "crc": _state_crc(info, blob)}
    return atomic_write_bytes(path, STATE_MAGIC + json.dumps(header).encode("utf-8") + b"\n"
                              + blob)


# -- appends ------------------------------------------------------------------------------------
def _last_line_start(fh: BinaryIO, size: int) -> int:
    """Offset just after the last ``\\n`` before ``size`` (0 if there is none)."""
    block = 1 << 16
    end = size
    while end > 0:
        start = max(0, end - block)
        fh.seek(start)
        chunk = fh.read(end - start)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        end = start
    return 0


def repair_cut_tail(path: str | os.PathLike, *, keep_json: bool = False) -> int:
    """Make ``path`` end at a line boundary before something is appended to it.

    A last line without its newline was cut by a crash. With ``keep_json`` a cut line that is
    still one complete JSON value (the crash fell just before the newline) is kept and
    terminated; otherwise it is dropped. Returns the bytes dropped.
    """
    p = Path(path)
    if not p.exists():
        return 0
    size = p.stat().st_size
    if size == 0:
        return 0
    with open(p, "r+b") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        start = _last_line_start(fh, size)
        fh.seek(start)
        tail = fh.read(size - start)
        if keep_json:
            try:
                _decode_line(tail)
            except ValueError:
                pass
            else:
                fh.seek(size)
                _write(fh, b"\n")
                fh.flush()
                os.fsync(fh.fileno())
                return 0
        fh.truncate(start)
        fh.flush()
        os.fsync(fh.fileno())
        return size - start


def _crc(record: Mapping[str, Any]) -> int:
    body = json.dumps({k: v for k, v in record.items() if k != "crc"}, sort_keys=True,
                      separators=(",", ":"))
    return zlib.crc32(body.encode("utf-8"))


def _decode_line(line: bytes) -> Any:
    """One JSON line; a record carrying ``crc`` must match it.

    Raises:
        ValueError: the line does not decode, or its checksum does not match (garbled).
    """
    rec = json.loads(line.decode("utf-8"))
    if isinstance(rec, dict) and "crc" in rec:
        if rec["crc"] != _crc(rec):
            raise ValueError("checksum mismatch")
        rec = {k: v for k, v in rec.items() if k != "crc"}
    return rec


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any], *,
                 fsync: bool = True) -> None:
    """Append ``record`` as one JSON line (one write; fsync-ed unless ``fsync=False``), after
    repairing a last line cut by a crash (see :func:`repair_cut_tail`).

    The line carries ``crc``, the CRC-32 of the record, so that :func:`read_jsonl` tells a
    garbled line from a good one (the field is removed again when reading).
    """
    rec = to_jsonable(dict(record))
    rec["crc"] = _crc(rec)
    data = (json.dumps(rec) + "\n").encode("utf-8")
    repair_cut_tail(path, keep_json=True)
    with open(path, "ab") as fh:
        _write(fh, data)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())


def csv_row_bytes(fields: Sequence[str], row: Mapping[str, Any] | None = None) -> bytes:
    """One CSV record (the header when ``row`` is None), ``\\r\\n``-terminated as ``csv``
    writes it."""
    buf = io.StringIO()
    if row is None:
        csv.writer(buf).writerow(list(fields))
    else:
        csv.DictWriter(buf, fieldnames=list(fields)).writerow(dict(row))
    return buf.getvalue().encode("utf-8")


def append_csv_row(path: str | os.PathLike, fields: Sequence[str], row: Mapping[str, Any], *,
                   header: bool = False) -> None:
    """Append one CSV row (and the header first when ``header``), flushed, after dropping a
    last row cut by a crash. Not fsync-ed: call :func:`fsync_file` at a commit point."""
    repair_cut_tail(path)
    data = (csv_row_bytes(fields) if header else b"") + csv_row_bytes(fields, row)
    with open(path, "ab") as fh:
        _write(fh, data)
        fh.flush()


# -- readers ------------------------------------------------------------------------------------
def _missing(path: Path, fix: str) -> DamagedFileError:
    return DamagedFileError(path, "the file is missing", fix)


def read_json(path: str | os.PathLike, *, fix: str) -> Any:
    """The JSON value in ``path``.

    Raises:
        DamagedFileError: ``path`` is missing, truncated or not JSON (``fix`` says what to do).
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise _missing(p, fix) from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        what = "empty" if not raw.strip() else f"not valid JSON: {e}"
        raise DamagedFileError(p, what, fix) from None


def read_jsonl(path: str | os.PathLike) -> tuple[list[Any], int]:
    """The JSON values of the lines of ``path`` (``[]`` if it does not exist) and the number of
    lines skipped because they do not decode or fail their checksum (cut by a crash, glued by
    an earlier writer, or garbled)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return [], 0
    out, bad = [], 0
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            out.append(_decode_line(line))
        except ValueError:             # includes UnicodeDecodeError and JSONDecodeError
            bad += 1
    return out, bad


def _brief(e: BaseException) -> str:
    """``Type: first sentence`` of an exception, at most ~120 characters."""
    text = str(e).splitlines()[0] if str(e) else ""
    text = text.split(". ")[0]
    return f"{type(e).__name__}: {text[:120]}" if text else type(e).__name__


_NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError,
               RuntimeError)


def read_npz(path: str | os.PathLike, names: Sequence[str] | None = None, *,
             fix: str) -> dict[str, np.ndarray]:
    """Arrays of the ``.npz`` at ``path``: all of them, or those of ``names`` it holds.

    Raises:
        DamagedFileError: ``path`` is missing, truncated or garbled (its CRC does not match).
    """
    p = Path(path)
    if not p.exists():
        raise _missing(p, fix)
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = z.files if names is None else [k for k in names if k in z.files]
            return {k: z[k] for k in keys}
    except _NPZ_ERRORS as e:
        raise DamagedFileError(p, f"not a readable .npz: {_brief(e)}", fix) from None


def read_torch(path: str | os.PathLike, *, fix: str, mmap: bool = False,
               map_location: Any = None) -> Any:
    """``torch.load`` of ``path`` (full unpickling: only for files tangentscope wrote).

    Raises:
        DamagedFileError: ``path`` is missing, truncated or garbled.
    """
    import torch

    p = Path(path)
    if not p.exists():
        raise _missing(p, fix)
    try:
        return torch.load(p, weights_only=False, mmap=mmap, map_location=map_location)
    except Exception as e:  # a garbled pickle can raise nearly anything
        raise DamagedFileError(p, f"not a readable checkpoint: {_brief(e)}", fix) from None


def read_state(path: str | os.PathLike, *, fix: str, load: bool = True,
               map_location: Any = None) -> tuple[dict[str, Any] | None, Any]:
    """``(header, object)`` of a checkpoint :func:`atomic_write_state` wrote, checksum checked
    (``object`` is None with ``load=False``). A plain ``torch.save`` file (earlier versions)
    gives ``(None, object)``.

    Raises:
        DamagedFileError: ``path`` is missing, truncated, garbled, or fails its checksum.
    """
    import torch

    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise _missing(p, fix) from None
    if not raw.startswith(STATE_MAGIC):
        if raw.startswith(STATE_MAGIC[: len(raw)]):
            raise DamagedFileError(p, "truncated in its header", fix)
        obj = read_torch(p, fix=fix, map_location=map_location)   # read even without load:
        return None, obj if load else None                        # that is its only check
    nl = raw.find(b"\n", len(STATE_MAGIC))
    try:
        header = json.loads(raw[len(STATE_MAGIC):nl].decode("utf-8")) if nl > 0 else None
    except ValueError:
        header = None
    if not (isinstance(header, dict) and isinstance(header.get("bytes"), int)
            and isinstance(header.get("crc"), int)):
        raise DamagedFileError(p, "its header is truncated or garbled", fix)
    blob = raw[nl + 1:]
    if len(blob) != header["bytes"]:
        raise DamagedFileError(p, f"{len(blob)} of its {header['bytes']} bytes are there", fix)
    info = {k: v for k, v in header.items() if k not in ("bytes", "crc")}
    if _state_crc(info, blob) != header["crc"]:
        raise DamagedFileError(p, "its checksum does not match (garbled)", fix)
    if not load:
        return header, None
    try:
        return header, torch.load(io.BytesIO(blob), weights_only=False,
                                  map_location=map_location)
    except Exception as e:  # checksum fine but unreadable: written by another torch
        raise DamagedFileError(p, f"not a readable checkpoint: {_brief(e)}", fix) from None


def read_csv(path: str | os.PathLike, *, fix: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the CSV at ``path`` (``([], [])`` if missing). A last row cut by a
    crash (no final newline) is left out, as :func:`append_csv_row` would drop it.

    Raises:
        DamagedFileError: the file does not decode as UTF-8 CSV (garbled bytes, NUL).
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return [], []
    if raw and not raw.endswith(b"\n"):
        raw = raw[: raw.rfind(b"\n") + 1]
    if b"\x00" in raw:
        raise DamagedFileError(p, f"NUL byte at offset {raw.index(0)}", fix)
    try:
        records = list(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")))
    except (UnicodeDecodeError, csv.Error) as e:
        raise DamagedFileError(p, f"not readable as CSV: {e}", fix) from None
    if not records:
        return [], []
    return records[0], records[1:]
