"""tangentscope: the empirical NTK, output-space training dynamics, the signal channel and the
reservoir, and the population-risk gate (Litman & Guo, 2026) on any PyTorch model.

The core needs only torch, numpy and tqdm; plotting, the web page, Hugging Face and Lightning
integrations are optional extras imported lazily.
"""

from . import losses
from .dynamics import FlowSolution, analytic_jump, eigh_kernel, integrate_flow, squared_loss_flow
from .errors import (ConfigError, KernelTooLargeError, NonFiniteError, ShapeError,
                     TangentscopeError, UnsupportedModelError)
from .io import RunDir
from .kernels import (CrossEntropyLoss, Eigenpairs, EntkOperator, FunctionalModel,
                      PerExampleLoss, SquaredLoss, adam_preconditioner, entk, entk_topk,
                      estimate_memory, flatten_kernel, functionalize, get_loss, lanczos_topk,
                      unflatten_kernel)

__version__ = "0.1.0"

__all__ = [
    "losses", "FlowSolution", "analytic_jump", "eigh_kernel", "integrate_flow",
    "squared_loss_flow", "ConfigError", "KernelTooLargeError", "NonFiniteError", "ShapeError",
    "TangentscopeError", "UnsupportedModelError", "RunDir", "CrossEntropyLoss", "Eigenpairs",
    "EntkOperator", "FunctionalModel", "PerExampleLoss", "SquaredLoss", "adam_preconditioner",
    "entk", "entk_topk", "estimate_memory", "flatten_kernel", "functionalize", "get_loss",
    "lanczos_topk", "unflatten_kernel",
]
