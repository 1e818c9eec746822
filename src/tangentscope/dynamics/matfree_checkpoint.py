"""The checkpoint kernel path: ``K = J D Jᵀ`` applied from parameter checkpoints, sharded.

:class:`CheckpointKernelPath` is the :class:`~tangentscope.dynamics.matfree_path.KernelPath` of
a run stored as :class:`~tangentscope.dynamics.matfree_path.Checkpoints`. One product of a block
``X`` ``(N, c)``: ``Jᵀ X`` by one VJP per chunk of examples with all ``c`` cotangents through
``vmap``, times the snapshot's diagonal ``D``, then ``J t`` by one ``vmap``-ed JVP per chunk
(inside :func:`tangentscope._utils.forward_ad_section`). Cost ``≈ 3 c`` forward passes over the
set; memory ``O(c · P)`` tangents plus ``chunk · c`` examples' activations (``chunk`` chosen
from ``memory_budget`` by measuring one example's saved activations).

Distributed (``group=``): each rank passes its shard of the training (and test) set; the
parameters are replicated. ``Jᵀ X`` of the local rows is summed over ranks (one all-reduce of
``c · P`` floats) and the rows of ``J t`` are all-gathered, so every vector stays replicated and
every rank runs the same linear algebra (the same code on CPU/gloo and GPU/NCCL). The stacked
row order is rank 0's examples, then rank 1's, ...
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp, vmap

from .._utils import default_memory_budget, eval_mode, forward_ad_section, parse_bytes
from ..errors import ConfigError, ShapeError
from ..linalg import lanczos_topk
from ..losses import OutputLoss, get_loss
from .matfree_path import (
    Checkpoints,
    CheckpointState,
    KernelPath,
    MemoryCheckpoints,
    check_block,
)
from .trajectory import KernelTrajectory

__all__ = ["CheckpointKernelPath"]


class _Shards:
    """Row bookkeeping of a set sharded over the ranks of ``group`` (one shard if ``None``)."""

    def __init__(self, n_local: int, group: Any, device: torch.device):
        self.group, self.device = group, device
        if group is None:
            self.sizes = [n_local]
            self.rank = 0
        else:
            t = torch.tensor([n_local], dtype=torch.long, device=device)
            out = [torch.zeros_like(t) for _ in range(dist.get_world_size(group))]
            dist.all_gather(out, t, group=group)
            self.sizes = [int(v) for v in out]
            self.rank = dist.get_rank(group)
        self.n = sum(self.sizes)
        self.offset = sum(self.sizes[:self.rank])
        self.n_local = n_local

    def local(self, X: Tensor, p: int) -> Tensor:
        """Rows of this shard of a stacked ``(n p, c)`` block → ``(n_local, p, c)``."""
        return X[self.offset * p:(self.offset + self.n_local) * p].reshape(self.n_local, p, -1)

    def gather(self, T: Tensor) -> Tensor:
        """Concatenate per-rank ``(n_r, ...)`` tensors over ranks (rank order) → ``(n, ...)``."""
        if self.group is None:
            return T
        mx = max(self.sizes)
        pad = torch.zeros((mx - T.shape[0], *T.shape[1:]), dtype=T.dtype, device=T.device)
        buf = torch.cat([T, pad]).contiguous()
        out = [torch.empty_like(buf) for _ in self.sizes]
        dist.all_gather(out, buf, group=self.group)
        return torch.cat([o[:s] for o, s in zip(out, self.sizes)])

    def sum(self, T: Tensor) -> Tensor:
        if self.group is not None:
            dist.all_reduce(T, group=self.group)
        return T


def _saved_bytes_per_example(fn: Callable[[Tensor], Tensor], x1: Tensor) -> int:
    """Bytes autograd saves for one example's backward (activations), measured once."""
    total = [0]

    def pack(t: Tensor) -> Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x1)
    return max(total[0], 1)


