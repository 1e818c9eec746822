"""Cost of building W_S and G_Q from a trajectory, against the cost of the kernels that feed it.

For N = n·p = 500, 2000, 5000 (p = 1) and 100 intervals (101 snapshots), one thread, float64:

- **kernels**: one snapshot's worth of eNTK work as the recorder does it — ``tangentscope.entk``
  of an MLP 1→256→256→1 (tanh, 66,561 parameters) on the n training plus m = 100 probe inputs
  in one call — timed once warm, times 101 snapshots; with ``implementation="auto"`` (the
  structured path, O(N² · widths)) and ``"jacobian"`` (O(N² P), what any other architecture
  gets);
- **operators**: ``accumulate_operators`` over the 100 intervals (``P``, ``W_S`` and ``G_Q``
  together) with the ``midpoint`` discretization (one N×N eigendecomposition per interval) and
  with one-step ``gd`` (matrix products only). The kernels are a synthetic, non-commuting path
  ``K_k = (1 − s_k) K_a + s_k K_b`` of PSD matrices generated on the fly (O(N²) per snapshot), so
  RAM holds a few N×N matrices, as with a trajectory on disk.

When a case would run past ``--max-seconds``, the intervals done so far are timed and the total
is extrapolated linearly (every interval does the same operations) and marked
``"extrapolated": true`` with the measured count. The headline is
``operator_seconds / kernel_seconds`` per case (target: < 1), in wall and in process CPU time
(closer to the work needed when the machine is shared). Each measurement runs in a fresh
one-thread process (peak memory = its RSS high-water mark).

    python benchmarks/operators.py            # writes benchmarks/results/operators.json
    python benchmarks/operators.py --quick    # N = 300, 1000; 20 intervals (operators-quick.tmp)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import tangentscope as ts
from tangentscope.dynamics import KernelTrajectory, accumulate_operators
from tangentscope.models import mlp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MEMORY_METHOD, PeakRSS, machine, run_worker, worker_reply, write_results

F64 = torch.float64


class _PathSource:
    """Snapshot kernels ``K_k = (1 − s) K_a + s K_b`` (and cross-kernels) made on demand."""

    def __init__(self, Ka, Kb, Qa, Qb, B, S):
        self.Ka, self.Kb, self.Qa, self.Qb, self.B, self.S = Ka, Kb, Qa, Qb, B, S

    def get(self, k, name):
        s = k / max(self.S - 1, 1)
        if name == "K_SS":
            return (1 - s) * self.Ka + s * self.Kb
        if name == "K_QS":
            return (1 - s) * self.Qa + s * self.Qb
        return self.B if name == "B" else None


def synthetic_trajectory(N: int, m: int, S: int, seed: int = 0) -> KernelTrajectory:
    """A trajectory of ``S`` snapshots with ``N × N`` kernels built lazily (squared loss)."""
    g = torch.Generator().manual_seed(seed)
    r = N // 2
    Ja, Jb = (torch.randn(N, r, generator=g, dtype=F64) / r ** 0.5 for _ in range(2))
    JQ = torch.randn(m, r, generator=g, dtype=F64) / r ** 0.5
    B = torch.full((N, 1, 1), 1.0 / N, dtype=F64)
    times = np.linspace(0.0, 0.5 * N, S)                  # ~ 0.5 n/λ_max per interval, like GD
    z = torch.zeros(S, N, 1, dtype=F64)
    return KernelTrajectory(
        steps=np.arange(S), times=times, lrs=np.full(S, np.nan), loss=np.zeros(S),
        test_loss=np.full(S, np.nan), u=z, g=z, U_Q=torch.zeros(S, m, 1, dtype=F64),
        dts=tuple([np.zeros(0)] + [np.array([times[1] - times[0]])] * (S - 1)),
        test_gram_norm=None, meta={"n": N, "p": 1, "m": m, "loss": "squared"}, data={},
        path=None, _source=_PathSource(Ja @ Ja.T, Jb @ Jb.T, JQ @ Ja.T, JQ @ Jb.T, B, S))


def time_operators(N: int, m: int, intervals: int, scheme: str, max_seconds: float) -> dict:
    traj = synthetic_trajectory(N, m, intervals + 1)
    done, t0, c0 = 0, time.perf_counter(), time.process_time()
    with PeakRSS() as mem:
        last = None
        for last in accumulate_operators(traj, discretization=scheme):  # noqa: B007
            done += 1
            if time.perf_counter() - t0 > max_seconds and done < intervals:
                break
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert last is not None and last.G is not None
    assert torch.isfinite(last.W).all() and torch.isfinite(last.G).all()
    return {"scheme": scheme, "intervals_measured": done,
            "seconds_per_interval": seconds / done, "seconds": seconds / done * intervals,
            "cpu_seconds": cpu / done * intervals,
            "extrapolated": done < intervals, "peak_bytes": mem.delta_bytes}


def time_kernels(N: int, m: int, snapshots: int, width: int, implementation: str) -> dict:
    torch.manual_seed(0)
    model = mlp(1, width, 2, 1, activation="tanh").double()
    x = torch.cat([torch.rand(N, 1, dtype=F64) * 2 - 1, torch.linspace(-1, 1, m, dtype=F64)[:,
                                                                                         None]])
    ts.entk(model, x[:8], implementation=implementation)     # imports, first-call overhead
    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        ts.entk(model, x, implementation=implementation)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds_per_snapshot": seconds, "seconds": seconds * snapshots,
            "cpu_seconds": cpu * snapshots,
            "num_params": sum(q.numel() for q in model.parameters()),
            "peak_bytes": mem.delta_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 300, 1000; 20 intervals")
    ap.add_argument("--sizes", default=None, help="comma-separated N (default 500,2000,5000)")
    ap.add_argument("--intervals", type=int, default=None, help="default 100 (quick: 20)")
    ap.add_argument("--max-seconds", type=float, default=900.0,
                    help="per (N, scheme): stop and extrapolate after this long")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.worker:
        job = json.loads(args.worker)
        if job.pop("kind") == "kernels":
            worker_reply(time_kernels(**job))
        else:
            worker_reply(time_operators(**job))
        return
    sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes
             else [300, 1000] if args.quick else [500, 2000, 5000])
    intervals = args.intervals or (20 if args.quick else 100)
    m, script = 100, str(Path(__file__).resolve())
    cases = []
    for N in sizes:
        kernels = {impl: run_worker(sys.executable, script,
                                    {"kind": "kernels", "N": N, "m": m, "snapshots": intervals + 1,
                                     "width": args.width, "implementation": impl}, timeout=7200)
                   for impl in ("auto", "jacobian")}
        kern = kernels["auto"]
        print(f"N={N}: kernels {kern.get('seconds', float('nan')):.1f} s (auto), "
              f"{kernels['jacobian'].get('seconds', float('nan')):.1f} s (jacobian) for "
              f"{intervals + 1} snapshots", flush=True)
        for scheme in ("midpoint", "gd"):
            op = run_worker(sys.executable, script,
                            {"kind": "operators", "N": N, "m": m, "intervals": intervals,
                             "scheme": scheme, "max_seconds": args.max_seconds},
                            timeout=args.max_seconds * 3 + 600)
            case = {"N": N, "m": m, "intervals": intervals, "operators": op, "kernels": kern,
                    "kernels_jacobian": kernels["jacobian"]}
            if "seconds" in op and "seconds" in kern:
                case["operator_to_kernel_ratio"] = op["seconds"] / kern["seconds"]
                case["operator_to_kernel_cpu_ratio"] = op["cpu_seconds"] / kern["cpu_seconds"]
            if "seconds" in op and "seconds" in kernels["jacobian"]:
                case["operator_to_jacobian_kernel_cpu_ratio"] = (
                    op["cpu_seconds"] / kernels["jacobian"]["cpu_seconds"])
                print(f"  {scheme:8s} operators {op['seconds']:.1f} s"
                      f"{' (extrapolated)' if op['extrapolated'] else ''}, ratio "
                      f"{case['operator_to_kernel_ratio']:.3f} (CPU time "
                      f"{case['operator_to_kernel_cpu_ratio']:.3f}; vs jacobian kernels "
                      f"{case.get('operator_to_jacobian_kernel_cpu_ratio', float('nan')):.3f})"
                      ", peak "
                      f"{ts._utils.format_bytes(op['peak_bytes'] or 0)}", flush=True)
            cases.append(case)
    out = {"benchmark": "operators", "quick": args.quick, "threads": 1, "dtype": "float64",
           "memory_method": MEMORY_METHOD, "machine": machine(),
           "model": f"mlp 1→{args.width}→{args.width}→1 tanh, float64, entk(auto) on n + m inputs",
           "cases": cases}
    path = write_results("operators" if not args.quick else "operators-quick", out)
    if args.quick:
        path = path.rename(path.with_suffix(".tmp"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
