"""Figures (matplotlib, Agg backend). Importing this package does not import matplotlib."""

from ._mpl import pyplot, save_figure

__all__ = ["pyplot", "save_figure"]
