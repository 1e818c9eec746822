"""Shared fixtures: a model zoo and the brute-force eNTK twin (per-output autograd loop)."""

from __future__ import annotations

import os

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
