"""Kernel paths: what the matrix-free operators read from a run, snapshot by snapshot.

A :class:`KernelPath` gives, for each snapshot ``k`` (``docs/notation.md``): the block actions
``K_SS(k)·X`` ``(N, c)`` and ``K_QS(k)·X`` ``(m p, c)``, the outputs ``u`` ``(n, p)``, the output
gradient ``g`` ``(n, p)``, the loss-Hessian blocks ``B`` ``(n, p, p)``, the test outputs ``U_Q``
``(m, p)``, the loss, the times ``τ_k`` and the per-step time increments ``dts``. Two kinds:

- :class:`DenseKernelPath` over a recorded :class:`~tangentscope.dynamics.KernelTrajectory`
  (``K·X`` is a dense product): the twin every matrix-free map is tested against, on the *same*
  recorded run;
- ``CheckpointKernelPath`` (:mod:`~tangentscope.dynamics.matfree_checkpoint`) over parameter
  checkpoints (:class:`Checkpoints`): ``J D Jᵀ X`` by
  one batched VJP (``Jᵀ X``, all ``c`` columns at once through ``vmap``) and one batched JVP,
  chunked over the training set, on any device; with ``group=`` the training (and test) set is
  sharded over ``torch.distributed`` ranks, each rank holds its shard and the replicated
  parameters, ``Jᵀ X`` is summed across ranks (one all-reduce of ``c · P`` floats) and the rows
  of ``J t`` are all-gathered, so vectors stay replicated and every rank runs the same linear
  algebra. Cost per product: ``≈ 3 · c`` forward passes over the (local) set; memory
  ``O(c · P + chunk · c · activations)``.

:class:`Checkpoints` is the storage interface (``times, steps, dts``, ``state(k)``);
:class:`MemoryCheckpoints` holds them in RAM (``CheckpointCollector`` in
:mod:`~tangentscope.dynamics.matfree_collect` fills one during training). A store-backed
``Checkpoints`` (named arrays per snapshot in ``dynamics/store.py``) is a drop-in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ShapeError, TangentscopeError
from ..losses import OutputLoss, get_loss
from .trajectory import KernelTrajectory

__all__ = ["KernelPath", "DenseKernelPath", "CheckpointState", "Checkpoints",
           "MemoryCheckpoints", "capture_state", "state_arrays", "state_from_arrays"]


# -- the interface -------------------------------------------------------------------------------
class KernelPath:
    """Per-snapshot kernel actions and small arrays of a run (see the module docstring).

    Subclasses set ``n, p, m, times, steps, dts, dtype, device`` and implement
    :meth:`kernel_matvec`, :meth:`cross_matvec`, :meth:`u`, :meth:`U_Q`, :meth:`hessian`,
    :meth:`gradient` and :meth:`loss`. ``products`` counts the columns pushed through the
    kernels (one ``K·x`` = one product).
    """

    n: int
    p: int
    m: int
    times: np.ndarray
    steps: np.ndarray
    dts: tuple[np.ndarray, ...]
    dtype: torch.dtype
    device: torch.device
    products: int = 0

    def __len__(self) -> int:
        return len(self.times)

    @property
    def N(self) -> int:
        """``n p``, the stacked output dimension."""
        return self.n * self.p

    def kernel_matvec(self, index: int, X: Tensor) -> Tensor:
        """``K_SS(index) X`` for ``X`` ``(N, c)`` → ``(N, c)``."""
        raise NotImplementedError

    def cross_matvec(self, index: int, X: Tensor) -> Tensor:
        """``K_QS(index) X`` for ``X`` ``(N, c)`` → ``(m p, c)``."""
        raise NotImplementedError

    def kernel_pair(self, index: int, X: Tensor | None, Xq: Tensor | None
                    ) -> tuple[Tensor | None, Tensor | None]:
        """``(K_SS(index) X, K_QS(index) Xq)`` (either may be ``None``); one ``Jᵀ`` pass where
        possible."""
        return (None if X is None else self.kernel_matvec(index, X),
                None if Xq is None else self.cross_matvec(index, Xq))

    def u(self, index: int) -> Tensor:
        """Training outputs ``(n, p)`` at snapshot ``index``."""
        raise NotImplementedError

    def U_Q(self, index: int) -> Tensor | None:
        """Test outputs ``(m, p)`` at snapshot ``index`` (``None`` without a test set)."""
        raise NotImplementedError

    def gradient(self, index: int) -> Tensor:
        """Output gradient ``g = ∇_u Φ`` ``(n, p)`` at snapshot ``index``."""
        raise NotImplementedError

    def hessian(self, index: int) -> Tensor:
        """Loss-Hessian blocks ``B`` ``(n, p, p)`` at snapshot ``index``."""
        raise NotImplementedError

    def loss(self, index: int) -> float:
        """Training loss ``Φ_S`` at snapshot ``index``."""
        raise NotImplementedError

    def test_gram_norm(self, index: int) -> float | None:
        """``‖K_QQ(index)‖₂`` for the visibility bound, or ``None`` if unavailable."""
        return None

    def _count(self, X: Tensor) -> None:
        self.products += X.shape[1]


def check_block(X: Tensor, N: int, what: str) -> None:
    """Raise :class:`ShapeError` unless ``X`` is a block ``(N, c)``."""
    if X.dim() != 2 or X.shape[0] != N:
        raise ShapeError(f"{what} needs a block (N, c) with N = {N}, got {tuple(X.shape)}")


# -- dense twin ------------------------------------------------------------------------------------
class DenseKernelPath(KernelPath):
    """A :class:`KernelPath` over a recorded :class:`KernelTrajectory` (dense kernels, two
    snapshots cached): the brute-force twin of ``CheckpointKernelPath``.

    Args:
        traj: the recorded trajectory.
        device: where to put the kernels (default CPU).
    """

    def __init__(self, traj: KernelTrajectory, *, device: torch.device | str | None = None):
        self.traj = traj
        self.n, self.p, self.m = traj.n, traj.p, traj.m
        self.times, self.steps, self.dts = traj.times, traj.steps, traj.dts
        self.dtype, self.device = torch.float64, torch.device(device or "cpu")
        self.products = 0
        try:
            self.loss_fn: OutputLoss | None = get_loss(traj.meta.get("loss", "squared"))
        except TangentscopeError:
            self.loss_fn = None
        self._cache: dict[int, tuple[Tensor, Tensor | None]] = {}

    def _kernels(self, index: int) -> tuple[Tensor, Tensor | None]:
        index = index % len(self)
        if index not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            KQ = self.traj.cross_kernel(index)
            self._cache[index] = (self.traj.kernel(index).to(self.device),
                              None if KQ is None else KQ.to(self.device))
        return self._cache[index]

    def product_bytes(self, c: int) -> int:
        """Bytes of the two cached snapshots' kernels (``N²`` and ``m p · N`` floats each)."""
        return 2 * 8 * self.N * (self.N + self.m * self.p)

    def kernel_matvec(self, index: int, X: Tensor) -> Tensor:
        check_block(X, self.N, "kernel_matvec")
        self._count(X)
        return self._kernels(index)[0] @ X

    def cross_matvec(self, index: int, X: Tensor) -> Tensor:
        check_block(X, self.N, "cross_matvec")
        KQ = self._kernels(index)[1]
        if KQ is None:
            raise ShapeError("the trajectory has no test/probe set: record it with "
                             "KernelRecorder(..., x_test=...) to get K_QS and G_Q")
        self._count(X)
        return KQ @ X

    def u(self, index: int) -> Tensor:
        return self.traj.u[index].to(self.device)

    def U_Q(self, index: int) -> Tensor | None:
        return None if self.traj.U_Q is None else self.traj.U_Q[index].to(self.device)

    def gradient(self, index: int) -> Tensor:
        return self.traj.g[index].to(self.device)

    def hessian(self, index: int) -> Tensor:
        return self.traj.hessian(index).to(self.device)

    def loss(self, index: int) -> float:
        return float(self.traj.loss[index])

    def test_gram_norm(self, index: int) -> float | None:
        g = self.traj.test_gram_norm
        return None if g is None else float(g[index])


