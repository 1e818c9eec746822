"""Prebuild GatedAdamW's fused CPU kernel (the install step runs this once per machine)::

    python -m tangentscope.optim._build --build     # compile into the cache if missing
    python -m tangentscope.optim._build --status    # where it is, whether it is built

A separate module from :mod:`._native` (which the package imports) so that ``python -m`` runs
it cleanly. Exit status 1 if the kernel cannot be built (GatedAdamW then uses its eager
kernels).
"""

from __future__ import annotations

from ._native import main

if __name__ == "__main__":
    raise SystemExit(main())
