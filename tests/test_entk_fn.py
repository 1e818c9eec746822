"""Kernel conventions: the kernel function (``entk_fn``), ``diagonal=True`` and outputs of any
shape, against the float64 brute-force kernel (one autograd call per example and output)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import tangentscope as ts
from tangentscope import ConfigError, KernelTooLargeError, ShapeError
from tangentscope.kernels import IMPLEMENTATIONS
from tangentscope.kernels.entk import EntkFn, entk_fn
from zoo import MODELS, brute_force_entk, inputs_for, kind, make_mlp

TOL: dict[str, Any] = {"rtol": 1e-10, "atol": 1e-10}


def diag_of(K: torch.Tensor) -> torch.Tensor:
    """``K[i, i]`` of a full ``(n, n, ...)`` kernel: ``(n, ...)``."""
    return torch.diagonal(K, dim1=0, dim2=1).movedim(-1, 0)


class Grid(nn.Module):
    """Outputs ``(b, 2, 3)``: a 2x3 grid per example."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 6))

    def forward(self, x):
        return self.net(x).reshape(x.shape[0], 2, 3)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", ["mlp_p4", "cnn", "transformer"])
def test_diagonal_is_the_diagonal_of_the_full_kernel(name, impl):
    torch.manual_seed(0)
    model = MODELS[name]()
    x1, x2 = inputs_for(kind(name), 5, 1), inputs_for(kind(name), 5, 2)
    ref = brute_force_entk(model, x1)
    K = ts.entk(model, x1, implementation=impl, diagonal=True)
    p = ref.shape[-1]
    assert K.shape == (5, p, p)
    torch.testing.assert_close(K, diag_of(ref), **TOL)
    Kt = ts.entk(model, x1, implementation=impl, diagonal=True, trace_outputs=True)
    assert Kt.shape == (5,)
    torch.testing.assert_close(Kt, diag_of(ref).diagonal(dim1=1, dim2=2).sum(-1), **TOL)
    # paired: K(x1_i, x2_i)
    torch.testing.assert_close(ts.entk(model, x1, x2, implementation=impl, diagonal=True),
                               diag_of(brute_force_entk(model, x1, x2)), **TOL)


@pytest.mark.parametrize("impl", ["structured", "jacobian"])
def test_diagonal_with_chunks_groups_and_precondition(impl):
    torch.manual_seed(1)
    model = make_mlp(2)
    x = inputs_for("vec", 7, 3)
    P = sum(q.numel() for q in model.parameters())
    d = torch.rand(P, dtype=torch.float64) + 0.1
    ref = diag_of(brute_force_entk(model, x, d=d))
    for c in (1, 3, None):
        got = ts.entk(model, x, implementation=impl, diagonal=True, precondition=d,
                      chunk_size=c)
        torch.testing.assert_close(got, ref, **TOL)
    blocks = ts.entk(model, x, implementation=impl, diagonal=True, groups="layer")
    full = ts.entk(model, x, implementation=impl, groups="layer")
    assert set(blocks) == set(full) == {"0", "2", "4"}
    for g in blocks:
        torch.testing.assert_close(blocks[g], diag_of(full[g]), **TOL)


def test_diagonal_needs_o_n_memory_and_checks_pairs():
    torch.manual_seed(2)
    model = make_mlp(1)
    x = inputs_for("vec", 400, 4)
    # the full 400 x 400 kernel (1.3 MB) does not fit a 0.5 MB budget; its diagonal does
    with pytest.raises(KernelTooLargeError):
        ts.entk(model, x, trace_outputs=True, memory_budget=500_000)
    kd = ts.entk(model, x, trace_outputs=True, diagonal=True, memory_budget=500_000)
    est = ts.estimate_memory(model, x, trace_outputs=True, diagonal=True, memory_budget=500_000)
    assert est["output"] == 400 * 8 and est["fits"] and est["chunk_size"] <= 32
    assert not ts.estimate_memory(model, x, trace_outputs=True, memory_budget=500_000)["fits"]
    sub = brute_force_entk(model, x[::50])
    torch.testing.assert_close(kd[::50], diag_of(sub)[:, 0, 0], **TOL)
    with pytest.raises(ShapeError, match="as many examples"):
        ts.entk(model, x[:4], x[:3], diagonal=True)


