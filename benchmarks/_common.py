"""Helpers for benchmark scripts: one-thread settings, timing, peak memory, isolated workers.

Dependency-free (standard library only), so a worker running under another interpreter (e.g. a
JAX environment without torch) can import it too.

Peak memory is the peak resident set size (RSS) of a fresh process during one call, minus its
RSS just before the call: ``/proc/self/clear_refs`` (``5``) resets the kernel's high-water mark
``VmHWM``, which is read back afterwards. It counts every allocator (torch, XLA, numpy), unlike
``tracemalloc``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                  "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
                  "TF_CPP_MIN_LOG_LEVEL": "3", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
MEMORY_METHOD = ("peak RSS of a fresh process during the first (cold) call minus RSS just before "
                 "it (VmHWM reset through /proc/self/clear_refs)")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


class PeakRSS:
    """Context manager: ``.delta_bytes`` = peak RSS inside the block minus RSS at its start."""

    def __enter__(self) -> PeakRSS:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.ok = True
        except OSError:
            self.ok = False
        self.start = _status_kib("VmRSS")
        self.delta_bytes: int | None = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.ok:
            self.delta_bytes = max(_status_kib("VmHWM") - self.start, 0) * 1024


def time_calls(fn: Callable[[], Any], repeats: int = 3, slow_s: float = 5.0
               ) -> dict[str, Any]:
    """Time ``fn`` after one measured cold call (which also gives its peak memory).

    Args:
        fn: the call to time; it must block until the result is ready.
        repeats: warm calls whose median is reported; only one when the cold call took more
            than ``slow_s`` seconds; 0: the cold call alone (``cold_seconds``, ``peak_bytes``).

    Returns:
        ``{"seconds": median warm wall time, "cpu_seconds": median process CPU time (all
        threads; on a busy machine closer to the time the work needs), "times", "cold_seconds",
        "peak_bytes"}``.
    """
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        fn()
        cold = time.perf_counter() - t0
    if repeats == 0:
        return {"cold_seconds": cold, "peak_bytes": mem.delta_bytes}
    times, cpu = [], []
    for _ in range(1 if cold > slow_s else repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu),
            "times": times, "cold_seconds": cold, "peak_bytes": mem.delta_bytes}


def run_worker(python: str, script: str, payload: dict[str, Any], timeout: float
               ) -> dict[str, Any]:
    """Run ``python script --worker JSON`` in a fresh one-thread process; parse its last line.

    Returns the worker's JSON dict, or ``{"skipped": reason}`` on timeout or failure.
    """
    env = {**os.environ, **ONE_THREAD_ENV}
    try:
        proc = subprocess.run([python, script, "--worker", json.dumps(payload)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"did not finish within {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if proc.returncode in (-9, 137):
            err = "killed (out of memory?)"
        return {"skipped": f"worker failed (exit {proc.returncode}): {err[:300]}"}
    return json.loads(lines[-1])


def worker_reply(result: dict[str, Any]) -> None:
    """Print a worker's result as the last stdout line (read by :func:`run_worker`)."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def machine() -> dict[str, Any]:
    """CPU, load and interpreter facts stored next to the numbers."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
            "python": platform.python_version(), "platform": platform.platform(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_results(name: str, data: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` (atomically) and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path
