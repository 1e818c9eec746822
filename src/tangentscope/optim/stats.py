"""Where the gate's gradient statistics come from.

``p.grad`` holds one number per coordinate: the gradient *estimate* ``ĝ = Σ_i c_i`` summed from
``b`` contributions ``c_i`` (one per example, or one per microbatch). The gate needs its noise
variance ``ν = Var[ĝ]`` (:func:`~tangentscope.optim.transforms.noise_variance`), i.e. the sums
``S1 = Σ_i c_i``, ``S2 = Σ_i c_i²`` and ``b``, which a :class:`StatsSource` collects while
``loss.backward()`` runs:

* :class:`PerExampleStats` — exact, per-example, from the closed forms of the derivative
  rules (:mod:`tangentscope.derivatives`: ``Linear``, ``Embedding``, ``Conv1d/2d`` with groups
  and any padding mode, ``LayerNorm``, ``RMSNorm``, ``GroupNorm``, eval-mode ``BatchNorm``,
  Hugging Face's GPT-2 ``Conv1D`` and Llama/Mistral/Qwen2 RMSNorm (once ``transformers`` is
  imported), layers added with :func:`~tangentscope.derivatives.register_rule`): per parameter
  ``Σ_i c_i²`` from each layer's inputs and output gradients (BackPACK's SumGradSquared idea),
  without materializing per-example gradients where a closed form exists (a Linear layer
  applied once per example: ``Σ_i c_i² = (δ²)ᵀ(a²)``). Tied or reused weights are summed per
  example before squaring.
* :class:`VmapStats` — exact, per-example, by ``torch.func.vmap(grad)``: any model, the
  brute-force twin of :class:`PerExampleStats` (it stores every per-example gradient of a
  chunk, which is its cost).
* :class:`MicrobatchStats` — one contribution per ``backward()`` (gradient accumulation, e.g.
  Hugging Face ``gradient_accumulation_steps``), recovered with
  ``Tensor.register_post_accumulate_grad_hook`` as the difference of successive ``p.grad``.
* *streaming* (no object: ``GatedAdamW(stats="streaming")``) — an EMA of squared deviations of
  successive ``p.grad`` inside the optimizer; see :mod:`.transforms`.

**Loss scaling.** The contributions are whatever ``backward()`` accumulates: for
``loss = mean_i ℓ_i`` they are ``c_i = ∇ℓ_i / b``; for ``sum`` they are ``∇ℓ_i``; for HF
gradient accumulation (``loss / M`` per microbatch) they are ``∇(microbatch mean)/M``. The
gate is invariant to any common scale (``ĝ²`` and ``ν̂`` scale alike), and ``ν̂`` is always in
``p.grad²`` units, so mean vs sum changes nothing as long as every contribution has the same
scale (equal-size microbatches). Examples must not interact (no train-mode BatchNorm) and the
loss must be a sum/mean over examples.

**Distributed data parallel.** Under an initialized ``torch.distributed`` group with more
than one rank (``distributed=None`` → auto), every source reduces its sums across ranks at
:meth:`~StatsSource.collect` (DDP averages gradients, so each rank's contribution enters as
``c/R``): all ranks gate on the same global statistics and stay identical.

**Skipped steps.** A backward that starts on cleared gradients (``zero_grad()`` after a
``GradScaler`` skipped ``step()`` on overflow) drops the sums no optimizer step consumed.

Usage::

    stats = PerExampleStats(model)                  # hooks the model
    opt = GatedAdamW(model.parameters(), stats=stats)
    loss = F.cross_entropy(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..derivatives import LayerRule, registered_modules, rule_for_module
from ..errors import ConfigError, ShapeError, UnsupportedModelError
from ._layers import ParamState, acc_dtype, check_total, contributions, graph_task
from .transforms import loo_decrease, noise_variance

__all__ = ["GradMoments", "StatsSource", "PerExampleStats", "VmapStats", "MicrobatchStats",
           "per_example_moments", "supported_modules"]


@dataclasses.dataclass(frozen=True)
class GradMoments:
    """Sums of gradient contributions of one parameter over one optimizer step.

    Attributes:
        grad_sum: ``S1 = Σ_i c_i``, shaped like the parameter (equals ``p.grad`` as left by
            ``backward()``).
        grad_sq_sum: ``S2 = Σ_i c_i²`` (elementwise), shaped like the parameter.
        count: ``b``, the number of contributions.
        source: ``'per-example'`` or ``'microbatch'``.
    """

    grad_sum: Tensor
    grad_sq_sum: Tensor
    count: int
    source: str = "per-example"

    def noise_variance(self) -> Tensor:
        """``ν̂ = Var[ĝ]`` estimate, ``(b S2 − S1²)/(b−1)`` (units ``p.grad²``)."""
        return noise_variance(self.grad_sum, self.grad_sq_sum, self.count)

    def loo_decrease(self) -> Tensor:
        """Leave-one-out held-out decrease ``S1² − ν̂`` per coordinate."""
        return loo_decrease(self.grad_sum, self.grad_sq_sum, self.count)


class StatsSource:
    """Base class: collects :class:`GradMoments` for ``self.params`` during ``backward()``.

    A source is consumed by ``GatedAdamW.step()`` / ``GatedOptimizer.step()``: they call
    :meth:`collect` and then :meth:`reset`. Use :meth:`remove` (or a ``with`` block) to detach
    its hooks.
    """

    kind = "per-example"

    def __init__(self) -> None:
        self.params: list[Tensor] = []
        self._names: dict[int, str] = {}
        self._handles: list[Any] = []

    # bookkeeping shared by the sources
    def _name(self, p: Tensor) -> str:
        return self._names.get(id(p), f"<parameter {tuple(p.shape)}>")

    def collect(self) -> dict[int, GradMoments]:
        """``id(param) -> GradMoments`` for every parameter that received gradient since the
        last :meth:`reset`."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything collected (called by the optimizer after each step)."""
        raise NotImplementedError

    def remove(self) -> None:
        """Detach all hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> StatsSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def supported_modules() -> tuple[type, ...]:
    """Module types :class:`PerExampleStats` has closed forms for (the registered derivative
    rules, :func:`tangentscope.derivatives.register_rule`)."""
    return registered_modules()


def _world(distributed: bool | None, group: Any, who: str) -> int:
    """Ranks to reduce over: 1 unless ``torch.distributed`` is initialized with several."""
    if distributed is False:
        return 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if distributed:
            raise ConfigError(f"{who}(distributed=True) but torch.distributed is not "
                              "initialized: call torch.distributed.init_process_group first")
        return 1
    return dist.get_world_size(group)


def _all_reduce(parts: Sequence[Tensor], group: Any) -> list[Tensor]:
    """Sum ``parts`` over the ranks with one flat all-reduce (same order on every rank)."""
    import torch.distributed as dist

    dtype = torch.promote_types(parts[0].dtype, torch.float32) if parts else torch.float32
    flat = torch.cat([t.reshape(-1).to(dtype) for t in parts])
    dist.all_reduce(flat, group=group)
    out, i = [], 0
    for t in parts:
        out.append(flat[i:i + t.numel()].view(t.shape).to(t.dtype))
        i += t.numel()
    return out


def _reduce_moments(params: Sequence[Tensor], local: dict[int, tuple[Tensor, Tensor, int]],
                    R: int, group: Any, source: str) -> dict[int, GradMoments]:
    """Global moments from each rank's ``id(p) -> (S1, S2, b)``: ``S1/R``, ``S2/R²``, ``Σ b``
    (DDP averages ranks). Every rank reduces every parameter, in ``params`` order."""
    if R == 1:
        return {k: GradMoments(s1, s2, b, source) for k, (s1, s2, b) in local.items()}
    parts: list[Tensor] = []
    for p in params:
        s1, s2, _ = local.get(id(p), (None, None, 0))
        z = torch.zeros(p.shape, dtype=acc_dtype(p), device=p.device)
        parts += [z if s1 is None else s1, z if s2 is None else s2]
    counts = torch.tensor([float(local.get(id(p), (None, None, 0))[2]) for p in params],
                          dtype=torch.float64, device=params[0].device if params else None)
    *sums, counts = _all_reduce([*parts, counts], group)
    out = {}
    for j, p in enumerate(params):
        b = int(round(float(counts[j])))
        if b > 0:
            out[id(p)] = GradMoments(sums[2 * j] / R, sums[2 * j + 1] / (R * R), b, source)
    return out


# =================================================================================================
# Closed-form per-example statistics (the per-layer math lives in tangentscope.derivatives)
# =================================================================================================
class PerExampleStats(StatsSource):
    """Exact per-example gradient statistics from the closed forms of the model's layers.

    Hooks every layer of ``model`` that has a derivative rule (:func:`supported_modules`;
    add one with :func:`tangentscope.derivatives.register_rule`). During each
    ``loss.backward()`` it adds ``Σ_i c_i²`` of every parameter to a running sum; a parameter
    used once per forward (the common case) never has its per-example gradients materialized;
    a tied or reused parameter (several uses per forward) gets them summed over its uses per
    example, then squared. Cost: see ``benchmarks/optim.py``.

    Args:
        model: the module whose trainable parameters the optimizer steps.
        validate: on the first backward, check that the hooked contributions add up to
            ``p.grad`` for every parameter (catches weights used outside their module, e.g. a
            tied head via ``F.linear``), raising :class:`UnsupportedModelError` if not. The
            tolerance follows the compute dtype (autocast included), with a rounding floor
            for gradients that vanish analytically (BERT's attention key bias); a mismatch of
            rounding size is reported as such, not as a weight used outside its module.
        pair_limit: sequence inputs with ``L(L+1)/2 ≤ pair_limit`` use the one-matmul pair
            expansion instead of materializing per-example weight gradients.
        chunk_bytes: working-memory cap for materialized per-example gradients of one layer;
            the default (1 MiB) keeps each chunk cache-resident: on a 2-layer transformer at
            b = 128 it is 2.0× plain backward vs 4.2× with 64 MiB chunks.
        broadcast: names of modules always called without a batch dimension (e.g. ``"pos"``
            for ``self.pos(torch.arange(L))``). Such a call's output is expanded to an explicit
            batch dimension (same values, so the model computes the same thing) so that its
            gradient is per-example. Calls whose input's first dimension differs from the
            model's batch size (first tensor argument of ``model``) are detected
            automatically; list a module here when its input could coincide with the batch
            size (a position-id vector of length ``L = b``).
        distributed: reduce the sums across ranks at :meth:`collect` (None: when
            ``torch.distributed`` is initialized with more than one rank).
        process_group: the group to reduce over (default: the world).

    Raises:
        UnsupportedModelError: a trainable parameter outside the supported layers (the message
            names it and the alternatives), or an unsupported layer configuration.
    """

    def __init__(self, model: nn.Module, *, validate: bool = True, pair_limit: int = 3,
                 chunk_bytes: int = 2 ** 20, broadcast: Iterable[str] = (),
                 distributed: bool | None = None, process_group: Any = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"PerExampleStats needs an nn.Module, got {type(model).__name__}")
        self._batch: int | None = None
        self._broadcast = set(broadcast)
        unknown = self._broadcast - {n for n, _ in model.named_modules()}
        if unknown:
            raise ConfigError(f"broadcast names {sorted(unknown)} are not modules of the model; "
                              "use names from model.named_modules()")
        self._state: dict[int, ParamState] = {}
        self._validate_left = 1 if validate else 0
        self._pair_limit, self._chunk_bytes = pair_limit, chunk_bytes
        self._distributed, self._group = distributed, process_group
        covered: dict[int, Tensor] = {}
        hooked: list[tuple[nn.Module, LayerRule, list[tuple[str, Tensor]]]] = []
        for mname, m in model.named_modules(remove_duplicate=False):
            rule = rule_for_module(m)
            if rule is None:
                continue
            own: list[tuple[str, Tensor]] = list(rule.module_params(m))
            if not own:
                continue
            why = rule.module_reason(m)
            if why is not None:
                raise UnsupportedModelError(
                    f"{mname or 'model'}: {why}. Use VmapStats(model, loss_fn), "
                    "MicrobatchStats or the streaming gate for this model.")
            for a, p in own:
                covered[id(p)] = p
                self._names.setdefault(id(p), f"{mname}.{a}" if mname else a)
            if all(m is not h[0] for h in hooked):
                hooked.append((m, rule, own))
        missing = [n for n, p in model.named_parameters()
                   if p.requires_grad and id(p) not in covered]
        if missing:
            kinds = ", ".join(t.__name__ for t in supported_modules())
            raise UnsupportedModelError(
                f"PerExampleStats has no closed form for trainable parameters {missing[:5]}"
                f"{' …' if len(missing) > 5 else ''} (outside {kinds} layers). Fixes: freeze "
                "them (requires_grad=False), register a rule for their layer "
                "(tangentscope.derivatives.register_rule), use VmapStats(model, loss_fn) (any "
                "model, slower), MicrobatchStats, or the streaming gate (stats='streaming').")
        names = {id(m): n for n, m in model.named_modules()}
        self._handles.append(model.register_forward_pre_hook(self._make_model_hook(model),
                                                             with_kwargs=True))
        for m, rule, own in hooked:
            hook = self._make_forward_hook(rule, own, names[id(m)] in self._broadcast, m)
            self._handles.append(m.register_forward_hook(hook))
        for p in covered.values():
            self.params.append(p)
            self._state[id(p)] = ParamState(self._names[id(p)])
            self._handles.append(p.register_post_accumulate_grad_hook(self._on_accumulated))

    # -- hooks ----------------------------------------------------------------------------------
    # Hooks are closures that only act for the module they were registered on: a deep copy of
    # the model carries them along, and must behave like an unhooked model.
    def _make_model_hook(self, model: nn.Module) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if mod is not model:
                return
            for v in list(args) + list(kwargs.values()):
                if isinstance(v, Tensor) and v.dim() > 0:
                    self._batch = v.shape[0]
                    return

        return hook

    def _make_forward_hook(self, rule: LayerRule, own: list[tuple[str, Tensor]], always: bool,
                           module: nn.Module) -> Callable[..., Tensor | None]:
        name = next(iter(self._names[id(p)] for _, p in own)).rsplit(".", 1)[0]

        def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor | None:
            if mod is not module or not torch.is_grad_enabled() or \
                    not isinstance(output, Tensor) or not output.requires_grad:
                return None
            x, new_out = args[0], None
            why = rule.reason(rule.module_call(mod, x), None)
            if why is not None:
                raise UnsupportedModelError(
                    f"{name}: {why}, so per-example gradients are not defined. Call "
                    "model.eval() for batch-statistics layers (or replace them with "
                    "LayerNorm/GroupNorm), or use MicrobatchStats / the streaming gate.")
            b = self._batch
            if b is not None and (always or x.dim() == 0 or x.shape[0] != b):
                if x.dim() > 0 and x.shape[0] == 1 and not always:
                    x, new_out = x.expand(b, *x.shape[1:]), output.expand(b, *output.shape[1:])
                elif always or (isinstance(mod, nn.Embedding) and x.dim() == 1):
                    x = x.unsqueeze(0).expand(b, *x.shape)
                    new_out = output.unsqueeze(0).expand(b, *output.shape)
                else:
                    raise ShapeError(
                        f"{name} was called with input shape {tuple(x.shape)} while the model's "
                        f"batch size is {b}: per-example statistics need the batch as the first "
                        "dimension of every hooked layer's input (do not flatten batch and "
                        "sequence together). If this layer is meant to be shared by all "
                        f"examples, pass broadcast=['{name}'].")
                output = new_out
            uses = [(a, p) for a, p in own if p.requires_grad]
            for _, p in uses:
                self._state[id(p)].uses += 1
            output.register_hook(lambda d: contributions(
                rule, mod, x, d, uses, self._state, graph_task(), self._validate_left > 0,
                self._pair_limit, self._chunk_bytes))
            return new_out

        return hook

    def _on_accumulated(self, p: Tensor) -> None:
        st = self._state[id(p)]
        if st.task != graph_task():
            st.drop_pending()
        if st.pending_sq is None and st.buf is None:
            raise UnsupportedModelError(
                f"{st.name} received a gradient that no hooked layer produced (the weight is used "
                "outside its module, e.g. a tied output head through F.linear). Use the module "
                "itself, VmapStats(model, loss_fn), or the streaming gate.")
        total: Tensor | None
        if st.buf is not None:
            sq, total = st.buf.square().sum(0), st.buf.sum(0)
        else:
            assert st.pending_sq is not None
            sq, total = st.pending_sq, st.pending_sum
        if self._validate_left and total is not None:
            check_total(p, st, total)
        st.sq = sq if st.sq is None else st.sq.add_(sq)
        st.count += st.pending_b
        assert p.grad is not None
        st.snapshot(p.grad, sq.dtype)
        st.uses = 0
        st.drop_pending()

    # -- StatsSource ----------------------------------------------------------------------------
    def collect(self) -> dict[int, GradMoments]:
        """The sums since the last :meth:`reset` (reduced across ranks under DDP)."""
        self._validate_left = max(0, self._validate_left - 1)   # validated the first step
        local = {id(p): (st.grad, st.sq, st.count) for p in self.params
                 if (st := self._state[id(p)]).count > 0 and st.grad is not None
                 and st.sq is not None}
        R = _world(self._distributed, self._group, "PerExampleStats")
        return _reduce_moments(self.params, local, R, self._group, "per-example")

    def reset(self) -> None:
        for st in self._state.values():
            st.reset()


# =================================================================================================
# vmap(grad): any model, per-example gradients materialized chunk by chunk
# =================================================================================================
def _check_no_batch_coupling(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or
                                                               not m.track_running_stats):
            raise UnsupportedModelError(
                f"{name or 'model'} is {type(m).__name__} using batch statistics: examples "
                "interact, so per-example gradients are not defined. Call model.eval() for it, "
                "or use MicrobatchStats / the streaming gate.")


def per_example_moments(model: nn.Module, loss_fn: Callable[..., Tensor], inputs: Tensor,
                        targets: Tensor | None = None, *, chunk_size: int | None = 64,
                        scale: float | None = None) -> tuple[dict[str, GradMoments], Tensor]:
    """Per-example gradients by ``vmap(grad)``, reduced to :class:`GradMoments` per parameter.

    Example ``i``'s loss is ``loss_fn(model(inputs[i:i+1]), targets[i:i+1])`` (a scalar; the
    batch-of-one shapes let ``F.cross_entropy`` & co. work unchanged). Contributions are
    ``c_i = scale · ∇ℓ_i`` with ``scale = 1/b`` by default, i.e. the statistics of
    ``mean_i ℓ_i``.

    Args:
        model: any ``nn.Module`` (buffers and frozen parameters are constants; dropout draws
            independent masks per example).
        loss_fn: ``loss_fn(output, target) -> scalar`` (``loss_fn(output)`` if ``targets`` is
            None).
        inputs: ``(b, ...)``; targets: ``(b, ...)`` or None.
        chunk_size: examples per ``vmap`` call (memory ``chunk_size × P``); None = all.
        scale: contribution scale (default ``1/b``).

    Returns:
        ``(name -> GradMoments, per-example losses (b,))``.

    Raises:
        UnsupportedModelError: train-mode BatchNorm. ShapeError: a batch of fewer than 2.
    """
    from torch.func import functional_call, grad_and_value, vmap

    _check_no_batch_coupling(model)
    b = inputs.shape[0]
    if targets is not None and targets.shape[0] != b:
        raise ShapeError(f"inputs have {b} examples but targets {targets.shape[0]}")
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    consts = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    consts.update(dict(model.named_buffers()))
    scale = 1.0 / b if scale is None else scale

    def loss_one(ps: dict[str, Tensor], x: Tensor, y: Tensor | None) -> Tensor:
        out = functional_call(model, (ps, consts), (x.unsqueeze(0),), tie_weights=True)
        val = loss_fn(out) if y is None else loss_fn(out, y.unsqueeze(0))
        return val.reshape(())

    f = vmap(grad_and_value(loss_one), in_dims=(None, 0, None if targets is None else 0),
             randomness="different")
    s1 = {n: torch.zeros_like(p, dtype=acc_dtype(p)) for n, p in params.items()}
    s2 = {n: torch.zeros_like(p, dtype=acc_dtype(p)) for n, p in params.items()}
    losses = []
    step = b if chunk_size is None else max(1, chunk_size)
    for s in range(0, b, step):
        g, val = f(params, inputs[s:s + step], None if targets is None else targets[s:s + step])
        losses.append(val.detach())
        for n, gi in g.items():
            c = gi.to(s1[n].dtype) * scale
            s1[n] += c.sum(0)
            s2[n] += c.square_().sum(0)
    return ({n: GradMoments(s1[n], s2[n], b, "per-example") for n in params},
            torch.cat(losses))


class VmapStats(StatsSource):
    """Exact per-example statistics by ``vmap(grad)`` — any model; replaces ``backward()``.

    ``loss = stats.backward(x, y)`` accumulates ``p.grad`` exactly like
    ``loss_fn(model(x), y)`` averaged over the batch followed by ``backward()`` would, and
    records the per-example sums for the optimizer's next step (call it several times to
    accumulate microbatches of examples). A call that finds every gradient cleared
    (``zero_grad()`` without an optimizer step in between) starts new sums. Under
    ``torch.distributed`` (``distributed=None`` → auto with more than one rank) ``p.grad`` and
    the sums are averaged across ranks as DDP's backward would (``backward()`` does not go
    through DDP's hooks).

    Args:
        model: the module (not the DDP wrapper); loss_fn: ``loss_fn(output, target) ->
            scalar`` per example (see :func:`per_example_moments`); chunk_size: examples per
            ``vmap`` call; distributed, process_group: as :class:`MicrobatchStats`.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Tensor], *,
                 chunk_size: int | None = 64, distributed: bool | None = None,
                 process_group: Any = None):
        super().__init__()
        self.model, self.loss_fn, self.chunk_size = model, loss_fn, chunk_size
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self._names = {id(p): n for n, p in named}
        self._by_name = dict(named)
        self._moments: dict[str, GradMoments] = {}
        self._distributed, self._group = distributed, process_group

    def backward(self, inputs: Tensor, targets: Tensor | None = None) -> Tensor:
        """Accumulate ``p.grad`` of the batch-mean loss and record statistics; return it."""
        if self._moments and all(p.grad is None or not bool(p.grad.any()) for p in self.params):
            self._moments = {}                                # cleared: a skipped step
        mom, losses = per_example_moments(self.model, self.loss_fn, inputs, targets,
                                          chunk_size=self.chunk_size)
        R = _world(self._distributed, self._group, "VmapStats")
        if R > 1:
            order = [p for p in self.params if self._names[id(p)] in mom]
            local = {id(p): (mom[n].grad_sum, mom[n].grad_sq_sum, mom[n].count)
                     for p in order if (n := self._names[id(p)]) in mom}
            red = _reduce_moments(order, local, R, self._group, "per-example")
            mom = {self._names[k]: m for k, m in red.items()}
        for n, m in mom.items():
            p = self._by_name[n]
            g = m.grad_sum.to(p.dtype)
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)
            old = self._moments.get(n)
            self._moments[n] = m if old is None else GradMoments(
                old.grad_sum + m.grad_sum, old.grad_sq_sum + m.grad_sq_sum,
                old.count + m.count, "per-example")
        return losses.mean()

    def collect(self) -> dict[int, GradMoments]:
        return {id(self._by_name[n]): m for n, m in self._moments.items()}

    def reset(self) -> None:
        self._moments = {}