def test_outputs_of_any_shape_are_flattened_row_major():
    """``(b, 2, 3)`` outputs: p = 6 with index a = 3 r + c; ``K.reshape(n, n, 2, 3, 2, 3)``
    restores the axes, and neural-tangents' ``trace_axes=(-1,)`` (trace the last axis only) is
    a trace of that reshaped kernel."""
    torch.manual_seed(3)
    model = Grid().double()
    x1, x2 = inputs_for("vec", 4, 5), inputs_for("vec", 3, 6)

    class Flat(nn.Module):                       # the brute-force twin of the stated rule
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x).reshape(x.shape[0], -1)

    ref = brute_force_entk(Flat(model), x1, x2)                  # (4, 3, 6, 6)
    K = ts.entk(model, x1, x2)
    assert K.shape == (4, 3, 6, 6)
    torch.testing.assert_close(K, ref, **TOL)
    K6 = K.reshape(4, 3, 2, 3, 2, 3)                              # K[i, j, r, c, r', c']
    r, c, r2, c2 = 1, 2, 0, 1
    torch.testing.assert_close(K6[:, :, r, c, r2, c2], ref[:, :, 3 * r + c, 3 * r2 + c2])
    nt_last = K6.diagonal(dim1=3, dim2=5).sum(-1)                 # trace_axes=(-1,): (4,3,2,2)
    want = sum(ref[:, :, 3 * torch.arange(2)[:, None] + k, 3 * torch.arange(2)[None, :] + k]
               for k in range(3))
    torch.testing.assert_close(nt_last, want, **TOL)
    torch.testing.assert_close(ts.entk(model, x1, x2, trace_outputs=True),
                               ref.diagonal(dim1=2, dim2=3).sum(-1), **TOL)


def test_kernel_function_is_entk_with_fixed_options():
    torch.manual_seed(4)
    model: Any = make_mlp(3)
    x1, x2 = inputs_for("vec", 4, 7), inputs_for("vec", 3, 8)
    kernel = entk_fn(model, trace_outputs=True, implementation="jacobian")
    assert isinstance(kernel, EntkFn) and kernel.options["trace_outputs"]
    ref = brute_force_entk(model, x1, x2)
    torch.testing.assert_close(kernel(x1, x2), ref.diagonal(dim1=2, dim2=3).sum(-1), **TOL)
    torch.testing.assert_close(kernel(x1), brute_force_entk(model, x1).diagonal(
        dim1=2, dim2=3).sum(-1), **TOL)
    torch.testing.assert_close(entk_fn(model, diagonal=True)(x1),
                               diag_of(brute_force_entk(model, x1)), **TOL)
    with torch.no_grad():                                 # follows the module's parameters
        model[0].weight.mul_(2.0)
    torch.testing.assert_close(kernel(x1, x2), brute_force_entk(model, x1, x2).diagonal(
        dim1=2, dim2=3).sum(-1), **TOL)


def test_kernel_function_of_a_function_model_takes_params_per_call():
    torch.manual_seed(5)
    W1 = torch.randn(3, 5, dtype=torch.float64)
    W2 = torch.randn(5, 2, dtype=torch.float64)

    def f(params, x):
        return torch.tanh(x @ params["W1"]) @ params["W2"]

    class Same(nn.Module):
        def __init__(self, a, b):
            super().__init__()
            self.W1, self.W2 = nn.Parameter(a.clone()), nn.Parameter(b.clone())

        def forward(self, x):
            return f({"W1": self.W1, "W2": self.W2}, x)

    x = inputs_for("vec", 4, 9)
    kernel = entk_fn(f)
    torch.testing.assert_close(kernel(x, None, {"W1": W1, "W2": W2}),
                               brute_force_entk(Same(W1, W2), x), **TOL)
    fixed = entk_fn(f, params={"W1": W1, "W2": W2}, diagonal=True, trace_outputs=True)
    torch.testing.assert_close(fixed(x), diag_of(brute_force_entk(Same(W1, W2), x)).diagonal(
        dim1=1, dim2=2).sum(-1), **TOL)
    with pytest.raises(ShapeError, match="params"):
        kernel(x)


def test_kernel_function_checks_options_before_work():
    model = make_mlp(1)
    with pytest.raises(ShapeError, match="implementation"):
        entk_fn(model, implementation="fast")
    with pytest.raises(ConfigError, match="dtype"):
        entk_fn(model, dtype=torch.int64)
    with pytest.raises(ConfigError, match="memory_budget"):
        entk_fn(model, memory_budget="lots")