class _Jacobian:
    """``Jᵀ V`` (VJP) and ``J T`` (JVP) of a module at a given state, batched over columns with
    ``vmap`` and chunked over examples; rows sharded over ranks (see :class:`_Shards`)."""

    def __init__(self, model: nn.Module, names: Sequence[str], dtype: torch.dtype,
                 device: torch.device, chunk_size: int | None, group: Any,
                 budget: int):
        self.model, self.names, self.dtype, self.device = model, list(names), dtype, device
        named = dict(model.named_parameters())
        self.frozen = {k: v.detach().to(device=device, dtype=dtype if v.is_floating_point()
                                        else v.dtype)
                       for k, v in named.items() if k not in set(self.names)}
        self.chunk_size, self.group, self.budget = chunk_size, group, budget
        self._per_example: dict[int, int] = {}

    def apply(self, state: CheckpointState, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        bufs = {k: (v.to(self.dtype) if v.is_floating_point() else v)
                for k, v in state.buffers.items()}
        out = functional_call(self.model, (dict(params), bufs, self.frozen), (x,),
                              tie_weights=True)
        return out.reshape(x.shape[0], -1)

    def _chunk(self, state: CheckpointState, x: Tensor, cols: int) -> int:
        if self.chunk_size:
            return self.chunk_size
        key = id(x)
        if key not in self._per_example:       # measured once per input set
            self._per_example[key] = _saved_bytes_per_example(
                lambda xs: self.apply(state, _leaves(state), xs), x[:1])
        per = self._per_example[key]
        return max(1, min(x.shape[0], int(self.budget // (4 * per * max(cols, 1)))))

    def pull(self, state: CheckpointState, x: Tensor, V: Tensor) -> Tensor:
        """``Jᵀ V`` for ``V`` ``(n_local, p, c)`` → flat ``(c, P)``, summed over ranks."""
        params = {k: state.params[k] for k in self.names}
        c = V.shape[2]
        out = torch.zeros(c, sum(t.numel() for t in params.values()), dtype=self.dtype,
                          device=self.device)
        chunk = self._chunk(state, x, c)
        Vc = V.permute(2, 0, 1)
        with eval_mode(self.model):
            for s in range(0, x.shape[0], chunk):
                xs = x[s:s + chunk]
                fn = vjp(lambda prm, xs=xs: self.apply(state, prm, xs), params)[1]
                g = vmap(fn)(Vc[:, s:s + chunk].contiguous())[0]
                out += torch.cat([g[k].reshape(c, -1) for k in self.names], 1)
        return self._sum(out)

    def _sum(self, out: Tensor) -> Tensor:
        if self.group is not None:
            dist.all_reduce(out, group=self.group)
        return out

    def push(self, state: CheckpointState, x: Tensor, T: Tensor) -> Tensor:
        """``J T`` for flat tangents ``T`` ``(c, P)`` → local rows ``(n_local, p, c)``."""
        params = {k: state.params[k] for k in self.names}
        tang, i = {}, 0
        for k, v in params.items():
            tang[k] = T[:, i:i + v.numel()].reshape(T.shape[0], *v.shape)
            i += v.numel()
        chunk = self._chunk(state, x, T.shape[0])
        outs = []
        with eval_mode(self.model), forward_ad_section():
            for s in range(0, x.shape[0], chunk):
                xs = x[s:s + chunk]

                def one(t: dict[str, Tensor], xs: Tensor = xs) -> Tensor:
                    return jvp(lambda prm: self.apply(state, prm, xs), (params,), (t,))[1]

                outs.append(vmap(one)(tang))                      # (c, chunk, p)
        return torch.cat(outs, 1).permute(1, 2, 0)

    def flat_preconditioner(self, state: CheckpointState) -> Tensor | None:
        D = state.preconditioner
        if D is None:
            return None
        missing = [k for k in self.names if k not in D]
        if missing:
            raise ShapeError(f"the checkpoint's preconditioner lacks {missing[:3]}")
        return torch.cat([D[k].reshape(-1).to(device=self.device, dtype=self.dtype)
                          for k in self.names])


def _leaves(state: CheckpointState) -> dict[str, Tensor]:
    return {k: v.detach().requires_grad_(True) for k, v in state.params.items()}


def _as_rows(x: Any, dtype: torch.dtype, device: torch.device, name: str) -> Tensor:
    x = torch.as_tensor(x)
    if x.dim() == 0 or x.shape[0] == 0:
        raise ShapeError(f"{name} must be a non-empty batch (n, ...), got shape {tuple(x.shape)}")
    return (x.to(dtype) if x.is_floating_point() else x).to(device)


class CheckpointKernelPath(KernelPath):
    """A :class:`KernelPath` that applies ``K = J D Jᵀ`` from parameter checkpoints.

    Args:
        model: the trained ``nn.Module`` (its architecture; parameters come from the states).
            Products run in eval mode (each submodule's flag restored).
        x_train, y_train: this rank's shard of the training set ``(n_local, ...)`` and targets
            (the whole set without ``group``). Row order of the stacked space: rank 0's rows,
            then rank 1's, ...
        checkpoints: :class:`Checkpoints` (e.g. :class:`MemoryCheckpoints`).
        loss: ``'squared'``, ``'cross_entropy'`` or an ``OutputLoss`` (``Φ`` averages over all
            ``n`` examples of all ranks).
        x_test, y_test: this rank's shard of the test/probe set, for ``K_QS`` and ``U_Q``.
        chunk_size: examples per VJP/JVP chunk (default: from ``memory_budget``).
        dtype: dtype of everything the path returns and of the outputs ``u, g, B`` (float64).
        compute_dtype: dtype of the VJP/JVP products (default ``dtype``); ``torch.float32``
            roughly halves their cost and rounds them to ~1e-7 relative (then use Krylov and
            Lanczos tolerances ``≥ 1e-6``).
        device: where to compute (default: the device of the states' parameters).
        group: a ``torch.distributed`` process group (or ``True`` for the default group) to
            shard the sets over; ``None`` for one process.
        memory_budget: bytes for one product's activations (default: half the free RAM).

    Raises:
        ShapeError: inputs and targets of different lengths, or a checkpoint whose parameters
            are not the model's.
    """

    def __init__(self, model: nn.Module, x_train: Tensor, y_train: Tensor,
                 checkpoints: Checkpoints, *, loss: str | OutputLoss = "squared",
                 x_test: Tensor | None = None, y_test: Tensor | None = None,
                 chunk_size: int | None = None, dtype: torch.dtype = torch.float64,
                 compute_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, group: Any = None,
                 memory_budget: int | str | None = None):
        if len(checkpoints) == 0:
            raise ShapeError("the checkpoints hold no snapshot")
        st0 = checkpoints.state(0)
        names = list(st0.params)
        named = dict(model.named_parameters())
        unknown = [k for k in names if k not in named]
        if unknown:
            raise ShapeError(f"checkpoint parameters {unknown[:3]} are not parameters of the "
                             "model: pass the model the checkpoints were taken from")
        self.model, self.ckpt, self.loss_fn = model, checkpoints, get_loss(loss)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else next(
            iter(st0.params.values())).device
        if group is True:
            group = dist.group.WORLD
        self.group = group
        self.x = _as_rows(x_train, dtype, self.device, "x_train")
        y = torch.as_tensor(y_train)
        if y.shape[0] != self.x.shape[0]:
            raise ShapeError(f"y_train has {y.shape[0]} rows but x_train has {self.x.shape[0]}")
        self.rows = _Shards(self.x.shape[0], group, self.device)
        self.y = self.rows.gather((y.to(dtype) if y.is_floating_point() else y).to(self.device))
        self.xq, self.yq, self.qrows = None, None, None
        if x_test is not None:
            self.xq = _as_rows(x_test, dtype, self.device, "x_test")
            self.qrows = _Shards(self.xq.shape[0], group, self.device)
            if y_test is not None:
                yq = torch.as_tensor(y_test)
                self.yq = self.qrows.gather((yq.to(dtype) if yq.is_floating_point()
                                             else yq).to(self.device))
        budget = (default_memory_budget() if memory_budget is None
                  else parse_bytes(memory_budget))
        self.jac = _Jacobian(model, names, dtype, self.device, chunk_size, group, budget)
        self.compute_dtype = compute_dtype or dtype
        self._cjac, self._cx, self._cxq = self.jac, self.x, self.xq
        if self.compute_dtype != dtype:
            self._cjac = _Jacobian(model, names, self.compute_dtype, self.device, chunk_size,
                                   group, budget)
            self._cx = _as_rows(x_train, self.compute_dtype, self.device, "x_train")
            if x_test is not None:
                self._cxq = _as_rows(x_test, self.compute_dtype, self.device, "x_test")
        self.times = np.asarray(checkpoints.times, dtype=float)
        self.steps = np.asarray(checkpoints.steps)
        self.dts = tuple(np.asarray(d, dtype=float) for d in checkpoints.dts)
        self.n = self.rows.n
        self.m = 0 if self.qrows is None else self.qrows.n
        self.products = 0
        self._states: dict[tuple[int, torch.dtype], CheckpointState] = {}
        self._u: dict[int, tuple[Tensor, Tensor | None]] = {}
        self._gram: dict[int, float] = {}
        with torch.no_grad(), eval_mode(model):
            self.p = self.jac.apply(self._state(0), self._state(0).params, self.x[:1]).shape[1]

    @classmethod
    def from_trajectory(cls, traj: KernelTrajectory, model: nn.Module,
                        states: Sequence[Mapping[str, Any]], **kw: Any) -> CheckpointKernelPath:
        """The checkpoint path of a run recorded by ``KernelRecorder``, from the model states
        captured at its snapshots (``on_snapshot=`` with :func:`capture_state`).

        Times, step increments, data, loss and the saved preconditioner ``D`` come from
        ``traj``; ``states[k]`` holds snapshot ``k``'s ``params`` (and ``buffers``).

        Raises:
            ConfigError: the run was preconditioned but ``D`` was not saved (record with
                ``save_preconditioner=True``), or the number of states differs.
        """
        if len(states) != len(traj):
            raise ConfigError(f"{len(states)} captured states for {len(traj)} snapshots: "
                              "capture one per snapshot (KernelRecorder(on_snapshot=...))")
        names = list(traj.meta.get("param_names") or states[0]["params"])
        pre = bool(traj.meta.get("preconditioned"))
        out = []
        for k, st in enumerate(states):
            D = traj.preconditioner(k)
            if pre and D is None:
                raise ConfigError("this trajectory is preconditioned (Adam or per-group learning "
                                  "rates) but its D was not saved: record with "
                                  "KernelRecorder(..., save_preconditioner=True)")
            params = {n: st["params"][n] for n in names}
            Dd = None
            if D is not None:
                Dd, i = {}, 0
                for n in names:
                    Dd[n] = D[i:i + params[n].numel()].reshape(params[n].shape)
                    i += params[n].numel()
            out.append(CheckpointState(params, dict(st.get("buffers", {})), Dd))
        ck = MemoryCheckpoints(tuple(out), traj.times, traj.steps, traj.dts)
        d = traj.data
        return cls(model, d["x"], d["y"], ck, loss=traj.meta.get("loss", "squared"),
                   x_test=d.get("x_test"), y_test=d.get("y_test"), **kw)

    # -- states and products -------------------------------------------------------------------
    def _state(self, index: int, dtype: torch.dtype | None = None) -> CheckpointState:
        """Snapshot ``index``'s state on this device in ``dtype`` (the last four are cached, so a
        sweep does not copy ``P`` floats per product)."""
        key = (index % len(self), dtype or self.dtype)
        if key not in self._states:
            if len(self._states) >= 4:
                self._states.pop(next(iter(self._states)))
            st = self.ckpt.state(key[0])
            conv = {n: v.to(device=self.device, dtype=key[1]) for n, v in st.params.items()}
            D = st.preconditioner
            bufs = {n: v.to(device=self.device) for n, v in st.buffers.items()}
            self._states[key] = CheckpointState(
                conv, bufs, None if D is None else {n: v.to(device=self.device)
                                                    for n, v in D.items()})
        return self._states[key]

    def kernel_matvec(self, index: int, X: Tensor) -> Tensor:
        out = self.kernel_pair(index, X, None)[0]
        assert out is not None
        return out

    def cross_matvec(self, index: int, X: Tensor) -> Tensor:
        out = self.kernel_pair(index, None, X)[1]
        assert out is not None
        return out

    def kernel_pair(self, index: int, X: Tensor | None, Xq: Tensor | None
                    ) -> tuple[Tensor | None, Tensor | None]:
        if Xq is not None and self.xq is None:
            raise ShapeError("this path has no test/probe set: pass x_test= to get K_QS, U_Q "
                             "and G_Q")
        blocks = [b for b in (X, Xq) if b is not None]
        for b in blocks:
            check_block(b, self.N, "a kernel product")
        if not blocks:
            return None, None
        cd, jac = self.compute_dtype, self._cjac
        V = torch.cat([b.to(device=self.device, dtype=cd) for b in blocks], 1)
        self._count(V)
        st = self._state(index, cd)
        with torch.no_grad():
            T = jac.pull(st, self._cx, self.rows.local(V, self.p))
            D = jac.flat_preconditioner(st)
            T = T if D is None else T * D
            c1 = 0 if X is None else X.shape[1]
            KX = KQX = None
            if X is not None:
                KX = self.rows.gather(jac.push(st, self._cx, T[:c1])).reshape(
                    self.N, -1).to(self.dtype)
            if Xq is not None:
                assert self._cxq is not None and self.qrows is not None
                KQX = self.qrows.gather(jac.push(st, self._cxq, T[c1:])).reshape(
                    self.m * self.p, -1).to(self.dtype)
        return KX, KQX

    def parameter_gradient(self, index: int) -> dict[str, Tensor]:
        """``∇_w Φ_S = J_Sᵀ g`` at snapshot ``index`` (summed over ranks), ``name → tensor``."""
        st = self._state(index)
        with torch.no_grad():
            T = self.jac.pull(st, self.x, self.rows.local(self.gradient(index).reshape(-1, 1),
                                                          self.p))[0]
        out, i = {}, 0
        for name in self.jac.names:
            v = st.params[name]
            out[name] = T[i:i + v.numel()].reshape(v.shape)
            i += v.numel()
        return out

    def product_bytes(self, c: int) -> int:
        """Planned bytes of one product of ``c`` columns besides activations (tangents ``c × P``
        three times; activations are chunked to ``memory_budget``)."""
        P = sum(v.numel() for v in self._state(0).params.values())
        return 3 * c * P * torch.empty((), dtype=self.compute_dtype).element_size()

    def test_kernel_matvec(self, index: int, X: Tensor) -> Tensor:
        """``K_QQ(index) X`` for ``X`` ``(m p, c)`` → ``(m p, c)``."""
        if self.xq is None or self.qrows is None:
            raise ShapeError("this path has no test/probe set (pass x_test=)")
        st = self._state(index)
        with torch.no_grad():
            T = self.jac.pull(st, self.xq, self.qrows.local(X, self.p))
            D = self.jac.flat_preconditioner(st)
            T = T if D is None else T * D
            return self.qrows.gather(self.jac.push(st, self.xq, T)).reshape(self.m * self.p, -1)

    def test_gram_norm(self, index: int) -> float | None:
        """``‖K_QQ(index)‖₂`` by Lanczos (``tol = 1e-12``), cached."""
        if self.xq is None:
            return None
        index = index % len(self)
        if index not in self._gram:
            r = lanczos_topk(lambda X: self.test_kernel_matvec(index, X), self.m * self.p, 1,
                             tol=1e-12, dtype=self.dtype, device=self.device)
            self._gram[index] = float(r.values[0])
        return self._gram[index]

    # -- small arrays ----------------------------------------------------------------------------
    def _outputs(self, index: int) -> tuple[Tensor, Tensor | None]:
        index = index % len(self)
        if index not in self._u:
            st = self._state(index)
            with torch.no_grad(), eval_mode(self.model):
                u = self.rows.gather(self.jac.apply(st, st.params, self.x))
                uq = None
                if self.xq is not None and self.qrows is not None:
                    uq = self.qrows.gather(self.jac.apply(st, st.params, self.xq))
            self._u[index] = (u, uq)
        return self._u[index]

    def u(self, index: int) -> Tensor:
        return self._outputs(index)[0]

    def U_Q(self, index: int) -> Tensor | None:
        return self._outputs(index)[1]

    def gradient(self, index: int) -> Tensor:
        return self.loss_fn.grad(self.u(index), self.y)

    def hessian(self, index: int) -> Tensor:
        return self.loss_fn.hessian(self.u(index), self.y)

    def loss(self, index: int) -> float:
        return float(self.loss_fn.value(self.u(index), self.y))

    def test_loss(self, index: int) -> float:
        """Test loss ``Φ_Q(U_Q)`` (NaN without test targets)."""
        uq = self.U_Q(index)
        return float("nan") if uq is None or self.yq is None else float(
            self.loss_fn.value(uq, self.yq))
