"""Kernels: the empirical NTK, its matrix-free operator, output-space losses, preconditioners."""

from .entk import entk, estimate_memory, flatten_kernel, unflatten_kernel
from .functional import FunctionalModel, functionalize
from .losses import (CrossEntropyLoss, OutputLoss, PerExampleLoss, SquaredLoss, dense_hessian,
                     get_loss, hessian_matvec)
from .operator import EntkOperator, Eigenpairs, entk_topk, lanczos_topk
from .precondition import adam_preconditioner

__all__ = [
    "entk", "estimate_memory", "flatten_kernel", "unflatten_kernel", "FunctionalModel",
    "functionalize", "CrossEntropyLoss", "OutputLoss", "PerExampleLoss", "SquaredLoss",
    "dense_hessian", "get_loss", "hessian_matvec", "EntkOperator", "Eigenpairs", "entk_topk",
    "lanczos_topk", "adam_preconditioner",
]
