"""Pruning by a per-parameter saliency: the standard saliencies, neuron scores and masks.

The theory's saliency is the channel score (:mod:`tangentscope.dynamics.channel_score`); the
standard ones it is compared with, all on the *trained* network:

- :func:`magnitude_saliency` — ``|w|`` (global magnitude pruning; Han et al. 2015, the baseline
  Blalock et al. 2020 found hard to beat);
- :func:`snip_saliency` — SNIP's connection sensitivity ``|w ⊙ ∂Φ/∂w|`` (Lee et al. 2019) on the
  training set (SNIP evaluates it at initialization; here at the weights being pruned);
- :func:`obd_saliency` — Optimal Brain Damage with the Gauss–Newton diagonal,
  ``½ w_k² [Jᵀ B J]_{kk}`` (LeCun et al. 1990): the second-order loss increase of removing
  ``w_k`` alone;
- :func:`random_saliency` — the floor.

Then :func:`global_masks` (unstructured: keep the largest saliencies over all weight matrices),
:func:`neuron_saliency` / :func:`neuron_masks` (structured: a hidden unit's saliency is the sum
over its incoming weights, its bias and its outgoing weights; the same fraction of units is
removed in every hidden layer), :func:`apply_masks` and :func:`keep_masked` (re-apply the masks
after every optimizer step while fine-tuning), and :func:`compact_mlp` (the smaller dense network
a neuron mask defines: the size reduction made real). Biases are never pruned on their own;
sparsity counts weight-matrix entries.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from .._utils import eval_mode
from ..errors import ConfigError, ShapeError, UnsupportedModelError

__all__ = ["weight_names", "magnitude_saliency", "snip_saliency", "obd_saliency",
           "random_saliency", "global_masks", "hidden_layers", "neuron_saliency",
           "neuron_masks", "apply_masks", "keep_masked", "sparsity_of", "compact_mlp"]

Saliency = dict[str, Tensor]


def weight_names(model: nn.Module) -> list[str]:
    """Names of the prunable weights: trainable parameters with at least two dimensions."""
    return [k for k, v in model.named_parameters() if v.requires_grad and v.dim() >= 2]


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in model.named_parameters() if v.requires_grad}


def magnitude_saliency(model: nn.Module) -> Saliency:
    """``|w|`` of every trainable parameter."""
    return {k: v.detach().abs().to(torch.float64) for k, v in _trainable(model).items()}


def snip_saliency(model: nn.Module, x: Tensor, y: Tensor) -> Saliency:
    """``|w ⊙ ∇_w Φ|`` with ``Φ = ‖f(x) − y‖²/(2n)`` on the given set (full batch)."""
    params = _trainable(model)
    with eval_mode(model):
        out = model(x)
        loss = 0.5 * (out.reshape(out.shape[0], -1) - y.reshape(y.shape[0], -1)).pow(2).sum(
            1).mean()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {k: (v.detach() * (torch.zeros_like(v) if g is None else g)).abs().to(torch.float64)
            for (k, v), g in zip(params.items(), grads)}


def obd_saliency(model: nn.Module, x: Tensor, hessian: Tensor | None = None, *,
                 chunk_size: int = 64) -> Saliency:
    """Optimal Brain Damage, Gauss–Newton: ``½ w_k² Σ_i [J_iᵀ B_i J_i]_{kk}``.

    Args:
        model: the network; x: ``(n, ...)`` the training inputs.
        hessian: ``(n, p, p)`` loss-Hessian blocks ``B_i`` (default squared loss, ``I/n``).
        chunk_size: examples per batched Jacobian.
    """
    params = {k: v.detach().to(torch.float64) for k, v in _trainable(model).items()}
    frozen = {k: v.detach() for k, v in model.named_parameters() if k not in params}
    bufs = dict(model.named_buffers())
    x = x.to(torch.float64) if x.is_floating_point() else x
    n = x.shape[0]

    def one(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, ({**frozen, **p}, bufs), (xi[None],),
                               tie_weights=True).reshape(-1)

    diag = {k: torch.zeros_like(v) for k, v in params.items()}
    with eval_mode(model):
        for s in range(0, n, chunk_size):
            J = vmap(jacrev(one), in_dims=(None, 0))(params, x[s:s + chunk_size])  # (c, p, ...)
            c, pdim = next(iter(J.values())).shape[:2]
            if hessian is None:
                C = torch.eye(pdim, dtype=torch.float64).expand(c, pdim, pdim) / n ** 0.5
            else:
                B = torch.as_tensor(hessian, dtype=torch.float64)[s:s + c]
                if B.shape != (c, pdim, pdim):
                    raise ShapeError(f"hessian must be (n, p, p) = ({n}, {pdim}, {pdim}), got "
                                     f"{tuple(torch.as_tensor(hessian).shape)}")
                lam, U = torch.linalg.eigh(0.5 * (B + B.transpose(1, 2)))
                C = U * lam.clamp_min(0).sqrt()[:, None, :]             # B = C Cᵀ
            for k, Jk in J.items():
                G = torch.einsum("cab,ca...->cb...", C, Jk)              # Cᵀ J per example
                diag[k] += G.pow(2).sum((0, 1))
    return {k: 0.5 * params[k].pow(2) * diag[k] for k in params}


def random_saliency(model: nn.Module, seed: int = 0) -> Saliency:
    """Independent uniform saliencies (seeded): random pruning."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=gen, dtype=torch.float64)
            for k, v in _trainable(model).items()}


