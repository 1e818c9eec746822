"""Shared fixtures: a model zoo and the brute-force eNTK twin (per-output autograd loop)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Test models are small: one intra-op thread is faster, and stable on a shared 2-core machine.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TANGENTSCOPE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set TANGENTSCOPE_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# -- a real browser for the page tests (test_app_browser, test_app_run_browser) -----------------
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser():
    """Headless Debian Chromium through Playwright; skipped where it is missing, except under
    ``CI=true`` (CI installs it, so a missing browser there is a failure)."""
    ci = os.environ.get("CI") == "true"
    if not Path(CHROMIUM).exists():
        if ci:
            pytest.fail(f"{CHROMIUM} is missing under CI=true (.ci/run installs Debian's chromium)")
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    try:
        from playwright import sync_api
    except ImportError:
        if ci:
            pytest.fail("playwright is missing under CI=true (pip install 'tangentscope[test]')")
        pytest.skip("playwright not installed (pip install 'tangentscope[test]')")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()
