"""The theory's operators at scale, matrix-free: one ``W_S·V`` (k = 32) and a top-32 channel vs n.

Task: a generated 10-class problem in the shape of MNIST-1D (40 inputs: class centres plus
unit noise, ``p = 10``, so ``N = 10 n``), an MLP 40→64→64→10 (tanh, 7,434 parameters)
trained by full-batch gradient descent on cross-entropy (``steps`` steps, lr 0.1, float32;
10 % of the training labels flipped), with a
:class:`~tangentscope.dynamics.matfree_collect.CheckpointCollector` (``KernelRecorder(...,
storage="checkpoint")`` in memory) keeping float64 checkpoints at ``logspaced(steps,
snapshots)`` steps. The analysis of the window ``[0, T]``
(``exp`` discretization, kernel products in float32 — ``--products float64`` for float64 —
with the Krylov tolerance that follows, 6e-6; memory budget 4 GiB):

- ``wv``: one ``W_S(0, T)·V`` for a random ``V`` ``(N, 32)`` (forward + adjoint sweep);
- ``channel``: the top-32 eigenpairs of ``W_S`` (block Lanczos, default block, ``tol = 1e-6``
  relative residual); with ``--channel nystrom`` the randomized Nyström variant;
- ``analysis`` (the largest size, and the largest with a channel): the identity residuals
  (``Φ(s) − Φ(T)`` vs ``g(s)ᵀ W_S g(s)``, ``ΔU_Q`` vs ``−G_Q g(s)``), and the label-noise vector's
  energy ``ξᵀ W_S ξ``, visibility ``‖G_Q ξ‖`` and channel share (10 % of the labels
  flipped); with the channel it is the issue's "full analysis";
- ``dense`` (small sizes): the same run recorded by ``KernelRecorder`` (``N × N`` kernels) and
  ``window_operators`` — time, memory, and the relative difference of ``W_S·V`` to the
  matrix-free result (``dense_agreement``), in the same run;
- ``wv_float64`` (smallest size): the same ``W_S·V`` with float64 products (time ratio and
  the float32 result's relative difference to it).

Each size runs in a fresh one-thread process (peak memory: RSS high-water mark of the
process, and the increase during each phase). A channel whose projected time exceeds
``--max-seconds`` is skipped (projection: 200 operator columns × this size's products per
``W_S`` column × the measured seconds per product). The fitted exponents are slopes of log
time against log n over the sizes measured.

    python benchmarks/operators_scale.py                 # n = 1000 .. 10000 (N = 1e4 .. 1e5)
    python benchmarks/operators_scale.py --quick --out /tmp/q.json   # n = 100 .. 800
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tangentscope.dynamics import (
    KernelRecorder,
    every,
    identity_residuals,
    logspaced,
    window_operators,
)
from tangentscope.dynamics.matfree import MatrixFreeOperators
from tangentscope.dynamics.matfree_channel import (
    gramian_topk,
    identity_residuals_matfree,
    noise_gradients,
    vector_report,
)
from tangentscope.dynamics.matfree_collect import CheckpointCollector

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    MEMORY_METHOD,
    PeakRSS,
    machine,
    run_worker,
    worker_reply,
    write_results,
)

F64 = torch.float64


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def make_run(n: int, steps: int, snapshots: int, lr: float, seed: int = 0, logspace: bool = False,
             dense: bool = False, m: int = 500, device: str = "cpu") -> dict[str, Any]:
    """Train the MLP on the generated task (data drawn on the CPU, so every device trains the
    same run); return the collector (and the dense trajectory)."""
    g = torch.Generator().manual_seed(seed)
    d, p = 40, 10
    centers = 0.6 * torch.randn(p, d, generator=g)
    y_clean = torch.randint(0, p, (n + m,), generator=g)
    x = centers[y_clean] + torch.randn(n + m, d, generator=g)
    flip = torch.rand(n + m, generator=g) < 0.1
    y = torch.where(flip, torch.randint(0, p, (n + m,), generator=g), y_clean)
    xq, yq = x[n:].to(device), y_clean[n:].to(device)
    x, y, y_clean = x[:n].to(device), y[:n].to(device), y_clean[:n]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, p)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = logspaced(steps, snapshots) if logspace else every(max(1, steps // snapshots))
    col = CheckpointCollector(model, x, y, loss="cross_entropy", x_test=xq, y_test=yq,
                              optimizer=opt, schedule=sched, total_steps=steps)
    rec = (KernelRecorder(model, x, y, loss="cross_entropy", x_test=xq, y_test=yq,
                          optimizer=opt, schedule=sched, total_steps=steps, verbose=False)
           if dense else None)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    col.close()
    if rec is not None:
        rec.close()
    return {"collector": col, "recorder": rec, "y_clean": y_clean, "train_seconds":
            time.perf_counter() - t0, "final_loss": float(loss.detach()),
            "train_accuracy": float((model(x).argmax(1) == y).float().mean())}


def _timed(fn: Any) -> tuple[Any, dict[str, Any]]:
    """Wall and CPU seconds, RSS peaks and (on a GPU) the CUDA allocator's peak of ``fn()``;
    CUDA work is synchronized before the clock stops."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        info: dict[str, Any] = {"seconds": time.perf_counter() - t0,
                                "cpu_seconds": time.process_time() - c0}
    info["peak_delta_bytes"] = mem.delta_bytes
    info["process_peak_bytes"] = _status_kib("VmHWM") * 1024
    if cuda:
        info["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out, info


def worker(job: dict[str, Any]) -> dict[str, Any]:
    """One size: train, then time the phases asked for (``job['phases']``)."""
    torch.set_num_threads(1)
    n, k = job["n"], job["k"]
    dev = job.get("device", "cpu")
    run, tr = _timed(lambda: make_run(n, job["steps"], job["snapshots"], job["lr"],
                                      dense=job.get("dense", False), logspace=True, device=dev))
    out: dict[str, Any] = {"n": n, "N": 10 * n, "p": 10, "train": {**tr, **{
        key: run[key] for key in ("train_seconds", "final_loss", "train_accuracy")}}}
    f32 = job["products"] == "float32"
    path = run["collector"].path(memory_budget=job["budget"], device=dev,
                                 compute_dtype=torch.float32 if f32 else None)
    ops = MatrixFreeOperators(path, discretization="exp", krylov_tol=job["krylov_tol"],
                              memory_budget=job["budget"])
    out["snapshot_steps"] = [int(v) for v in path.steps]
    out["krylov_tol"] = ops.krylov_tol
    out["plan"] = ops.plan(k).describe()
    V = torch.randn(path.N, k, dtype=F64, generator=torch.Generator().manual_seed(1))
    limit = job["max_seconds"]
    started = time.perf_counter()
    res, info = _timed(lambda: ops.apply(V, propagate=False, gramian=True))
    per_prod = info["seconds"] / max(res.products, 1)
    out["wv"] = {**info, "products": res.products, "products_per_column": res.products / k,
                 "seconds_per_product": per_prod, "krylov_dims": list(res.krylov_dims)}
    WV = res.WV
    assert WV is not None
    if job.get("f64_check") and f32:
        p64 = run["collector"].path(memory_budget=job["budget"], device=dev)
        o64 = MatrixFreeOperators(p64, discretization="exp", memory_budget=job["budget"])
        r64, info = _timed(lambda: o64.apply(V, propagate=False, gramian=True))
        assert r64.WV is not None
        out["wv_float64"] = {**info, "products": r64.products,
                             "float32_over_float64_seconds": out["wv"]["seconds"]
                             / info["seconds"],
                             "float32_relative_difference": float(
                                 (WV - r64.WV).norm() / r64.WV.norm())}
    ch = None
    if "channel" in job["phases"]:
        guess = job.get("channel_columns", 200) * res.products / k * per_prod
        if guess > limit:
            out["channel"] = {"skipped": f"projected {guess:.0f} s > --max-seconds {limit:.0f}"}
        else:
            ch, info = _timed(lambda: gramian_topk(ops, 32, method=job["channel"], tol=1e-6,
                                                    block_size=job.get("block_size")))
            out["channel"] = {**info, "method": job["channel"], "matvecs": ch.matvecs,
                              "products": ch.products, "converged": ch.converged,
                              "max_relative_residual": float(ch.residuals.max()
                                                             / ch.eigenvalues[0]),
                              "eigenvalues": ch.eigenvalues[[0, 7, 15, 31]].tolist()}
    if "analysis" in job["phases"]:
        def analysis() -> dict[str, Any]:
            ids = identity_residuals_matfree(path, discretization="exp",
                                             krylov_tol=ops.krylov_tol,
                                             memory_budget=job["budget"])
            gc, gn = noise_gradients(path, run["y_clean"])
            rep = vector_report(ops, {"noise": gn, "clean": gc}, channel=ch)
            return {"identities": ids.summary(),
                    "vectors": {key: r.summary() for key, r in rep.items()}}

        res2, info = _timed(analysis)
        out["analysis"] = {**info, **res2}
        if ch is not None:
            out["full_analysis_seconds"] = out["channel"]["seconds"] + info["seconds"]
    if job.get("dense"):
        traj = run["recorder"].trajectory()
        ops_d, info = _timed(lambda: window_operators(traj, discretization="exp"))
        out["dense"] = {**info, "kernel_bytes_per_snapshot": 8 * path.N * path.N,
                        "identities": identity_residuals(traj, discretization="exp").summary(),
                        "dense_agreement": float((ops_d.W @ V - WV).norm()
                                                 / (ops_d.W @ V).norm())}
        out["dense"]["matrix_free_over_dense"] = out["wv"]["seconds"] / info["seconds"]
    out["worker_seconds"] = time.perf_counter() - started
    return out


def _fit(ns: list[int], ts: list[float]) -> float | None:
    if len(ns) < 2:
        return None
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def figure(path: str) -> None:
    """Seconds of one ``W_S·V`` (k = 32) and of the top-32 channel against ``N``, on the CPU
    (``operators_scale*.json``, one thread) and the GPU (``operators_scale-cuda.json``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from _common import RESULTS

    series: dict[str, dict[int, dict[str, Any]]] = {"CPU (1 thread)": {}, "GPU (H200)": {}}
    for f in sorted(RESULTS.glob("operators_scale*.json")):
        d = json.loads(f.read_text())
        key = "GPU (H200)" if d.get("device", "cpu") != "cpu" else "CPU (1 thread)"
        for r in d["results"]:
            if "wv" in r:
                series[key].setdefault(r["N"], {}).update(
                    {k: r[k] for k in ("wv", "channel") if isinstance(r.get(k), dict)
                     and "seconds" in r[k]})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (label, rows), color in zip(series.items(), ("tab:blue", "tab:orange")):
        Ns = sorted(rows)
        ax.loglog(Ns, [rows[N]["wv"]["seconds"] for N in Ns], "o-", color=color,
                  label=f"one W_S·V (k = 32), {label}")
        ch = [N for N in Ns if "channel" in rows[N]]
        ax.loglog(ch, [rows[N]["channel"]["seconds"] for N in ch], "s--", color=color,
                  label=f"top-32 channel, {label}")
    ax.set_xlabel("N = n·p stacked outputs")
    ax.set_ylabel("seconds")
    ax.set_title("matrix-free operators of a 2,000-step run (MLP, 7,434 parameters)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    print(f"[operators_scale] wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="*")
    ap.add_argument("--dense-sizes", type=int, nargs="*")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--snapshots", type=int, default=12, help="logspaced(steps, snapshots)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--krylov-tol", type=float, default=None,
                    help="default: 1e-12 (float64 products) or 6e-6 (float32)")
    ap.add_argument("--channel", default="lanczos", choices=["lanczos", "nystrom"])
    ap.add_argument("--channel-sizes", type=int, nargs="*")
    ap.add_argument("--block-size", type=int, default=None,
                    help="the channel's Lanczos block (default: the library's; on a GPU a "
                         "block of 32 costs about what 4 columns do)")
    ap.add_argument("--products", default="float32", choices=["float32", "float64"])
    ap.add_argument("--max-seconds", type=float, default=1800.0)
    ap.add_argument("--budget", default="4G")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (training and products)")
    ap.add_argument("--no-f64-check", action="store_true",
                    help="skip the float64-products W_S·V at the smallest size")
    ap.add_argument("--out", default=None)
    ap.add_argument("--figure", metavar="PNG",
                    help="plot the results in benchmarks/results (CPU and GPU) and exit")
    args = ap.parse_args()
    if args.figure:
        figure(args.figure)
        return
    if args.worker:
        worker_reply(worker(json.loads(args.worker)))
        return
    sizes = args.sizes or ([100, 200, 400, 800] if args.quick else [1000, 2500, 5000, 10000])
    dense = set(args.dense_sizes if args.dense_sizes is not None
                else ([100] if args.quick else [100, 250]))
    chan = set(args.channel_sizes if args.channel_sizes is not None else sizes)
    script = str(Path(__file__).resolve())
    common = {"steps": args.steps, "snapshots": args.snapshots, "lr": args.lr, "k": args.k,
              "krylov_tol": args.krylov_tol, "channel": args.channel,
              "products": args.products, "block_size": args.block_size,
              "max_seconds": args.max_seconds, "budget": args.budget, "device": args.device}
    results: list[dict[str, Any]] = []

    def save() -> Path:                       # after every size: a killed run keeps the rest
        ok = [r for r in results if "wv" in r and r["n"] in sizes]
        fit = {"wv_seconds_vs_n": _fit([r["n"] for r in ok], [r["wv"]["seconds"] for r in ok]),
               "wv_seconds_per_product_vs_n": _fit([r["n"] for r in ok],
                                                   [r["wv"]["seconds_per_product"] for r in ok]),
               "wv_products_per_column_vs_n": _fit([r["n"] for r in ok],
                                                   [r["wv"]["products_per_column"] for r in ok])}
        chs = [r for r in ok if isinstance(r.get("channel"), dict) and "seconds" in r["channel"]]
        fit["channel_seconds_vs_n"] = _fit([r["n"] for r in chs],
                                           [r["channel"]["seconds"] for r in chs])
        out = {"description": __doc__.split("\n\n")[0], "settings": common, "sizes": sizes,
               "dense_sizes": sorted(dense), "results": results, "fitted_exponents": fit,
               "memory_method": MEMORY_METHOD + "; process_peak_bytes: VmHWM of the worker"
               + ("; cuda_peak_bytes: torch.cuda.max_memory_allocated during the phase"
                  if args.device == "cuda" else ""),
               "machine": machine(), "torch": torch.__version__,
               "device": (torch.cuda.get_device_name() if args.device == "cuda" else "cpu")}
        if args.out and "/" in args.out:                  # an explicit file (dev runs)
            path = Path(args.out)
            path.write_text(json.dumps(out, indent=2) + "\n")
            return path
        return write_results(args.out or ("operators_scale-quick" if args.quick
                                          else "operators_scale"), out)

    for n in sorted(set(sizes) | dense):
        phases = (["wv"] + (["channel"] if n in chan else [])
                  + (["analysis"] if n in (max(sizes), max(chan, default=0)) else []))
        job = {**common, "n": n, "phases": phases, "dense": n in dense,
               "f64_check": n == min(sizes) and not args.no_f64_check}
        print(f"[operators_scale] n = {n} (N = {10 * n}): {phases}"
              f"{' + dense' if n in dense else ''}", flush=True)
        res = run_worker(sys.executable, script, job, timeout=4 * args.max_seconds + 600)
        res.setdefault("n", n)
        results.append(res)
        print(json.dumps({key: res.get(key) for key in ("n", "wv", "channel", "dense",
                                                       "skipped")}, default=str)[:800],
              flush=True)
        path = save()
    print(f"[operators_scale] wrote {path}", flush=True)


if __name__ == "__main__":
    main()
