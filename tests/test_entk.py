"""Every eNTK implementation against the brute-force per-output autograd loop (float64)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import tangentscope as ts
from tangentscope.kernels import IMPLEMENTATIONS, Implementation
from zoo import MODELS, brute_force_entk, inputs_for, kind, make_bn, make_mlp

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


# -- which backend, and the same path for the estimate -------------------------------------------
def test_select_implementation_says_which_and_why():
    model = make_mlp(2)
    x = inputs_for("vec", 6)
    ch = ts.kernels.select_implementation(model, x)
    assert ch.implementation == "structured" and ch.requested == "auto"
    assert ch.coverage == 1.0 and dict(ch.generic) == {} and "100.0%" in ch.reason
    with pytest.raises(dataclasses.FrozenInstanceError):
        ch.implementation = "jacobian"
    assert ts.kernels.select_implementation(model, x, implementation="ntvp").implementation \
        == "ntvp"
    assert ts.kernels.select_implementation(model, x, implementation=Implementation.LOOP
                                            ).implementation == "loop"

    class Custom(nn.Module):  # 90 of 121 scalars in a parameter no layer rule covers
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(30, 3))
            self.out = nn.Linear(30, 1)

        def forward(self, x):
            return self.out(torch.tanh(x @ self.W.T))

    ch = ts.kernels.select_implementation(Custom().double(), x)
    assert ch.implementation == "jacobian" and "25.6%" in ch.reason
    assert set(ch.generic) == {"W"} and "does not factor" in ch.generic["W"]


def test_estimate_memory_takes_entk_arguments_and_runs_the_same_choice():
    model = make_mlp(3, width=32)
    x1, x2 = inputs_for("vec", 64, 1), inputs_for("vec", 16, 2)
    est = ts.estimate_memory(model, x1, x2, trace_outputs=True, groups="layer",
                             memory_budget="1G")
    assert est["implementation"] == "structured" and est["fits"]
    assert est["output"] == 64 * 16 * 3 * 8 and est["budget"] == 2**30  # 3 groups, float64
    assert est["total"] == est["output"] + est["working"]
    est_j = ts.estimate_memory(model, x1, implementation="jacobian")
    assert est_j["implementation"] == "jacobian"
    # a budget between one example and the whole set: the chunk entk would use
    tight = est_j["output"] + est_j["working"] // 5
    est_t = ts.estimate_memory(model, x1, implementation="jacobian", memory_budget=tight)
    assert est_t["fits"] and est_t["chunk_size"] < 64 and est_t["total"] <= tight
    K = ts.entk(model, x1, implementation="jacobian", memory_budget=tight)
    torch.testing.assert_close(K, brute_force_entk(model, x1), **TOL)
    est_no = ts.estimate_memory(model, x1, memory_budget=1000)
    assert not est_no["fits"]
    with pytest.raises(ts.KernelTooLargeError):
        ts.entk(model, x1, memory_budget=1000)


def test_no_module_global_plan_cache():
    import tangentscope.kernels.structured as S

    assert not hasattr(S, "_RECENT") and not hasattr(S, "_StalePlan")


# -- issue 12: modes, coupled batches, threads, recurrent layers ------------------------------
def test_modes_are_checked_on_every_submodule():
    x = inputs_for("vec", 4)
    drop = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1)).double().eval()
    drop[1].train()                                   # a train-mode dropout under an eval model
    for impl in ("auto", "jacobian", "loop"):
        with pytest.raises(ts.UnsupportedModelError, match="model.eval") as e:
            ts.entk(drop, x, implementation=impl)
        assert "loop" not in str(e.value)
    frozen = make_bn(2).train()
    frozen[1].eval()                                  # a frozen BatchNorm in a train-mode model
    torch.testing.assert_close(ts.entk(frozen, x), brute_force_entk(frozen.eval(), x), **TOL)
    nostats = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False),
                            nn.Linear(4, 1)).double().eval()
    with pytest.raises(ts.UnsupportedModelError, match="track_running_stats"):
        ts.entk(nostats, x)


def test_stochastic_function_model_is_refused_without_suggesting_loop():
    W = torch.randn(2, 3, dtype=torch.float64)

    def noisy(prm, x):
        return x @ prm["W"].T + 0.1 * torch.randn(x.shape[0], 2, dtype=x.dtype)

    for impl in ("auto", "jacobian", "ntvp", "loop"):
        with pytest.raises(ts.UnsupportedModelError, match="random numbers") as e:
            ts.entk(noisy, inputs_for("vec", 4), params={"W": W}, implementation=impl)
        assert "implementation='loop'" not in str(e.value)


@pytest.mark.parametrize("impl", ["auto", *IMPLEMENTATIONS])
def test_models_that_mix_examples_are_refused_by_every_implementation(impl):
    class Centered(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 1)

        def forward(self, x):
            h = torch.tanh(self.l1(x))
            return self.l2(h - h.mean(0))

    with pytest.raises(ts.UnsupportedModelError, match="couples the examples.*jacrev"):
        ts.entk(Centered().double(), inputs_for("vec", 5), implementation=impl)
    with pytest.raises(ts.UnsupportedModelError, match="couples the examples"):
        ts.EntkOperator(Centered().double(), inputs_for("vec", 5))


@pytest.mark.parametrize("impl", ["ntvp", "structured", "jacobian", "loop", "operator"])
def test_kernel_paths_are_thread_safe(impl):
    import threading

    model = make_mlp(2)
    x = inputs_for("vec", 5)
    v = torch.randn(10, dtype=torch.float64)

    def run():
        if impl == "operator":
            return ts.EntkOperator(model, x, chunk_size=2) @ v
        return ts.entk(model, x, implementation=impl)

    want = run()
    barrier, got, errors = threading.Barrier(4), [], []

    def worker():
        barrier.wait()
        try:
            for _ in range(3):
                got.append(run())
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for k in got:
        torch.testing.assert_close(k, want, **TOL)


class Recurrent(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.r, self.o = cls(3, 4, batch_first=True), nn.Linear(4, 1)

    def forward(self, x):
        return self.o(self.r(x)[0][:, -1])


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_layers_run_by_loop_and_name_it(cls):
    model = Recurrent(cls).double().eval()
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    ch = ts.kernels.select_implementation(model, x)
    assert ch.implementation == "loop" and "recurrent" in ch.reason
    K = ts.entk(model, x)
    torch.testing.assert_close(K, brute_force_entk(model, x), **TOL)
    torch.testing.assert_close(ts.entk(model, x, implementation="ntvp"), K, **TOL)
    for impl in ("jacobian", "structured"):
        with pytest.raises(ts.UnsupportedModelError, match="implementation='loop'"):
            ts.entk(model, x, implementation=impl)


def test_bad_arguments_are_clear_errors():
    model = make_mlp(2)
    x = inputs_for("vec", 4)
    with pytest.raises(ts.ShapeError, match=r"x\[:, None\]"):
        ts.entk(model, torch.randn(5, dtype=torch.float64))
    with pytest.raises(ts.ShapeError, match=r"x\[:, None\]"):
        ts.entk(nn.Linear(1, 2).double(), torch.randn(5, dtype=torch.float64))
    with pytest.raises(ts.ConfigError, match="floating-point"):
        ts.entk(model, x, dtype=torch.int64)
    with pytest.raises(ts.ConfigError, match="'4G'"):
        ts.entk(model, x, memory_budget="abc")
    for bad in (-5, 0, "-1G"):
        with pytest.raises(ts.ConfigError, match="positive"):
            ts.entk(model, x, memory_budget=bad)
    P = sum(q.numel() for q in model.parameters())
    with pytest.raises(ts.ConfigError, match="D >= 0"):
        ts.entk(model, x, precondition=-torch.ones(P, dtype=torch.float64))
    with pytest.raises(ts.ConfigError, match="D >= 0"):
        ts.EntkOperator(model, x, precondition=torch.full((P,), float("nan"), dtype=torch.float64))
    with pytest.raises(ts.ConfigError, match="chunk_size"):
        ts.EntkOperator(model, x, chunk_size=-1)
    with pytest.raises(ts.ShapeError, match="implementation must be"):
        ts.estimate_memory(model, x, implementation="abc")
