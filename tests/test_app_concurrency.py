"""Several tabs of the live page train at once (issue 12.7): forward-mode AD is process-global,
so the page's K·g clock (one ``forward_ad`` pass per step) must never nest across sessions."""

from __future__ import annotations

import threading
import time

import torch

from tangentscope.app.model import DemoConfig, DemoTrainer
from tangentscope.app.session import SessionManager
from test_demo import _one_torch_thread  # noqa: F401 - autouse: one torch thread, as `app` runs

SMALL = dict(n=16, width=32, depth=2, steps_per_update=5)


def test_trainers_in_four_threads_match_one_at_a_time():
    """Four trainers stepping at once (released together) neither fail nor change a number."""
    steps = 150

    def final(seed: int) -> tuple[torch.Tensor, float]:
        tr = DemoTrainer(DemoConfig(seed=seed, **SMALL))
        tr.train(steps)
        return torch.cat([p.detach().reshape(-1) for p in tr.model.parameters()]), tr.t_eff

    alone = {seed: final(seed) for seed in range(4)}
    together: dict[int, tuple[torch.Tensor, float]] = {}
    errors: list[str] = []
    start = threading.Barrier(4)

    def work(seed: int) -> None:
        tr = DemoTrainer(DemoConfig(seed=seed, **SMALL))
        start.wait()
        try:
            tr.train(steps)
        except Exception as e:  # recorded: the assertion below names it
            errors.append(f"seed {seed}: {type(e).__name__}: {e}")
            return
        together[seed] = (torch.cat([p.detach().reshape(-1) for p in tr.model.parameters()]),
                          tr.t_eff)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for seed, (w, t_eff) in alone.items():
        assert torch.equal(together[seed][0], w) and together[seed][1] == t_eff


def test_four_sessions_train_concurrently_to_the_end():
    """Four live sessions (the page's worker threads) all reach ``done``; none errors."""
    mgr = SessionManager(max_sessions=4, reap_after=600.0, max_fps=None)
    try:
        sessions = [mgr.create(DemoConfig(seed=i, max_steps=120, **SMALL)) for i in range(4)]
        for s in sessions:
            s.command("start")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            states = [s.state() for s in sessions]
            if all(st["status"] in ("done", "error", "diverged") for st in states):
                break
            time.sleep(0.05)
        states = [s.state() for s in sessions]
        assert [st["status"] for st in states] == ["done"] * 4, [
            (st["status"], st.get("message")) for st in states]
        assert all(st["step"] == 120 for st in states)
    finally:
        mgr.shutdown()
