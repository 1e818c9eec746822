"""Turn an ``nn.Module`` (or a function) into a pure ``f(params, x) -> (batch, p)``.

Everything in :mod:`tangentscope.kernels` works on a :class:`FunctionalModel`: the trainable
parameters as a dict of tensors, and an ``apply(params, x)`` that returns outputs flattened to
``(batch, p)``. Buffers (BatchNorm running statistics, ...) and frozen parameters are captured
as constants.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import ShapeError, UnsupportedModelError

__all__ = ["FunctionalModel", "functionalize", "param_groups", "flat_dim", "module_lock"]

Params = dict[str, Tensor]

_STOCHASTIC = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
               nn.FeatureAlphaDropout)


@dataclasses.dataclass(frozen=True)
class FunctionalModel:
    """A model as a pure function of its trainable parameters.

    Attributes:
        apply: ``apply(params, x) -> Tensor`` of shape ``(batch, p)``.
        params: trainable parameters, ``name -> Tensor`` (detached copies or views).
        module: the originating ``nn.Module``, if any.
        recurrent: names of its ``nn.LSTM``/``GRU``/``RNN`` submodules (only ``loop`` and
            ``ntvp`` can differentiate those).
    """

    apply: Callable[[Params, Tensor], Tensor]
    params: Params
    module: nn.Module | None = None
    recurrent: tuple[str, ...] = ()

    @property
    def num_params(self) -> int:
        """Total number of trainable scalars ``P``."""
        return sum(t.numel() for t in self.params.values())

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def apply_one(self, params: Params, x: Tensor) -> Tensor:
        """Outputs for a single example ``x`` (no batch dim) → shape ``(p,)``."""
        return self.apply(params, x.unsqueeze(0))[0]

    def output_dim(self, x: Tensor) -> int:
        """``p``, found by evaluating one example of ``x`` (shape ``(batch, ...)``)."""
        with torch.no_grad():
            return self.apply(self.params, x[:1]).shape[1]


_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def module_lock(module: nn.Module) -> threading.RLock:
    """The lock every :func:`functionalize` of ``module`` holds around ``functional_call``.

    ``functional_call`` swaps the module's parameters for the given tensors while it runs, so
    two threads computing kernels of one module at once would see each other's tensors; holding
    this (re-entrant) lock serializes the forwards of one module (the contractions run in
    parallel). Code outside tangentscope that runs the same module concurrently should hold it
    too. The registry holds modules weakly.
    """
    with _LOCKS_GUARD:
        lock = _LOCKS.get(module)
        if lock is None:
            lock = _LOCKS[module] = threading.RLock()
        return lock


def _check_mode(model: nn.Module) -> tuple[str, ...]:
    """Refuse modes where the eNTK is not a per-example, deterministic quantity, judged on every
    submodule's own ``training`` flag (a frozen ``bn.eval()`` inside a train-mode model is fine;
    a train-mode dropout inside an eval-mode model is not). Returns the names of recurrent
    submodules (``nn.LSTM``/``GRU``/``RNN``), which ``vmap`` cannot batch."""
    recurrent = []
    for name, m in model.named_modules():
        where = name or "model"
        if isinstance(m, nn.RNNBase):
            recurrent.append(where)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.training:
                raise UnsupportedModelError(
                    f"{where} is {type(m).__name__} in training mode: it normalizes with batch "
                    "statistics (coupling examples, and updating running stats as a side "
                    "effect). Call model.eval() first so it uses its running statistics.")
            if not m.track_running_stats or m.running_mean is None:
                raise UnsupportedModelError(
                    f"{where} is {type(m).__name__}(track_running_stats=False): it normalizes "
                    "with batch statistics even in eval mode, so examples are coupled. Use a "
                    "BatchNorm with running statistics, or LayerNorm/GroupNorm.")
        if not m.training:
            continue
        if isinstance(m, _STOCHASTIC) and m.p > 0:
            raise UnsupportedModelError(
                f"{where} is {type(m).__name__}(p={m.p}) in training mode: the eNTK of a "
                "stochastic network is not defined. Call model.eval() first (dropout off; or "
                f"{where}.eval()), or set the dropout probability to 0.")
        if isinstance(m, nn.MultiheadAttention) and m.dropout > 0:
            raise UnsupportedModelError(
                f"{where} is MultiheadAttention(dropout={m.dropout}) in training mode; "
                "call model.eval() first.")
    return tuple(recurrent)


def _flatten_out(out: Any, batch: int) -> Tensor:
    if not isinstance(out, Tensor):
        raise ShapeError(f"model returned {type(out).__name__}; tangentscope needs a Tensor of "
                         "outputs (wrap the model so it returns logits/predictions only)")
    if out.dim() == 0 or out.shape[0] != batch:
        raise ShapeError(f"model output has shape {tuple(out.shape)} for a batch of {batch}: the "
                         "first dimension must be the batch; make forward return outputs of "
                         "shape (batch, ...)")
    return out.reshape(batch, -1)


def functionalize(model: nn.Module | Callable[[Params, Tensor], Tensor],
                  params: Mapping[str, Tensor] | None = None, *,
                  dtype: torch.dtype | None = None) -> FunctionalModel:
    """Wrap a module or ``fn(params, x)`` as a :class:`FunctionalModel`.

    Args:
        model: an ``nn.Module`` (its ``requires_grad`` parameters are trainable; other
            parameters and all buffers are constants; its train/eval mode is honoured), or a
            function ``fn(params, x) -> outputs`` with ``params`` given.
        params: for a function model, its parameters. For a module, optionally a subset/override
            of its parameters to differentiate (others become constants).
        dtype: cast parameters, buffers and (inside ``apply``) floating inputs to this dtype,
            e.g. ``torch.float64`` for reference computations. The module is not modified.

    Raises:
        UnsupportedModelError: dropout or BatchNorm in training mode.
        ShapeError: a function model without ``params``.
    """
    if isinstance(model, nn.Module):
        recurrent = _check_mode(model)
        lock = module_lock(model)
        with lock:  # not while another thread's functional_call has swapped the parameters
            every = list(model.named_parameters(remove_duplicate=False))
            named = dict(model.named_parameters())
            buffers = dict(model.named_buffers())
            tied = len(every) != len(named) or len(buffers) != len(
                list(model.named_buffers(remove_duplicate=False)))
        if params is None:
            trainable = {k: v.detach() for k, v in named.items() if v.requires_grad}
        else:
            unknown = set(params) - set(named)
            if unknown:
                raise ShapeError(f"params names not in the model: {sorted(unknown)[:5]}; use "
                                 "names from model.named_parameters()")
            bad = [k for k, v in params.items() if not isinstance(v, Tensor)]
            if bad:
                raise ShapeError(f"params[{bad[0]!r}] is not a tensor: pass the parameters "
                                 "themselves (dict(model.named_parameters()) or a subset)")
            trainable = {k: v.detach() for k, v in params.items()}
        consts = {k: v.detach() for k, v in named.items() if k not in trainable}
        consts.update(buffers)
        if dtype is not None:
            trainable = {k: v.to(dtype) for k, v in trainable.items()}
            consts = {k: v.to(dtype) if v.is_floating_point() else v for k, v in consts.items()}
        if not trainable:
            raise ShapeError("the model has no trainable parameters (all requires_grad=False): "
                             "set requires_grad=True on the parameters to differentiate, or "
                             "pass them with params=")
        module = model

        def apply(p: Params, x: Tensor) -> Tensor:
            if dtype is not None and x.is_floating_point():
                x = x.to(dtype)
            with lock:  # functional_call swaps the module's tensors for the call's duration
                out = functional_call(module, (p, consts), (x,), tie_weights=tied)
            return _flatten_out(out, x.shape[0])

        return FunctionalModel(apply, trainable, module, recurrent)

    if not callable(model):
        raise UnsupportedModelError(f"expected an nn.Module or a callable fn(params, x), got "
                                    f"{type(model).__name__}: pass a module, or a function "
                                    "with params=")
    if not isinstance(params, Mapping) or not all(isinstance(v, Tensor)
                                                  for v in params.values()):
        raise ShapeError("a function model needs its parameters: pass params= as a dict "
                         "name -> tensor (functionalize(fn, params))")
    p0 = {k: (v.detach().to(dtype) if dtype is not None else v.detach()) for k, v in params.items()}
    fn = model

    def apply_fn(p: Params, x: Tensor) -> Tensor:
        if dtype is not None and x.is_floating_point():
            x = x.to(dtype)
        return _flatten_out(fn(p, x), x.shape[0])

    return FunctionalModel(apply_fn, p0, None)


def flat_dim(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def param_groups(names: list[str], groups: Any) -> dict[str, list[str]]:
    """Resolve a grouping spec into ``group -> [param names]`` (order preserved).

    ``groups`` may be ``'layer'`` (by owning module: the name without its last component),
    ``'param'`` (one group per parameter tensor), a callable ``name -> group`` or a mapping
    ``group -> [names]`` (every name must appear exactly once).
    """
    out: dict[str, list[str]] = {}
    if groups == "layer":
        for n in names:
            out.setdefault(n.rsplit(".", 1)[0] if "." in n else n, []).append(n)
    elif groups == "param":
        out = {n: [n] for n in names}
    elif callable(groups):
        for n in names:
            out.setdefault(str(groups(n)), []).append(n)
    elif isinstance(groups, Mapping):
        if not all(isinstance(ns, (list, tuple)) and all(isinstance(n, str) for n in ns)
                   for ns in groups.values()):
            raise ShapeError("a groups mapping must be group -> list of parameter names: pass "
                             "e.g. {'body': ['0.weight', '0.bias'], 'head': ['2.weight', ...]}")
        seen = [n for ns in groups.values() for n in ns]
        missing, extra = set(names) - set(seen), set(seen) - set(names)
        if missing or extra or len(seen) != len(set(seen)):
            raise ShapeError(f"param groups must partition the parameters (list every trainable "
                             f"parameter name exactly once); missing "
                             f"{sorted(missing)[:5]}, unknown {sorted(extra)[:5]}")
        out = {str(g): list(ns) for g, ns in groups.items()}
    else:
        raise ShapeError(f"groups must be 'layer', 'param', a callable or a mapping (use one of "
                         f"them), got "
                         f"{groups!r}")
    return out
