"""eNTK implementations side by side: seconds and peak memory, one thread, float32.

Cases (issue 2): MLP 10→512→512→p (tanh) with p = 1, 10 and n = 256, 1024; a CNN on 1×28×28
(conv 1→16 3×3, conv 16→32 3×3 stride 2, linear head) with p = 10, n = 256; (issue 16) the
ResNet :func:`tangentscope.models.resnet8x` (stem conv + BN, eight basic blocks 16→128 with
projection shortcuts, eval BatchNorm with random running statistics, 0.70 M parameters) on
3×32×32 with p = 10, n = 32, 128, 512 (``--cases resnet`` runs only these). Each is computed
with tangentscope's default (``implementation="auto"``), ``"jacobian"`` and ``"ntvp"``, and with
neural-tangents' three implementations (JAX, in ``.venv-nt``; skipped with a note if absent).

Every (case, implementation) runs in a fresh one-thread process: after one warm-up outside the
measurement (tangentscope: the same call on 2 examples, paying the process's lazy imports and
first-use initialization; neural-tangents: its ahead-of-time compilation for the shape), one
cold call gives the peak memory (RSS high-water mark minus RSS before the call), then the median
of warm calls gives the seconds (one warm call when the cold one took > 5 s). Cases are
skipped, with the reason in the JSON, when neural-tangents' algorithm would need more than
``--memory-budget`` by the library's own estimate for the same algorithm (neural-tangents cannot
chunk), or when the time predicted from the same implementation at a smaller n (scaled by n²)
exceeds ``--max-seconds``.

    python benchmarks/entk.py            # writes benchmarks/results/entk.json (~25 min)
    python benchmarks/entk.py --quick    # small n, a few minutes (results/entk-quick.tmp)
    python benchmarks/entk.py --cases resnet --sizes 32,128 --impls default,structured_derivatives \
        --out /tmp/entk-resnet.json      # the ResNet rows against neural-tangents alone
    python benchmarks/entk.py --cases resnet --sizes 512 --impls default --max-seconds 300 \
        --out benchmarks/results/entk-resnet512.json        # n = 512 alone (~8 CPU-minutes)

On a GPU machine (``benchmarks/gpu.sh``): ``--device cuda --clock wall --nt-python python3``
puts the torch side's model and inputs on the GPU (each call synchronized; ``cuda_peak_bytes``
is the allocator's peak) and runs neural-tangents with that interpreter, whose JAX then uses
the same GPU (``gpu_peak_bytes``: XLA's peak, preallocation off).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import tangentscope as ts
from tangentscope.kernels import estimate_memory, select_implementation
from tangentscope.models import BasicBlock, mlp, resnet8x

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    MEMORY_METHOD,
    RESULTS,
    machine,
    run_worker,
    time_calls,
    worker_reply,
    write_results,
)

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
NT_PYTHON = ROOT / ".venv-nt" / "bin" / "python"
TORCH_IMPLS = ("default", "jacobian", "ntvp")
NT_IMPLS = ("jacobian_contraction", "ntk_vector_products", "structured_derivatives")
NT_EQUIV = {"jacobian_contraction": "jacobian", "ntk_vector_products": "ntvp",
            "structured_derivatives": "structured"}
FULL = [("mlp", 256, 1), ("mlp", 1024, 1), ("mlp", 256, 10), ("mlp", 1024, 10),
        ("cnn", 256, 10), ("resnet", 32, 10), ("resnet", 128, 10), ("resnet", 512, 10)]
#: cold calls shorter than this (seconds) get their memory as a median over fresh processes and
#: the torch allocator's peak: their few MiB of RSS are mostly noise
NOISY_BELOW_S = 1.0
QUICK = [("mlp", 32, 1), ("mlp", 64, 1), ("mlp", 32, 10), ("cnn", 16, 10), ("resnet", 8, 10)]


class CNN(nn.Module):
    """1×28×28 → conv 16 (3×3) → ReLU → conv 32 (3×3, stride 2) → ReLU → linear → p."""

    def __init__(self, p: int):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32 * 14 * 14, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(h.flatten(1))


def parse_bytes(text: str) -> int:
    """``'8G'`` / ``'512M'`` / a number of bytes."""
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    return int(float(s[:-1]) * mult[s[-1]]) if s and s[-1] in mult else int(float(s))


def build(model: str, n: int, p: int) -> tuple[nn.Module, torch.Tensor]:
    """The case's model (seeded, eval mode, float32) and inputs ``(n, ...)``."""
    torch.manual_seed(0)
    if model == "mlp":
        return mlp(10, 512, 2, p, activation="tanh").eval(), torch.randn(n, 10)
    if model == "resnet":
        net = resnet8x(p)
        with torch.no_grad():  # eval BatchNorm with non-trivial statistics
            for k, v in net.named_buffers():
                if k.endswith("running_mean"):
                    v.uniform_(-0.2, 0.2)
                elif k.endswith("running_var"):
                    v.uniform_(0.5, 1.5)
        return net.eval(), torch.randn(n, 3, 32, 32)
    return CNN(p).eval(), torch.randn(n, 1, 28, 28)


