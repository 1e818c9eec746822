"""The matrix-free eNTK operator and Lanczos top-k against the dense kernel and eigh."""

from __future__ import annotations

import pytest
import torch

import tangentscope as ts
from zoo import inputs_for, make_cnn, make_mlp


def test_matvec_equals_dense_kernel_times_vector():
    model = make_mlp(3)
    x = inputs_for("vec", 6)
    K = ts.flatten_kernel(ts.entk(model, x))
    op = ts.EntkOperator(model, x, chunk_size=4)
    v = torch.randn(18, dtype=torch.float64)
    torch.testing.assert_close(op @ v, K @ v, rtol=1e-10, atol=1e-10)
    V = torch.randn(18, 3, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(V), K @ V, rtol=1e-10, atol=1e-10)
    d = torch.rand(sum(q.numel() for q in model.parameters()), dtype=torch.float64)
    Kd = ts.flatten_kernel(ts.entk(model, x, precondition=d))
    torch.testing.assert_close(ts.EntkOperator(model, x, precondition=d) @ v, Kd @ v,
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("make,kind,n,iterative", [(lambda: make_mlp(2, width=32), "vec", 60, True),
                                                   (lambda: make_cnn(2), "cnn", 20, False)])
def test_topk_matches_eigh(make, kind, n, iterative):
    model = make()
    x = inputs_for(kind, n)
    K = ts.flatten_kernel(ts.entk(model, x))
    lam, V = torch.linalg.eigh(K)
    lam, V = lam.flip(0), V.flip(1)
    k = 6
    res = ts.entk_topk(model, x, k, tol=1e-10)
    torch.testing.assert_close(res.values, lam[:k], rtol=1e-8, atol=1e-8 * float(lam[0]))
    # eigenvectors up to sign (the top eigenvalues of these kernels are simple)
    overlap = (V[:, :k].T @ res.vectors).diagonal().abs()
    torch.testing.assert_close(overlap, torch.ones(k, dtype=torch.float64), rtol=0, atol=1e-6)
    assert (res.residuals <= 1e-7 * float(lam[0])).all()
    if iterative:  # a well-separated top spectrum converges long before the space is exhausted
        assert res.iterations < K.shape[0] // 2


def test_lanczos_handles_repeated_and_zero_eigenvalues():
    torch.manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64))
    lam = torch.tensor([5.0, 5.0, 5.0, 2.0] + [0.0] * 26, dtype=torch.float64)
    A = Q @ torch.diag(lam) @ Q.T
    res = ts.lanczos_topk(lambda v: A @ v, 30, 5, tol=1e-10)
    torch.testing.assert_close(res.values, lam[:5], rtol=0, atol=1e-9)
    assert (res.residuals < 1e-9).all()


def test_topk_bad_k():
    with pytest.raises(ts.ShapeError, match="k must be"):
        ts.lanczos_topk(lambda v: v, 4, 5)
