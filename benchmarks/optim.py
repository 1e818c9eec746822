"""Population-risk gate: optimizer step and gradient-statistics cost, and gate agreement.

    python benchmarks/optim.py            # full (a few minutes on 2 cores)
    python benchmarks/optim.py --quick    # smoke check (seconds)

Writes ``benchmarks/results/optim.json``. One thread; every number is a ratio against a
baseline timed *in the same run*, interleaved (A B A B …) so that load changes hit both; each
timing is the median over rounds of the median of ``reps`` calls. Sections:

* ``step``: ``optimizer.step()`` alone vs ``torch.optim.AdamW(fused=True)`` (the primary
  baseline, ``ratio_vs_adamw_fused``; targets: gated ≤ 1.3×, gate off ≤ 1.05×) and
  ``AdamW(foreach=True)``, on an MLP 784→1024→1024→10, a 2-layer transformer and a GPT-2-style
  51 M-parameter model built from a config; ``kernels`` names the step kernel each gated
  configuration ran (``GatedAdamW.kernels``);
* ``train_step``: forward + backward + step, the gate's overhead over torch's fused AdamW
  (target ≤ 3 %);
* ``build``: the fused kernel's cold build and a warm-cache process's first step (target: no
  per-process compile over 5 s);
* ``statistics``: forward + backward + statistics vs plain forward + backward for each exact
  source (closed-form hooks, ``vmap``), per model and batch size (targets: hooks ≤ 1.5× MLP,
  ≤ 2.5× transformer);
* ``agreement``: on the synthetic problem of tests/test_gate_synthetic.py, how often the
  streaming gate's decision equals the exact one's on the same batches;
* ``estimator_residual``: the first-order population-risk estimate's residual against
  brute-force leave-one-out steps, relative to the self-influence bias it removes.

``--device cuda`` (a GPU machine; ``benchmarks/gpu.sh``) runs the ``step`` and ``train_step``
sections with the models, batches and optimizer states on the GPU, each call followed by
``torch.cuda.synchronize()`` (wall time is the measure there), into ``optim-cuda.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine, write_results
from tangentscope.models import TinyTransformer, mlp
from tangentscope.optim import (
    GatedAdamW,
    GatedOptimizer,
    PerExampleStats,
    PopulationRiskEstimator,
    VmapStats,
)

#: where the step and train_step sections run (``--device``)
DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _interleaved(fns: dict[str, Callable[[], object]], reps: int, rounds: int
                 ) -> dict[str, dict[str, float]]:
    """Per fn, the median over interleaved rounds of the median of ``reps`` calls, in thread
    CPU seconds (``cpu``: immune to being descheduled on a loaded machine) and wall seconds
    (on a GPU each call is synchronized: ``wall`` is the measure, ``cpu`` the host's share)."""
    per: dict[str, dict[str, list[float]]] = {k: {"cpu": [], "wall": []} for k in fns}
    for f in fns.values():
        f()
        f()                                      # a second warm-up: Triton/cuBLAS first uses
    _sync()
    for _ in range(rounds):
        for k, f in fns.items():
            cpu, wall = [], []
            for _ in range(reps):
                c0, t0 = time.thread_time(), time.perf_counter()
                f()
                _sync()
                cpu.append(time.thread_time() - c0)
                wall.append(time.perf_counter() - t0)
            per[k]["cpu"].append(statistics.median(cpu))
            per[k]["wall"].append(statistics.median(wall))
    return {k: {m: statistics.median(v) for m, v in d.items()} for k, d in per.items()}


def _ratios(t: dict[str, dict[str, float]], base: str) -> dict[str, dict[str, float]]:
    return {m: {k: v[m] / t[base][m] for k, v in t.items()} for m in ("cpu", "wall")}


def _models() -> dict[str, tuple[nn.Module, Callable[[int], tuple[torch.Tensor, torch.Tensor]]]]:
    torch.manual_seed(0)
    net = mlp(784, 1024, 2, 10)
    tf = TinyTransformer(64, 64, d_model=128, n_heads=4, n_layers=2, d_mlp=512, max_len=8)

    def mlp_batch(b):
        return torch.randn(b, 784, device=DEVICE), torch.randint(0, 10, (b,), device=DEVICE)

    def tf_batch(b):
        return (torch.randint(0, 64, (b, 8), device=DEVICE),
                torch.randint(0, 64, (b,), device=DEVICE))

    return {"mlp_784_1024_1024_10": (net.to(DEVICE), mlp_batch),
            "transformer_2l_d128_L8": (tf.to(DEVICE), tf_batch)}


def _gpt2(quick: bool) -> tuple[nn.Module, Callable[[int], tuple[torch.Tensor, torch.Tensor]]]:
    """A GPT-2-style model built from a config (nothing downloaded): 8 layers, d 512, the GPT-2
    vocabulary (51 M parameters; ``quick``: 2 layers, d 128, 6.9 M)."""
    import transformers  # optional: only for this model

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    d, layers = (128, 2) if quick else (512, 8)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=256, n_embd=d, n_layer=layers,
                                  n_head=8, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    net = transformers.GPT2LMHeadModel(cfg)

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.net(ids).logits[:, -1]

    def batch(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randint(0, 50257, (max(1, b // 16), 64), device=DEVICE),
                torch.randint(0, 50257, (max(1, b // 16),), device=DEVICE))

    return LM().to(DEVICE), batch


#: the step configurations timed on every model (a ``GatedAdamW`` or ``torch.optim`` maker)
STEP_MAKERS: dict[str, Callable[[Any], Any]] = {
    "torch_adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
    "torch_adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
    "gated_off": lambda ps: GatedAdamW(ps, lr=1e-4, gate=False),
    "gated_off_fused": lambda ps: GatedAdamW(ps, lr=1e-4, gate=False, fused=True),
    "gated_off_fused_noguard": lambda ps: GatedAdamW(ps, lr=1e-4, gate=False, fused=True,
                                                     nonfinite="ignore"),
    "gated_off_eager": lambda ps: GatedAdamW(ps, lr=1e-4, gate=False, fused=False),
    "gated_streaming_hard_update": lambda ps: GatedAdamW(ps, lr=1e-4),
    "gated_streaming_hard_update_fused": lambda ps: GatedAdamW(ps, lr=1e-4, fused=True),
    "gated_streaming_hard_update_fused_noguard": lambda ps: GatedAdamW(
        ps, lr=1e-4, fused=True, nonfinite="ignore"),
    "gated_streaming_hard_update_eager": lambda ps: GatedAdamW(ps, lr=1e-4, fused=False),
    "gated_streaming_hard_update_foreach": lambda ps: GatedAdamW(ps, lr=1e-4, fused=False,
                                                                 foreach=True),
    "gated_streaming_soft_update": lambda ps: GatedAdamW(ps, lr=1e-4, gate="soft"),
    "gated_streaming_soft_update_fused": lambda ps: GatedAdamW(ps, lr=1e-4, gate="soft",
                                                               fused=True),
    "gated_streaming_hard_grad": lambda ps: GatedAdamW(ps, lr=1e-4, gate_on="grad"),
    "gated_streaming_hard_moments": lambda ps: GatedAdamW(ps, lr=1e-4, gate_on="moments"),
    "wrapper_adam_streaming": lambda ps: GatedOptimizer(torch.optim.Adam(ps, lr=1e-4,
                                                                         foreach=True)),
}
#: the subset timed on the large model (each keeps its own state: memory)
LARGE_MAKERS = ("torch_adamw_fused", "torch_adamw_foreach", "gated_off", "gated_off_fused",
                "gated_off_fused_noguard", "gated_streaming_hard_update",
                "gated_streaming_hard_update_fused", "gated_streaming_hard_update_fused_noguard",
                "gated_streaming_hard_update_eager")


def _step_section(model: nn.Module, batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
                  makers: dict[str, Callable[[Any], Any]], reps: int, rounds: int,
                  share: bool) -> dict[str, Any]:
    """Time ``step()`` of every maker, interleaved; ``share``: one model (its gradients) for
    all optimizers (a large model: only the optimizer states are per maker)."""
    x, y = batch(64)
    fns: dict[str, Callable[[], object]] = {}
    kernels: dict[str, list[str]] = {}
    shared = model
    if share:
        F.cross_entropy(shared(x), y).backward()
    for k, make in makers.items():
        m = shared if share else copy.deepcopy(model)
        if not share:
            F.cross_entropy(m(x), y).backward()
        opt = make(m.parameters())
        fns[k] = opt.step
        if hasattr(opt, "register_step_observer"):
            opt.register_step_observer(
                lambda o, info, k=k, seen=kernels: seen.__setitem__(
                    k, sorted({g.kernel for g in info.groups})))
    t = _interleaved(fns, reps, rounds)
    return {"params": sum(p.numel() for p in model.parameters()),
            "tensors": len(list(model.parameters())), "seconds": t,
            "ratio_vs_adamw_fused": _ratios(t, "torch_adamw_fused"),
            "ratio_vs_adamw_foreach": _ratios(t, "torch_adamw_foreach"), "kernels": kernels}


def bench_step(quick: bool) -> dict:
    """``optimizer.step()`` alone; primary baseline ``torch.optim.AdamW(fused=True)``."""
    out = {}
    reps, rounds = (5, 3) if quick else (15, 9)
    for name, (model, batch) in _models().items():
        out[name] = _step_section(model, batch, STEP_MAKERS, reps, rounds, share=False)
    model, batch = _gpt2(quick)
    name = "gpt2_8l_d512_51M" if not quick else "gpt2_2l_d128"
    out[name] = _step_section(model, batch, {k: STEP_MAKERS[k] for k in LARGE_MAKERS},
                              3 if quick else 5, 3 if quick else 7, share=True)
    return out


def bench_train_step(quick: bool) -> dict:
    """The whole training step (forward + backward + step) with torch's fused AdamW, the
    default gated step and ``fused=True``: the gate's overhead (target ≤ 3 %)."""
    out = {}
    models = dict(_models())
    models["gpt2_8l_d512_51M" if not quick else "gpt2_2l_d128"] = _gpt2(quick)
    makers = {k: STEP_MAKERS[k] for k in ("torch_adamw_fused", "gated_streaming_hard_update",
                                          "gated_streaming_hard_update_fused",
                                          "gated_streaming_hard_update_fused_noguard",
                                          "gated_off")}
    for name, (model, batch) in models.items():
        big = name.startswith("gpt2")
        x, y = batch(64)
        fns: dict[str, Callable[[], object]] = {}
        for k, make in makers.items():
            m = copy.deepcopy(model)
            opt = make(m.parameters())

            def train(m=m, opt=opt, x=x, y=y):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(m(x), y).backward()
                opt.step()

            fns[k] = train
        reps, rounds = ((2, 2) if quick else (3, 7)) if big else ((3, 3) if quick else (7, 25))
        t = _interleaved(fns, reps, rounds)
        out[name] = {"seconds": t, "ratio_vs_adamw_fused": _ratios(t, "torch_adamw_fused")}
        del fns
    return out


_FIRST_STEP = """
import json, sys, time
t0 = time.perf_counter()
import torch
from tangentscope.optim import GatedAdamW
from tangentscope.models import TinyTransformer
torch.set_num_threads(1)
t1 = time.perf_counter()
m = TinyTransformer(64, 64, d_model=128, n_heads=4, n_layers=2, d_mlp=512, max_len=8)
opt = GatedAdamW(m.parameters(), lr=1e-3, fused=True)
for p in m.parameters():
    p.grad = torch.randn_like(p)
kernels = []
opt.register_step_observer(lambda o, i: kernels.append(i.groups[0].kernel))
t2 = time.perf_counter()
opt.step()
t3 = time.perf_counter()
opt.step()
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_step_s": t3 - t2, "second_step_s": t4 - t3,
                  "kernel": kernels[0]}))
"""


def bench_build(quick: bool) -> dict:
    """Compile/build time per process: the C++ extension's cold build (an empty cache), then
    new processes with the cache warm (first ``fused=True`` step = load + step)."""
    import os
    import subprocess
    import tempfile

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TANGENTSCOPE_CACHE": cache}
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "tangentscope.optim._build", "--build"],
                             env=env, capture_output=True, text=True, check=False)
        out["cold_build_s"] = time.perf_counter() - t0
        out["cold_build_ok"] = res.returncode == 0
        runs = []
        for _ in range(2 if quick else 5):
            r = subprocess.run([sys.executable, "-c", _FIRST_STEP], env=env,
                               capture_output=True, text=True, check=True)
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        out["warm_processes"] = runs
        out["warm_first_step_s_median"] = statistics.median(r["first_step_s"] for r in runs)
        out["warm_second_step_s_median"] = statistics.median(r["second_step_s"] for r in runs)
    out["meaning"] = ("cold: compiling the extension into an empty cache (once per machine); "
                      "warm: a new process's first fused step (loading the cached library "
                      "included) vs its second")
    return out


def bench_statistics(quick: bool) -> dict:
    out = {}
    reps, rounds = (2, 2) if quick else (5, 5)
    sizes = {"mlp_784_1024_1024_10": (128,) if quick else (128, 512),
             "transformer_2l_d128_L8": (64,) if quick else (128,)}
    for name, (model, batch) in _models().items():
        for b in sizes[name]:
            x, y = batch(b)
            plain, hooked = copy.deepcopy(model), copy.deepcopy(model)
            stats = PerExampleStats(hooked)

            def fb_plain(plain=plain, x=x, y=y):
                plain.zero_grad(set_to_none=True)
                F.cross_entropy(plain(x), y).backward()

            def fb_hooks(hooked=hooked, stats=stats, x=x, y=y):
                hooked.zero_grad(set_to_none=True)
                F.cross_entropy(hooked(x), y).backward()
                stats.collect()
                stats.reset()

            fns: dict[str, Callable[[], object]] = {"plain": fb_plain, "hooks": fb_hooks}
            if name.startswith("mlp") and b <= 128:       # storing every per-example gradient
                vm = copy.deepcopy(model)
                vs = VmapStats(vm, F.cross_entropy, chunk_size=None)

                def fb_vmap(vm=vm, vs=vs, x=x, y=y):
                    vm.zero_grad(set_to_none=True)
                    vs.backward(x, y)
                    vs.reset()

                fns["vmap"] = fb_vmap
            t = _interleaved(fns, reps if "vmap" not in fns else max(1, reps // 2), rounds)
            out[f"{name}_b{b}"] = {"seconds": t, "ratio_vs_plain": _ratios(t, "plain")}
        if name.startswith("mlp"):                        # low and high precision
            for dt in (torch.float64, torch.bfloat16):
                x, y = batch(128)
                x = x.to(dt)
                plain, hooked = copy.deepcopy(model).to(dt), copy.deepcopy(model).to(dt)
                stats = PerExampleStats(hooked)

                def p_fb(m=plain, x=x, y=y):
                    m.zero_grad(set_to_none=True)
                    F.cross_entropy(m(x).float(), y).backward()

                def h_fb(m=hooked, s=stats, x=x, y=y):
                    m.zero_grad(set_to_none=True)
                    F.cross_entropy(m(x).float(), y).backward()
                    s.collect()
                    s.reset()

                t = _interleaved({"plain": p_fb, "hooks": h_fb}, max(1, reps // 2), rounds)
                out[f"{name}_b128_{str(dt).split('.')[1]}"] = {
                    "seconds": t, "ratio_vs_plain": _ratios(t, "plain")}
    return out


def bench_agreement(quick: bool) -> dict:
    """Streaming vs exact gate decisions on the same batches (known signal/noise)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_gate_synthetic import SNR, Levels, _batches, _groups

    steps, skip = (200, 100) if quick else (1500, 500)
    out = {}
    for nb in (0.99, 0.999):
        torch.manual_seed(0)
        m_ex, m_st = Levels(), Levels()
        m_st.load_state_dict(m_ex.state_dict())
        o_ex = GatedAdamW(_groups(m_ex), lr=1e-3, weight_decay=0.0, stats=PerExampleStats(m_ex))
        o_st = GatedAdamW(_groups(m_st), lr=1e-3, weight_decay=0.0, noise_beta=nb)
        agree = torch.zeros(len(SNR))
        rate_ex, rate_st = torch.zeros(len(SNR)), torch.zeros(len(SNR))
        n = 0
        for t, x in enumerate(_batches(steps, 1)):
            moved = []
            for mdl, opt in ((m_ex, o_ex), (m_st, o_st)):
                before = [lay.weight.detach().clone() for lay in mdl.layers]
                opt.zero_grad()
                mdl(x).sum(1).mean().backward()
                opt.step()
                moved.append(torch.stack([(lay.weight.detach() != b0).flatten()
                                          for lay, b0 in zip(mdl.layers, before)]))
            if t >= skip:
                agree += (moved[0] == moved[1]).float().mean(1)
                rate_ex += moved[0].float().mean(1)
                rate_st += moved[1].float().mean(1)
                n += 1
        out[f"noise_beta_{nb}"] = {"snr": list(SNR), "agreement": (agree / n).tolist(),
                                   "pass_rate_exact": (rate_ex / n).tolist(),
                                   "pass_rate_streaming": (rate_st / n).tolist(),
                                   "steps_measured": n}
    return out


def bench_estimator_residual(quick: bool) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_estimator import _loo_brute_force

    out: dict[str, Any] = {}
    for gate in (False, "hard"):
        rows: dict[str, dict[str, float]] = {}
        for warm in ((5, 50) if quick else (5, 50, 300)):
            rows[f"warm{warm}"] = {}
            for b in ((12, 24) if quick else (12, 24, 48)):
                est, naive, brute = _loo_brute_force(gate, b=b, warm=warm)
                rows[f"warm{warm}"][f"b{b}"] = abs(est - brute) / abs(naive - brute)
        out["gate_" + str(gate).lower()] = rows
    out["meaning"] = ("|estimate - brute-force LOO| / |uncorrected - brute-force LOO| for one "
                      "AdamW step after `warm` steps on a batch of b (0 = exact, 1 = no better "
                      "than no correction)")
    return out


def bench_estimator_late(quick: bool) -> dict:
    """Late in a real multi-epoch run (regression task of ``poprisk-estimate``): the estimate vs
    brute-force leave-one-out vs the *true* first-order population change, i.e. the gradient of
    the loss on 2,000 fresh noisy points dotted with the actual step."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tangentscope.experiments.poprisk_estimate import Config, epoch_batches, make_task
    from test_optim_helpers import brute_per_example

    cfg = Config()
    task = make_task(cfg, "regression", 0)
    model = task.model.double()
    x, y, xt, yt = (t.double() for t in (task.x, task.y, task.x_test, task.y_test))
    stats = PerExampleStats(model)
    opt = GatedAdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, gate=False, stats=stats)
    bat = epoch_batches(x.shape[0], cfg.batch_size, torch.Generator().manual_seed(0))
    warm = 200 if quick else 2000
    for _ in range(warm):
        idx = next(bat)
        opt.zero_grad()
        task.loss(model(x[idx]), y[idx]).backward()
        opt.step()
    names = [n for n, _ in model.named_parameters()]
    rows: list[dict[str, Any]] = []
    for _ in range(1 if quick else 3):
        idx = next(bat)
        xb, yb, b = x[idx], y[idx], len(idx)
        G = brute_per_example(model, task.loss, xb, yb)
        opt.zero_grad()
        task.loss(model(xb), yb).backward()
        full = stats.collect()
        stats.reset()
        brute = 0.0
        for i in range(b):
            cm = copy.deepcopy(model)
            co = GatedAdamW(cm.parameters(), lr=cfg.lr, weight_decay=0.0, gate=False)
            co.load_state_dict(copy.deepcopy(opt.state_dict()))
            for cq, n in zip(cm.parameters(), names):
                cq.grad = ((G[n].sum(0) - G[n][i]) / (b - 1)).clone()
            before = [c.detach().clone() for c in cm.parameters()]
            co.step()
            for cq, w0, n in zip(cm.parameters(), before, names):
                brute += float((G[n][i] * (cq.detach() - w0)).sum()) / b
        m2 = copy.deepcopy(model)
        task.loss(m2(xt), yt).backward()
        gpop = {n: p.grad.clone() for n, p in m2.named_parameters() if p.grad is not None}
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        est = PopulationRiskEstimator(opt)
        opt.step(moments=full)
        c = est.curve()
        est.detach()
        rows.append({
            "step": warm + len(rows) + 1,
            "estimate": float(c.estimate[1] - c.estimate[0]),
            "brute_force_loo": brute,
            "uncorrected": float(c.train_first_order[1] - c.train_first_order[0]),
            "true_population_first_order": sum(float((gpop[n] * (p.detach() - start[n])).sum())
                                               for n, p in model.named_parameters())})
    return {"rows": rows, "meaning": "per-step first-order changes of the population loss"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke check (seconds)")
    ap.add_argument("--only", default=None, help="comma-separated sections")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: the step and train_step sections on the GPU (optim-cuda.json)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(1)
    sections = {"step": bench_step, "train_step": bench_train_step, "build": bench_build,
                "statistics": bench_statistics,
                "agreement": bench_agreement, "estimator_residual": bench_estimator_residual,
                "estimator_late": bench_estimator_late}
    chosen = args.only.split(",") if args.only else list(sections)
    name = "optim-quick" if args.quick else "optim"
    if DEVICE.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: torch sees no GPU")
        chosen = [k for k in chosen if k in ("step", "train_step")] or ["step", "train_step"]
        name += "-cuda"
    res = {}
    previous = RESULTS / f"{name}.json"
    if args.only and previous.exists():               # re-run some sections, keep the others
        res = json.loads(previous.read_text())
    res.update({"benchmark": "optim", "quick": args.quick, "torch": torch.__version__,
                "threads": torch.get_num_threads(), "machine": machine(),
                "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"})
    for k in chosen:
        t0 = time.perf_counter()
        res[k] = sections[k](args.quick)
        print(f"[optim] {k} done in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"wrote {write_results(name, res)}")


if __name__ == "__main__":
    main()
