"""tangentscope: the empirical NTK, output-space training dynamics, the signal channel and the
reservoir, and the population-risk gate (Litman & Guo, 2026) on any PyTorch model.

The core needs only torch, numpy and tqdm; plotting, the web page, Hugging Face, Lightning and
TensorBoard integrations are optional extras imported lazily. Symbols and equations:
docs/notation.md; how the code is organized: the README.
"""

from . import data, derivatives, dynamics, kernels, linalg, losses, models, optim
from .dynamics import (
                       FlowSolution,
                       KernelRecorder,
                       KernelTrajectory,
                       analytic_jump,
                       eigh_kernel,
                       integrate_flow,
                       split_channels,
                       squared_loss_flow,
                       window_operators,
)
from .errors import (
                       ConfigError,
                       DamagedFileError,
                       KernelTooLargeError,
                       NonFiniteError,
                       RecoveredFileWarning,
                       ShapeError,
                       TangentscopeError,
                       UnsupportedModelError,
)
from .io import RunDir
from .kernels import (
                       Eigenpairs,
                       EntkOperator,
                       FunctionalModel,
                       StructuredPlan,
                       adam_preconditioner,
                       entk,
                       entk_fn,
                       entk_topk,
                       estimate_memory,
                       flatten_kernel,
                       functionalize,
                       lanczos_topk,
                       select_implementation,
                       structured_plan,
                       unflatten_kernel,
)
from .optim import GatedAdamW, GatedOptimizer, PopulationRiskEstimator, gate

__version__ = "0.1.0"

__all__ = [
    # subpackages
    "data", "derivatives", "dynamics", "kernels", "linalg", "losses", "models", "optim",
    # kernels
    "entk", "entk_fn", "estimate_memory", "select_implementation", "flatten_kernel",
    "unflatten_kernel", "functionalize", "FunctionalModel", "EntkOperator", "entk_topk",
    "lanczos_topk", "Eigenpairs", "adam_preconditioner", "StructuredPlan", "structured_plan",
    # dynamics
    "KernelRecorder", "KernelTrajectory", "window_operators", "split_channels", "FlowSolution",
    "analytic_jump", "eigh_kernel", "integrate_flow", "squared_loss_flow",
    # optimizer
    "GatedAdamW", "GatedOptimizer", "gate", "PopulationRiskEstimator",
    # run directories and errors
    "RunDir", "TangentscopeError", "ConfigError", "ShapeError", "KernelTooLargeError",
    "UnsupportedModelError", "NonFiniteError", "DamagedFileError", "RecoveredFileWarning",
]
