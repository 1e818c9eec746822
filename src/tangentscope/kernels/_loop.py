"""The ``"loop"`` backend: plain autograd, one example and one output at a time (no ``vmap``).

Slow, but works for models ``torch.func`` cannot transform: data-dependent Python control flow,
``.item()``, recurrent layers (``nn.LSTM``/``GRU``/``RNN``).
"""

from __future__ import annotations

import torch
from torch import Tensor

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
from .functional import FunctionalModel

__all__ = ["cost", "compute", "jacobian_rows"]


def cost(req: Request) -> WorkFn:
    """Working bytes for chunks ``(c1, c2)``: the Jacobian rows of both chunks."""
    s, P, p = req.itemsize, req.fm.num_params, req.p
    A = activation_bytes(req.fm, req.x1) / s

    def work(c1: int, c2: int) -> int:
        return int(SAFETY * s * ((c1 + c2) * p * P + 2 * A + 2 * P))
    return work


def jacobian_rows(fm: FunctionalModel, x: Tensor) -> dict[str, Tensor]:
    """``name -> (c, p, *shape)`` by ``torch.autograd.grad``, one example and output at a time."""
    params = {k: v.detach().requires_grad_(True) for k, v in fm.params.items()}
    names = list(params)
    rows: dict[str, list[Tensor]] = {k: [] for k in names}
    for i in range(x.shape[0]):
        with torch.enable_grad():
            out = fm.apply(params, x[i:i + 1])[0]
            per_out: dict[str, list[Tensor]] = {k: [] for k in names}
            for a in range(out.shape[0]):
                gs = torch.autograd.grad(out[a], [params[k] for k in names], retain_graph=True,
                                         allow_unused=True)
                for k, gk in zip(names, gs):
                    per_out[k].append(torch.zeros_like(params[k]) if gk is None else gk)
        for k in names:
            rows[k].append(torch.stack(per_out[k]))
    return {k: torch.stack(v) for k, v in rows.items()}


def compute(req: Request, c: int) -> Tensor | dict[str, Tensor]:
    """The kernel of ``req`` in chunks of ``c`` examples."""
    fm, x1, x2, sym, trace = req.fm, req.x1, req.x2, req.symmetric, req.trace
    grp = req.groups or {"": list(fm.params)}
    out = alloc(req)
    for a, b in progress(block_pairs(req.n1, req.n2, c, sym), desc="eNTK blocks",
                         disable=not req.show_progress or None):
        ja = jacobian_rows(fm, x1[a])
        jb = ja if (sym and a == b) else jacobian_rows(fm, x2[b])
        for g, names in grp.items():
            blk = contract(flat_jac(ja, names, req.precondition, 2),
                           flat_jac(jb, names, None, 2), trace)
            write_block(out[g], a, b, blk.detach(), sym, trace)
    return finish(out, req.groups)
