"""Time per training step of each grokking optimizer, relative to AdamW in the same run.

One plain model (not the stacked ensemble the experiment uses), one CPU thread, the same
minibatches for every optimizer. Optimizers are measured in interleaved rounds (AdamW, A, B, …,
AdamW, A, B, …) and the median over rounds is kept, so machine noise hits all of them alike.

    python benchmarks/grokking_step.py            # writes benchmarks/results/grokking_step.json
    python benchmarks/grokking_step.py --quick    # seconds; writes grokking_step-quick.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_results
from tangentscope.experiments import grokking as G
from tangentscope.experiments._grokking_setup import build_cell_optimizer
from tangentscope.models.embedding_mlp import EmbeddingMLP
from tangentscope.models.transformer import TinyTransformer

OPTIMIZERS = ("adamw", "gated", "gated-grad", "gated-moments", "gated-streaming", "grokfast",
              "grokfast-ma", "gated-grad+grokfast")


def _setup(setting_name: str, optimizer: str):
    st = G.SETTINGS[setting_name]
    task = G.make_task(st, [0])
    torch.manual_seed(0)
    if st.model == "mlp":
        model = EmbeddingMLP(task.vocab, task.n_classes, d_embed=st.d_embed, width=st.width,
                             depth=st.depth)
    else:
        model = TinyTransformer(task.vocab, task.n_classes, d_model=st.d_model,
                                n_heads=st.n_heads, n_layers=st.n_layers, d_mlp=4 * st.d_model,
                                max_len=task.x.shape[1])
    built = build_cell_optimizer(optimizer, model, st, st.batch_size)
    g = torch.Generator().manual_seed(0)
    train = task.train_idx[0]

    def step() -> None:
        idx = train[torch.randint(len(train), (st.batch_size,), generator=g)]
        loss = torch.nn.functional.cross_entropy(model(task.x[idx]), task.y[idx])
        built.zero_grad(set_to_none=True)
        loss.backward()
        built.step()

    return step


def measure(setting_name: str, optimizers, steps: int, rounds: int) -> dict:
    fns, skipped = {}, {}
    for o in optimizers:
        try:
            fns[o] = _setup(setting_name, o)
        except Exception as e:  # an optimizer the library does not provide (yet)
            skipped[o] = repr(e)
    for f in fns.values():  # warm-up
        for _ in range(max(3, steps // 5)):
            f()
    times: dict[str, list[float]] = {o: [] for o in fns}
    for _ in range(rounds):
        for o, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                f()
            times[o].append((time.perf_counter() - t0) / steps)
    base = statistics.median(times["adamw"])
    rows = {o: {"ms_per_step_median": 1e3 * statistics.median(ts),
                "ms_per_step_min": 1e3 * min(ts),
                "ratio_vs_adamw": statistics.median(ts) / base,
                "ratio_vs_adamw_per_round": [t / a for t, a in zip(ts, times["adamw"])]}
            for o, ts in times.items()}
    return {"setting": setting_name, "steps_per_round": steps, "rounds": rounds,
            "optimizers": rows, "skipped": skipped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few steps (smoke check)")
    ap.add_argument("--settings", default="ci,tf-add")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--name", default=None, help="results/<name>.json (default grokking_step, "
                    "grokking_step-quick with --quick)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    steps, rounds = (5, 2) if args.quick else (40, 7)
    results = [measure(s, args.optimizers.split(","), steps, rounds)
               for s in args.settings.split(",")]
    out = {"benchmark": "grokking_step", "quick": args.quick, "torch": torch.__version__,
           "machine": machine(), "threads": 1, "results": results}
    name = args.name or ("grokking_step-quick" if args.quick else "grokking_step")
    print(f"wrote {write_results(name, out)}")
    for r in results:
        print(f"[{r['setting']}]")
        for o, v in r["optimizers"].items():
            print(f"  {o:<24} {v['ms_per_step_median']:8.2f} ms/step  "
                  f"{v['ratio_vs_adamw']:.2f}x AdamW")
        for o, e in r["skipped"].items():
            print(f"  {o:<24} skipped: {e}")


if __name__ == "__main__":
    main()
