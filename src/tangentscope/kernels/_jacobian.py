"""The ``"jacobian"`` backend: per-example Jacobians by ``vmap(jacrev)``, contracted with one
matmul per block of examples.

Working set per block: the per-parameter Jacobians of both chunks and their flattened copies
``2 (c1 + c2) p P``, the autograd-saved activations of a chunk times ``(1 + p)``, and the
block ``c1 c2 p²``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jacrev, vmap

from .._utils import progress
from ._plan import (
    SAFETY,
    Request,
    WorkFn,
    activation_bytes,
    alloc,
    block_pairs,
    contract,
    finish,
    flat_jac,
    write_block,
)
from .functional import FunctionalModel, Params

__all__ = ["jacobian_floats", "cost", "compute", "per_example_jacobian"]


def jacobian_floats(c1: int, c2: int, p: int, n_params: int, acts: float) -> float:
    """Floats held for a ``c1 × c2`` block of ``n_params`` parameters; ``acts``: saved
    activation floats per example."""
    return (2 * (c1 + c2) * p * n_params + max(c1, c2) * acts * (1 + p) + n_params
            + c1 * c2 * p * p)


def cost(req: Request) -> WorkFn:
    """Working bytes for chunks ``(c1, c2)``."""
    s, P, p = req.itemsize, req.fm.num_params, req.p
    A = activation_bytes(req.fm, req.x1) / s

    def work(c1: int, c2: int) -> int:
        return int(SAFETY * s * jacobian_floats(c1, c2, p, P, A))
    return work


def per_example_jacobian(fm: FunctionalModel, x: Tensor) -> dict[str, Tensor]:
    """``name -> (c, p, *shape)`` per-example Jacobians via ``vmap(jacrev)``."""
    def f(params: Params, xi: Tensor) -> Tensor:
        return fm.apply(params, xi.unsqueeze(0))[0]

    return vmap(jacrev(f), in_dims=(None, 0))(fm.params, x)


def compute(req: Request, c: int) -> Tensor | dict[str, Tensor]:
    """The kernel of ``req`` in chunks of ``c`` examples."""
    fm, x1, x2, sym, trace = req.fm, req.x1, req.x2, req.symmetric, req.trace
    grp = req.groups or {"": list(fm.params)}
    out = alloc(req)
    cur_a, ja = None, None
    with torch.no_grad():
        for a, b in progress(block_pairs(req.n1, req.n2, c, sym), desc="eNTK blocks",
                             disable=not req.show_progress or None):
            if cur_a != a.start:
                ja, cur_a = per_example_jacobian(fm, x1[a]), a.start
            assert ja is not None
            jb = ja if (sym and a == b) else per_example_jacobian(fm, x2[b])
            for g, names in grp.items():
                J1 = flat_jac(ja, names, req.precondition, 2)
                J2 = flat_jac(jb, names, None, 2)
                write_block(out[g], a, b, contract(J1, J2, trace), sym, trace)
    return finish(out, req.groups)
