"""Viscous Burgers' equation: the exact solution (Cole–Hopf) and the PINN residual.

The benchmark of Raissi et al. (2019)::

    u_t + u u_x = ν u_xx,   x ∈ [−1, 1], t ∈ [0, 1],   u(0, x) = −sin(πx),   u(t, ±1) = 0,
    ν = 0.01/π.

The Cole–Hopf transform linearises it to the heat equation; for this initial condition

    u(t, x) = −∫ sin(π(x−η)) f(x−η) e^{−η²/(4νt)} dη / ∫ f(x−η) e^{−η²/(4νt)} dη,
    f(y) = exp(−cos(πy) / (2πν)).

With ``η = √(4νt) z`` both integrals have the Gauss–Hermite weight ``e^{−z²}``; ``f`` spans
``e^{±50}`` at ν = 0.01/π, so the quotient is evaluated as a softmax over the nodes
(log-sum-exp), which is stable for every ``t > 0``. Differentiating the softmax gives ``u_x``
in closed form: ``u_x = −π E[cos πy] − (π/(2πν)) Var[sin πy]`` under the node weights.
The solution is odd in ``x`` and 2-periodic, so ``u(t, ±1) = 0`` holds exactly. The exact
solution is numpy only; the reference grid is cached in memory.

For PINNs: noisy observations and collocation points, the autograd residual
(:func:`burgers_residual`), and :class:`BurgersPINN`, a network evaluated with its
derivatives in closed form, with exact per-point gradient statistics for the gated optimizer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Literal, overload

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError, UnsupportedModelError
from ..models.mlp import Sine
from ..optim import GradMoments

__all__ = ["BURGERS_NU", "BurgersObservations", "BurgersPINN", "BurgersReference",
           "burgers_exact", "burgers_point_losses", "burgers_reference", "burgers_residual",
           "noisy_burgers_observations", "residual_from_derivatives", "sample_collocation"]

BURGERS_NU = 0.01 / math.pi
"""The benchmark's viscosity ``ν = 0.01/π``."""

_MAX_NODES = 300  # numpy's hermgauss overflows somewhat above 350 nodes
_CHUNK = 256      # examples per batched matmul in BurgersPINN.grad_moments (cache-sized)


