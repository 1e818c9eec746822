"""Per-example gradient statistics of single layers, in closed form (used by
:class:`~tangentscope.optim.stats.PerExampleStats`).

Each layer type turns its saved input ``x`` and its output gradient ``δ`` into ``Σ_i c_i²``
(sum over examples of squared per-example gradients), ``Σ_i c_i`` and, where a parameter is used
more than once per forward, the per-example gradients ``(b, *shape)`` themselves. A Linear layer
applied once per example needs one extra matmul, ``(δ²)ᵀ(a²)``; with a sequence dimension the
pair expansion or chunked per-example products are used; Conv layers unfold to a Linear layer;
Embedding sums repeated tokens per example; normalization layers use ``Σ δ x̂``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import UnsupportedModelError

__all__ = ["supported_modules"]


def _acc_dtype(p: Tensor) -> torch.dtype:
    """Accumulation dtype: float32 for half-precision parameters."""
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def _seq_linear_sq(a: Tensor, d: Tensor, pair_limit: int, chunk_bytes: int) -> Tensor:
    """``Σ_i (d_iᵀ a_i)²`` elementwise for ``a (b, L, in)``, ``d (b, L, out)`` → ``(out, in)``.

    ``L = 1``: one matmul ``(d²)ᵀ(a²)``. Small ``L``: the pair expansion
    ``Σ_{l,l'} (d_l d_l')ᵀ (a_l a_l')`` as one matmul over ``L(L+1)/2`` symmetric pairs.
    Otherwise per-example ``d_iᵀ a_i`` by batched matmul, in chunks of ``chunk_bytes``.
    """
    b, L, n_in = a.shape
    n_out = d.shape[2]
    if L == 1:
        return (d[:, 0] ** 2).T @ (a[:, 0] ** 2)
    if L * (L + 1) // 2 <= pair_limit:
        iu, ju = torch.triu_indices(L, L, device=a.device)
        w = torch.where(iu == ju, 1.0, 2.0).to(a.dtype)
        dd = (d[:, iu] * d[:, ju]).reshape(-1, n_out)
        aa = (a[:, iu] * a[:, ju] * w[None, :, None]).reshape(-1, n_in)
        return dd.T @ aa
    out = torch.zeros(n_out, n_in, dtype=a.dtype, device=a.device)
    step = max(1, chunk_bytes // max(1, n_out * n_in * a.element_size()))
    for s in range(0, b, step):
        g = torch.bmm(d[s:s + step].transpose(1, 2), a[s:s + step])
        out += g.square_().sum(0)
    return out


def _seq_linear_per_example(a: Tensor, d: Tensor) -> Tensor:
    """Per-example ``d_iᵀ a_i`` → ``(b, out, in)``."""
    return torch.bmm(d.transpose(1, 2), a)


def _flat_seq(t: Tensor) -> Tensor:
    """``(b, ..., f)`` → ``(b, L, f)`` with ``L`` the product of the middle dims."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


class _Layer:
    """Per-example gradients of one module type's parameters.

    ``prepare(module, x, δ)`` turns the saved input and the output gradient into the layer's
    working form (called in backward); ``sq``/``total``/``per_example`` then give
    ``Σ_i c_i²``, ``Σ_i c_i`` (shaped like the parameter) and ``(b, *shape)``.
    """

    attrs: tuple[str, ...] = ("weight", "bias")

    def check(self, module: nn.Module, name: str) -> None:
        """Raise (at construction / in forward) where per-example gradients do not exist."""

    def prepare(self, module: nn.Module, x: Tensor, d: Tensor) -> tuple[Any, Tensor]:
        raise NotImplementedError

    def per_example(self, module: nn.Module, attr: str, a: Any, d: Tensor) -> Tensor:
        raise NotImplementedError

    def sq(self, module: nn.Module, attr: str, a: Any, d: Tensor) -> Tensor:
        return self.per_example(module, attr, a, d).square_().sum(0)

    def total(self, module: nn.Module, attr: str, a: Any, d: Tensor) -> Tensor:
        return self.per_example(module, attr, a, d).sum(0)


class _Linear(_Layer):
    """``y = a Wᵀ + b`` over any middle (sequence) dims; Conv layers reduce to it by unfolding."""

    def __init__(self, pair_limit: int, chunk_bytes: int):
        self.pair_limit, self.chunk_bytes = pair_limit, chunk_bytes

    def prepare(self, module: nn.Module, x: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        return _flat_seq(x), _flat_seq(d)

    def _shape(self, module: nn.Module, attr: str, t: Tensor) -> Tensor:
        return t.reshape(t.shape[:-2] + getattr(module, attr).shape) if attr == "weight" else t

    def per_example(self, module: nn.Module, attr: str, a: Tensor, d: Tensor) -> Tensor:
        if attr == "bias":
            return d.sum(1)
        return self._shape(module, attr, _seq_linear_per_example(a, d))

    def sq(self, module: nn.Module, attr: str, a: Tensor, d: Tensor) -> Tensor:
        if attr == "bias":
            return d.sum(1).square_().sum(0)
        return self._shape(module, attr, _seq_linear_sq(a, d, self.pair_limit, self.chunk_bytes))

    def total(self, module: nn.Module, attr: str, a: Tensor, d: Tensor) -> Tensor:
        if attr == "bias":
            return d.sum((0, 1))
        return self._shape(module, attr, d.reshape(-1, d.shape[-1]).T @ a.reshape(-1, a.shape[-1]))


class _Conv(_Linear):
    """``Conv1d``/``Conv2d`` (``groups = 1``, zero padding) as a Linear layer on unfolded
    patches: ``a (b, L, C·k)``, ``δ (b, L, out)``."""

    def check(self, module: nn.Module, name: str) -> None:
        if module.groups != 1 or module.padding_mode != "zeros" or \
                isinstance(module.padding, str) and module.padding != "valid":
            raise UnsupportedModelError(
                f"{name}: {type(module).__name__}(groups={module.groups}, padding="
                f"{module.padding!r}, padding_mode={module.padding_mode!r}) has no closed form "
                "here (supported: groups=1, zero padding given as numbers). Use VmapStats(model, "
                "loss_fn) or the streaming gate for this model.")

    def prepare(self, module: nn.Module, x: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        pad = (0,) * len(module.kernel_size) if module.padding == "valid" else module.padding
        if isinstance(module, nn.Conv1d):
            x, d = x.unsqueeze(2), d.unsqueeze(2)
            k, dil, pad, st = ((1,) + tuple(module.kernel_size), (1,) + tuple(module.dilation),
                               (0,) + tuple(pad), (1,) + tuple(module.stride))
        else:
            k, dil, st = module.kernel_size, module.dilation, module.stride
        cols = F.unfold(x, k, dilation=dil, padding=pad, stride=st)   # (b, C·k, L)
        return cols.transpose(1, 2), d.flatten(2).transpose(1, 2)


class _Embedding(_Layer):
    """Rows ``W[tok]``: per-example gradient of row ``v`` is ``Σ_{l: tok_l = v} δ_l``."""

    attrs = ("weight",)

    def check(self, module: nn.Module, name: str) -> None:
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            raise UnsupportedModelError(
                f"{name}: Embedding(max_norm={module.max_norm}, scale_grad_by_freq="
                f"{module.scale_grad_by_freq}, sparse={module.sparse}) is not supported (sparse "
                "gradients and in-forward renormalization have no per-example closed form); "
                "use a plain nn.Embedding, or the streaming gate.")

    def prepare(self, module: nn.Module, x: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        b = x.shape[0]
        tok = x.reshape(b, -1)
        d = d.reshape(b, tok.shape[1], -1)
        if module.padding_idx is not None:
            d = d * (tok != module.padding_idx).unsqueeze(-1).to(d.dtype)
        return tok, d

    def _keys(self, module: nn.Module, tok: Tensor) -> Tensor:
        rows = torch.arange(tok.shape[0], device=tok.device)[:, None] * module.num_embeddings
        return (rows + tok).reshape(-1)

    def per_example(self, module: nn.Module, attr: str, tok: Tensor, d: Tensor) -> Tensor:
        b, V, D = tok.shape[0], module.num_embeddings, d.shape[-1]
        out = torch.zeros(b * V, D, dtype=d.dtype, device=d.device)
        out.index_add_(0, self._keys(module, tok), d.reshape(-1, D))
        return out.view(b, V, D)

    def sq(self, module: nn.Module, attr: str, tok: Tensor, d: Tensor) -> Tensor:
        V, D = module.num_embeddings, d.shape[-1]
        out = torch.zeros(V, D, dtype=d.dtype, device=d.device)
        flat = d.reshape(-1, D)
        if tok.shape[1] == 1:
            return out.index_add_(0, tok.reshape(-1), flat * flat)
        uniq, inv = torch.unique(self._keys(module, tok), return_inverse=True)
        seg = torch.zeros(uniq.shape[0], D, dtype=d.dtype, device=d.device).index_add_(0, inv,
                                                                                       flat)
        return out.index_add_(0, uniq % V, seg.square_())

    def total(self, module: nn.Module, attr: str, tok: Tensor, d: Tensor) -> Tensor:
        D = d.shape[-1]
        out = torch.zeros(module.num_embeddings, D, dtype=d.dtype, device=d.device)
        return out.index_add_(0, tok.reshape(-1), d.reshape(-1, D))


class _Norm(_Layer):
    """Elementwise affine after a normalization: ``y = x̂ γ + β`` (LayerNorm, RMSNorm,
    eval-mode BatchNorm). Per-example ``∂γ = Σ δ x̂``, ``∂β = Σ δ`` over the non-affine dims."""

    def prepare(self, module: nn.Module, x: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        xh = self.normalize(module, x.to(d.dtype))
        b = x.shape[0]
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            C = x.shape[1]
            return xh.reshape(b, C, -1).transpose(1, 2), d.reshape(b, C, -1).transpose(1, 2)
        n = math.prod(module.normalized_shape)
        return xh.reshape(b, -1, n), d.reshape(b, -1, n)

    def normalize(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def per_example(self, module: nn.Module, attr: str, xh: Tensor, d: Tensor) -> Tensor:
        g = (d * xh).sum(1) if attr == "weight" else d.sum(1)
        return g.reshape((g.shape[0],) + getattr(module, attr).shape)


class _LayerNorm(_Norm):
    def normalize(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


class _RMSNorm(_Norm):
    attrs = ("weight",)

    def normalize(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.rms_norm(x, module.normalized_shape, None, module.eps)


class _BatchNormEval(_Norm):
    def check(self, module: nn.Module, name: str) -> None:
        if module.training or not module.track_running_stats:
            raise UnsupportedModelError(
                f"{name} is {type(module).__name__} normalizing with batch statistics (training "
                "mode): examples interact, so per-example gradients are not defined. Call "
                "model.eval() for it, replace it with LayerNorm/GroupNorm, or use "
                "MicrobatchStats / the streaming gate.")

    def normalize(self, module: nn.Module, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - module.running_mean.view(shape).to(x.dtype)) * torch.rsqrt(
            module.running_var.view(shape).to(x.dtype) + module.eps)


def supported_modules() -> tuple[type, ...]:
    """Module types :class:`PerExampleStats` has closed forms for."""
    out: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LayerNorm,
                             nn.modules.batchnorm._BatchNorm)
    return out + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _layer_for(module: nn.Module, pair_limit: int, chunk_bytes: int) -> _Layer | None:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return _Conv(pair_limit, chunk_bytes)
    if isinstance(module, nn.Linear):
        return _Linear(pair_limit, chunk_bytes)
    if isinstance(module, nn.Embedding):
        return _Embedding()
    if isinstance(module, nn.LayerNorm):
        return _LayerNorm()
    if hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm):
        return _RMSNorm()
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return _BatchNormEval()
    return None
