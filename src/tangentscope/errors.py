"""Exceptions raised by tangentscope.

Every error names the problem *and* the fix; they are raised before any expensive work starts.
"""

from __future__ import annotations


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