# =================================================================================================
# Microbatches: one contribution per backward()
# =================================================================================================
class MicrobatchStats(StatsSource):
    """Per-microbatch gradients from ``register_post_accumulate_grad_hook``.

    After each ``backward()`` the hook sees the accumulated ``p.grad``; the difference from the
    previous one is that microbatch's contribution ``c_j``. With ``M`` microbatches per
    optimizer step (``gradient_accumulation_steps = M``; each microbatch's loss divided by
    ``M`` or not — any common scale) the gate holds each microbatch out against the other
    ``M − 1``. Nothing else in the training loop changes. A backward that starts on cleared
    gradients (``zero_grad()`` after a skipped step) starts new sums.

    Under ``torch.distributed`` (``distributed=None`` → auto when initialized with more than
    one rank) each rank's local microbatches are contributions too: the sums are all-reduced at
    :meth:`collect` (``S2/R²``, ``S1/R`` for DDP's averaging) and ``b = R·M``.

    Args:
        params: a module or an iterable of parameters.
        distributed: all-reduce across ranks (see above).
        process_group: the group to reduce over (default: the world).

    Memory: two parameter-sized buffers (the previous ``p.grad`` and ``Σ c_j²``).
    """

    kind = "microbatch"

    def __init__(self, params: nn.Module | Iterable[Tensor], *, distributed: bool | None = None,
                 process_group: Any = None):
        super().__init__()
        named: list[tuple[str, Tensor]]
        if isinstance(params, nn.Module):
            named = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
        else:
            named = [(f"param{i}", p) for i, p in enumerate(params) if p.requires_grad]
        if not named:
            raise ConfigError("MicrobatchStats got no parameters that require grad")
        self.params = [p for _, p in named]
        self._names = {id(p): n for n, p in named}
        self._state = {id(p): ParamState(n) for n, p in named}
        self._prev: dict[int, Tensor] = {}
        self._sq: dict[int, Tensor] = {}
        self._count: dict[int, int] = {}
        self._distributed, self._group = distributed, process_group
        for p in self.params:
            self._handles.append(p.register_hook(self._make_pre_hook(p)))
            self._handles.append(p.register_post_accumulate_grad_hook(self._on_accumulated))

    def _make_pre_hook(self, p: Tensor) -> Callable[[Tensor], None]:
        def hook(_: Tensor) -> None:  # before this backward's gradient is accumulated
            k = id(p)
            st = self._state[k]
            st.count = self._count.get(k, 0)
            if st.cleared(p.grad):
                self._prev.pop(k, None)
                self._sq.pop(k, None)
                self._count.pop(k, None)
        return hook

    def _on_accumulated(self, p: Tensor) -> None:
        assert p.grad is not None
        g = p.grad.detach()
        k = id(p)
        prev = self._prev.get(k)
        if prev is None:
            c = g.to(acc_dtype(p), copy=True)
            self._prev[k] = c.clone()
            self._sq[k] = c.square_()
            self._count[k] = 1
        else:
            c = g.to(prev.dtype) - prev
            self._sq[k].addcmul_(c, c)
            prev.copy_(g)
            self._count[k] += 1
        st = self._state[k]
        st.grad_ref, st.grad_version = weakref.ref(p.grad), p.grad._version

    def collect(self) -> dict[int, GradMoments]:
        R = _world(self._distributed, self._group, "MicrobatchStats")
        local = {k: (self._prev[k], self._sq[k], self._count[k]) for k in self._count}
        return _reduce_moments(self.params, local, R, self._group, "microbatch")

    def reset(self) -> None:
        self._prev.clear()
        self._sq.clear()
        self._count.clear()
