"""The fused gated-AdamW step's C++ extension (CPU): compiled once per machine, loaded per
process.

    python -m tangentscope.optim._build --build      # prebuild (the install step runs this)
    python -m tangentscope.optim._build --status     # where it is, whether it is built

The source is ``optim/csrc/gated_adamw.cpp``; it registers
``torch.ops.tangentscope_optim.gated_adamw_step_`` (one call per param group and dtype). The
shared library is compiled with the machine's C++ compiler (``$CXX``, else ``c++``/``g++``)
straight against torch's headers — no ninja, no setuptools, no pybind11, no Python headers —
into ``$TANGENTSCOPE_CACHE/ext/`` (default ``~/.cache/tangentscope/ext/``), under a name that
hashes the source, the flags, torch's version and the CPU (it is built with
``-march=native``), so a changed source, torch or machine gets a fresh build and never loads
a stale one. Builds are atomic (a temporary file renamed into place) and serialized across
processes by a lock file, so concurrent test processes build it once.

Importing this module compiles and loads nothing; :func:`load` does, on the first fused step.
``GatedAdamW(fused=None)`` (the default) uses the kernel only if it is already built
(:func:`is_built`: the library is in the cache, or loaded in this process); ``fused=True``
builds it if needed (15–40 s once per machine on a 2-core CPU). When it cannot be built (no
compiler, a compile error) :func:`load` returns ``None`` after one ``RuntimeWarning`` per
process and the optimizer takes its eager kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["SOURCE", "build", "cache_dir", "is_built", "library_path", "load", "loaded_op",
           "status"]

#: the C++ source of the kernel
SOURCE = Path(__file__).resolve().with_name("csrc") / "gated_adamw.cpp"
#: the op's namespace in ``torch.ops``
NAMESPACE = "tangentscope_optim"
#: compile flags: the reference's rounding needs ``-ffp-contract=off`` (no contraction but the
#: explicit ``std::fma`` calls); ``-fno-math-errno`` lets ``sqrt`` vectorize
CXXFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno",
            "-fno-trapping-math", "-fopenmp-simd", "-std=c++20", "-fPIC", "-shared",
            "-fvisibility=hidden", "-w")

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"op": None, "failed": None, "warned": False}


def cache_dir() -> Path:
    """Where built libraries live: ``$TANGENTSCOPE_CACHE/ext`` (default
    ``~/.cache/tangentscope/ext``)."""
    root = os.environ.get("TANGENTSCOPE_CACHE") or str(Path.home() / ".cache" / "tangentscope")
    return Path(root) / "ext"


def _cpu_fingerprint() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.machine() + platform.processor()
    keep = [ln for ln in text.splitlines()[:40]
            if ln.startswith(("model name", "flags", "vendor_id", "cpu family", "model\t"))]
    return "\n".join(keep)


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _abi_flag() -> str:
    return f"-D_GLIBCXX_USE_CXX11_ABI={int(bool(torch._C._GLIBCXX_USE_CXX11_ABI))}"


@functools.lru_cache(maxsize=1)
def _tag() -> str:
    """Hash of the source, the flags, torch, the ABI and the CPU (computed once per process)."""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes() if SOURCE.exists() else b"", " ".join(CXXFLAGS).encode(),
                 torch.__version__.encode(), _abi_flag().encode(),
                 _cpu_fingerprint().encode(), sys.platform.encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def library_path() -> Path:
    """The built library's path for this source, torch and CPU (it may not exist yet)."""
    return cache_dir() / f"gated_adamw_{_tag()}.so"


def is_built() -> bool:
    """The kernel is loaded in this process, or built in the cache (so loading is cheap)."""
    return _STATE["op"] is not None or (_STATE["failed"] is None and library_path().exists())


def _command(out: Path) -> list[str]:
    cxx = _compiler()
    if cxx is None:
        raise FileNotFoundError("no C++ compiler found (tried $CXX, c++, g++, clang++)")
    root = Path(torch.__file__).resolve().parent
    return [cxx, *CXXFLAGS, _abi_flag(), "-isystem", str(root / "include"),
            "-isystem", str(root / "include" / "torch" / "csrc" / "api" / "include"),
            str(SOURCE), "-o", str(out), f"-L{root / 'lib'}", "-lc10", "-ltorch_cpu",
            f"-Wl,-rpath,{root / 'lib'}"]


