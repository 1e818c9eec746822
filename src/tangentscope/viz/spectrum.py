"""Figures for kernel spectra, channel/reservoir energy, rotation and the operator identities.

Every helper takes plain arrays (so a run directory's ``arrays.npz`` is enough to redraw), an
optional matplotlib ``ax`` (a new figure otherwise) and returns the ``Axes``. Save with
:func:`tangentscope.viz.save_figure`. matplotlib is imported only when a helper is called.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ._mpl import pyplot

__all__ = ["plot_eigenvalue_spectra", "plot_residual_energy", "plot_residual_energy_map",
           "plot_channel_energy", "plot_rotation_surface", "plot_visibility",
           "plot_identity_residuals", "plot_spectral_schedule", "plot_fit"]


def _ax(ax: Any, figsize: tuple[float, float] = (5.0, 3.4), projection: str | None = None) -> Any:
    if ax is not None:
        return ax
    fig = pyplot().figure(figsize=figsize)
    return fig.add_subplot(111, projection=projection)


def _positive(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=float)
    return np.where(a > 0, a, np.nan)


def plot_eigenvalue_spectra(times: np.ndarray, eigenvalues: np.ndarray, *, top: int = 16,
                            ax: Any = None, title: str = "eNTK eigenvalues over training") -> Any:
    """The ``top`` largest eigenvalues ``λ_i(t)`` of ``K_SS(t)`` (``(S, N)``) against time."""
    ax = _ax(ax)
    lam = _positive(eigenvalues)[:, :top]
    cmap = pyplot().get_cmap("viridis")
    t = np.asarray(times, dtype=float)
    x = np.where(t > 0, t, np.nan) if (t > 0).sum() > 1 else t
    for i in range(lam.shape[1]):
        ax.plot(x, lam[:, i], color=cmap(i / max(lam.shape[1] - 1, 1)), lw=1.2)
    ax.set_yscale("log")
    if (t > 0).sum() > 1:
        ax.set_xscale("log")
    ax.set(xlabel="training time τ = Σ lr", ylabel="λ_i(K_SS)", title=title)
    return ax


def plot_residual_energy(eigenvalues: np.ndarray, energy: np.ndarray, *, axes: Any = None,
                         title: str = "") -> Any:
    """The essay's demo panel: eigenvalues (top) and residual energy ``⟨v_i, r⟩²`` (bottom) per
    eigenvector, largest eigenvalue first. Returns the two axes."""
    if axes is None:
        _, axes = pyplot().subplots(2, 1, figsize=(5.0, 4.2), sharex=True)
    i = np.arange(len(eigenvalues))
    axes[0].bar(i, _positive(eigenvalues), color="#3b6ea8", width=0.85)
    axes[0].set(yscale="log", ylabel="λ_i", title=title or "eigenvalues and residual energy")
    axes[1].bar(i, _positive(energy), color="#c4572c", width=0.85)
    axes[1].set(yscale="log", ylabel="⟨v_i, r⟩²", xlabel="eigenvector i (largest λ first)")
    return axes


def plot_residual_energy_map(times: np.ndarray, energy: np.ndarray, *, ax: Any = None,
                             top: int | None = None,
                             title: str = "residual energy per mode over training") -> Any:
    """Heat map of ``⟨v_i(t), r(t)⟩² / ‖r(0)‖²`` (``(S, N)``): modes vs snapshots."""
    ax = _ax(ax)
    E = np.asarray(energy, dtype=float)[:, :top]
    E = E / max(float(E[0].sum()), 1e-300)
    im = ax.imshow(np.log10(np.maximum(E.T, 1e-12)), aspect="auto", origin="lower",
                   cmap="magma", vmin=-8, vmax=0, interpolation="nearest",
                   extent=(0, len(times), -0.5, E.shape[1] - 0.5))
    ax.figure.colorbar(im, ax=ax, label="log₁₀ energy / ‖r(0)‖²")
    n = len(times)
    ticks = np.unique(np.linspace(0, n - 1, min(n, 5)).astype(int))
    ax.set_xticks(ticks + 0.5, [f"{times[k]:.3g}" for k in ticks])
    ax.set(xlabel="training time τ (snapshots)", ylabel="mode i of K_SS(t)", title=title)
    ax.grid(False)
    return ax


def plot_channel_energy(times: np.ndarray, fractions: Mapping[str, np.ndarray], *,
                        ax: Any = None, rank: np.ndarray | None = None,
                        title: str = "energy in the signal channel of W_S(0, t)") -> Any:
    """Fraction of each vector's energy in the channel (``1 −`` reservoir) over time."""
    ax = _ax(ax)
    t = np.asarray(times, dtype=float)
    for name, f in fractions.items():
        ax.plot(t, f, lw=1.6, label=name)
    ax.set(xlabel="training time τ", ylabel="channel fraction", ylim=(-0.02, 1.02), title=title)
    if (t > 0).all() and len(t) > 1 and t[-1] / t[0] > 50:
        ax.set_xscale("log")
    if rank is not None:
        ax2 = ax.twinx()
        ax2.step(t, rank, where="post", color="0.5", lw=1, ls="--", label="channel dim")
        ax2.set_ylabel("channel dimension", color="0.4")
        ax2.grid(False)
    ax.legend(loc="lower right")
    return ax


