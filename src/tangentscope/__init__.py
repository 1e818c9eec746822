"""tangentscope: the empirical NTK, output-space training dynamics, the signal channel and the
reservoir, and the population-risk gate (Litman & Guo, 2026) on any PyTorch model.

The core needs only torch, numpy and tqdm; plotting, the web page, Hugging Face and Lightning
integrations are optional extras imported lazily.
"""

from . import data, dynamics, losses, models, optim
from .dynamics import (FlowSolution, KernelRecorder, KernelTrajectory, analytic_jump, eigh_kernel,
                       integrate_flow, split_channels, squared_loss_flow, window_operators)
from .errors import (ConfigError, KernelTooLargeError, NonFiniteError, ShapeError,
                     TangentscopeError, UnsupportedModelError)
from .io import RunDir
from .kernels import (CrossEntropyLoss, Eigenpairs, EntkOperator, FunctionalModel,
                      PerExampleLoss, SquaredLoss, adam_preconditioner, entk, entk_topk,
                      estimate_memory, flatten_kernel, functionalize, get_loss, lanczos_topk,
                      unflatten_kernel)
from .kernels.structured import StructuredPlan, structured_plan
from .optim import GatedAdamW, GatedOptimizer, PopulationRiskEstimator, gate

__version__ = "0.1.0"

__all__ = [
    "data", "dynamics", "losses", "models", "optim", "KernelRecorder", "KernelTrajectory",
    "split_channels", "window_operators", "StructuredPlan", "structured_plan", "GatedAdamW",
    "GatedOptimizer", "PopulationRiskEstimator", "gate", "FlowSolution", "analytic_jump", "eigh_kernel", "integrate_flow",
    "squared_loss_flow", "ConfigError", "KernelTooLargeError", "NonFiniteError", "ShapeError",
    "TangentscopeError", "UnsupportedModelError", "RunDir", "CrossEntropyLoss", "Eigenpairs",
    "EntkOperator", "FunctionalModel", "PerExampleLoss", "SquaredLoss", "adam_preconditioner",
    "entk", "entk_topk", "estimate_memory", "flatten_kernel", "functionalize", "get_loss",
    "lanczos_topk", "unflatten_kernel",
]
