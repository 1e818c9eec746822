"""The code examples of docs/integrations.md, so that the tests run exactly what the page shows.

An example is the ```python block right after a ``<!-- example: NAME -->`` marker.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

DOC = Path(__file__).parents[1] / "docs" / "integrations.md"


def example(name: str) -> str:
    """The source of example ``name``."""
    m = re.search(rf"<!-- example: {re.escape(name)} -->\s*```python\n(.*?)```", DOC.read_text(),
                  re.S)
    if m is None:
        raise KeyError(f"no example {name!r} in {DOC}")
    return m.group(1)


def run_example(name: str) -> dict[str, Any]:
    """Execute example ``name`` (in the current directory) and return its globals."""
    ns: dict[str, Any] = {"__name__": f"docs_example_{name.replace('-', '_')}"}
    exec(compile(example(name), f"{DOC.name}:{name}", "exec"), ns)
    return ns
