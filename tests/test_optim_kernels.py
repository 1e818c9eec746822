"""GatedAdamW's step kernels against the reference (the transforms' chain), the kernel table,
and the step-observer hook."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tangentscope import ConfigError
from tangentscope.optim import (
    GatedAdamW,
    GatedOptimizer,
    GradMoments,
    PerExampleStats,
    PopulationRiskEstimator,
    StepInfo,
)
from tangentscope.optim import _kernels as K
from tangentscope.optim.transforms import gated_adamw_step_
from test_optim_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
REFERENCE = K.KERNELS[-1]
BY_NAME = {k.name: k for k in K.KERNELS}
SHAPES = ((300, 7), (7,), (1,), (130_000,), (2, 3, 4))     # one above FOREACH_MAX_NUMEL


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in SHAPES]


def _grads(steps, dtype, seed=1):
    """A gradient sequence independent of the weights (signal + noise, a few exact zeros), so
    two kernels see the same gradients whatever their rounding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        row = []
        for s in SHAPES:
            x = 0.3 * torch.randn(s, generator=g, dtype=dtype) + 0.05
            x.view(-1)[:2] = 0.0
            row.append(x)
        out.append(row)
    return out


def _run(kernel, dtype=torch.float32, steps=25, **kw):
    ps = _params(dtype)
    opt = GatedAdamW(ps, lr=3e-2, weight_decay=0.1, **kw)
    opt.kernels = (BY_NAME[kernel], REFERENCE)
    used, fr = set(), []
    opt.register_step_observer(lambda o, info: used.update(g.kernel for g in info.groups))
    for grads in _grads(steps, dtype):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        fr.append(opt.gate_stats()["fraction_updated"][0])
    assert used == {kernel}, used
    return ps, opt, fr


def _state(opt, ps, key):
    return torch.cat([opt.state[p][key].flatten() for p in ps])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", [dict(gate=False), dict(), dict(gate="soft"),
                                dict(gate_on="grad"), dict(gate_on="grad", gate="soft"),
                                dict(gate_warmup=3)])
def test_foreach_kernel_is_the_reference_bit_for_bit(dtype, kw):
    a, oa, fa = _run("reference", dtype, **kw)
    b, ob, fb = _run("foreach", dtype, foreach=True, **kw)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
    assert torch.equal(_state(oa, a, "exp_avg_sq"), _state(ob, b, "exp_avg_sq"))
    assert fa == fb


@pytest.mark.parametrize("gate", ["hard", "soft"])
def test_foreach_moments_placement_equals_the_reference_to_rounding(gate):
    a, _, fa = _run("reference", gate_on="moments", gate=gate)
    b, _, fb = _run("foreach", foreach=True, gate_on="moments", gate=gate)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert fa == pytest.approx(fb, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", [dict(), dict(threshold=2.5), dict(gate_warmup=4),
                                dict(noise_beta=0.9, weight_decay=0.0)])
def test_streaming_hard_kernel_equals_the_reference(dtype, kw):
    """Same gate decisions; weights, moments and noise state to rounding (torch's fused AdamW
    orders the arithmetic its own way: bit for bit on long tensors, an ulp apart on short)."""
    kw = {"weight_decay": 0.1, **kw}
    wd = kw.pop("weight_decay")
    ps_a, ps_b = _params(dtype), _params(dtype)
    oa = GatedAdamW(ps_a, lr=3e-2, weight_decay=wd, **kw)
    ob = GatedAdamW(ps_b, lr=3e-2, weight_decay=wd, fused=False, **kw)   # the eager default
    oa.kernels = (REFERENCE,)
    used = set()
    ob.register_step_observer(lambda o, info: used.update(g.kernel for g in info.groups))
    for grads in _grads(25, dtype):
        for ps in (ps_a, ps_b):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
        oa.step()
        ob.step()
        assert oa.gate_stats()["fraction_updated"] == ob.gate_stats()["fraction_updated"]
    assert used == {"streaming-hard"}
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    for key in ("exp_avg", "exp_avg_sq", "exp_avg_dev_sq"):
        torch.testing.assert_close(_state(oa, ps_a, key), _state(ob, ps_b, key), rtol=tol,
                                   atol=tol * 1e-3)
    assert [oa.state[p]["noise_n"] for p in ps_a] == [ob.state[p]["noise_n"] for p in ps_b]
    for p, q in zip(ps_a, ps_b):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)