@functools.lru_cache(maxsize=8)
def _hermite(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(all="ignore"):
        z, w = np.polynomial.hermite.hermgauss(nodes)
    if not np.all(np.isfinite(w)):  # pragma: no cover - guarded by _MAX_NODES
        raise ConfigError(f"Gauss–Hermite weights overflowed at {nodes} nodes; use fewer")
    with np.errstate(divide="ignore"):
        return z, np.log(w)


@overload
def burgers_exact(t: np.ndarray | float, x: np.ndarray | float, *, nu: float = ...,
                  nodes: int = ..., return_dx: Literal[False] = ...) -> np.ndarray: ...


@overload
def burgers_exact(t: np.ndarray | float, x: np.ndarray | float, *, nu: float = ...,
                  nodes: int = ..., return_dx: Literal[True]) -> tuple[np.ndarray, np.ndarray]:
    ...


def burgers_exact(t: np.ndarray | float, x: np.ndarray | float, *, nu: float = BURGERS_NU,
                  nodes: int = 200, return_dx: bool = False
                  ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The exact solution ``u(t, x)`` (and optionally ``∂u/∂x``) by Cole–Hopf + Gauss–Hermite.

    Args:
        t: times ``≥ 0`` (any shape broadcastable with ``x``).
        x: positions (the formula holds on the whole line; the benchmark uses ``[−1, 1]``).
        nu: viscosity ``ν > 0``.
        nodes: Gauss–Hermite nodes (≤ 300). 200 agrees with a 20 001-point trapezoid rule to
            1e-12 at ν = 0.01/π (``tests/test_burgers.py``); smaller ν needs more.
        return_dx: also return ``∂u/∂x`` (exact derivative of the quadrature, not a difference).

    Returns:
        ``u`` with the broadcast shape of ``t`` and ``x`` (float64), or ``(u, u_x)``.

    Raises:
        ConfigError: ``t < 0``, ``ν ≤ 0`` or a node count outside ``[2, 300]``.
    """
    if not (isinstance(nodes, int) and 2 <= nodes <= _MAX_NODES):
        raise ConfigError(f"nodes must be an integer in [2, {_MAX_NODES}], got {nodes!r}")
    if not nu > 0:
        raise ConfigError(f"viscosity nu must be > 0, got {nu!r}")
    t, x = np.broadcast_arrays(np.asarray(t, dtype=np.float64), np.asarray(x, dtype=np.float64))
    if np.any(t < 0) or not np.all(np.isfinite(t)):
        raise ConfigError("burgers_exact needs finite times t >= 0")
    z, log_w = _hermite(nodes)
    a = 1.0 / (2.0 * math.pi * nu)
    y = x[..., None] - np.sqrt(4.0 * nu * t)[..., None] * z      # (..., nodes)
    log_p = log_w - a * np.cos(math.pi * y)
    log_p = log_p - log_p.max(axis=-1, keepdims=True)
    p = np.exp(log_p)
    p /= p.sum(axis=-1, keepdims=True)
    s = np.sin(math.pi * y)
    mean_s = (p * s).sum(-1)
    u = -mean_s
    if not return_dx:
        return u
    var_s = (p * s * s).sum(-1) - mean_s**2
    u_x = -math.pi * (p * np.cos(math.pi * y)).sum(-1) - a * math.pi * var_s
    # t = 0: every node sits at x, so the formulas above give -sin(πx) and -π cos(πx) already.
    return u, u_x


@dataclasses.dataclass(frozen=True)
class BurgersReference:
    """The exact solution on a grid.

    Attributes:
        t: ``(nt,)`` times in ``[0, 1]``.
        x: ``(nx,)`` positions in ``[−1, 1]``.
        u: ``(nt, nx)`` ``u(t_i, x_j)``, float64.
        nu: the viscosity.
    """

    t: np.ndarray
    x: np.ndarray
    u: np.ndarray
    nu: float

    def points(self) -> np.ndarray:
        """``(nt·nx, 2)`` grid points as ``(t, x)`` rows, row-major in ``(t, x)``."""
        tt, xx = np.meshgrid(self.t, self.x, indexing="ij")
        return np.stack([tt.ravel(), xx.ravel()], axis=1)


@functools.lru_cache(maxsize=4)
def burgers_reference(nt: int = 101, nx: int = 256, *, nu: float = BURGERS_NU,
                      nodes: int = 200) -> BurgersReference:
    """The exact solution on ``nt`` evenly spaced times in ``[0, 1]`` × ``nx`` in ``[−1, 1]``
    (cached in memory; the arrays are read-only).

    Raises:
        ConfigError: fewer than 2 points on an axis.
    """
    if nt < 2 or nx < 2:
        raise ConfigError(f"the reference grid needs nt, nx >= 2, got nt={nt}, nx={nx}")
    t = np.linspace(0.0, 1.0, nt)
    x = np.linspace(-1.0, 1.0, nx)
    u = burgers_exact(t[:, None], x[None, :], nu=nu, nodes=nodes)
    for a in (t, x, u):
        a.setflags(write=False)
    return BurgersReference(t, x, u, nu)


@dataclasses.dataclass(frozen=True)
class BurgersObservations:
    """Noisy point measurements of the exact solution.

    Attributes:
        tx: ``(n, 2)`` points ``(t, x)``, uniform on ``[0, 1] × [−1, 1]``.
        u: ``(n, 1)`` noisy values ``u_exact + ε``.
        u_clean: ``(n, 1)`` exact values.
        noise: ``(n, 1)`` the noise ``ε ~ N(0, σ²)`` actually added.
        sigma: ``σ``; the noise floor of the observation MSE is ``σ²``.
    """

    tx: Tensor
    u: Tensor
    u_clean: Tensor
    noise: Tensor
    sigma: float


def noisy_burgers_observations(n: int, sigma: float, *, seed: int = 0, nu: float = BURGERS_NU,
                               dtype: torch.dtype = torch.float32) -> BurgersObservations:
    """``n`` noisy measurements of ``u`` at uniform random points of the domain.

    Raises:
        ConfigError: ``n < 1`` or ``σ`` negative / not finite.
    """
    if n < 1:
        raise ConfigError(f"need at least one observation, got n={n}")
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ConfigError(f"sigma must be a finite number >= 0, got {sigma!r}")
    rng = np.random.default_rng(seed)
    tx = np.stack([rng.uniform(0, 1, n), rng.uniform(-1, 1, n)], axis=1)
    clean = burgers_exact(tx[:, 0], tx[:, 1], nu=nu)[:, None]
    eps = sigma * rng.standard_normal((n, 1))
    as_t = functools.partial(torch.as_tensor, dtype=dtype)
    return BurgersObservations(as_t(tx), as_t(clean + eps), as_t(clean), as_t(eps), float(sigma))


def sample_collocation(n_interior: int, n_initial: int, n_boundary: int, *,
                       generator: torch.Generator | None = None,
                       dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Uniform random points ``(t, x)``: interior, on ``t = 0`` and on ``x = ±1``.

    Returns:
        ``(interior (n_interior, 2), initial (n_initial, 2), boundary (n_boundary, 2))``.
    """
    def u01(*shape):
        return torch.rand(*shape, generator=generator, dtype=dtype)

    interior = torch.stack([u01(n_interior), 2 * u01(n_interior) - 1], dim=1)
    initial = torch.stack([torch.zeros(n_initial, dtype=dtype), 2 * u01(n_initial) - 1], dim=1)
    sign = torch.where(u01(n_boundary) < 0.5, -1.0, 1.0).to(dtype)
    boundary = torch.stack([u01(n_boundary), sign], dim=1)
    return interior, initial, boundary


def burgers_residual(u_fn, tx: Tensor, *, nu: float = BURGERS_NU,
                     create_graph: bool = True) -> Tensor:
    """The PDE residual ``u_t + u u_x − ν u_xx`` of a network at points ``tx``.

    Args:
        u_fn: callable ``(m, 2) → (m, 1)``, inputs ordered ``(t, x)`` (a module or a closure
            over parameters, e.g. a ``torch.func.functional_call``).
        tx: ``(m, 2)`` points.
        nu: viscosity.
        create_graph: keep the graph so the residual can be differentiated w.r.t. parameters
            (training); ``False`` for evaluation.

    Returns:
        ``(m,)`` residuals (units of ``u``/time).

    Raises:
        ShapeError: ``tx`` is not ``(m, 2)`` or ``u_fn`` does not return ``(m, 1)``.
    """
    if tx.ndim != 2 or tx.shape[1] != 2:
        raise ShapeError(f"tx must be (m, 2) points ordered (t, x), got {tuple(tx.shape)}")
    tx = tx.detach().requires_grad_(True)
    with torch.enable_grad():
        u = u_fn(tx)
        if u.shape != (tx.shape[0], 1):
            raise ShapeError(f"u_fn must map (m, 2) -> (m, 1), got {tuple(u.shape)}")
        (du,) = torch.autograd.grad(u.sum(), tx, create_graph=True)
        u_t, u_x = du[:, 0], du[:, 1]
        (du_x,) = torch.autograd.grad(u_x.sum(), tx, create_graph=create_graph)
        u_xx = du_x[:, 1]
    r = u_t + u[:, 0] * u_x - nu * u_xx
    return r if create_graph else r.detach()


class BurgersPINN(nn.Module):
    """A network ``u(t, x)`` evaluated with its derivatives ``[u, u_t, u_x, u_xx]`` per point.

    The derivatives are propagated forward through the layers in closed form ("Taylor mode"):
    four streams — the value ``a`` and its tangents ``a_t, a_x, a_xx`` — pass every
    ``Linear`` (the bias only on the value stream: ``z = W a + b``, ``z_• = W a_•``) and every
    elementwise activation ``h = σ(z)`` (``h_t = σ'(z) z_t``, ``h_x = σ'(z) z_x``,
    ``h_xx = σ''(z) z_x² + σ'(z) z_xx``). This costs about one batched forward per stream, is
    plain tensor algebra (so ``backward()``, ``vmap(grad)`` and ``VmapStats`` all work), and
    gives each Linear layer per-example inputs ``a_i ∈ R^{4×in}``, so exact per-example
    gradient statistics have a closed form (:meth:`grad_moments`): the gradient of example
    ``i`` on ``W`` is ``Σ_s δ_is a_isᵀ`` over the four streams, on ``b`` it is ``δ_i0``.

    The network sees ``(2t − 1, x) ∈ [−1, 1]²``; derivatives are w.r.t. the raw ``(t, x)``.

    Args:
        net: ``nn.Sequential`` of ``nn.Linear`` and elementwise activations
            (:class:`~tangentscope.models.Sine`, ``nn.Tanh``), mapping 2 inputs to 1 output
            (e.g. a :class:`~tangentscope.models.siren.Siren`).

    Raises:
        UnsupportedModelError: another layer type, or not 2 → 1.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        if not isinstance(net, nn.Sequential):
            raise UnsupportedModelError(
                f"BurgersPINN needs an nn.Sequential of Linear and Sine/Tanh layers, got "
                f"{type(net).__name__}; build the network with Siren(...) or mlp(..., "
                "activation='tanh'|'sin')")
        linears = [m for m in net if isinstance(m, nn.Linear)]
        for m in net:
            if not isinstance(m, (nn.Linear, Sine, nn.Tanh)):
                raise UnsupportedModelError(
                    f"BurgersPINN: layer {type(m).__name__} has no derivative rule here "
                    "(supported: Linear, Sine, Tanh); use Siren(...) or mlp(..., "
                    "activation='tanh'|'sin')")
        if not linears or linears[0].in_features != 2 or linears[-1].out_features != 1:
            raise UnsupportedModelError("BurgersPINN needs a network mapping (t, x) -> u, i.e. "
                                        "2 inputs and 1 output")
        self.net = net
        self._record: list[tuple[nn.Linear, Tensor, list[Tensor]]] | None = None

    def _inputs(self, tx: Tensor) -> Tensor:
        scale = torch.tensor([2.0, 1.0], dtype=tx.dtype, device=tx.device)
        return tx * scale - torch.tensor([1.0, 0.0], dtype=tx.dtype, device=tx.device)

    def u(self, tx: Tensor) -> Tensor:
        """``(m, 2)`` points → ``(m, 1)`` values only (for evaluation)."""
        return self.net(self._inputs(tx))

    def forward(self, tx: Tensor) -> Tensor:
        """``(m, 2)`` points ``(t, x)`` → ``(m, 4)`` columns ``[u, u_t, u_x, u_xx]``."""
        if tx.ndim != 2 or tx.shape[1] != 2:
            raise ShapeError(f"BurgersPINN expects (m, 2) points ordered (t, x), got "
                             f"{tuple(tx.shape)}")
        m = tx.shape[0]
        seeds = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=tx.dtype,
                             device=tx.device)               # ∂/∂t, ∂/∂x, ∂²/∂x² of the inputs
        a = torch.cat([self._inputs(tx).unsqueeze(1), seeds.expand(m, 3, 2)], dim=1)  # (m, 4, 2)
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                z = a @ layer.weight.T
                if layer.bias is not None:
                    z = torch.cat([z[:, :1] + layer.bias, z[:, 1:]], dim=1)
                if self._record is not None and torch.is_grad_enabled() and z.requires_grad:
                    slot: list[Tensor] = []
                    self._record.append((layer, a.detach(), slot))
                    z.register_hook(slot.append)
                a = z
            else:
                z0, z_t, z_x, z_xx = a.unbind(1)
                h, d1, d2 = _activation(layer, z0)
                a = torch.stack([h, d1 * z_t, d1 * z_x, d2 * z_x * z_x + d1 * z_xx], dim=1)
        return a[:, :, 0]

    def record_statistics(self, enabled: bool = True) -> None:
        """Record what :meth:`grad_moments` needs during the next forward/backward."""
        self._record = [] if enabled else None

    def grad_moments(self) -> dict[int, Any]:
        """Exact per-example gradient sums of the last recorded forward + ``backward()``.

        Call :meth:`record_statistics` before the forward; the loss must be a mean (or sum)
        of per-point losses of that forward's rows. Returns ``id(param) -> GradMoments``
        (``S1 = Σ_i c_i`` = the gradient of that backward, ``S2 = Σ_i c_i²``, ``b`` rows), the
        form ``GatedAdamW.step(moments=...)`` takes. Recording stops afterwards.

        Raises:
            ConfigError: nothing was recorded, or the backward has not run.
        """
        rec = self._record
        if not rec or any(not slot for _, _, slot in rec):
            raise ConfigError("grad_moments() needs record_statistics() before the forward and "
                              "loss.backward() after it")
        out: dict[int, Any] = {}
        for layer, a, slot in rec:
            d = sum(slot[1:], slot[0])                       # (m, 4, out)
            b = d.shape[0]
            sq = torch.zeros_like(layer.weight, dtype=d.dtype)
            for s in range(0, b, _CHUNK):                     # per-example ∂W = δ_iᵀ a_i
                sq += torch.bmm(d[s:s + _CHUNK].transpose(1, 2), a[s:s + _CHUNK]).square_().sum(0)
            total = d.reshape(-1, d.shape[2]).T @ a.reshape(-1, a.shape[2])
            out[id(layer.weight)] = GradMoments(total, sq, b)
            if layer.bias is not None:
                per_b = d[:, 0]
                out[id(layer.bias)] = GradMoments(per_b.sum(0), per_b.square().sum(0), b)
        self._record = None
        return out


def _activation(layer: nn.Module, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(σ(z), σ'(z), σ''(z))`` for the supported elementwise layers."""
    if isinstance(layer, nn.Tanh):
        h = torch.tanh(z)
        d1 = 1 - h * h
        return h, d1, -2 * h * d1
    assert isinstance(layer, Sine)                            # Sine: sin(w z)
    w = layer.w0
    s, c = torch.sin(w * z), torch.cos(w * z)
    return s, w * c, -(w * w) * s


def burgers_point_losses(out: Tensor, target: Tensor, *, nu: float = BURGERS_NU) -> Tensor:
    """Per-point PINN losses from :class:`BurgersPINN` outputs.

    Args:
        out: ``(m, 4)`` ``[u, u_t, u_x, u_xx]``.
        target: ``(m, 3)`` rows ``(kind, value, weight)``: ``kind = 1`` a collocation point,
            loss ``weight · (u_t + u u_x − ν u_xx)²``; ``kind = 0`` a value constraint (an
            observation, the initial or the boundary condition), loss ``weight · (u − value)²``.

    Returns:
        ``(m,)`` losses; their mean is the PINN objective when ``weight = m·λ_g/n_g`` for a
        term ``g`` with ``n_g`` points and weight ``λ_g``.
    """
    kind, value, weight = target.unbind(-1)
    residual = residual_from_derivatives(out, nu=nu)
    return weight * torch.where(kind > 0.5, residual**2, (out[..., 0] - value) ** 2)


def residual_from_derivatives(out: Tensor, *, nu: float = BURGERS_NU) -> Tensor:
    """``u_t + u u_x − ν u_xx`` from ``(m, 4)`` columns ``[u, u_t, u_x, u_xx]`` → ``(m,)``."""
    u, u_t, u_x, u_xx = out.unbind(-1)
    return u_t + u * u_x - nu * u_xx
