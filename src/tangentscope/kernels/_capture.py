"""Record the layer calls that the structured eNTK can factor, and their output sensitivities.

One forward of a chunk runs under a ``TorchFunctionMode`` that intercepts every torch function
touching a trainable parameter. Calls of the functions with a derivative rule
(:func:`tangentscope.derivatives.rule_for_function`: ``F.linear``, ``F.conv1d/2d``,
``F.embedding``, ``layer_norm``, ``rms_norm``, ``group_norm``, eval-mode ``batch_norm``, and any
registered with :func:`~tangentscope.derivatives.register_rule`) whose parameters sit in the
rule's roles (weight/bias slots) are recorded with what the rule keeps and the autograd edge
of their output ``z`` (not ``z`` itself: its storage is freed as soon as the forward is done
with it, unless autograd saves it); any other use of a parameter (a custom op, a slice,
MultiheadAttention's packed weights, a tie between two kinds of layer) marks that parameter
as *generic*. Then ``p`` backward passes give ``δ = ∂(Σ_i f_a(x_i))/∂z`` for every recorded
``z`` — per example, since examples are independent in eval mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..derivatives import LayerRule, rule_for_function

__all__ = ["Call", "Recording", "record", "sensitivities"]

_METADATA = {"size", "dim", "numel", "shape", "ndim", "dtype", "device", "requires_grad",
             "is_floating_point", "is_complex", "layout", "__len__", "is_leaf", "grad_fn",
             "data_ptr", "element_size", "is_contiguous", "stride", "names", "is_sparse"}


@dataclasses.dataclass
class Call:
    """One recorded layer call.

    Attributes:
        rule: the layer's derivative rule (its ``kind``: ``"linear"``, ``"conv"``,
            ``"embedding"``, ``"norm"``, ...).
        names: role (``"weight"``/``"bias"``) → trainable parameter name, for the roles filled
            by trainable parameters.
        z: the call's output ``(c, ...)``; in a recording with a graph, a ``meta`` tensor of
            its shape and dtype (the values are not kept).
        data: what the rule keeps (:meth:`~tangentscope.derivatives.LayerRule.data`).
        edge: in a recording with a graph, the autograd edge of the output, through which
            :func:`sensitivities` differentiates with respect to it.
    """

    rule: LayerRule
    names: dict[str, str]
    z: Tensor
    data: dict[str, Any]
    edge: GradientEdge | None = None

    @property
    def kind(self) -> str:
        """The rule's layer kind."""
        return self.rule.kind


@dataclasses.dataclass
class Recording:
    """A recorded forward: calls in order, the ``(c, p)`` output and the generic parameters."""

    calls: list[Call]
    out: Tensor
    generic: dict[str, str]  # name -> reason it needs the generic path
    activations: int = 0  # floats of the intermediate outputs with the batch first


def _func_name(func: Any) -> str:
    name = getattr(func, "__name__", "")
    if name in ("__get__", "__set__"):
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


_METADATA_FUNCS: dict[Any, bool] = {}  # memo of a static fact: func -> reads only metadata


def _is_metadata(func: Any) -> bool:
    try:
        return _METADATA_FUNCS[func]
    except KeyError:
        res = _METADATA_FUNCS[func] = _func_name(func) in _METADATA
        return res
    except TypeError:  # unhashable
        return _func_name(func) in _METADATA


class _Recorder(TorchFunctionMode):
    def __init__(self, ids: Mapping[int, str], batch: int, clone: bool, count: bool):
        super().__init__()
        self.ids, self.batch, self.clone, self.count = ids, batch, clone, count
        self.activations = 0
        self.calls: list[Call] = []
        self.generic: dict[str, str] = {}
        self.watch: list[tuple[Tensor, int]] = []
        self.zeros: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def _attach(self, out: Tensor) -> None:
        """Put an output that does not depend on a tracked tensor (the first layer's) into the
        graph without making it a leaf: ``out += 0`` with a zero that requires grad, so that its
        edge is an ``AddBackward`` node, which keeps no tensor (a leaf's edge would keep the
        leaf's storage alive until the graph is freed)."""
        key = (out.dtype, out.device)
        if key not in self.zeros:
            self.zeros[key] = torch.zeros((), dtype=out.dtype, device=out.device,
                                          requires_grad=True)
        out.add_(self.zeros[key])

    def _params_in(self, tree: Any) -> list[str]:
        """Names of the tracked parameters among the leaves of ``tree`` (args and kwargs)."""
        out: list[str] = []
        stack = [tree]
        while stack:
            t = stack.pop()
            if isinstance(t, Tensor):
                if id(t) in self.ids:
                    out.append(self.ids[id(t)])
            elif isinstance(t, (tuple, list)):
                stack.extend(t)
            elif isinstance(t, dict):
                stack.extend(t.values())
            elif t is not None and not isinstance(t, (int, float, bool, str, torch.dtype,
                                                      torch.device, torch.Size)):
                leaves, _ = tree_flatten(t)  # other pytree containers
                stack.extend(x for x in leaves if x is not t)
        return out[::-1]

    def _mark(self, names: list[str], reason: str) -> None:
        for n in names:
            self.generic.setdefault(n, reason)

    def _counted(self, out: Any) -> Any:
        if self.count:
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, Tensor) and t.dim() and t.shape[0] == self.batch and \
                        t.is_floating_point():
                    self.activations += t.numel()
        return out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = rule_for_function(func)
        if rule is None:
            if _is_metadata(func):
                return func(*args, **kwargs)
            self._mark(self._params_in((args, kwargs)),
                       f"it is used by {_func_name(func) or func!r}, which the structured "
                       "path does not factor")
            return self._counted(func(*args, **kwargs))
        b = rule.bind(args, kwargs)
        names = {r: self.ids[id(b[r])] for r in rule.roles
                 if isinstance(b.get(r), Tensor) and id(b[r]) in self.ids}
        others = self._params_in({k: v for k, v in b.items() if k not in names})
        self._mark(others, f"it is an input (not the weight/bias) of {rule.kind}")
        out = self._counted(func(*args, **kwargs))
        if not names:
            return out
        if self.count:  # a plan: what the call is, not its values (no graph, no watch)
            reason = rule.reason(b, self.batch)
            if reason is not None:
                self._mark(list(names.values()), reason)
            else:
                self.calls.append(Call(rule, names, out, rule.data(b)))
            return out
        with torch.no_grad():
            reason = rule.reason(b, self.batch)
            data = rule.data(b) if reason is None else {}
        if reason is not None:
            self._mark(list(names.values()), reason)
            return out
        x = b.get(rule.input_arg)
        if isinstance(x, Tensor):  # kept views of the input must not change after the call
            ptr = x.untyped_storage().data_ptr()
            views = [k for k, v in data.items()
                     if isinstance(v, Tensor) and v.untyped_storage().data_ptr() == ptr]
            if views:
                self.watch.append((x, x._version))
                if self.clone:
                    data = {k: v.clone() if k in views else v for k, v in data.items()}
        if not out.requires_grad:
            self._attach(out)
        self.watch.append((out, out._version))
        self.calls.append(Call(rule, names, out, data))
        return out.clone() if self.clone else out