def test_the_reference_kernel_is_the_transform_chain():
    """The single-tensor kernel runs ``gated_adamw_step_``: stepping the chain by hand with the
    same exact gate gives the same bits."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(40))
    opt = GatedAdamW([p], lr=1e-2, weight_decay=0.1, gate_on="grad")
    opt.kernels = (REFERENCE,)
    w = p.detach().clone()
    st = {"exp_avg": torch.zeros(40), "exp_avg_sq": torch.zeros(40), "step": torch.tensor(0.0)}
    for _ in range(10):
        c = torch.randn(6, 40) * 0.5 + 0.2
        mom = GradMoments(c.sum(0), (c ** 2).sum(0), 6)
        p.grad = c.sum(0).clone()
        opt.step(moments={p: mom})
        st["step"] += 1
        gate = mom.grad_sum.square() > mom.noise_variance()
        gated_adamw_step_(w, c.sum(0), st, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0.1, gate=gate.float(), gate_on="grad")
    assert torch.equal(p.detach(), w)


@pytest.mark.parametrize("foreach", [False, True, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gate_off_is_torch_adamw_bit_for_bit(foreach, dtype):
    """The eager kernels (``fused=False``; the fused one: tests/test_optim_fused.py)."""
    torch.manual_seed(0)
    m1 = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    m2 = copy.deepcopy(m1)
    groups = lambda m: [{"params": m[0].parameters()},
                        {"params": m[2].parameters(), "lr": 3e-3, "weight_decay": 0.0}]
    ref = torch.optim.AdamW(groups(m1), lr=1e-2, weight_decay=0.1, foreach=foreach)
    opt = GatedAdamW(groups(m2), lr=1e-2, weight_decay=0.1, gate=False, foreach=foreach,
                     fused=False)
    s1 = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=2e-2, total_steps=60)
    s2 = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=60)
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        x = torch.randn(8, 5, generator=g).to(dtype)
        for m, o, s in ((m1, ref, s1), (m2, opt, s2)):
            o.zero_grad()
            (m(x) ** 2).mean().backward()
            o.step()
            s.step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_kernel_table_choices():
    ps = _params(torch.float32)
    names = []

    def kernel_of(**kw):   # the eager kernels (fused=False; the fused one: test_optim_fused.py)
        opt = GatedAdamW(list(ps), lr=1e-3, **{"fused": False, **kw})
        opt.register_step_observer(lambda o, info: names.append(info.groups[0].kernel))
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
        return names[-1]

    assert kernel_of() == "streaming-hard"                    # the default, on CPU
    assert kernel_of(gate=False) == "foreach"
    assert kernel_of(foreach=True) == "foreach"
    assert kernel_of(gate="soft") == "reference"
    assert kernel_of(gate_on="moments") == "reference"
    assert kernel_of(threshold=0.0) == "reference"
    assert kernel_of(foreach=False, gate=False) == "reference"
    assert [k.name for k in GatedAdamW.kernels] == ["compiled", "foreach", "streaming-hard",
                                                    "reference"]
    opt = GatedAdamW(ps, lr=1e-3, gate=False)
    PopulationRiskEstimator(opt)
    opt.register_step_observer(lambda o, info: names.append(info.groups[0].kernel))
    opt.step()
    assert names[-1] == "reference"                           # the estimator needs its terms


# -- the step-observer hook -------------------------------------------------------------------
def test_step_observer_gets_a_frozen_step_info_and_can_be_removed():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = GatedAdamW([{"params": m[0].parameters()}, {"params": m[2].parameters(),
                                                      "gate": False}], lr=1e-2, fused=False)
    seen: list[StepInfo] = []
    handle = opt.register_step_observer(lambda o, info: seen.append((o, info)))
    x = torch.randn(8, 5)
    for _ in range(3):
        opt.zero_grad()
        (m(x) ** 2).mean().backward()
        opt.step()
    assert [i.step for _, i in seen] == [1, 2, 3] and all(o is opt for o, _ in seen)
    info = seen[-1][1]
    assert not info.skipped and info.terms is None and len(info.groups) == 2
    g0, g1 = info.groups
    assert g0.index == 0 and g0.kernel == "streaming-hard" and g0.numel == 5 * 16 + 16
    assert g0.fraction_updated == pytest.approx(opt.gate_stats()["fraction_updated"][0])
    assert g1.passed is None and g1.fraction_updated is None
    with pytest.raises(AttributeError):
        info.step = 7
    handle.remove()
    opt.step()
    assert len(seen) == 3
    # a skipped step is reported too
    opt.register_step_observer(lambda o, i: seen.append((o, i)))
    m[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert seen[-1][1].skipped and seen[-1][1].groups == ()


def test_needs_terms_gives_the_estimator_terms():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    opt = GatedAdamW(m.parameters(), lr=1e-2, stats=PerExampleStats(m))
    terms = []
    h = opt.register_step_observer(lambda o, info: terms.append(info.terms), needs_terms=True)
    est = PopulationRiskEstimator(opt)
    x = torch.randn(12, 3, dtype=torch.float64)
    opt.zero_grad()
    (m(x) ** 2).mean().backward()
    opt.step()
    assert len(terms[0]) == 4
    dot = float(sum(t.grad_dot_delta for t in terms[0]))
    assert est.curve().train_first_order[1] - est.curve().train_first_order[0] == \
        pytest.approx(dot)
    h.remove()
    est.detach()
    assert not opt._needs_terms()


def test_gated_optimizer_has_the_same_hook():
    torch.manual_seed(0)
    m = nn.Linear(4, 3)
    opt = GatedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1))
    seen = []
    opt.register_step_observer(lambda o, info: seen.append(info))
    for _ in range(2):
        opt.zero_grad()
        (m(torch.randn(6, 4)) ** 2).mean().backward()
        opt.step()
    assert [i.step for i in seen] == [1, 2] and seen[-1].groups[0].kernel == "wrapped"
    assert 0 <= seen[-1].groups[0].fraction_updated <= 1
    with pytest.raises(ConfigError, match="needs_terms=False"):
        opt.register_step_observer(lambda o, i: None, needs_terms=True)
    with pytest.raises(ConfigError, match="callable"):
        opt.register_step_observer(3)