# -- checkpoints -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CheckpointState:
    """What one snapshot needs to apply its kernel.

    Attributes:
        params: trainable parameters ``name → tensor`` (those the kernel differentiates).
        buffers: module buffers at the snapshot (BatchNorm running statistics), ``name →
            tensor`` (may be empty).
        preconditioner: diagonal ``D`` ``name → tensor`` shaped like each parameter (Adam's
            factor times the group's ``lr_g / lr_0``), or ``None`` for ``J Jᵀ``.
    """

    params: Mapping[str, Tensor]
    buffers: Mapping[str, Tensor]
    preconditioner: Mapping[str, Tensor] | None = None

    @property
    def nbytes(self) -> int:
        ts = [*self.params.values(), *self.buffers.values(),
              *(self.preconditioner or {}).values()]
        return sum(t.numel() * t.element_size() for t in ts)


class Checkpoints(Protocol):
    """Storage of a checkpoint run: ``times`` ``(S,)``, ``steps`` ``(S,)``, ``dts`` (per snapshot
    the step increments since the previous one), ``__len__`` and ``state(k)``."""

    @property
    def times(self) -> np.ndarray: ...
    @property
    def steps(self) -> np.ndarray: ...
    @property
    def dts(self) -> tuple[np.ndarray, ...]: ...
    def __len__(self) -> int: ...
    def state(self, index: int) -> CheckpointState: ...


