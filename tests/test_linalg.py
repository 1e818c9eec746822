"""tangentscope.linalg against eigh-based brute-force twins (float64, explicit tolerances):
Krylov actions of the interval functions, block Lanczos (and its block-size default against
scipy's eigsh), randomized Nyström, stochastic Lanczos quadrature."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tangentscope.dynamics.operators import _phi1, _phi2
from tangentscope.errors import ShapeError, TangentscopeError
from tangentscope.linalg import (
    KrylovConvergenceError,
    LockstepLanczos,
    default_block_size,
    dense_density,
    dense_function,
    dense_topk,
    krylov_actions,
    lanczos_topk,
    nystrom_topk,
    phi1,
    phi2,
    slq_density,
)

F64 = torch.float64


def _psd(N=120, decay=1.5, scale=1.0, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=F64))
    lam = scale * torch.arange(1, N + 1, dtype=F64) ** -decay
    if rank is not None:
        lam[rank:] = 0
    return (Q * lam) @ Q.T, lam


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# -- φ-functions --------------------------------------------------------------------------------
def test_phi_functions_match_the_operators_and_the_closed_forms():
    x = torch.cat([torch.zeros(1, dtype=F64), torch.logspace(-8, 3, 200, dtype=F64)])
    torch.testing.assert_close(phi1(x), _phi1(x), rtol=1e-15, atol=0)
    torch.testing.assert_close(phi2(x), _phi2(x), rtol=1e-15, atol=0)
    big = x[x > 0.1]
    torch.testing.assert_close(phi1(big), (1 - torch.exp(-big)) / big, rtol=1e-13, atol=0)
    torch.testing.assert_close(phi2(big), (big - 1 + torch.exp(-big)) / big ** 2, rtol=1e-12,
                               atol=0)
    assert float(phi1(torch.zeros(1, dtype=F64))) == 1.0
    assert float(phi2(torch.zeros(1, dtype=F64))) == 0.5


# -- Krylov actions -----------------------------------------------------------------------------
@pytest.mark.parametrize("h", [0.01, 1.0, 30.0, 1000.0])
def test_krylov_actions_match_eigh(h):
    S, _ = _psd(scale=20.0)
    B = torch.randn(S.shape[0], 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    B[:, 3] = 0                                          # a zero column: f(S)·0 = 0
    fns = [lambda l: torch.exp(-h * l), lambda l: -h * phi1(h * l),
           lambda l: -2 * h * h * phi2(2 * h * l), lambda l: -h * h * phi2(h * l)]
    res, info = krylov_actions(lambda X: S @ X, B, fns, tol=1e-12)
    for r, f in zip(res, fns):
        assert _rel(r, dense_function(S, f) @ B) < 1e-10
        assert float(r[:, 3].abs().max()) == 0.0
    assert info.dims[3] == 0 and info.max_dim < S.shape[0]


def test_krylov_column_chunks_and_invariant_subspaces():
    S, _ = _psd(N=80, rank=6, scale=5.0)                 # rank 6: Krylov spaces are invariant at 7
    B = torch.randn(80, 7, dtype=F64, generator=torch.Generator().manual_seed(2))
    f = [lambda l: torch.exp(-2.0 * l)]
    full, info = krylov_actions(lambda X: S @ X, B, f, tol=1e-13)
    chunked, _ = krylov_actions(lambda X: S @ X, B, f, tol=1e-13, column_chunk=3)
    want = dense_function(S, f[0]) @ B
    assert _rel(full[0], want) < 1e-12 and _rel(chunked[0], want) < 1e-12
    assert info.max_dim <= 9                             # stops at (about) the rank


def test_krylov_refuses_when_the_cap_is_too_small():
    S, _ = _psd(scale=50.0)
    B = torch.randn(S.shape[0], 2, dtype=F64)
    with pytest.raises(KrylovConvergenceError, match="krylov_max_dim"):
        krylov_actions(lambda X: S @ X, B, [lambda l: torch.exp(-100 * l)], max_dim=4)
    assert issubclass(KrylovConvergenceError, TangentscopeError)


def test_lockstep_lanczos_tridiagonal_is_the_projection():
    S, _ = _psd(N=60)
    B = torch.randn(60, 3, dtype=F64)
    lz = LockstepLanczos(lambda X: S @ X, B)
    for _ in range(10):
        lz.step()
    cols = torch.arange(3)
    T = lz.tridiagonal(cols)
    Q = lz.Q[:, :10]                                     # (c, 10, N)
    for c in range(3):
        torch.testing.assert_close(Q[c] @ S @ Q[c].T, T[c], rtol=0, atol=1e-13)
        torch.testing.assert_close(Q[c] @ Q[c].T, torch.eye(10, dtype=F64), rtol=0, atol=1e-13)


# -- eigenpairs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 5, 16])
def test_lanczos_topk_matches_eigh(k):
    A, lam = _psd()
    r = lanczos_topk(lambda V: A @ V, A.shape[0], k, tol=1e-10)
    ref = dense_topk(A, k)
    assert r.converged
    torch.testing.assert_close(r.values, ref.values, rtol=1e-10, atol=0)
    # eigenvectors up to sign: |⟨v, v_ref⟩| = 1 (distinct eigenvalues)
    torch.testing.assert_close((r.vectors * ref.vectors).sum(0).abs(),
                               torch.ones(k, dtype=F64), rtol=0, atol=1e-8)
    assert float(r.residuals.max()) <= 1e-10 * float(lam[0])


def test_lanczos_finds_repeated_and_zero_eigenvalues():
    N = 50
    Q, _ = torch.linalg.qr(torch.randn(N, N, dtype=F64, generator=torch.Generator()
                                       .manual_seed(3)))
    lam = torch.zeros(N, dtype=F64)
    lam[:6] = torch.tensor([3.0, 3.0, 3.0, 2.0, 2.0, 1.0], dtype=F64)
    A = (Q * lam) @ Q.T
    r = lanczos_topk(lambda V: A @ V, N, 8, block_size=3, tol=1e-10)
    torch.testing.assert_close(r.values, lam[:8], rtol=0, atol=1e-10)


def test_block_size_default_matches_scipy_eigsh_counts():
    """The safe default (b = min(k, 8)) needs 72 products for the top 8 of a power-law
    spectrum where scipy's eigsh needs ~27; ``default_block_size`` (b = 1 up to k = 8), what
    the matrix-free channel uses, needs no more than ARPACK."""
    sla = pytest.importorskip("scipy.sparse.linalg")
    A, lam = _psd(N=1000)
    counts = {}
    for b in (None, default_block_size(8)):
        r = lanczos_topk(lambda V: A @ V, 1000, 8, tol=1e-8, block_size=b)
        torch.testing.assert_close(r.values, lam[:8], rtol=1e-12, atol=0)
        counts[b] = r.matvecs
    calls = [0]

    def mv(v):
        calls[0] += 1
        return A.numpy() @ v

    op = sla.LinearOperator((1000, 1000), matvec=mv, dtype=np.float64)
    sla.eigsh(op, k=8, which="LA", tol=1e-8)
    assert default_block_size(8) == 1 and default_block_size(32) == 4
    assert counts[None] >= 60                            # the safe default, b = 8
    assert counts[1] <= calls[0]                         # no worse than ARPACK
    assert counts[1] <= 30


def test_nystrom_is_exact_for_low_rank_and_improves_with_power_iterations():
    A, lam = _psd(N=200, rank=12)
    r = nystrom_topk(lambda V: A @ V, 200, 10, oversample=5, power_iters=0)
    torch.testing.assert_close(r.values, lam[:10], rtol=1e-9, atol=0)
    assert float(r.residuals.max()) < 1e-9
    B, lamB = _psd(N=200, decay=2.0)
    errs = [float(((nystrom_topk(lambda V: B @ V, 200, 8, power_iters=q).values - lamB[:8]).abs()
                   / lamB[:8]).max()) for q in (0, 2)]
    assert errs[1] < errs[0] and errs[1] < 1e-3


def test_eigen_solvers_refuse_bad_k():
    A, _ = _psd(N=10)
    for fn in (lanczos_topk, nystrom_topk):
        with pytest.raises(ShapeError, match="k must be"):
            fn(lambda V: A @ V, 10, 0)
    with pytest.raises(ShapeError, match="matvec returned"):
        lanczos_topk(lambda V: V[:5], 10, 2)


# -- stochastic Lanczos quadrature ---------------------------------------------------------------
def test_slq_quadrature_is_exact_for_low_degree_polynomials():
    A, _ = _psd(N=150)
    m = 6
    d = slq_density(lambda V: A @ V, 150, probes=3, steps=m, seed=4)
    g = torch.Generator().manual_seed(4)
    V = (torch.randint(0, 2, (150, 3), generator=g) * 2 - 1).to(F64) / math.sqrt(150)
    for j in range(2 * m):                               # Gauss: exact up to degree 2m − 1
        want = (V * (torch.linalg.matrix_power(A, j) @ V)).sum(0)
        got = (d.weights * d.nodes ** j).sum(1)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-15)


def test_slq_density_and_trace_against_eigh():
    A, lam = _psd(N=300, decay=0.7)
    d = slq_density(lambda V: A @ V, 300, probes=64, steps=40, seed=0)
    exact = dense_density(A)
    # trace estimates: Hutchinson error of 64 Rademacher probes (a few % here)
    assert abs(d.trace(lambda t: t) - float(lam.sum())) < 0.05 * float(lam.sum())
    assert abs(d.trace(torch.sqrt) - float(lam.sqrt().sum())) < 0.05 * float(lam.sqrt().sum())
    grid = torch.linspace(-2, 0.5, 200, dtype=F64)
    a, b = d.log_density(grid, sigma=0.15), exact.log_density(grid, sigma=0.15)
    dx = float(grid[1] - grid[0])
    assert float((a - b).abs().sum()) * dx < 0.1          # L1 distance of the densities
    assert abs(d.fraction_below(float(lam[150])) - exact.fraction_below(float(lam[150]))) < 0.05
    with pytest.raises(ShapeError):
        slq_density(lambda V: A @ V, 300, probes=0)


def test_slq_with_given_vectors_is_their_own_spectral_measure():
    """``start=``: each vector's Gauss quadrature; with the full Krylov space it is exact, so
    the weight above a cut is the share of ``‖v‖²`` in the eigenvectors above it."""
    A, lam = _psd(N=40, decay=0.7)
    w, Q = torch.linalg.eigh(A)
    g = torch.Generator().manual_seed(4)
    V = torch.randn(40, 2, dtype=F64, generator=g) * torch.tensor([1.0, 3.0], dtype=F64)
    d = slq_density(lambda X: A @ X, 40, start=V, steps=40)
    cut = float(lam[10])
    got = (d.weights * (d.nodes > cut)).sum(1)
    c = Q.T @ V
    want = (c[w > cut] ** 2).sum(0) / (c ** 2).sum(0)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    with pytest.raises(ShapeError, match="start"):
        slq_density(lambda X: A @ X, 40, start=torch.ones(5, 1, dtype=F64))