def record(apply: Callable[[dict[str, Tensor], Tensor], Tensor], params: Mapping[str, Tensor],
           x: Tensor, skip: Collection[str] = (), grad: bool = True) -> Recording:
    """Run ``apply(params, x)`` once, recording factorable layer calls.

    Parameters are passed detached (the graph only links the recorded outputs ``z`` to the
    model output). If the model modifies a recorded tensor in place (``ReLU(inplace=True)``),
    the forward is repeated with recorded tensors cloned.

    Args:
        apply: the model as ``apply(params, x) -> (c, p)``.
        params: trainable parameters ``name -> Tensor``.
        x: a chunk of inputs ``(c, ...)``.
        skip: parameters not to track (already known to need the generic path).
        grad: build the graph from the recorded outputs to the model output, for
            :func:`sensitivities`. Without it (a plan) only the calls are recorded, and the
            floats of every intermediate output with the batch first are counted
            (``Recording.activations``: an upper bound of what autograd saves in the graph).
    """
    prm = {k: v.detach() for k, v in params.items()}
    ids = {id(v): k for k, v in prm.items() if k not in skip}
    for clone in (False, True):
        rec = _Recorder(ids, x.shape[0], clone, count=not grad)
        try:
            with torch.set_grad_enabled(grad), rec:
                out = apply(prm, x)
        except RuntimeError as e:
            if clone or "in-place" not in str(e):
                raise
            continue
        if clone or all(t._version == v for t, v in rec.watch):
            if grad:  # keep the outputs' edges and shapes, not their storage
                for c in rec.calls:
                    c.edge = get_gradient_edge(c.z)
                    c.z = torch.empty_like(c.z, device="meta")
            return Recording(rec.calls, out, rec.generic, rec.activations)
    raise AssertionError("unreachable")


def sensitivities(rec: Recording, p: int, keep: Sequence[bool] | None = None,
                  each: Callable[[int, tuple[Tensor, ...]], None] | None = None
                  ) -> list[Tensor | None]:
    """``δ`` for every recorded call: ``(c, p, *z.shape[1:])``, ``δ[i, a] = ∂f_a(x_i)/∂z_i``.

    Uses one backward per output index with ``Σ_i f_a(x_i)`` (examples are independent).

    Args:
        rec: a recording with its graph (``record(..., grad=True)``).
        p: outputs.
        keep: per call, whether its ``δ`` is returned (None in its place otherwise); default
            all.
        each: ``each(a, grads)`` after the backward pass of output ``a``, with every call's
            ``∂(Σ_i f_a(x_i))/∂z`` ``(c, *z.shape[1:])`` (to reduce them output by output).
    """
    zs = [c.z for c in rec.calls]
    edges = [c.edge for c in rec.calls if c.edge is not None]
    if len(edges) < len(zs):
        raise ValueError("sensitivities need a recording with its graph: record(..., grad=True)")
    out = rec.out
    keep = [True] * len(zs) if keep is None else keep

    def grads(fa: Tensor, retain: bool) -> tuple[Tensor, ...]:
        gs = torch.autograd.grad(fa, edges, retain_graph=retain, allow_unused=True)
        return tuple(torch.zeros(z.shape, dtype=z.dtype, device=out.device) if g is None else g
                     for g, z in zip(gs, zs))

    if p == 1 and out.requires_grad:  # one backward: its gradients are the sensitivities
        with torch.enable_grad():
            f0 = out[:, 0].sum()
        gs = grads(f0, False)
        if each is not None:
            each(0, gs)
        return [g.unsqueeze(1) if k else None for g, k in zip(gs, keep)]
    deltas: list[Tensor | None] = [
        torch.zeros(z.shape[0], p, *z.shape[1:], dtype=z.dtype, device=out.device) if k else None
        for z, k in zip(zs, keep)]  # filled output by output: no list of p copies to stack
    if not out.requires_grad:
        return deltas
    for a in range(p):
        with torch.enable_grad():
            fa = out[:, a].sum()
        gs = grads(fa, a < p - 1)
        for d, g in zip(deltas, gs):
            if d is not None:
                d[:, a] = g
        if each is not None:
            each(a, gs)
        del gs
    return deltas
