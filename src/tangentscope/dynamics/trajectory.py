"""A recorded training trajectory: kernels, outputs and losses at snapshot times.

A :class:`KernelTrajectory` is what :class:`~tangentscope.dynamics.recorder.KernelRecorder`
writes and what the operators of :mod:`tangentscope.dynamics.operators` read. Snapshot ``k``
holds, at optimizer step ``steps[k]`` and training time ``times[k] = Σ_t η_t`` (the sum of the
learning rates of the steps taken so far, times the loss scale):

- stacked eNTK ``K_SS`` ``(N, N)`` with ``N = n p`` (row ``i*p + a``) — the preconditioned
  ``J D Jᵀ`` for Adam-like optimizers — and the cross-kernel ``K_QS`` ``(m p, N)``;
- outputs ``u`` ``(n, p)``, ``U_Q`` ``(m, p)``, output gradient ``g = ∇_u Φ`` ``(n, p)``, the loss
  Hessian blocks ``B`` ``(n, p, p)``, train and test loss, the learning rate;
- ``dts``: the per-step time increments of the optimizer steps between snapshot ``k − 1`` and
  ``k`` (what the ``"gd"`` discretization needs), and ``‖K_QQ‖₂`` for the visibility bound.

Small per-snapshot arrays live in memory; kernels are loaded on demand (one file per snapshot on
disk), so operators over long runs need RAM for a few ``N × N`` matrices only.

Storage is :mod:`tangentscope.dynamics.store` (a directory or memory; the on-disk layout is
documented there): this module reads records of kind ``"kernel"`` through a
:class:`~tangentscope.dynamics.store.TrajectoryStore` and knows nothing of files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DamagedFileError, ShapeError
from ..kernels.entk import flatten_kernel
from .store import INDEX_FIX as _INDEX_FIX
from .store import TrajectoryStore

__all__ = ["KernelTrajectory", "read_index", "KERNEL_ARRAYS", "SMALL_ARRAYS"]

#: arrays of a snapshot loaded when a trajectory is opened (``O(n p)`` each)
SMALL_ARRAYS = ("u", "g", "U_Q", "dts")
#: arrays of a snapshot loaded on demand (``O(N²)``, ``O(P)``)
KERNEL_ARRAYS = ("K_SS", "K_QS", "B", "D")


def read_index(path: str | Path) -> list[dict[str, Any]]:
    """The snapshot records of the recording in ``path`` (see
    :meth:`~tangentscope.dynamics.store.TrajectoryStore.records`)."""
    return TrajectoryStore.open(path).records()


class _Snapshots:
    """The big arrays of the records ``recs`` of ``store``, loaded on demand."""

    def __init__(self, store: TrajectoryStore, recs: Sequence[Mapping[str, Any]]):
        self.store, self.recs = store, list(recs)

    def get(self, k: int, name: str) -> Any:
        return self.store.array(self.recs[k], name)

    def subset(self, idx: Sequence[int]) -> _Snapshots:
        return _Snapshots(self.store, [self.recs[i] for i in idx])


def _incomplete(store: TrajectoryStore, rec: Mapping[str, Any], what: str) -> Exception:
    """The error for a snapshot that lacks arrays every kernel snapshot has."""
    if store.path is not None and "file" in rec:
        return DamagedFileError(store.path / rec["file"], f"it has no {what}", _INDEX_FIX)
    return ShapeError(f"snapshot at step {rec.get('step')} has no {what}: every snapshot of a "
                      "trajectory needs them (pass them to from_arrays)")


def _t64(x: Any) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).to(torch.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class KernelTrajectory:
    """Snapshots of a training run (see module docstring). Index snapshots with ``k``.

    Attributes:
        steps: ``(S,)`` optimizer step of each snapshot.
        times: ``(S,)`` training time ``τ = Σ η_t`` (learning rate × loss scale, summed).
        lrs: ``(S,)`` learning rate in effect at each snapshot.
        loss: ``(S,)`` training loss ``Φ_S(u)``.
        test_loss: ``(S,)`` test loss ``Φ_Q(U_Q)`` (NaN without test targets).
        u: ``(S, n, p)`` training outputs.
        g: ``(S, n, p)`` output gradients ``∇_u Φ``.
        U_Q: ``(S, m, p)`` test outputs, or ``None`` without a test set.
        dts: per snapshot, the ``(k,)`` time increments of the optimizer steps since the
            previous snapshot (empty for the first).
        test_gram_norm: ``(S,)`` ``‖K_QQ‖₂`` (largest eigenvalue of the test Gram), or ``None``.
        meta: ``n, p, m, loss, preconditioned, ...``.
        data: ``x, y, x_test, y_test`` (and any extra arrays the recorder was given).
        path: the run directory, if on disk.
    """

    steps: np.ndarray
    times: np.ndarray
    lrs: np.ndarray
    loss: np.ndarray
    test_loss: np.ndarray
    u: Tensor
    g: Tensor
    U_Q: Tensor | None
    dts: tuple[np.ndarray, ...]
    test_gram_norm: np.ndarray | None
    meta: Mapping[str, Any]
    data: Mapping[str, Tensor]
    path: Path | None
    _source: Any = dataclasses.field(repr=False)

    # -- sizes ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.steps)

    @property
    def n(self) -> int:
        return self.u.shape[1]

    @property
    def p(self) -> int:
        return self.u.shape[2]

    @property
    def m(self) -> int:
        return 0 if self.U_Q is None else self.U_Q.shape[1]

    @property
    def N(self) -> int:
        """``n p``, the size of the stacked output space."""
        return self.n * self.p

    # -- per-snapshot arrays (loaded on demand) ---------------------------------------------
    def _array(self, index: int, name: str) -> Tensor | None:
        if not -len(self) <= index < len(self):
            raise IndexError(f"snapshot {index} out of range for a trajectory of {len(self)}")
        a = self._source.get(index % len(self), name)
        return None if a is None else _t64(a)

    def kernel(self, index: int) -> Tensor:
        """Stacked ``K_SS`` ``(N, N)`` of snapshot ``index`` (float64)."""
        K = self._array(index, "K_SS")
        if K is None:
            raise _incomplete(self._source.store, self._source.recs[index % len(self)], "K_SS")
        return K

    def cross_kernel(self, index: int) -> Tensor | None:
        """Stacked ``K_QS`` ``(m p, N)`` of snapshot ``index``, or ``None`` without a test set."""
        return self._array(index, "K_QS")

    def hessian(self, index: int) -> Tensor:
        """Loss-Hessian blocks ``B`` ``(n, p, p)`` of snapshot ``index``."""
        B = self._array(index, "B")
        if B is None:
            raise _incomplete(self._source.store, self._source.recs[index % len(self)], "B")
        return B

    def hessian_scale(self, index: int = 0) -> float | None:
        """``b`` when the loss Hessian at snapshot ``index`` is ``b I`` (squared loss: ``1/n``),
        else ``None``."""
        B = self.hessian(index)
        b = float(B[0, 0, 0])
        eye = torch.eye(self.p, dtype=B.dtype).expand_as(B)
        return b if torch.allclose(B, b * eye, rtol=1e-12, atol=0) else None

    def preconditioner(self, index: int) -> Tensor | None:
        """Flat diagonal preconditioner ``D`` ``(P,)`` of snapshot ``index``, if it was saved."""
        return self._array(index, "D")

    def index_of_step(self, step: int) -> int:
        """The snapshot index taken at optimizer step ``step``.

        Raises:
            ShapeError: no snapshot at that step (the message lists the nearest ones).
        """
        hit = np.nonzero(self.steps == step)[0]
        if hit.size == 0:
            near = self.steps[np.argsort(np.abs(self.steps - step))[:3]].tolist()
            raise ShapeError(f"no snapshot at step {step}; nearest snapshot steps: {near}")
        return int(hit[0])

    # -- views ------------------------------------------------------------------------------
    def select(self, indices: Sequence[int]) -> KernelTrajectory:
        """The snapshots ``indices`` (increasing) as a trajectory; step increments of dropped
        snapshots are merged into the next kept one, so times and ``dts`` stay consistent."""
        idx = [int(i) % len(self) for i in indices]
        if not idx or any(b <= a for a, b in zip(idx, idx[1:])):
            raise ShapeError(f"indices must be non-empty and strictly increasing, got {indices}")
        dts = [np.zeros(0)] + [np.concatenate(self.dts[a + 1:b + 1]) for a, b in zip(idx, idx[1:])]
        t = torch.as_tensor(idx)
        return dataclasses.replace(
            self, steps=self.steps[idx], times=self.times[idx], lrs=self.lrs[idx],
            loss=self.loss[idx], test_loss=self.test_loss[idx], u=self.u[t], g=self.g[t],
            U_Q=None if self.U_Q is None else self.U_Q[t], dts=tuple(dts),
            test_gram_norm=None if self.test_gram_norm is None else self.test_gram_norm[idx],
            _source=self._source.subset(idx))

    def subsample(self, every: int) -> KernelTrajectory:
        """Every ``every``-th snapshot (0, every, 2 every, ...): a sparser snapshot schedule."""
        if every < 1:
            raise ShapeError(f"every must be >= 1, got {every}")
        return self.select(range(0, len(self), every))

    def window(self, start: int, stop: int) -> KernelTrajectory:
        """Snapshots ``start .. stop`` inclusive."""
        return self.select(range(start % len(self), stop % len(self) + 1))

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> KernelTrajectory:
        """Load a trajectory a :class:`KernelRecorder` wrote to ``path``.

        Raises:
            ConfigError: ``path`` holds no recorded trajectory, or no finished snapshot yet.
            DamagedFileError: a file of the recording is truncated or garbled (the message
                names it and the fix).
        """
        traj = cls.from_store(TrajectoryStore.open(path))
        # the recorder stores one time increment per optimizer step since the snapshot before:
        # a record lost from the middle of the index would show here
        for k in range(1, len(traj)):
            gap = int(traj.steps[k] - traj.steps[k - 1])
            if len(traj.dts[k]) != gap:
                raise DamagedFileError(
                    Path(path) / "index.jsonl", f"the snapshot at step {traj.steps[k]} follows "
                    f"step {traj.steps[k - 1]} but holds {len(traj.dts[k])} step increments, not "
                    f"{gap}: a record between them is missing or garbled", _INDEX_FIX)
        return traj

    @classmethod
    def from_store(cls, store: TrajectoryStore) -> KernelTrajectory:
        """The ``"kernel"`` records of ``store`` as a trajectory (small arrays read now, kernels
        on demand).

        Raises:
            ConfigError: the store has no finished snapshot yet.
        """
        recs = store.records("kernel")
        if not recs and store.records("checkpoint"):
            raise ConfigError(f"{store.path or 'this recording'} holds parameter checkpoints "
                              "(KernelRecorder(..., storage='checkpoint')), not kernels: open "
                              "it with tangentscope.dynamics.matfree_record.checkpoint_path("
                              "run_dir, model) and use the matrix-free operators")
        if not recs:
            where = store.path if store.path is not None else "the recording"
            raise ConfigError(f"{where} has no finished snapshot yet: load it once the "
                              "recorder has taken one (it does at creation), or, if it was "
                              "interrupted before that, delete it and record again")

        def col(name: str, default: float = np.nan) -> np.ndarray:
            return np.array([default if r.get(name) is None else r[name] for r in recs],
                            dtype=float)

        small = [store.arrays(r, SMALL_ARRAYS) for r in recs]
        for r, a in zip(recs, small):
            if "u" not in a or "g" not in a or ("U_Q" in small[0]) != ("U_Q" in a):
                raise _incomplete(store, r, "u, g (and U_Q)")
        has_q = "U_Q" in small[0]
        gram = col("test_gram_norm")
        return cls(
            steps=np.array([r["step"] for r in recs], dtype=np.int64), times=col("time"),
            lrs=col("lr"), loss=col("loss"), test_loss=col("test_loss"),
            u=torch.stack([_t64(s["u"]) for s in small]),
            g=torch.stack([_t64(s["g"]) for s in small]),
            U_Q=torch.stack([_t64(s["U_Q"]) for s in small]) if has_q else None,
            dts=tuple(np.asarray(s.get("dts", np.zeros(0)), dtype=float) for s in small),
            test_gram_norm=None if np.isnan(gram).all() else gram,
            meta={k: v for k, v in store.meta.items() if k != "format"},
            data={k: torch.as_tensor(v) for k, v in store.data().items()}, path=store.path,
            _source=_Snapshots(store, recs))

    @classmethod
    def from_arrays(cls, times: Sequence[float] | np.ndarray, K_SS: Sequence[Tensor],
                    u: Sequence[Tensor], g: Sequence[Tensor], B: Sequence[Tensor],
                    loss: Sequence[float], *, K_QS: Sequence[Tensor] | None = None,
                    U_Q: Sequence[Tensor] | None = None, steps: Sequence[int] | None = None,
                    dts: Sequence[Sequence[float]] | None = None,
                    test_gram_norm: Sequence[float] | None = None,
                    data: Mapping[str, Tensor] | None = None,
                    meta: Mapping[str, Any] | None = None) -> KernelTrajectory:
        """An in-memory trajectory from explicit per-snapshot arrays (synthetic or external).

        Args:
            times: ``(S,)`` increasing training times ``τ_k``.
            K_SS: ``S`` kernels, ``(n, n, p, p)`` or stacked ``(N, N)``.
            u, g: ``S`` arrays ``(n, p)``.
            B: ``S`` loss-Hessian blocks ``(n, p, p)``.
            loss: ``(S,)`` training losses.
            K_QS, U_Q: ``S`` cross-kernels ``(m, n, p, p)``/``(m p, N)`` and test outputs.
            steps: optimizer steps (default ``0..S−1``).
            dts: per-step time increments between snapshots (default: one step per interval).
        """
        S = len(times)
        t = np.asarray(times, dtype=float)
        if len(K_SS) != S or len(u) != S or len(g) != S or len(B) != S or len(loss) != S:
            raise ShapeError("times, K_SS, u, g, B and loss need one entry per snapshot")
        if np.any(np.diff(t) < 0):
            raise ShapeError("times must be non-decreasing")
        if (K_QS is None) != (U_Q is None):
            raise ShapeError("pass both K_QS and U_Q (test outputs), or neither")
        if steps is not None and len(steps) != S:
            raise ShapeError(f"steps has {len(steps)} entries for {S} snapshots")
        u2 = [_t64(x).reshape(_t64(x).shape[0], -1) for x in u]
        n, p = u2[0].shape
        if dts is None:
            dts = [[]] + [[b - a] for a, b in zip(t, t[1:])]
        m = 0 if U_Q is None else _t64(U_Q[0]).reshape(-1, p).shape[0]
        store = TrajectoryStore.create(None, {"n": n, "p": p, "m": m, "loss": "unknown",
                                              "preconditioned": False, **dict(meta or {})},
                                       dict(data or {}))
        for k, s in enumerate(steps if steps is not None else range(S)):
            K = flatten_kernel(_t64(K_SS[k]))
            if K.shape != (n * p, n * p):
                raise ShapeError(f"K_SS[{k}] is {tuple(K.shape)} stacked, need {(n * p, n * p)}")
            arrays = {"K_SS": K, "B": _t64(B[k]).reshape(n, p, p), "u": u2[k],
                      "g": _t64(g[k]).reshape(n, p), "dts": np.asarray(dts[k], float)}
            if K_QS is not None and U_Q is not None:
                arrays["K_QS"] = flatten_kernel(_t64(K_QS[k]))
                arrays["U_Q"] = _t64(U_Q[k]).reshape(-1, p)
            store.append({"index": k, "step": int(s), "time": float(t[k]), "lr": float("nan"),
                          "loss": float(loss[k]), "test_loss": None,
                          "test_gram_norm": None if test_gram_norm is None
                          else float(test_gram_norm[k])}, arrays)
        return cls.from_store(store)
