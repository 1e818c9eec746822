"""``tangentscope.losses``: output-space losses (``Φ``, ``g = ∇_uΦ``, ``B = ∇²_uΦ``).

The implementation lives in :mod:`tangentscope.kernels.losses`; this is its public name.
"""

from .kernels.losses import *  # noqa: F401,F403
from .kernels.losses import __all__  # noqa: F401