def _export_resnet(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The ResNet's state dict in neural-tangents' best layouts: inputs NHWC, convolution
    kernels HWIO, the head ``(in, out)``; block strides as ``blocks.i.stride``."""
    arrays = {"x": x.permute(0, 2, 3, 1).contiguous().numpy()}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        v = v.detach()
        if v.dim() == 4:
            v = v.permute(2, 3, 1, 0)
        elif k == "head.weight":
            v = v.T
        arrays[k] = v.contiguous().numpy()
    for name, blk in model.named_modules():
        if isinstance(blk, BasicBlock):
            arrays[f"{name}.stride"] = np.asarray(blk.stride)
    return arrays


def export(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    """Weights and inputs ``x`` for the JAX worker: ``w0, b0, w1, ...`` (dense weights as
    ``(in, out)``, convolution weights OIHW), or for the ResNet its state dict
    (:func:`_export_resnet`)."""
    if any(isinstance(m, BasicBlock) for m in model.modules()):
        np.savez(path, **_export_resnet(model, x))  # type: ignore[arg-type]
        return
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    arrays = {"x": x.numpy()}
    for i, m in enumerate(layers):
        w = m.weight.detach()
        arrays[f"w{i}"] = (w.T if isinstance(m, nn.Linear) else w).contiguous().numpy()
        arrays[f"b{i}"] = m.bias.detach().numpy()
    np.savez(path, **arrays)


def torch_worker(payload: dict) -> dict:
    torch.set_num_threads(1)
    model, x = build(payload["model"], payload["n"], payload["p"])
    impl = "auto" if payload["impl"] == "default" else payload["impl"]
    cuda = payload.get("device", "cpu") == "cuda"
    if cuda:
        model, x = model.cuda(), x.cuda()

    def call() -> torch.Tensor:
        k = ts.entk(model, x, implementation=impl, memory_budget=payload["budget"])
        if cuda:
            torch.cuda.synchronize()
        return k

    # the process's one-time costs (lazy imports, first-use initialization) on two examples,
    # outside the measurement, as neural-tangents' compilation is outside its own
    ts.entk(model, x[:2], implementation=impl, memory_budget=payload["budget"])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if payload.get("memory_only"):
        return time_calls(call, repeats=0)
    result = time_calls(call, repeats=payload["repeats"])
    if not cuda and result["cold_seconds"] < NOISY_BELOW_S:
        result["allocator_peak_bytes"] = allocator_peak(call)
    if cuda:
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        result["device"] = torch.cuda.get_device_name()
    if payload["impl"] == "default":
        choice = select_implementation(model, x, memory_budget=payload["budget"])
        result["implementation_chosen"] = choice.implementation
        result["implementation_reason"] = choice.reason
        est = estimate_memory(model, x, memory_budget=payload["budget"])
        result["estimated_bytes"] = est["total"]  # the library's estimate before any work
        if result.get("peak_bytes"):
            result["estimate_over_peak"] = est["total"] / result["peak_bytes"]
    if payload.get("save_kernel"):
        np.save(payload["save_kernel"], call().cpu().numpy())
    return result


def allocator_peak(fn: Callable[[], object]) -> int:
    """Peak bytes held by torch's CPU allocator during ``fn()`` (from the profiler's
    allocation events): the working set without the RSS noise of allocator thresholds and
    first-use code pages, which dominates cases of a few MiB."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    cur = peak = 0
    for e in sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"]):
        cur += e["args"]["Bytes"]
        peak = max(peak, cur)
    return peak


