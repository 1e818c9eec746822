"""Every eNTK implementation against the brute-force per-output autograd loop (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tangentscope as ts
from tangentscope.kernels.entk import IMPLEMENTATIONS
from zoo import MODELS, brute_force_entk, inputs_for, kind, make_mlp

TOL = dict(rtol=1e-10, atol=1e-10)
GENERIC = [i for i in IMPLEMENTATIONS if i != "structured"]


@pytest.mark.parametrize("impl", GENERIC)
@pytest.mark.parametrize("name", list(MODELS))
def test_entk_matches_brute_force(name, impl):
    model = MODELS[name]()
    x1, x2 = inputs_for(kind(name), 5, seed=1), inputs_for(kind(name), 3, seed=2)
    ref_11 = brute_force_entk(model, x1)
    ref_12 = brute_force_entk(model, x1, x2)
    K11 = ts.entk(model, x1, implementation=impl)
    K12 = ts.entk(model, x1, x2, implementation=impl)
    p = ref_11.shape[-1]
    assert K11.shape == (5, 5, p, p) and K12.shape == (5, 3, p, p)
    torch.testing.assert_close(K11, ref_11, **TOL)
    torch.testing.assert_close(K12, ref_12, **TOL)
    Kt = ts.entk(model, x1, x2, implementation=impl, trace_outputs=True)
    torch.testing.assert_close(Kt, ref_12.diagonal(dim1=2, dim2=3).sum(-1), **TOL)


@pytest.mark.parametrize("impl", GENERIC)
def test_chunking_does_not_change_the_kernel(impl):
    model = make_mlp(3)
    x1, x2 = inputs_for("vec", 7, 1), inputs_for("vec", 5, 2)
    full = ts.entk(model, x1, x2, implementation=impl)
    for c in (1, 2, 3):
        torch.testing.assert_close(ts.entk(model, x1, x2, implementation=impl, chunk_size=c),
                                   full, **TOL)
        torch.testing.assert_close(ts.entk(model, x1, implementation=impl, chunk_size=c),
                                   brute_force_entk(model, x1), **TOL)


@pytest.mark.parametrize("impl", GENERIC)
def test_groups_sum_to_full_and_match_blocks(impl):
    model = make_mlp(2)
    x = inputs_for("vec", 4)
    blocks = ts.entk(model, x, implementation=impl, groups="layer")
    assert set(blocks) == {"0", "2", "4"}
    torch.testing.assert_close(sum(blocks.values()), ts.entk(model, x, implementation=impl),
                               **TOL)
    # the block of layer "2" alone equals the kernel of a model whose other params are frozen
    for n, q in model.named_parameters():
        q.requires_grad_(n.startswith("2."))
    torch.testing.assert_close(blocks["2"], brute_force_entk(model, x), **TOL)


@pytest.mark.parametrize("impl", GENERIC)
def test_preconditioned_kernel(impl):
    model = make_mlp(2)
    x1, x2 = inputs_for("vec", 4, 1), inputs_for("vec", 3, 2)
    P = sum(q.numel() for q in model.parameters())
    d = torch.rand(P, dtype=torch.float64) + 0.1
    K = ts.entk(model, x1, x2, implementation=impl, precondition=d)
    torch.testing.assert_close(K, brute_force_entk(model, x1, x2, d=d), **TOL)
    # the dict form is the same
    dd, i = {}, 0
    for n, q in model.named_parameters():
        dd[n] = d[i:i + q.numel()].reshape(q.shape)
        i += q.numel()
    torch.testing.assert_close(ts.entk(model, x1, x2, implementation=impl, precondition=dd), K,
                               **TOL)


def test_functional_model_and_float32():
    torch.manual_seed(0)
    W1 = torch.randn(8, 3, dtype=torch.float64)
    W2 = torch.randn(2, 8, dtype=torch.float64)

    def f(prm, x):
        return torch.tanh(x @ prm["W1"].T) @ prm["W2"].T

    x = torch.randn(5, 3, dtype=torch.float64)
    K = ts.entk(f, x, params={"W1": W1, "W2": W2})
    mod = nn.Sequential(nn.Linear(3, 8, bias=False), nn.Tanh(), nn.Linear(8, 2, bias=False))
    mod = mod.double()
    with torch.no_grad():
        mod[0].weight.copy_(W1)
        mod[2].weight.copy_(W2)
    torch.testing.assert_close(K, brute_force_entk(mod, x), **TOL)
    K32 = ts.entk(mod.float(), x.float())
    assert K32.dtype == torch.float32
    torch.testing.assert_close(K32.double(), K, rtol=1e-4, atol=1e-4)
    K64 = ts.entk(mod.float(), x.float(), dtype=torch.float64)
    assert K64.dtype == torch.float64
    torch.testing.assert_close(K64, K, rtol=1e-6, atol=1e-6)  # params were rounded to float32


def test_tied_weights_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)
            self.b = nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    m = Tied().double()
    x = inputs_for("vec", 3).repeat(1, 2)[:, :4]
    for impl in GENERIC:
        torch.testing.assert_close(ts.entk(m, x, implementation=impl), brute_force_entk(m, x),
                                   **TOL)


def test_flatten_roundtrip():
    K = torch.randn(3, 4, 2, 2)
    M = ts.flatten_kernel(K)
    assert M.shape == (6, 8)
    assert M[1 * 2 + 1, 3 * 2 + 0] == K[1, 3, 1, 0]
    torch.testing.assert_close(ts.unflatten_kernel(M, 2), K)


# -- bad input ----------------------------------------------------------------------------------
def test_errors_are_clear():
    model = make_mlp(1)
    x = inputs_for("vec", 4)
    with pytest.raises(ts.ShapeError, match="example shape"):
        ts.entk(model, x, torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(ts.ShapeError, match="empty"):
        ts.entk(model, x[:0])
    with pytest.raises(ts.ShapeError, match="failed on x"):
        ts.entk(model, torch.randn(4, 7, dtype=torch.float64))
    with pytest.raises(ts.ShapeError, match="implementation must be"):
        ts.entk(model, x, implementation="magic")
    drop = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1)).double().train()
    with pytest.raises(ts.UnsupportedModelError, match="model.eval"):
        ts.entk(drop, x)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double().train()
    with pytest.raises(ts.UnsupportedModelError, match="model.eval"):
        ts.entk(bn, x)

    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 1)

        def forward(self, x):
            return self.l(x).detach()

    with pytest.raises(ts.UnsupportedModelError, match="do not depend differentiably"):
        ts.entk(Detached().double(), x)
    with pytest.raises(ts.ShapeError, match="preconditioner"):
        ts.entk(model, x, precondition=torch.ones(3, dtype=torch.float64))


def test_kernel_too_large_is_refused_before_work():
    model = make_mlp(1)
    x = inputs_for("vec", 64)
    with pytest.raises(ts.KernelTooLargeError, match="entk_topk"):
        ts.entk(model, x, memory_budget=1000)  # the 64x64 output alone is 32 KB
    with pytest.raises(ts.KernelTooLargeError, match="chunk_size"):
        ts.entk(model, x, memory_budget="200K", chunk_size=64)
    # a budget that fits the output but not the whole Jacobian is met by chunking
    est = ts.estimate_memory(model, x)
    K = ts.entk(model, x, memory_budget=est["output"] + est["working"] // 8)
    torch.testing.assert_close(K, ts.entk(model, x), **TOL)


def test_data_dependent_model_points_to_loop():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 2)

        def forward(self, x):
            h = self.l(x)
            return h * 2 if h.sum().item() > 0 else h

    m = Branchy().double()
    x = inputs_for("vec", 3)
    with pytest.raises(ts.UnsupportedModelError, match="loop"):
        ts.entk(m, x, implementation="jacobian")
    K = ts.entk(m, x, implementation="loop")
    assert K.shape == (3, 3, 2, 2)


def test_non_finite_kernel_is_an_error():
    model = make_mlp(1)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ts.NonFiniteError):
        ts.entk(model, inputs_for("vec", 3), implementation="jacobian")