def sparsity_of(masks: Mapping[str, Tensor], names: Sequence[str]) -> float:
    """Fraction of the entries of ``names`` that the masks remove."""
    tot = sum(masks[k].numel() for k in names)
    kept = sum(int(masks[k].sum()) for k in names)
    return 1.0 - kept / tot if tot else 0.0


def global_masks(saliency: Mapping[str, Tensor], sparsity: float,
                 names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Keep the ``1 − sparsity`` largest saliencies over all of ``names`` (default: every
    entry of ``saliency`` with ≥ 2 dimensions); other parameters keep all entries. Ties at
    the threshold are broken by position, so the sparsity is exact.

    Returns:
        name → bool mask for every entry of ``saliency``.

    Raises:
        ConfigError: ``sparsity`` outside ``[0, 1)`` or an unknown name.
    """
    if not 0 <= sparsity < 1:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    names = [k for k, v in saliency.items() if v.dim() >= 2] if names is None else list(names)
    unknown = [k for k in names if k not in saliency]
    if unknown:
        raise ConfigError(f"no saliency for {unknown}; have {sorted(saliency)}")
    flat = torch.cat([saliency[k].reshape(-1).to(torch.float64) for k in names])
    drop = int(round(sparsity * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    if drop:
        keep[torch.argsort(flat, stable=True)[:drop]] = False
    out = {k: torch.ones_like(v, dtype=torch.bool) for k, v in saliency.items()}
    i = 0
    for k in names:
        m = saliency[k].numel()
        out[k] = keep[i:i + m].reshape(saliency[k].shape)
        i += m
    return out


def hidden_layers(model: nn.Module) -> list[tuple[str, str]]:
    """``(layer, next layer)`` name pairs of consecutive ``nn.Linear`` modules in definition
    order: the hidden units of ``layer`` are the rows of its weight and the columns of the next
    layer's weight (an MLP such as :func:`tangentscope.models.mlp`).

    Raises:
        UnsupportedModelError: fewer than two Linear layers, or a next layer whose input size
            is not the layer's output size.
    """
    lin = [(k, m) for k, m in model.named_modules() if isinstance(m, nn.Linear)
           and m.weight.requires_grad]
    if len(lin) < 2:
        raise UnsupportedModelError("structured pruning needs a chain of at least two trainable "
                                    "nn.Linear layers (an MLP); prune unstructured instead")
    out = []
    for (a, ma), (b, mb) in zip(lin, lin[1:]):
        if mb.in_features != ma.out_features:
            raise UnsupportedModelError(f"{b} takes {mb.in_features} inputs but {a} gives "
                                        f"{ma.out_features}: not a chain of Linear layers")
        out.append((a, b))
    return out


def _pname(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def neuron_saliency(model: nn.Module, saliency: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A hidden unit's saliency: the sum over its incoming weights, its bias and its outgoing
    weights (``layer → (width,)``; see :func:`hidden_layers`)."""
    out = {}
    for a, b in hidden_layers(model):
        s = saliency[_pname(a, "weight")].sum(1)
        if _pname(a, "bias") in saliency:
            s = s + saliency[_pname(a, "bias")]
        out[a] = s + saliency[_pname(b, "weight")].sum(0)
    return out


def neuron_masks(model: nn.Module, neurons: Mapping[str, Tensor], fraction: float
                 ) -> dict[str, Tensor]:
    """Remove the ``fraction`` of hidden units with the smallest saliency in every hidden layer
    (incoming row, bias, outgoing column).

    Returns:
        name → bool mask for every trainable parameter.

    Raises:
        ConfigError: ``fraction`` outside ``[0, 1)``.
    """
    if not 0 <= fraction < 1:
        raise ConfigError(f"fraction must be in [0, 1), got {fraction}")
    masks = {k: torch.ones_like(v, dtype=torch.bool) for k, v in _trainable(model).items()}
    for a, b in hidden_layers(model):
        s = neurons[a]
        drop = torch.argsort(s.to(torch.float64), stable=True)[:int(round(fraction * s.numel()))]
        masks[_pname(a, "weight")][drop, :] = False
        if _pname(a, "bias") in masks:
            masks[_pname(a, "bias")][drop] = False
        masks[_pname(b, "weight")][:, drop] = False
    return masks


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Zero the masked-out entries of the model's parameters in place."""
    named = dict(model.named_parameters())
    with torch.no_grad():
        for k, m in masks.items():
            if k not in named:
                raise ConfigError(f"mask for {k!r}, which is not a parameter of the model")
            named[k].mul_(m.to(named[k].dtype))


def keep_masked(optimizer: torch.optim.Optimizer, model: nn.Module,
                masks: Mapping[str, Tensor]) -> Any:
    """Re-apply ``masks`` after every ``optimizer.step()`` (fine-tuning a pruned network);
    returns the hook handle (``.remove()`` it when done)."""
    apply_masks(model, masks)
    return optimizer.register_step_post_hook(lambda *_: apply_masks(model, masks))


def compact_mlp(model: nn.Sequential, masks: Mapping[str, Tensor]) -> nn.Sequential:
    """The smaller dense MLP that a neuron mask (:func:`neuron_masks`) defines: every hidden
    unit whose incoming row is masked out entirely is dropped (its row, bias and the next
    layer's column), the kept entries are copied. On any input it computes what
    ``apply_masks(model, masks)`` computes (a removed unit's outgoing column is zero).

    Args:
        model: an ``nn.Sequential`` of ``nn.Linear`` layers and parameter-free activations
            (:func:`tangentscope.models.mlp`); not modified.
        masks: name → bool mask, as :func:`neuron_masks` returns.

    Returns:
        a new ``nn.Sequential`` with the surviving widths (same dtype and device).

    Raises:
        UnsupportedModelError: ``model`` is not such a chain (:func:`hidden_layers`) or a
            hidden layer would keep no unit.
    """
    if not isinstance(model, nn.Sequential):
        raise UnsupportedModelError("compact_mlp needs an nn.Sequential MLP "
                                    "(tangentscope.models.mlp)")
    pairs = hidden_layers(model)
    if any("." in a or "." in b for a, b in pairs):
        raise UnsupportedModelError("compact_mlp needs the Linear layers as direct children of "
                                    "the nn.Sequential (tangentscope.models.mlp)")
    keep: dict[str, Tensor] = {}
    for a, _ in pairs:
        w = masks.get(_pname(a, "weight"))
        width = cast(nn.Linear, model.get_submodule(a)).out_features
        rows = torch.ones(width, dtype=torch.bool) if w is None else w.reshape(
            w.shape[0], -1).any(1)
        if not bool(rows.any()):
            raise UnsupportedModelError(f"layer {a} keeps no hidden unit; prune a smaller "
                                        f"fraction")
        keep[a] = torch.nonzero(rows).reshape(-1)
    prev: dict[str, str] = {b: a for a, b in pairs}
    small = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in model.named_children():
            if not isinstance(mod, nn.Linear):
                continue
            out_idx = keep.get(name)
            in_idx = keep.get(prev.get(name, ""))
            W = mod.weight.detach() * masks.get(f"{name}.weight", torch.ones((), dtype=torch.bool)
                                                 ).to(mod.weight.dtype)
            W = W if out_idx is None else W[out_idx]
            W = W if in_idx is None else W[:, in_idx]
            lin = nn.Linear(W.shape[1], W.shape[0], bias=mod.bias is not None,
                            dtype=W.dtype, device=W.device)
            lin.weight.copy_(W)
            if mod.bias is not None:
                bm = masks.get(f"{name}.bias", torch.ones((), dtype=torch.bool))
                bias = mod.bias.detach() * bm.to(mod.bias.dtype)
                lin.bias.copy_(bias if out_idx is None else bias[out_idx])
            setattr(small, name, lin)
    return small