def _have_nt(args: argparse.Namespace) -> bool:
    """Whether ``--nt-python`` runs and imports neural_tangents' package metadata."""
    import subprocess

    try:
        return subprocess.run([args.nt_python, "-c", "import importlib.util, sys; sys.exit("
                               "importlib.util.find_spec('neural_tangents') is None)"],
                              capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _key(impl: str) -> str:
    return f"nt.{impl}" if impl in NT_IMPLS else f"tangentscope.{impl}"


def _run(impl: str, model: str, n: int, p: int, npz: Path, args: argparse.Namespace,
         save_kernel: str | None = None, memory_only: bool = False) -> dict:
    payload = {"model": model, "n": n, "p": p, "impl": impl, "repeats": args.repeats,
               "budget": args.memory_budget, "npz": str(npz), "save_kernel": save_kernel,
               "device": args.device, "memory_only": memory_only}
    if impl in NT_IMPLS:
        return run_worker(str(args.nt_python), str(HERE.parent / "_entk_nt.py"), payload,
                          timeout=3 * args.max_seconds + 120)
    return run_worker(sys.executable, str(HERE), payload, timeout=3 * args.max_seconds + 120)


def _predicted(done: list[dict], model: str, n: int, p: int, key: str) -> float | None:
    """Seconds predicted for ``n`` from the largest smaller ``n`` measured (∝ n²)."""
    prev = [c for c in done if c["model"] == model and c["p"] == p and c["n"] < n
            and "seconds" in c["results"].get(key, {})]
    if not prev:
        return None
    c = max(prev, key=lambda c: c["n"])
    return c["results"][key]["seconds"] * (n / c["n"]) ** 2


def cross_check(model_name: str, p: int, args: argparse.Namespace, tmp: Path) -> dict:
    """Relative max error of the float32 default kernel and of neural-tangents' structured
    kernel, each against tangentscope's float64 kernel, on 16 examples with the same weights."""
    model, x = build(model_name, 16, p)
    npz = tmp / f"check_{model_name}.npz"
    export(model, x, npz)
    k_ts = ts.entk(model, x).numpy()
    k64 = ts.entk(model, x, dtype=torch.float64).numpy()
    out = {"n": 16, "p": p, "float32_vs_float64_rel": float(np.abs(k_ts - k64).max()
                                                            / np.abs(k64).max())}
    if _have_nt(args):
        path = tmp / f"check_{model_name}_nt.npy"
        r = _run("structured_derivatives", model_name, 16, p, npz, args, str(path))
        if "skipped" in r:
            out["nt"] = r["skipped"]
        else:
            k_nt = np.load(path)
            out["nt_structured_vs_float64_rel"] = float(np.abs(k_nt - k64).max()
                                                        / np.abs(k64).max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small n, 1 repeat (smoke check)")
    ap.add_argument("--repeats", type=int, default=3, help="warm calls per measurement")
    ap.add_argument("--memory-budget", default="8G",
                    help="memory for each call (tangentscope chunks to it; NT cases estimated "
                         "above it are skipped)")
    ap.add_argument("--memory-repeats", type=int, default=5,
                    help="fresh processes whose median peak memory is reported, for cases "
                         "whose cold call takes under a second")
    ap.add_argument("--max-seconds", type=float, default=150.0,
                    help="skip a case whose predicted time per call exceeds this")
    ap.add_argument("--impls", default=",".join(TORCH_IMPLS + NT_IMPLS))
    ap.add_argument("--cases", default="", help="comma-separated models to run (mlp, cnn, "
                    "resnet); default all")
    ap.add_argument("--sizes", default="", help="comma-separated n to run; default all")
    ap.add_argument("--out", default=None, help="output JSON path")
    ap.add_argument("--table", metavar="JSON", help="print the markdown table of a results "
                    "file and exit (with --clock cpu|wall)")
    ap.add_argument("--clock", default="cpu", choices=("cpu", "wall"))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="where the torch side computes (cuda: synchronized, wall clock)")
    ap.add_argument("--nt-python", default=str(NT_PYTHON),
                    help="interpreter with JAX and neural-tangents (default .venv-nt)")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text()), args.clock))
        return
    if args.quick:
        args.repeats, args.max_seconds = 1, 20.0
    impls = [i for i in args.impls.split(",") if i]
    cases = QUICK if args.quick else FULL
    if args.cases:
        cases = [c for c in cases if c[0] in args.cases.split(",")]
    if args.sizes:
        cases = [c for c in cases if str(c[1]) in args.sizes.split(",")]
    budget = parse_bytes(args.memory_budget)
    notes = [f"timing: median of {args.repeats} warm calls after one cold call (1 warm call if "
             "the cold call took > 5 s); one thread (torch.set_num_threads(1), XLA "
             "single-threaded Eigen); float32; each measurement in a fresh process",
             f"memory: {MEMORY_METHOD}; for cold calls under 1 s the median over "
             f"{args.memory_repeats} fresh processes (peak_bytes_runs); "
             "allocator_peak_bytes (torch, cold calls under 1 s: the CPU allocator's peak "
             "from the profiler's allocation events) is the working set without that noise "
             "(XLA's CPU backend reports no buffer sizes to compare with); each "
             "process first makes one warm-up call outside the measurement: tangentscope "
             "the same call on 2 examples (its one-time lazy imports and initialization, "
             "~9 MiB on the first call of a process), "
             "neural-tangents its ahead-of-time compilation for the measured shape",
             "neural-tangents: empirical_ntk_fn(f, trace_axes=(), vmap_axes=0) under jax.jit, "
             "timed after ahead-of-time compilation (compile_seconds reported apart); f is a "
             "plain JAX function mirroring the torch module with the same weights, dense "
             "weights laid out (in, out) so that f computes x W + b (neural-tangents' "
             "structured rules do not apply through a transposed parameter)"]
    if args.device == "cuda":
        notes.append(f"device: {torch.cuda.get_device_name()}; torch side synchronized after "
                     "each call; neural-tangents on the same GPU through JAX; compare the wall "
                     "clock (--clock wall); cuda_peak_bytes / gpu_peak_bytes are the "
                     "allocators' peaks")
    if not _have_nt(args):
        impls = [i for i in impls if i not in NT_IMPLS]
        notes.append(f"neural-tangents skipped: {args.nt_python} has no neural_tangents (see "
                     "docs/performance.md for the environment)")
    done: list[dict] = []
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for model_name, n, p in cases:
            model, x = build(model_name, n, p)
            npz = tmp / f"{model_name}_{n}_{p}.npz"
            export(model, x, npz)
            case = {"name": f"{model_name}_n{n}_p{p}", "model": model_name, "n": n, "p": p,
                    "P": sum(q.numel() for q in model.parameters()), "results": {}}
            for impl in impls:
                key = _key(impl)
                pred = _predicted(done, model_name, n, p, key)
                if impl in NT_IMPLS:
                    est = estimate_memory(model, x, implementation=NT_EQUIV[impl],
                                          chunk_size=n)["total"]  # unchunked, as NT runs
                    if est > budget:
                        case["results"][key] = {
                            "skipped": f"estimated {est / 2**30:.1f} GiB (tangentscope."
                                       f"estimate_memory for {NT_EQUIV[impl]!r}, the same "
                                       f"algorithm, unchunked) > budget "
                                       f"{budget / 2**30:.1f} GiB", "estimated_bytes": est}
                        continue
                if pred is not None and pred > args.max_seconds:
                    case["results"][key] = {"skipped": f"predicted {pred:.0f} s per call (n² "
                                                       "from a smaller n) > --max-seconds",
                                            "predicted_seconds": pred}
                    continue
                r = _run(impl, model_name, n, p, npz, args)
                if "seconds" in r and r["cold_seconds"] < NOISY_BELOW_S and args.memory_repeats > 1:
                    # a few MiB of RSS are noise (allocator thresholds, first-use pages):
                    # the median over fresh processes, the same for every implementation
                    runs = [r["peak_bytes"]] + [
                        m["peak_bytes"] for m in (
                            _run(impl, model_name, n, p, npz, args, memory_only=True)
                            for _ in range(args.memory_repeats - 1)) if "peak_bytes" in m]
                    r["peak_bytes_runs"] = runs
                    r["peak_bytes"] = int(statistics.median(runs))
                case["results"][key] = r
                print(f"{case['name']:>16} {key:<30} "
                      + (f"{r['seconds']:9.4f} s wall {r['cpu_seconds']:9.4f} s cpu "
                         f"{(r['peak_bytes'] or 0) / 2**20:8.1f} MiB"
                         if "seconds" in r else r["skipped"]), flush=True)
            _ratios(case)
            done.append(case)
        checks = {m: cross_check(m, 3, args, tmp) for m in sorted({c[0] for c in cases})}
    out = {"benchmark": "entk", "quick": args.quick,
           "command": "python " + " ".join(["benchmarks/entk.py", *sys.argv[1:]]),
           "machine": machine(), "torch": torch.__version__, "wall_seconds": time.time() - t_start,
           "budget_bytes": budget, "max_seconds": args.max_seconds, "notes": notes,
           "cases": done, "cross_check": checks, "targets": _targets(done)}
    path = Path(args.out) if args.out else (RESULTS / ("entk-quick.tmp" if args.quick
                                                       else "entk.json"))
    if args.out or args.quick:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
    else:
        path = write_results("entk", out)
    print(table(out))
    print(f"wrote {path}")


