"""Kernels: the empirical NTK (one table of backends), its matrix-free operator, preconditioners.

Output-space losses live in :mod:`tangentscope.losses`.
"""

from .entk import (
    IMPLEMENTATIONS,
    EntkFn,
    Implementation,
    ImplementationChoice,
    MemoryEstimate,
    entk,
    entk_fn,
    estimate_memory,
    flatten_kernel,
    select_implementation,
    unflatten_kernel,
)
from .functional import FunctionalModel, functionalize
from .operator import Eigenpairs, EntkOperator, entk_topk, lanczos_topk
from .precondition import adam_preconditioner
from .structured import StructuredPlan, structured_plan

__all__ = [
    "entk", "entk_fn", "EntkFn", "estimate_memory", "select_implementation",
    "Implementation", "ImplementationChoice", "MemoryEstimate", "IMPLEMENTATIONS", "flatten_kernel",
    "unflatten_kernel", "FunctionalModel", "functionalize", "EntkOperator", "Eigenpairs",
    "entk_topk", "lanczos_topk", "adam_preconditioner", "StructuredPlan", "structured_plan",
]
