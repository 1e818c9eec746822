"""Matrix-free linear algebra for symmetric (PSD) operators known through block products.

At the bottom of the import graph (torch and ``tangentscope.errors`` only), so kernels, dynamics
and experiments can all use it:

- :func:`lanczos_topk` (block Lanczos, :func:`default_block_size`), :func:`nystrom_topk`
  (randomized Nyström) → :class:`Eigenpairs`;
- :func:`slq_density` (stochastic Lanczos quadrature) → :class:`SpectralDensity`;
- :func:`krylov_actions`: ``f(S)·B`` for several scalar ``f`` sharing one Krylov space (the interval
  exponentials and φ-functions :func:`phi1`, :func:`phi2` of the operators);
- brute-force twins for tests: :func:`dense_topk`, :func:`dense_density`,
  :func:`dense_function`.
"""

from .eigen import Eigenpairs, default_block_size, dense_topk, lanczos_topk, nystrom_topk
from .functions import phi1, phi2
from .krylov import (
                                      KrylovConvergenceError,
                     KrylovInfo,
                     LockstepLanczos,
                     dense_function,
                     krylov_actions,
)
from .slq import SpectralDensity, dense_density, slq_density

__all__ = ["Eigenpairs", "default_block_size", "lanczos_topk", "nystrom_topk", "dense_topk",
           "phi1", "phi2", "KrylovConvergenceError", "KrylovInfo",
           "LockstepLanczos", "krylov_actions", "dense_function", "SpectralDensity",
           "slq_density", "dense_density"]
