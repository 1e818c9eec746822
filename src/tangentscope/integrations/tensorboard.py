"""TensorBoard for plain loops: a small scalar logger and a reader of event files (extra
``tensorboard``; ``torch.utils.tensorboard``/``tensorboard`` are imported inside the functions).

Inside ``transformers.Trainer`` or Lightning use their own TensorBoard loggers (``report_to=
"tensorboard"``, ``lightning.pytorch.loggers.TensorBoardLogger``) with the callbacks of
:mod:`.hf` and :mod:`.lightning`; for W&B likewise (``report_to="wandb"``, ``WandbLogger``), or,
in a plain loop, ``TrainingMonitor(..., log=lambda m, s: wandb.log(m, step=s))``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["TensorBoardLogger", "read_scalars"]


class TensorBoardLogger:
    """Scalars to a TensorBoard event file; ``log`` fits ``TrainingMonitor(log=...)``.

    Args:
        log_dir: the directory of the event files (``tensorboard --logdir`` it).
        prefix: prepended to every tag (e.g. ``"train/"``).
        flush_secs: how often the writer flushes to disk.

    Raises:
        ConfigError: ``tensorboard`` is not installed (``pip install 'tangentscope[tensorboard]'``).
    """

    def __init__(self, log_dir: str | os.PathLike, *, prefix: str = "", flush_secs: int = 10):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch raises this without the tensorboard package
            raise ConfigError("TensorBoardLogger needs the tensorboard package: pip install "
                              "'tangentscope[tensorboard]' (or tensorboard)") from e
        self.log_dir = Path(log_dir)
        self.prefix = prefix
        self.writer: Any = SummaryWriter(log_dir=str(self.log_dir), flush_secs=flush_secs)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Write every finite number of ``metrics`` as a scalar at ``step``."""
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(self.prefix + k, float(v), int(step))

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def read_scalars(log_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``log_dir`` (searched recursively):
    ``tag -> [(step, value), ...]`` in step order.

    Raises:
        ConfigError: no event file under ``log_dir``, or ``tensorboard`` is not installed.
    """
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as e:
        raise ConfigError("read_scalars needs the tensorboard package: pip install "
                          "'tangentscope[tensorboard]' (or tensorboard)") from e
    root = Path(log_dir)
    dirs = sorted({f.parent for f in root.rglob("events.out.tfevents.*")})
    if not dirs:
        raise ConfigError(f"no TensorBoard event file under {root}: pass the log directory the "
                          "trainer's TensorBoard logger wrote to")
    out: dict[str, list[tuple[int, float]]] = {}
    for d in dirs:
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((int(e.step), float(e.value))
                                           for e in acc.Scalars(tag))
    return {k: sorted(v) for k, v in out.items()}
