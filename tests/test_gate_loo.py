"""The exact gate is the leave-one-out rule (docs/gate.md), checked against brute force.

Brute force: for every example ``i`` and coordinate ``k``, *take* the step along the mean
gradient of the other ``b − 1`` examples on coordinate ``k`` alone and measure example ``i``'s
loss change by central finite differences (float64); average over ``i``. The gate must pass
coordinate ``k`` exactly when that held-out loss decreases.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

from tangentscope.optim import (
    GatedAdamW,
    PerExampleStats,
    VmapStats,
    gate_from_sums,
    loo_decrease,
    noise_variance,
    snr_gate,
)
from test_optim_helpers import brute_per_example, one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")



def _loss(out, y):
    return ((out - y) ** 2).sum(-1).mean() + 0.1 * out.sin().sum(-1).mean()


def _model(seed: int, width: int, act: str) -> nn.Module:
    torch.manual_seed(seed)
    a = {"tanh": nn.Tanh(), "relu": nn.ReLU(), "gelu": nn.GELU()}[act]
    return nn.Sequential(nn.Linear(3, width), a, nn.Linear(width, 2)).double()


def _brute_force_loo(model: nn.Module, x: torch.Tensor, y: torch.Tensor, h: float = 1e-5
                     ) -> torch.Tensor:
    """``(1/b) Σ_i [held-out decrease of L_i from a unit step on k along ḡ_{−i,k}]`` per k."""
    params = list(model.parameters())
    b = x.shape[0]
    per = brute_per_example(model, _loss, x, y)            # one autograd call per example
    G = torch.cat([g.reshape(b, -1) for g in per.values()], 1)   # (b, P)
    flat = torch.cat([p.detach().flatten() for p in params])
    out = torch.zeros(flat.numel(), dtype=torch.float64)

    def loss_i_at(w: torch.Tensor, i: int) -> float:
        torch.nn.utils.vector_to_parameters(w, params)
        with torch.no_grad():
            return float(_loss(model(x[i:i + 1]), y[i:i + 1]))

    for i in range(b):
        others = (G.sum(0) - G[i]) / (b - 1)              # mean gradient of the other b − 1
        for k in range(flat.numel()):
            e = torch.zeros_like(flat)
            e[k] = others[k] * h
            # decrease of L_i when coordinate k steps by −h·ḡ_{−i,k}, per unit h
            out[k] += (loss_i_at(flat + e, i) - loss_i_at(flat - e, i)) / (2 * h) / b
    torch.nn.utils.vector_to_parameters(flat, params)
    return out                                            # = (1/b) Σ_i g_ik ḡ_{−i,k}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), width=st.integers(2, 5), b=st.integers(2, 7),
       act=st.sampled_from(["tanh", "relu", "gelu"]))
def test_exact_gate_equals_brute_force_leave_one_out(seed, width, b, act):
    model = _model(seed, width, act)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(b, 3, generator=g, dtype=torch.float64)
    y = torch.randn(b, 2, generator=g, dtype=torch.float64)
    brute = _brute_force_loo(model, x, y)

    # closed-form hooks → the optimizer's hard gate (τ = 1): coordinate moves iff gate = 1
    stats = PerExampleStats(model)
    opt = GatedAdamW(model.parameters(), lr=1e-3, weight_decay=0.0, stats=stats)
    before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
    model.zero_grad()
    _loss(model(x), y).backward()
    mom = stats.collect()
    A = torch.cat([mom[id(p)].loo_decrease().flatten() for p in model.parameters()])
    opt.step()
    moved = torch.cat([p.detach().flatten() for p in model.parameters()]) != before

    scale = brute.abs().max()
    clear = brute.abs() > 1e-6 * scale                    # sign unambiguous at FD accuracy
    assert clear.sum() > 0
    # A is the same quantity as the brute force (per unit step, averaged over examples) …
    torch.testing.assert_close(A[clear], brute[clear], rtol=1e-5, atol=1e-9 * float(scale))
    # … and the gate is exactly its sign
    assert torch.equal(moved[clear], (brute > 0)[clear])


def test_vmap_source_gives_the_same_gate():
    model = _model(3, 4, "tanh")
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    brute = _brute_force_loo(model, x, y)
    vs = VmapStats(model, lambda out, t: _loss(out, t))
    model.zero_grad()
    vs.backward(x, y)
    gate = torch.cat([gate_from_sums(m.grad_sum, m.grad_sq_sum, m.count).flatten()
                      for m in vs.collect().values()])
    clear = brute.abs() > 1e-6 * brute.abs().max()
    assert torch.equal(gate[clear].bool(), (brute > 0)[clear])


def test_threshold_forms_and_variance_normalization():
    """τ = 1: LOO (μ² > s²/b, s² unbiased ⇔ μ² > σ²_biased/(b−1)); τ = b/(b−1): the note's."""
    torch.manual_seed(0)
    b = 5
    g = torch.randn(b, 1000, dtype=torch.float64) + 0.3      # per-example gradients
    c = g / b                                                # contributions of a mean loss
    S1, S2 = c.sum(0), (c * c).sum(0)
    mu = g.mean(0)
    s2_unbiased, s2_biased = g.var(0, unbiased=True), g.var(0, unbiased=False)
    nu = noise_variance(S1, S2, b)
    torch.testing.assert_close(nu, s2_unbiased / b)            # Var of the batch mean
    torch.testing.assert_close(loo_decrease(S1, S2, b), mu ** 2 - s2_unbiased / b)
    loo = snr_gate(S1, nu, 1.0).bool()
    assert torch.equal(loo, mu ** 2 > s2_biased / (b - 1))
    assert torch.equal(loo, S1 ** 2 > S2)                      # Σ_{i≠j} c_i c_j > 0
    note = snr_gate(S1, nu, b / (b - 1)).bool()
    assert torch.equal(note, mu ** 2 > s2_unbiased / (b - 1))
    assert (note <= loo).all() and (note != loo).any()         # the note's form is stricter


def test_gate_is_invariant_to_loss_scaling():
    """mean vs sum reduction: contributions differ by b, the gate does not."""
    torch.manual_seed(1)
    b = 8
    g = torch.randn(b, 200, dtype=torch.float64) + 0.2
    for scale in (1.0 / b, 1.0, 37.0):
        c = g * scale
        gate = gate_from_sums(c.sum(0), (c * c).sum(0), b)
        assert torch.equal(gate, gate_from_sums(g.sum(0), (g * g).sum(0), b))


def test_soft_gate_is_the_shrinkage_factor_and_positive_where_hard_passes():
    torch.manual_seed(2)
    sig = torch.randn(500, dtype=torch.float64)
    nu = torch.rand(500, dtype=torch.float64)
    for tau in (0.5, 1.0, 2.0):
        soft = snr_gate(sig, nu, tau, "soft")
        hard = snr_gate(sig, nu, tau, "hard")
        torch.testing.assert_close(soft, (1 - tau * nu / sig ** 2).clamp(min=0))
        assert torch.equal(soft > 0, hard.bool())
    assert snr_gate(torch.zeros(3), torch.ones(3), 1.0, "soft").eq(0).all()
    assert snr_gate(torch.zeros(3), torch.zeros(3), 1.0, "hard").eq(0).all()


@pytest.mark.parametrize("count", [0, 1])
def test_variance_of_one_sample_is_refused(count):
    from tangentscope import ConfigError

    with pytest.raises(ConfigError, match="at least 2"):
        noise_variance(torch.ones(2), torch.ones(2), count)
