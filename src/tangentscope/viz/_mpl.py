"""Lazy matplotlib access with a headless backend and one consistent style; reading the
``{"median", "min", "max"}`` seed summaries the experiments write."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from ..errors import TangentscopeError

_STYLE: dict[str, Any] = {
    "figure.dpi": 110,
    "savefig.dpi": 130,
    "savefig.bbox": "tight",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "font.size": 9,
    "axes.titlesize": 10,
    "legend.fontsize": 8,
    "legend.frameon": False,
}


def pyplot() -> Any:
    """``matplotlib.pyplot`` with the Agg backend and tangentscope's style.

    Raises:
        TangentscopeError: matplotlib is not installed (``pip install 'tangentscope[plot]'``).
    """
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise TangentscopeError("figures need matplotlib: pip install 'tangentscope[plot]'") from e
    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update(cast(Any, _STYLE))
    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    """Save ``fig`` to ``path`` (PNG), close it, and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    pyplot().close(fig)
    return path


def seed_stat(row: Mapping[str, Any], key: str) -> tuple[float, float, float]:
    """``(median, min, max)`` of a seed summary ``row[key]``; NaNs where it is absent."""
    s = row.get(key)
    if not isinstance(s, Mapping):
        return math.nan, math.nan, math.nan
    return float(s["median"]), float(s["min"]), float(s["max"])
