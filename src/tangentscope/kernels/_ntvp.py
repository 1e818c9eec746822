"""The ``"ntvp"`` backend: NTK-vector products. ``vjp`` gives the rows ``J(x2)ᵀ e`` of a column
chunk, ``jvp`` applies ``J(x1)`` to them; no per-example Jacobian of ``x1`` is formed.

Forward-mode AD keeps process-global state, so every ``jvp`` runs inside
:func:`tangentscope._utils.forward_ad_section` (two threads never nest it).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from .._utils import forward_ad_section, progress
from ._plan import (
    SAFETY,
    Request,
    WorkFn,
    activation_bytes,
    alloc,
    block_pairs,
    finish,
    write_block,
)
from .functional import Params

__all__ = ["cost", "compute"]


def cost(req: Request) -> WorkFn:
    """Working bytes for chunks ``(c1, c2)``: the ``c2 p`` parameter tangents, the vjp graph and
    the batched jvp's activations."""
    s, P, p = req.itemsize, req.fm.num_params, req.p
    A = activation_bytes(req.fm, req.x1) / s

    def work(c1: int, c2: int) -> int:
        return int(SAFETY * s * (c2 * p * P + c2 * A * (1 + p) + c2 * p * c1 * (A + p)
                                 + c1 * c2 * p * p))
    return work


def compute(req: Request, c: int) -> Tensor | dict[str, Tensor]:
    """The kernel of ``req`` in chunks of ``c`` examples."""
    fm, x1, x2, sym, trace, p = req.fm, req.x1, req.x2, req.symmetric, req.trace, req.p
    grp = req.groups or {"": list(fm.params)}
    dt = fm.dtype
    out = alloc(req)
    with torch.no_grad():
        cur_b, tangents = None, None
        for a, b in progress(block_pairs(req.n1, req.n2, c, sym), desc="eNTK blocks",
                             disable=not req.show_progress or None):
            if cur_b != b.start:
                xb = x2[b]
                vjp_fn = vjp(lambda prm, xb=xb: fm.apply(prm, xb), fm.params)[1]
                cb = xb.shape[0]
                basis = torch.eye(cb * p, dtype=dt, device=fm.device).reshape(cb * p, cb, p)
                tangents = vmap(vjp_fn)(basis)[0]  # name -> (cb p, *shape) = rows of J(x2)
                if req.precondition is not None:
                    tangents = {k: v * req.precondition[k] for k, v in tangents.items()}
                cur_b = b.start
            xa = x1[a]
            assert tangents is not None
            for g, names in grp.items():
                tg = {k: (v if k in names else torch.zeros_like(v)) for k, v in tangents.items()}

                def jvp_one(t: Params, xa: Tensor = xa) -> Tensor:
                    return jvp(lambda prm: fm.apply(prm, xa), (fm.params,), (t,))[1]

                with forward_ad_section():
                    cols = vmap(jvp_one)(tg)  # (cb p, ca, p): cols[j b, i, a] = K[i a, j b]
                ca, cb = xa.shape[0], b.stop - b.start
                blk = cols.reshape(cb, p, ca, p).permute(2, 0, 3, 1)
                if trace:
                    blk = blk.diagonal(dim1=2, dim2=3).sum(-1)
                write_block(out[g], a, b, blk, sym, trace)
    return finish(out, req.groups)
