"""Matrix-free eNTK: kernel-vector products ``K v = J (D (Jᵀ v))`` and top-k eigenpairs by Lanczos.

Memory is ``O(P + chunk · activations)``: the ``(np, np)`` kernel is never formed, so spectra of
training sets far larger than a dense kernel allows are reachable. The operator is safe to use
from several threads (its ``jvp`` sections hold the process-wide forward-mode lock).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.func import jvp, vjp

from .._utils import forward_ad_section
from ..errors import ConfigError, ShapeError
from ..linalg import Eigenpairs, lanczos_topk
from ._plan import as_input, probe_model, resolve_preconditioner
from .functional import FunctionalModel, functionalize

__all__ = ["EntkOperator", "entk_topk", "lanczos_topk", "Eigenpairs"]  # the last two: linalg's


class EntkOperator:
    """The stacked ``(n p, n p)`` eNTK of ``model`` on ``x`` as a linear operator.

    Args:
        model: module, function model (with ``params``) or FunctionalModel.
        x: inputs ``(n, ...)``.
        params: see :func:`tangentscope.entk`.
        precondition: diagonal ``D`` (dict or flat tensor) for ``J D Jᵀ``.
        dtype: computation dtype.
        chunk_size: examples per vjp/jvp chunk (bounds activation memory); default all.

    ``op @ v`` / ``op.matvec(v)`` with ``v`` of shape ``(n p,)`` or ``(n p, k)``.

    Raises:
        ShapeError, ConfigError, UnsupportedModelError: as :func:`tangentscope.entk` (bad
            inputs, ``chunk_size < 1``, a non-floating ``dtype``, a negative preconditioner, a
            stochastic or batch-coupled model).
    """

    def __init__(self, model: Any, x: Tensor, *, params: Mapping[str, Tensor] | None = None,
                 precondition: Any = None, dtype: torch.dtype | None = None,
                 chunk_size: int | None = None):
        if dtype is not None and (not isinstance(dtype, torch.dtype)
                                  or not dtype.is_floating_point):
            raise ConfigError(f"dtype must be a floating-point torch.dtype, got {dtype!r}: pass "
                              "e.g. dtype=torch.float64, or None for the parameters' dtype")
        if chunk_size is not None and (isinstance(chunk_size, bool)
                                       or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ConfigError(f"chunk_size must be an integer >= 1, got {chunk_size!r}: pass the "
                              "examples per vjp/jvp chunk, or None for all")
        self.fm = model if isinstance(model, FunctionalModel) else functionalize(
            model, params, dtype=dtype)
        self.x = as_input(x, self.fm, dtype, "x")
        self.D = resolve_preconditioner(self.fm, precondition)
        self.n = self.x.shape[0]
        self.p = probe_model(self.fm, self.x, self.x)
        self.chunk = chunk_size or self.n
        self.matvecs = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n * self.p, self.n * self.p)

    @property
    def dtype(self) -> torch.dtype:
        return self.fm.dtype

    def vjp(self, v: Tensor) -> dict[str, Tensor]:
        """``Jᵀ v``, the vector–Jacobian product on the operator's inputs (one backward pass
        per chunk; no preconditioner applied).

        Args:
            v: output-space vector, ``(n, p)`` or stacked ``(n p,)`` (row ``i·p + a``).

        Returns:
            ``name -> (Jᵀ v)[name]``, one tensor shaped like each parameter of ``fm.params``
            (dtype ``self.dtype``).

        Raises:
            ShapeError: ``v`` has neither shape.
        """
        if v.shape not in ((self.n, self.p), (self.n * self.p,)):
            raise ShapeError(f"vjp: v has shape {tuple(v.shape)}; pass an output-space vector "
                             f"of shape ({self.n}, {self.p}) or ({self.n * self.p},)")
        with torch.no_grad():
            return self._jt(v.to(self.dtype).reshape(self.n, self.p))

    def jvp(self, tangent: Mapping[str, Tensor]) -> Tensor:
        """``J t``, the Jacobian–vector product: the first-order output change of the parameter
        step ``t`` (forward mode, held under :func:`tangentscope._utils.forward_ad_section`).

        Args:
            tangent: ``name -> t[name]`` for every parameter of ``fm.params``, each shaped like
                it (other dtypes are cast to ``self.dtype``).

        Returns:
            ``(n, p)`` output change.

        Raises:
            ShapeError: a parameter missing from ``tangent``, an extra name, or a wrong shape.
        """
        names = set(self.fm.params)
        if set(tangent) != names:
            missing, extra = sorted(names - set(tangent)), sorted(set(tangent) - names)
            raise ShapeError(f"jvp: the tangent must name exactly the operator's parameters; "
                             f"missing {missing[:3]}, extra {extra[:3]}")
        t = {}
        for k, p in self.fm.params.items():
            if tangent[k].shape != p.shape:
                raise ShapeError(f"jvp: tangent for {k!r} has shape {tuple(tangent[k].shape)}, "
                                 f"the parameter {tuple(p.shape)}")
            t[k] = tangent[k].detach().to(dtype=p.dtype, device=p.device)
        with torch.no_grad():
            return self._j(t)

    def _jt(self, v: Tensor) -> dict[str, Tensor]:
        """``Jᵀ v`` for ``v`` of shape ``(n, p)`` → parameter-shaped tangent."""
        acc = {k: torch.zeros_like(t) for k, t in self.fm.params.items()}
        for s in range(0, self.n, self.chunk):
            xs = self.x[s:s + self.chunk]
            fn = vjp(lambda prm, xs=xs: self.fm.apply(prm, xs), self.fm.params)[1]
            (g,) = fn(v[s:s + self.chunk])
            for k in acc:
                acc[k] += g[k]
        return acc

    def _j(self, t: Mapping[str, Tensor]) -> Tensor:
        """``J t`` → ``(n, p)``."""
        outs = []
        for s in range(0, self.n, self.chunk):
            xs = self.x[s:s + self.chunk]
            with forward_ad_section():
                outs.append(jvp(lambda prm, xs=xs: self.fm.apply(prm, xs), (self.fm.params,),
                                (dict(t),))[1])
        return torch.cat(outs)

    def matvec(self, v: Tensor) -> Tensor:
        """``K v`` for ``v`` of shape ``(n p,)`` or ``(n p, k)``."""
        if v.shape[0] != self.shape[0]:
            raise ShapeError(f"vector has length {v.shape[0]}, operator is {self.shape}: pass a "
                             f"vector (or columns) of length n p = {self.shape[0]}")
        if v.dim() == 2:
            return torch.stack([self.matvec(v[:, j]) for j in range(v.shape[1])], dim=1)
        self.matvecs += 1
        with torch.no_grad():
            t = self._jt(v.to(self.dtype).reshape(self.n, self.p))
            if self.D is not None:
                t = {k: t[k] * self.D[k] for k in t}
            return self._j(t).reshape(-1)

    __matmul__ = matvec

    def topk(self, k: int, **kw: Any) -> Eigenpairs:
        """Top-``k`` eigenpairs by block Lanczos (:func:`tangentscope.linalg.lanczos_topk`;
        keywords as there)."""
        return lanczos_topk(self.matvec, self.shape[0], k, dtype=self.dtype,
                            device=self.fm.device, **kw)


def entk_topk(model: Any, x: Tensor, k: int, *, params: Mapping[str, Tensor] | None = None,
              precondition: Any = None, dtype: torch.dtype | None = None,
              chunk_size: int | None = None, tol: float = 1e-8, max_iter: int | None = None,
              seed: int = 0) -> Eigenpairs:
    """Top-``k`` eigenpairs of the stacked eNTK on ``x`` without forming it.

    Args:
        model, x, params, precondition, dtype, chunk_size: as :class:`EntkOperator`.
        k: number of eigenpairs.
        tol: stop when every wanted pair has ``‖K v − λ v‖ ≤ tol · λ_max``.
        max_iter: cap on the Lanczos basis size (default ``n p``; ``max_basis`` of
            :func:`tangentscope.linalg.lanczos_topk`).
        seed: start-vector seed.
    """
    op = EntkOperator(model, x, params=params, precondition=precondition, dtype=dtype,
                      chunk_size=chunk_size)
    return op.topk(k, tol=tol, max_basis=max_iter, seed=seed)
