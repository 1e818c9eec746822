"""The live page in a real browser: headless Chromium driven by Playwright.

Skipped where ``/usr/bin/chromium`` is missing, except under ``CI=true`` (CI installs it, so a
missing browser there is a failure). Saves ``test-artifacts/app.png``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tangentscope.app import make_server

ARTIFACTS = Path(__file__).parents[1] / "test-artifacts"

pytestmark = pytest.mark.browser


@pytest.fixture
def server():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `tangentscope app` runs
    srv = make_server(port=0, max_sessions=3, reap_after=2.0, heartbeat=0.3).start()
    yield srv
    srv.shutdown()
    torch.set_num_threads(threads)


def draws(page) -> int:
    return page.evaluate("window.tangentscope.spectrumDraws")


def test_page_trains_live_and_reacts_to_controls(browser, server):
    url = f"http://127.0.0.1:{server.port}/"
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error"  # our 400s aside
            and "status of 400" not in m.text else None)
    external: list[str] = []
    page.on("request", lambda r: external.append(r.url) if not r.url.startswith(
        (url, "data:")) else None)
    page.goto(url)
    page.wait_for_function("window.tangentscope && window.tangentscope.spectrumDraws >= 1",
                           timeout=30_000)
    assert page.input_value("input[name=width]") == "256"  # the default configuration

    page.click("#run")
    start = draws(page)
    page.wait_for_function(f"window.tangentscope.spectrumDraws >= {start + 5}", timeout=60_000)
    assert page.text_content("#status") == "running"
    assert int(page.get_attribute("#spectrum", "data-draws")) >= start + 5

    # a bad value: a clear message on the page, the field flagged, training goes on
    page.fill("input[name=width]", "0")
    page.dispatch_event("input[name=width]", "change")
    page.wait_for_selector("#error:not([hidden])", timeout=10_000)
    assert "width" in page.text_content("#error") and "2048" in page.text_content("#error")
    assert "invalid" in page.get_attribute("input[name=width]", "class")
    n = draws(page)
    page.wait_for_function(f"window.tangentscope.spectrumDraws >= {n + 2}", timeout=30_000)

    # a good value restarts training on new data; the page follows
    page.fill("input[name=noise]", "0.6")
    page.dispatch_event("input[name=noise]", "change")
    page.wait_for_selector("#error[hidden]", state="attached", timeout=10_000)
    n = draws(page)
    page.wait_for_function(f"window.tangentscope.spectrumDraws >= {n + 3}", timeout=60_000)
    sessions = server.sessions.sessions()
    assert len(sessions) == 1 and sessions[0].config.noise == 0.6
    assert sessions[0].state()["status"] == "running"

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)

    # a second tab gets a session of its own
    other = browser.new_page()
    other.goto(url)
    other.wait_for_function("window.tangentscope && window.tangentscope.spectrumDraws >= 1",
                            timeout=30_000)
    assert len(server.sessions.sessions()) == 2
    other.close()
    page.close()
    assert not errors, errors
    assert not external, external  # everything is served locally
