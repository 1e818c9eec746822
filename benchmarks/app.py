"""Updates per second of the live page (full eNTK spectrum, n = 64, width-256 ReLU MLP).

One torch thread (as ``tangentscope app`` runs). An *update* is what the page shows: 10
full-batch AdamW steps, the eNTK ``K_SS`` (64 × 64) at the new weights, its eigendecomposition,
the residual projections and one JSON frame. Measured three ways, in interleaved rounds
(median over rounds, so machine noise hits every variant alike):

- ``session``: a :class:`tangentscope.app.Session` worker, uncapped (``max_fps=None``), counting
  published frames; once with ``implementation="auto"`` (the structured eNTK where it applies)
  and once with the generic ``"jacobian"`` path as the in-run baseline;
- ``http``: the same through the real server and an event-stream client on this machine;
- ``breakdown``: the parts of one update (training steps, eNTK + eigh, JSON) timed alone.

    python benchmarks/app.py            # writes benchmarks/results/app.json
    python benchmarks/app.py --quick    # a few seconds, for a smoke check
    python benchmarks/app.py --screenshot docs/figures/app.png   # the docs' picture (Chromium)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from tangentscope.app import make_server
from tangentscope.app.model import DemoConfig, DemoTrainer
from tangentscope.app.session import Session

TARGET = 10.0  # updates per second the issue asks for
CONFIG = DemoConfig(n=64, width=256, depth=2, steps_per_update=10, max_steps=10**6)


def _session_rate(implementation: str, seconds: float) -> float:
    s = Session("bench", CONFIG, implementation=implementation, max_fps=None)
    try:
        s.command("start")
        first = None
        while first is None:  # the first frame after the first timed update
            f = s.wait_frame(0, 30)
            if f and b'"status":"running"' in f[1] and b'"step":0,' not in f[1]:
                first = f[0]
        t0 = time.perf_counter()
        time.sleep(seconds)
        last = s.wait_frame(0, 30)[0]
        return (last - first) / (time.perf_counter() - t0)
    finally:
        s.close()


def _http_rate(seconds: float) -> dict[str, float]:
    srv = make_server(port=0, max_fps=None).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request("POST", "/api/sessions", body=json.dumps({"max_steps": 10**6}),
                     headers={"Content-Type": "application/json"})
        sid = json.loads(conn.getresponse().read())["session"]
        conn.close()
        stream = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        stream.request("GET", f"/api/sessions/{sid}/events")
        resp = stream.getresponse()
        c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        c.request("POST", f"/api/sessions/{sid}/start")
        c.getresponse().read()
        c.close()
        received, ids, t0, nbytes = 0, [], None, 0
        while True:
            line = resp.fp.readline()
            if line.startswith(b"id: "):
                fid = int(line[4:])
            if line.startswith(b"data: ") and b'"status":"running"' in line:
                if t0 is None:
                    if b'"step":0,' in line:
                        continue
                    t0 = time.perf_counter()
                    ids.append(fid)
                    continue
                received += 1
                nbytes += len(line)
                ids.append(fid)
                if time.perf_counter() - t0 >= seconds:
                    break
        elapsed = time.perf_counter() - t0
        resp.close()
        stream.close()
        return {"received_per_s": received / elapsed, "published_per_s": (ids[-1] - ids[0]) /
                elapsed, "frame_kib": nbytes / max(received, 1) / 1024}
    finally:
        srv.shutdown()


def _breakdown(repeats: int) -> dict[str, float]:
    tr = DemoTrainer(CONFIG)
    tr.train(20)
    tr.snapshot()
    out = {}
    for name, fn in (("train_10_steps_ms", lambda: tr.train(10)),
                     ("entk_eigh_ms", tr.snapshot)):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = 1e3 * statistics.median(times)
    s = Session("json", CONFIG, max_fps=None)
    try:
        frame = json.loads(s.wait_frame(1, 60)[1])
    finally:
        s.close()
    t0 = time.perf_counter()
    for _ in range(repeats):
        json.dumps(frame, separators=(",", ":"))
    out["json_ms"] = 1e3 * (time.perf_counter() - t0) / repeats
    return out


def screenshot(path: str, step: int = 1200) -> None:
    """Open the page in headless Chromium, train the default config to ``step``, screenshot."""
    from playwright.sync_api import sync_playwright

    srv = make_server(port=0).start()
    try:
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update"])
            page = b.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"http://127.0.0.1:{srv.port}/")
            page.wait_for_function("window.tangentscope && window.tangentscope.frames > 1")
            page.click("#run")
            page.wait_for_function(f"window.tangentscope.step >= {step}", timeout=300_000)
            page.click("#run")  # pause, so the picture shows one consistent frame
            page.wait_for_function("window.tangentscope.status === 'paused'")
            page.wait_for_timeout(300)
            page.screenshot(path=path, full_page=True)
            b.close()
    finally:
        srv.shutdown()
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short windows, 1 round")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "app.json"))
    ap.add_argument("--screenshot", metavar="PNG", help="only take the docs' screenshot")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.screenshot:
        return screenshot(args.screenshot)
    window, rounds = (1.5, 1) if args.quick else (4.0, 5)

    rates: dict[str, list[float]] = {"auto": [], "jacobian": [], "http_received": [],
                                     "http_published": []}
    frame_kib = 0.0
    for r in range(rounds):
        rates["auto"].append(_session_rate("auto", window))
        rates["jacobian"].append(_session_rate("jacobian", window))
        h = _http_rate(window)
        rates["http_received"].append(h["received_per_s"])
        rates["http_published"].append(h["published_per_s"])
        frame_kib = h["frame_kib"]
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f}/s"
                                                      for k, v in rates.items()), flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    parts = _breakdown(5 if args.quick else 30)
    result = {
        "benchmark": "app",
        "what": "live-page updates per second: 10 AdamW steps + full eNTK (n=64) + eigh + JSON",
        "config": {"n": CONFIG.n, "width": CONFIG.width, "depth": CONFIG.depth,
                   "steps_per_update": CONFIG.steps_per_update, "dtype": "float64"},
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick, "rounds": rounds, "window_s": window,
        "updates_per_s": {"session_auto": med["auto"], "session_jacobian": med["jacobian"],
                          "http_received": med["http_received"],
                          "http_published": med["http_published"]},
        "speedup_auto_vs_jacobian": med["auto"] / med["jacobian"],
        "target_updates_per_s": TARGET,
        "meets_target": med["http_received"] >= TARGET,
        "frame_kib": frame_kib,
        "breakdown_ms": parts,
        "all_rounds": rates,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "load_average": os.getloadavg(), "torch": torch.__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("updates_per_s", "speedup_auto_vs_jacobian",
                                             "meets_target", "breakdown_ms")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
