"""Exceptions raised by tangentscope.

Every error names the problem *and* the fix; they are raised before any expensive work starts.
"""

from __future__ import annotations

import os
from pathlib import Path


class TangentscopeError(Exception):
    """Base class for all tangentscope errors."""


class ShapeError(TangentscopeError, ValueError):
    """Inputs have incompatible or unexpected shapes."""


class KernelTooLargeError(TangentscopeError, MemoryError):
    """The requested kernel (or its working memory) does not fit the memory budget."""


class UnsupportedModelError(TangentscopeError, TypeError):
    """The model contains a layer or mode the requested computation cannot handle."""


class NonFiniteError(TangentscopeError, FloatingPointError):
    """A gradient, kernel or output contains NaN or Inf."""


class ConfigError(TangentscopeError, ValueError):
    """A configuration value is invalid."""


class DamagedFileError(TangentscopeError):
    """A run file is truncated, garbled or missing; the message names the file and the fix.

    Attributes:
        path: the damaged file.
    """

    def __init__(self, path: str | os.PathLike, problem: str, fix: str):
        self.path = Path(path)
        super().__init__(f"{self.path} is damaged ({problem}): {fix}")


class RecoveredFileWarning(UserWarning):
    """A damaged file was set aside and an earlier good copy (or a fresh start) used instead."""