@dataclasses.dataclass(frozen=True)
class MemoryCheckpoints:
    """:class:`Checkpoints` held in memory (``S`` states of ``O(P)`` floats each)."""

    states: tuple[CheckpointState, ...]
    times: np.ndarray
    steps: np.ndarray
    dts: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        S = len(self.states)
        if not (len(self.times) == len(self.steps) == len(self.dts) == S) or S == 0:
            raise ShapeError(f"checkpoints need one time, step and dts entry per state; got "
                             f"{S} states, {len(self.times)} times, {len(self.steps)} steps, "
                             f"{len(self.dts)} dts")
        if np.any(np.diff(self.times) < 0):
            raise ShapeError("checkpoint times must be non-decreasing")

    def __len__(self) -> int:
        return len(self.states)

    def state(self, index: int) -> CheckpointState:
        return self.states[index]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.states)


def capture_state(model: nn.Module, names: Sequence[str] | None = None, *,
                  dtype: torch.dtype | None = torch.float64) -> dict[str, dict[str, Tensor]]:
    """A copy of ``model``'s trainable parameters (or ``names``) and buffers, for
    :class:`CheckpointState` (``{'params': ..., 'buffers': ...}``)."""
    named = dict(model.named_parameters())
    keep = list(names) if names is not None else [k for k, v in named.items() if v.requires_grad]

    def cp(t: Tensor) -> Tensor:
        t = t.detach().clone()
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    return {"params": {k: cp(named[k]) for k in keep},
            "buffers": {k: cp(v) for k, v in model.named_buffers()}}


def state_arrays(state: CheckpointState) -> dict[str, np.ndarray]:
    """The named arrays of one checkpoint record in a trajectory store: ``param/<name>``,
    ``buffer/<name>`` and ``D/<name>`` (the inverse of :func:`state_from_arrays`)."""
    out = {f"param/{k}": v.detach().cpu().numpy() for k, v in state.params.items()}
    out.update({f"buffer/{k}": v.detach().cpu().numpy() for k, v in state.buffers.items()})
    out.update({f"D/{k}": v.detach().cpu().numpy()
                for k, v in (state.preconditioner or {}).items()})
    return out


def state_from_arrays(arrays: Mapping[str, np.ndarray]) -> CheckpointState:
    """A :class:`CheckpointState` from a checkpoint record's named arrays (see
    :func:`state_arrays`; the order of the names does not matter).

    Raises:
        ShapeError: the arrays hold no ``param/`` entries (not a checkpoint record).
    """
    def part(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix):]: torch.as_tensor(v) for k, v in arrays.items()
                if k.startswith(prefix)}

    if not part("param/"):
        raise ShapeError("the record holds no 'param/<name>' arrays: it is not a parameter "
                         "checkpoint (was it recorded with the dense recorder?)")
    D = part("D/")
    return CheckpointState(part("param/"), part("buffer/"), D or None)
