"""When a :class:`~tangentscope.dynamics.recorder.KernelRecorder` takes a snapshot."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError

__all__ = ["Schedule", "every", "logspaced", "at_steps", "manual"]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When to snapshot: at steps ``start, start + every, ...``, at listed ``steps``, or only on
    demand (``every = 0`` and no steps). Build with :func:`every`, :func:`logspaced`,
    :func:`at_steps` or :func:`manual`."""

    every: int = 0
    start: int = 0
    steps: frozenset[int] = frozenset()

    def due(self, step: int) -> bool:
        """Whether a snapshot is scheduled after optimizer step ``step``."""
        return step in self.steps or self._periodic(step)

    def planned(self, total_steps: int | None) -> int | None:
        """Snapshots in steps ``0..total_steps``, step 0 included (the recorder takes it when
        it starts); ``None`` when that depends on an unknown ``total_steps``.

        Counted in ``O(len(steps))``, whatever ``total_steps`` (``every(k)`` by arithmetic).
        Listed steps after ``total_steps`` are not counted when it is known.
        """
        if total_steps is None:
            if self.every:
                return None
            return len(self.steps | {0})
        T = int(total_steps)
        periodic = 0
        if self.every and self.start <= T:
            periodic = (T - self.start) // self.every + 1
        extra = {s for s in self.steps | {0}
                 if 0 <= s <= T and not self._periodic(s)}
        return periodic + len(extra)

    def _periodic(self, step: int) -> bool:
        return self.every > 0 and step >= self.start and (step - self.start) % self.every == 0

    def describe(self) -> str:
        if self.every:
            return f"every {self.every} steps" + (f" from {self.start}" if self.start else "")
        return f"{len(self.steps)} listed steps" if self.steps else "manual"


def every(k: int, start: int = 0) -> Schedule:
    """Snapshot after steps ``start, start + k, start + 2k, ...``."""
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"every(k) needs an integer k >= 1, got {k!r}")
    return Schedule(every=k, start=start)


def logspaced(total_steps: int, num: int) -> Schedule:
    """About ``num`` snapshots log-spaced over ``1..total_steps`` (plus step 0)."""
    if total_steps < 1 or num < 1:
        raise ConfigError(f"logspaced needs total_steps >= 1 and num >= 1, got {total_steps}, "
                          f"{num}")
    s = np.unique(np.round(np.geomspace(1, total_steps, num)).astype(int))
    return Schedule(steps=frozenset(int(v) for v in s) | {0})


def at_steps(steps: Sequence[int]) -> Schedule:
    """Snapshot after exactly these steps."""
    return Schedule(steps=frozenset(int(s) for s in steps))


def manual() -> Schedule:
    """Snapshots only when :meth:`KernelRecorder.snapshot` is called (and at creation)."""
    return Schedule()