def plot_rotation_surface(times: np.ndarray, mode_angles: np.ndarray, *, ax: Any = None,
                          title: str = "kernel rotation relative to initialization") -> Any:
    """Shaded surface of the angle of each top eigenvector ``v_i(t)`` out of the initial top-k
    eigenspace (``(S, k)``; centered, normalized Gram matrices)."""
    plt = pyplot()
    from matplotlib.colors import LightSource

    if ax is None:
        ax = plt.figure(figsize=(5.6, 4.2)).add_subplot(111, projection="3d")
    A = np.degrees(np.asarray(mode_angles, dtype=float))
    S, k = A.shape
    X, Y = np.meshgrid(np.arange(S), np.arange(k), indexing="ij")
    rgb = LightSource(azdeg=315, altdeg=45).shade(A, cmap=plt.get_cmap("viridis"), vert_exag=0.1,
                                                  blend_mode="soft", vmin=0,
                                                  vmax=max(float(A.max()), 1.0))
    ax.plot_surface(X, Y, A, facecolors=rgb, rstride=1, cstride=1, linewidth=0,
                    antialiased=False, shade=False)
    ticks = np.unique(np.linspace(0, S - 1, min(S, 4)).astype(int))
    ax.set_xticks(ticks, [f"{times[i]:.3g}" for i in ticks])
    ax.set(xlabel="time τ", ylabel="mode i", zlabel="angle (deg)", zlim=(0, 90), title=title)
    ax.view_init(elev=28, azim=-130)
    return ax


def plot_visibility(eigenvalues: np.ndarray, visibility: np.ndarray, *,
                    bound: np.ndarray | None = None, cut: float | None = None, ax: Any = None,
                    title: str = "test visibility ‖G_Q ψ_j‖ vs λ_j(W_S)") -> Any:
    """Per-mode test visibility against the mode's eigenvalue, with the bound and the cut."""
    ax = _ax(ax)
    lam, vis = _positive(eigenvalues), _positive(visibility)
    ax.scatter(lam, vis, s=12, color="#3b6ea8", label="‖G_Q ψ_j‖", zorder=3)
    if bound is not None:
        order = np.argsort(np.nan_to_num(lam, nan=np.inf))
        ax.plot(lam[order], _positive(bound)[order], color="0.3", lw=1,
                label="√(λ_j ∫‖K_QQ‖ dτ) bound")
    if cut is not None and cut > 0:
        ax.axvline(cut, color="#c4572c", ls="--", lw=1, label="channel | reservoir cut")
    ax.set(xscale="log", yscale="log", xlabel="λ_j(W_S)", ylabel="‖G_Q ψ_j‖", title=title)
    ax.legend(loc="upper left")
    return ax


def plot_identity_residuals(times: np.ndarray, errors: Mapping[str, np.ndarray], *,
                            ax: Any = None, title: str = "identity residuals on [0, t]") -> Any:
    """Relative errors of the identities for windows ``[0, t]`` against ``t``."""
    ax = _ax(ax)
    for name, e in errors.items():
        ax.plot(times, _positive(e), lw=1.4, label=name)
    ax.set(yscale="log", xlabel="training time τ", ylabel="relative error", title=title)
    ax.legend()
    return ax


def plot_spectral_schedule(eigenvalues: np.ndarray, learned_time: np.ndarray, *,
                           predicted_time: np.ndarray | None = None, ax: Any = None,
                           title: str = "spectral schedule: when each mode was learned") -> Any:
    """Learned time of each mode against its eigenvalue (frozen-kernel prediction dashed)."""
    ax = _ax(ax)
    lam = _positive(eigenvalues)
    ax.scatter(lam, _positive(learned_time), s=14, color="#3b6ea8", label="measured", zorder=3)
    if predicted_time is not None:
        order = np.argsort(np.nan_to_num(lam, nan=np.inf))
        ax.plot(lam[order], _positive(predicted_time)[order], "--", color="0.3", lw=1,
                label="frozen-kernel prediction")
    ax.set(xscale="log", yscale="log", xlabel="λ_i (K_SS at start)",
           ylabel="time residual fell below fraction", title=title)
    ax.legend()
    return ax


def plot_fit(x: np.ndarray, y: np.ndarray, noisy: np.ndarray, x_test: np.ndarray,
             predictions: Mapping[str, np.ndarray], y_test: np.ndarray | None = None, *,
             ax: Any = None, title: str = "fit") -> Any:
    """1-D regression: training points (noisy ones marked), test curve(s)."""
    ax = _ax(ax)
    x, y = np.ravel(x), np.ravel(y)
    noisy = np.ravel(noisy).astype(bool)
    if y_test is not None:
        ax.plot(np.ravel(x_test), np.ravel(y_test), color="0.6", lw=1, label="clean target")
    for name, pred in predictions.items():
        ax.plot(np.ravel(x_test), np.ravel(pred), lw=1.5, label=name)
    ax.scatter(x[~noisy], y[~noisy], s=14, color="#3b6ea8", zorder=3, label="clean labels")
    ax.scatter(x[noisy], y[noisy], s=18, color="#c4572c", marker="x", zorder=3,
               label="noisy labels")
    ax.set(xlabel="x", ylabel="y", title=title)
    ax.legend(fontsize=7)
    return ax
