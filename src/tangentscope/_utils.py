"""Small shared helpers: progress bars, byte formatting, seeding, memory, module modes and the
process-wide forward-mode AD lock."""

from __future__ import annotations

import contextlib
import os
import random
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch
from torch import nn

T = TypeVar("T")


def progress(iterable: Iterable[T], *, desc: str = "", total: int | None = None,
             leave: bool = False, disable: bool | None = None) -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm progress bar (stderr).

    The bar is hidden when stderr is not a terminal or ``TANGENTSCOPE_PROGRESS=0``, and forced
    on with ``TANGENTSCOPE_PROGRESS=1``.
    """
    if disable is None:
        env = os.environ.get("TANGENTSCOPE_PROGRESS")
        disable = (env == "0") if env is not None else not sys.stderr.isatty()
    if disable:
        return iter(iterable)
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True))


def format_bytes(n: float) -> str:
    """Human-readable byte count, e.g. ``format_bytes(3 * 2**30) == '3.00 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a fresh ``torch.Generator`` seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def available_memory() -> int:
    """Bytes of RAM currently available (Linux ``MemAvailable``; 8 GiB if unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def default_memory_budget() -> int:
    """Default working-memory budget in bytes.

    ``TANGENTSCOPE_MEMORY_BUDGET`` (bytes, or with a ``K/M/G`` suffix) if set, else half of the
    currently available RAM.
    """
    env = os.environ.get("TANGENTSCOPE_MEMORY_BUDGET")
    if env:
        return parse_bytes(env)
    return available_memory() // 2


def parse_bytes(text: str | int | float) -> int:
    """Parse ``'512M'``, ``'4G'``, ``'1.5GiB'`` or a plain number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(float(s))


# Forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) keeps its dual level in
# process-global state: two threads inside it at once fail with "Nested forward mode AD is not
# supported". Every forward-mode section in tangentscope holds this lock (re-entrant, so nested
# calls from one thread are fine).
FORWARD_AD_LOCK = threading.RLock()


@contextlib.contextmanager
def forward_ad_section() -> Iterator[None]:
    """Serialize a forward-mode AD section across threads (see :data:`FORWARD_AD_LOCK`)."""
    with FORWARD_AD_LOCK:
        yield


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block; afterwards each submodule's own
    ``training`` flag is exactly what it was (a frozen ``bn.eval()`` inside a train-mode model
    stays frozen; ``model.train(was)`` would not restore that)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, was in flags:
            m.training = was