def table(data: dict, clock: str = "cpu") -> str:
    """A markdown table of a results JSON: seconds (``clock``: ``cpu`` or ``wall``) and peak
    memory per implementation, skipped cases marked."""
    field = "cpu_seconds" if clock == "cpu" else "seconds"
    keys = [_key(i) for i in TORCH_IMPLS + NT_IMPLS]
    head = ["case", "P"] + [k.replace("tangentscope.", "ts.") for k in keys]
    head += ["default vs jacobian", "default / NT best", "memory / NT best"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in data["cases"]:
        cells = [f"{c['model'].upper()} n={c['n']} p={c['p']}", f"{c['P']:,}"]
        for k in keys:
            r = c["results"].get(k)
            if r is None:
                cells.append("")
            elif field in r:
                mem = f" / {r['peak_bytes'] / 2**20:.0f} MiB" if r.get("peak_bytes") else ""
                cells.append(f"{r[field]:.3g} s{mem}")
            else:
                cells.append("skipped (memory)" if "estimated_bytes" in r else
                             f"skipped (time: ~{r['predicted_seconds']:.0f} s predicted)"
                             if "predicted_seconds" in r else "did not finish in "
                             + r["skipped"].split("within ")[-1] if "within" in r["skipped"]
                             else "failed")
        sp = c.get("speedup_default_vs_jacobian", {}).get(clock)
        nt = c.get("time_ratio_default_over_nt_best", {}).get(clock)
        pred = c["results"].get("tangentscope.jacobian", {}).get("predicted_seconds")
        d = c["results"].get("tangentscope.default", {}).get("seconds")
        cells.append(f"{sp:.0f}x faster" if sp else
                     f"~{pred / d:.0f}x (wall, predicted)" if pred and d else "")
        cells.append(f"{nt:.2f} ({c['nt_best'][clock].split('.')[1]})" if nt else "")
        mr = c.get("memory_ratio_default_over_nt_best")
        cells.append(f"{mr:.2f}" if mr else "")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _ratios(case: dict) -> None:
    """Speed-up of the default over jacobian and its time relative to neural-tangents' fastest,
    by wall-clock seconds and by process CPU seconds (robust to other load on the machine)."""
    res = case["results"]
    for clock, field in (("wall", "seconds"), ("cpu", "cpu_seconds")):
        t = {k: v[field] for k, v in res.items() if field in v}
        d = t.get("tangentscope.default")
        if d is None:
            continue
        if "tangentscope.jacobian" in t:
            case.setdefault("speedup_default_vs_jacobian", {})[clock] = (
                t["tangentscope.jacobian"] / d)
        nt = {k: v for k, v in t.items() if k.startswith("nt.")}
        if nt:
            best = min(nt, key=nt.get)
            case.setdefault("nt_best", {})[clock] = best
            case.setdefault("time_ratio_default_over_nt_best", {})[clock] = d / nt[best]
    best = case.get("nt_best", {}).get("cpu")
    if best and res.get("tangentscope.default", {}).get("peak_bytes") and \
            res[best].get("peak_bytes"):
        case["memory_ratio_default_over_nt_best"] = (res["tangentscope.default"]["peak_bytes"]
                                                     / res[best]["peak_bytes"])


def _targets(cases: list[dict]) -> dict:
    out = {}
    for clock in ("wall", "cpu"):
        sp = [c["speedup_default_vs_jacobian"][clock] for c in cases
              if c["model"] == "mlp" and clock in c.get("speedup_default_vs_jacobian", {})]
        nt = [c["time_ratio_default_over_nt_best"][clock] for c in cases
              if clock in c.get("time_ratio_default_over_nt_best", {})]
        out[clock] = {
            "min_speedup_vs_jacobian_on_mlps": min(sp, default=None),
            "speedup_vs_jacobian_on_mlps_at_least_20x": all(x >= 20 for x in sp) if sp else None,
            "max_time_ratio_default_over_nt_best": max(nt, default=None),
            "default_not_slower_than_nt_best": all(r <= 1 for r in nt) if nt else None,
            "default_at_most_half_nt_best_time": all(r <= 0.5 for r in nt) if nt else None}
    mem = [c["memory_ratio_default_over_nt_best"] for c in cases
           if "memory_ratio_default_over_nt_best" in c]
    out["memory"] = {"max_memory_ratio_default_over_nt_best": max(mem, default=None),
                     "default_not_above_nt_best_memory": all(r <= 1 for r in mem) if mem
                     else None}
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_reply(torch_worker(json.loads(sys.argv[2])))
    else:
        main()
