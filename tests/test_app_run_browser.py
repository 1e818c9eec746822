"""The page of a recorded run in a real browser: headless Chromium driven by Playwright.

Skipped where ``/usr/bin/chromium`` is missing, except under ``CI=true`` (a missing browser there
is a failure). Saves ``test-artifacts/run_page.png``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from recorded_runs import experiment_like
from tangentscope.app import make_run_server

ARTIFACTS = Path(__file__).parents[1] / "test-artifacts"

pytestmark = pytest.mark.browser


def counters(page):
    return page.evaluate("window.tangentscope")


def test_run_page_slides_through_snapshots_and_shows_gate_telemetry(browser, tmp_path):
    srv = make_run_server(experiment_like(tmp_path / "exp")).start()
    url = f"http://127.0.0.1:{srv.port}/"
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 1300})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        external: list[str] = []
        page.on("request", lambda r: external.append(r.url) if not r.url.startswith(
            (url, "data:")) else None)
        page.goto(url)
        page.wait_for_function("window.tangentscope.loaded && "
                               "window.tangentscope.snapshotDraws >= 1", timeout=30_000)
        c = counters(page)
        assert c["snapshot"] == 4 and c["trajectory"] == "trajectory"   # opens at the end
        assert c["column"] == "gate/fraction/0" and c["metricsDraws"] >= 1
        assert "my-exp" in page.text_content("#title")
        assert "step 20" in page.text_content("#where")
        assert "rank" in page.text_content("#channel-stats")

        # the time slider: back to the first snapshot (no W_S split there yet)
        page.fill("#slider", "0")
        page.dispatch_event("#slider", "input")
        page.wait_for_function("window.tangentscope.snapshot === 0", timeout=10_000)
        assert "step 0" in page.text_content("#where")
        assert "first snapshot" in page.text_content("#channel-stats")
        page.click("#next")
        page.wait_for_function("window.tangentscope.snapshot === 1", timeout=10_000)
        assert "step 5" in page.text_content("#where")

        # another metrics column: one series per optimizer
        n = counters(page)["metricsDraws"]
        page.select_option("#column", "loss")
        page.wait_for_function(f"window.tangentscope.metricsDraws > {n}", timeout=10_000)
        caption = page.text_content("#metrics-caption")
        assert "adamw" in caption and "gated" in caption

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "run_page.png"), full_page=True)
        page.close()
    finally:
        srv.shutdown()
    assert not errors, errors
    assert not external, external
