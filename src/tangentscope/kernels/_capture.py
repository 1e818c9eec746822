"""Record the layer calls that the structured eNTK can factor, and their output sensitivities.

One forward of a chunk runs under a ``TorchFunctionMode`` that intercepts every torch function
touching a trainable parameter. Calls of ``F.linear``, ``F.conv1d/2d``, ``F.embedding`` and the
affine normalizations (``layer_norm``, ``rms_norm``, ``group_norm``, eval-mode ``batch_norm``)
whose parameters sit in the weight/bias slots are recorded with their inputs and their output
``z``; any other use of a parameter (a custom op, a slice, MultiheadAttention's packed weights, a
tie between two kinds of layer) marks that parameter as *generic*. Then ``p`` backward passes
give ``δ = ∂(Σ_i f_a(x_i))/∂z`` for every recorded ``z`` — per example, since examples are
independent in eval mode.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["Call", "Recording", "record", "sensitivities"]

_METADATA = {"size", "dim", "numel", "shape", "ndim", "dtype", "device", "requires_grad",
             "is_floating_point", "is_complex", "layout", "__len__", "is_leaf", "grad_fn",
             "data_ptr", "element_size", "is_contiguous", "stride", "names", "is_sparse"}


@dataclasses.dataclass
class Call:
    """One recorded layer call.

    Attributes:
        kind: ``"linear"``, ``"conv"``, ``"embedding"`` or ``"norm"``.
        names: role (``"weight"``/``"bias"``) → trainable parameter name, for the roles filled
            by trainable parameters.
        z: the call's output ``(c, ...)``, a node of the recorded graph.
        data: what the factorization needs: ``a`` (input) for linear/conv, conv geometry,
            ``tokens``/``padding_idx`` for embeddings, ``xhat``/``wdims`` for norms.
    """

    kind: str
    names: dict[str, str]
    z: Tensor
    data: dict[str, Any]


@dataclasses.dataclass
class Recording:
    """A recorded forward: calls in order, the ``(c, p)`` output and the generic parameters."""

    calls: list[Call]
    out: Tensor
    generic: dict[str, str]  # name -> reason it needs the generic path
    saved_bytes: int = 0  # bytes autograd saved for the backward (the recorded graph)


def _bind(names: tuple[str, ...], defaults: dict[str, Any], args: tuple, kwargs: dict
          ) -> dict[str, Any]:
    out = dict(defaults)
    out.update(zip(names, args))
    out.update(kwargs)
    return out


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[-1]))


# -- per-op rules: a reason the call cannot be factored (or None), and what to keep --------------
def _batch_reason(x: Tensor, batch: int, min_dim: int) -> str | None:
    if x.dim() < min_dim or x.shape[0] != batch:
        return (f"its input of shape {tuple(x.shape)} is not per-example (batch {batch} first), "
                "e.g. a positional table indexed without the batch")
    return None


def _linear(b: dict, batch: int) -> tuple[str | None, dict]:
    x = b["input"]
    return _batch_reason(x, batch, 2), {"a": x}


def _conv(b: dict, batch: int, nd: int) -> tuple[str | None, dict]:
    x, w = b["input"], b["weight"]
    reason = _batch_reason(x, batch, nd + 2)
    if w.dim() != nd + 2:
        reason = "unexpected weight shape"
    pad = b["padding"]
    ks = tuple(w.shape[2:])
    stride = (b["stride"],) * nd if isinstance(b["stride"], int) else tuple(b["stride"])
    dil = (b["dilation"],) * nd if isinstance(b["dilation"], int) else tuple(b["dilation"])
    if isinstance(pad, str):
        if pad == "valid":
            pads = [(0, 0)] * nd
        else:  # 'same': total d(k-1), the extra element on the right (as ATen does)
            pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(ks, dil)]
    else:
        pt = (pad,) * nd if isinstance(pad, int) else tuple(pad)
        pads = [(q, q) for q in pt]
    if nd == 1:  # as a 2-d convolution over (1, W)
        x, ks, stride, dil, pads = x.unsqueeze(2), (1,) + ks, (1,) + stride, (1,) + dil, \
            [(0, 0)] + pads
    return reason, {"a": x, "kernel": ks, "stride": stride, "dilation": dil, "pads": pads,
                    "groups": int(b["groups"])}


def _embedding(b: dict, batch: int) -> tuple[str | None, dict]:
    x, w = b["input"], b["weight"]
    if b["max_norm"] is not None:
        return "max_norm renormalizes the weight inside forward", {}
    if b["scale_grad_by_freq"]:
        return "scale_grad_by_freq makes its gradient depend on the whole batch", {}
    pad = b["padding_idx"]
    if pad is not None and pad < 0:
        pad += w.shape[0]
    return _batch_reason(x, batch, 1), {"tokens": x, "padding_idx": pad}


def _norm(xhat_fn: Callable[[dict], Tensor], channel_first: bool
          ) -> Callable[[dict, int], tuple[str | None, dict]]:
    def rule(b: dict, batch: int) -> tuple[str | None, dict]:
        x = b["input"]
        reason = _batch_reason(x, batch, 2)
        if b.get("training"):
            reason = "batch statistics couple the examples (training-mode batch_norm)"
        if reason:
            return reason, {}
        wd = 1 if channel_first else len(tuple(b["normalized_shape"]))
        return None, {"xhat": xhat_fn(b), "channel_first": channel_first, "wdims": wd}
    return rule


@dataclasses.dataclass(frozen=True)
class _Spec:
    kind: str
    arg_names: tuple[str, ...]
    defaults: dict[str, Any]
    rule: Callable[[dict, int], tuple[str | None, dict]]
    roles: tuple[str, ...] = ("weight", "bias")


_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEF = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_SPECS: dict[Any, _Spec] = {
    F.linear: _Spec("linear", ("input", "weight", "bias"), {"bias": None}, _linear),
    F.conv1d: _Spec("conv", _CONV, _CONV_DEF, lambda b, n: _conv(b, n, 1)),
    F.conv2d: _Spec("conv", _CONV, _CONV_DEF, lambda b, n: _conv(b, n, 2)),
    F.embedding: _Spec("embedding", ("input", "weight", "padding_idx", "max_norm", "norm_type",
                                     "scale_grad_by_freq", "sparse"),
                       {"padding_idx": None, "max_norm": None, "scale_grad_by_freq": False},
                       _embedding, ("weight",)),
    F.layer_norm: _Spec("norm", ("input", "normalized_shape", "weight", "bias", "eps"),
                        {"weight": None, "bias": None, "eps": 1e-5},
                        _norm(lambda b: F.layer_norm(b["input"], b["normalized_shape"],
                                                     eps=b["eps"]), False)),
    F.group_norm: _Spec("norm", ("input", "num_groups", "weight", "bias", "eps"),
                        {"weight": None, "bias": None, "eps": 1e-5},
                        _norm(lambda b: F.group_norm(b["input"], b["num_groups"],
                                                     eps=b["eps"]), True)),
    F.batch_norm: _Spec("norm", ("input", "running_mean", "running_var", "weight", "bias",
                                 "training", "momentum", "eps"),
                        {"weight": None, "bias": None, "training": False, "eps": 1e-5},
                        _norm(lambda b: F.batch_norm(b["input"], b["running_mean"],
                                                     b["running_var"], eps=b["eps"]), True)),
}
if hasattr(F, "rms_norm"):
    _SPECS[F.rms_norm] = _Spec("norm", ("input", "normalized_shape", "weight", "eps"),
                               {"weight": None, "eps": None},
                               _norm(lambda b: F.rms_norm(b["input"], b["normalized_shape"],
                                                          eps=b["eps"]), False), ("weight",))


def _func_name(func: Any) -> str:
    name = getattr(func, "__name__", "")
    if name in ("__get__", "__set__"):
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


class _Recorder(TorchFunctionMode):
    def __init__(self, ids: Mapping[int, str], batch: int, clone: bool):
        super().__init__()
        self.ids, self.batch, self.clone = ids, batch, clone
        self.calls: list[Call] = []
        self.generic: dict[str, str] = {}
        self.watch: list[tuple[Tensor, int]] = []

    def _params_in(self, tree: Any) -> list[str]:
        leaves, _ = tree_flatten(tree)
        return [self.ids[id(t)] for t in leaves if isinstance(t, Tensor) and id(t) in self.ids]

    def _mark(self, names: list[str], reason: str) -> None:
        for n in names:
            self.generic.setdefault(n, reason)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        spec = _SPECS.get(func)
        if spec is None:
            if _func_name(func) not in _METADATA:
                self._mark(self._params_in((args, kwargs)),
                           f"it is used by {_func_name(func) or func!r}, which the structured "
                           "path does not factor")
            return func(*args, **kwargs)
        b = _bind(spec.arg_names, spec.defaults, args, kwargs)
        names = {r: self.ids[id(b[r])] for r in spec.roles
                 if isinstance(b.get(r), Tensor) and id(b[r]) in self.ids}
        others = self._params_in({k: v for k, v in b.items() if k not in names})
        self._mark(others, f"it is an input (not the weight/bias) of {spec.kind}")
        out = func(*args, **kwargs)
        if not names:
            return out
        with torch.no_grad():
            reason, data = spec.rule(b, self.batch)
        if reason is not None:
            self._mark(list(names.values()), reason)
            return out
        for key in ("a", "tokens"):
            if key in data:
                self.watch.append((b["input"], b["input"]._version))
                data[key] = data[key].detach().clone() if self.clone else data[key].detach()
        if not out.requires_grad:
            out.requires_grad_(True)
        self.watch.append((out, out._version))
        self.calls.append(Call(spec.kind, names, out, data))
        return out.clone() if self.clone else out


def record(apply: Callable[[dict[str, Tensor], Tensor], Tensor], params: Mapping[str, Tensor],
           x: Tensor, count_saved: bool = False, skip: Collection[str] = ()) -> Recording:
    """Run ``apply(params, x)`` once, recording factorable layer calls.

    Parameters are passed detached (the graph only links the recorded outputs ``z`` to the
    model output). If the model modifies a recorded tensor in place (``ReLU(inplace=True)``),
    the forward is repeated with recorded tensors cloned.

    Args:
        apply: the model as ``apply(params, x) -> (c, p)``.
        params: trainable parameters ``name -> Tensor``.
        x: a chunk of inputs ``(c, ...)``.
        count_saved: measure the bytes autograd saves (``Recording.saved_bytes``).
        skip: parameters not to track (already known to need the generic path).
    """
    prm = {k: v.detach() for k, v in params.items()}
    ids = {id(v): k for k, v in prm.items() if k not in skip}
    saved = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    for clone in (False, True):
        rec, saved = _Recorder(ids, x.shape[0], clone), 0
        try:
            with torch.enable_grad(), rec, (torch.autograd.graph.saved_tensors_hooks(
                    pack, lambda t: t) if count_saved else contextlib.nullcontext()):
                out = apply(prm, x)
        except RuntimeError as e:
            if clone or "in-place" not in str(e):
                raise
            continue
        if clone or all(t._version == v for t, v in rec.watch):
            return Recording(rec.calls, out, rec.generic, saved)
    raise AssertionError("unreachable")


def sensitivities(rec: Recording, p: int) -> list[Tensor]:
    """``δ`` for every recorded call: ``(c, p, *z.shape[1:])``, ``δ[i, a] = ∂f_a(x_i)/∂z_i``.

    Uses one backward per output index with ``Σ_i f_a(x_i)`` (examples are independent).
    """
    zs = [c.z for c in rec.calls]
    out = rec.out
    per_a: list[list[Tensor]] = [[] for _ in zs]
    if not out.requires_grad:
        return [torch.zeros(z.shape[0], p, *z.shape[1:], dtype=z.dtype, device=z.device)
                for z in zs]
    for a in range(p):
        with torch.enable_grad():
            fa = out[:, a].sum()
        gs = torch.autograd.grad(fa, zs, retain_graph=a < p - 1, allow_unused=True,
                                 materialize_grads=True)
        for k, g in enumerate(gs):
            per_a[k].append(g)
    return [g[0].unsqueeze(1) if p == 1 else torch.stack(g, dim=1) for g in per_a]