def build(force: bool = False) -> Path:
    """Compile the library into the cache if it is not there (``force``: again); returns its
    path. Serialized across processes (a lock file); atomic (compiled under a temporary name).

    Raises:
        FileNotFoundError: no C++ compiler, or the source is missing.
        RuntimeError: the compiler failed (its output is in the message).
    """
    if not SOURCE.exists():
        raise FileNotFoundError(f"the kernel source {SOURCE} is missing from the installation")
    path = library_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)              # another process may be building it
        try:
            if path.exists() and not force:
                return path
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.so")
            cmd = _command(tmp)
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0 or not tmp.exists():
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise RuntimeError(f"compiling {SOURCE.name} failed ({' '.join(cmd[:1])} exit "
                                   f"{res.returncode}):\n{(res.stderr or res.stdout)[-3000:]}")
            os.replace(tmp, path)
            return path
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _register(path: Path) -> Any:
    ns = getattr(torch.ops, NAMESPACE)
    if not hasattr(ns, "gated_adamw_step_"):     # one registration per process
        torch.ops.load_library(str(path))
    return ns.gated_adamw_step_


def load(build_if_missing: bool = True) -> Any | None:
    """The op ``torch.ops.tangentscope_optim.gated_adamw_step_``, loading (and, if
    ``build_if_missing``, building) the library on first use; ``None`` if it is not built
    (``build_if_missing=False``) or cannot be built or loaded (one ``RuntimeWarning`` per
    process names the cause and the fix)."""
    op = _STATE["op"]
    if op is not None or _STATE["failed"] is not None:
        return op
    with _LOCK:
        if _STATE["op"] is not None or _STATE["failed"] is not None:
            return _STATE["op"]
        path = library_path()
        if not path.exists() and not build_if_missing:
            return None
        try:
            _STATE["op"] = _register(build() if not path.exists() else path)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _STATE["failed"] = f"{type(e).__name__}: {e}"
    if _STATE["failed"] is not None and not _STATE["warned"]:
        _STATE["warned"] = True
        first = str(_STATE["failed"]).splitlines()[0]
        warnings.warn(f"GatedAdamW: the fused CPU kernel is unavailable ({first}); using the "
                      "eager kernels (same results, slower). Fix: install a C++ compiler (g++) "
                      "and run `python -m tangentscope.optim._build --build`",
                      RuntimeWarning, stacklevel=4)
    return _STATE["op"]


def loaded_op(name: str) -> Any | None:
    """``torch.ops.tangentscope_optim.<name>`` if the library is already loaded in this
    process (never loads or builds it), else ``None``."""
    if _STATE["op"] is None:
        return None
    return getattr(getattr(torch.ops, NAMESPACE), name)


def status() -> dict[str, Any]:
    """Where the library is and whether it is built, loaded or failed (for ``--status``)."""
    return {"source": str(SOURCE), "library": str(library_path()),
            "built": library_path().exists(), "loaded": _STATE["op"] is not None,
            "failed": _STATE["failed"], "compiler": _compiler()}


def _reset_for_tests() -> None:
    """Forget a failure (tests simulate one); a loaded library stays loaded."""
    _STATE.update(failed=None, warned=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tangentscope.optim._build",
                                 description="Build or inspect GatedAdamW's fused CPU kernel.")
    ap.add_argument("--build", action="store_true", help="compile it into the cache if missing")
    ap.add_argument("--force", action="store_true", help="with --build: compile again")
    ap.add_argument("--status", action="store_true", help="print where it is")
    args = ap.parse_args(argv)
    if args.build:
        t0 = time.perf_counter()
        had = library_path().exists() and not args.force
        try:
            path = build(force=args.force)
        except (OSError, RuntimeError) as e:
            print(f"tangentscope: fused kernel not built ({e}); GatedAdamW will use its eager "
                  "kernels", file=sys.stderr)
            return 1
        what = "already built" if had else f"built in {time.perf_counter() - t0:.1f} s"
        print(f"tangentscope: fused kernel {what}: {path}")
    if args.status or not args.build:
        for k, v in status().items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
