"""GatedAdamW: a drop-in torch.optim.Optimizer; every path against a twin."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from tangentscope import ConfigError, NonFiniteError, adam_preconditioner
from tangentscope.optim import GatedAdamW, GradMoments, PerExampleStats
from tangentscope.optim.transforms import gate_from_sums, gated_adamw_delta
from test_optim_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def _data(steps, dtype=torch.float32, b=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 5, generator=g).to(dtype), torch.randn(b, 3, generator=g).to(dtype))
            for _ in range(steps)]


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def _train(model, opt, data, sched=None):
    for x, y in data:
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
        if sched is not None:
            sched.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _groups(model, **second):
    return [{"params": model[0].parameters()}, {"params": model[2].parameters(), **second}]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gate_off_matches_torch_adamw_over_100_steps(foreach, dtype):
    data = _data(100, dtype)
    m1, m2 = _model(dtype), _model(dtype)
    ref = torch.optim.AdamW(_groups(m1, lr=3e-3, weight_decay=0.0), lr=1e-2,
                            weight_decay=0.1, foreach=foreach)
    opt = GatedAdamW(_groups(m2, lr=3e-3, weight_decay=0.0), lr=1e-2, weight_decay=0.1,
                     gate=False, foreach=foreach)
    s1 = torch.optim.lr_scheduler.OneCycleLR(ref, max_lr=2e-2, total_steps=100)
    s2 = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-2, total_steps=100)
    a, b = _train(m1, ref, data, s1), _train(m2, opt, data, s2)
    assert float((a.double() - b.double()).abs().max()) <= 1e-7


@pytest.mark.parametrize("gate", ["hard", "soft"])
@pytest.mark.parametrize("gate_on", ["update", "grad", "moments"])
@pytest.mark.parametrize("stats", ["streaming", "exact"])
def test_foreach_equals_single_tensor(gate, gate_on, stats):
    data = _data(30)
    outs = []
    for fe in (False, True):
        m = _model()
        src = PerExampleStats(m) if stats == "exact" else "streaming"
        opt = GatedAdamW(m.parameters(), lr=1e-2, gate=gate, gate_on=gate_on, stats=src,
                         foreach=fe)
        outs.append(_train(m, opt, data))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=3e-7)


@pytest.mark.parametrize("gate", ["hard", "soft"])
@pytest.mark.parametrize("gate_on", ["update", "grad", "moments"])
def test_step_equals_the_reference_transform_chain(gate, gate_on):
    """Exact statistics supplied by the caller → the optimizer's step equals
    ``scale_by_adam → gate → decayed weights → lr`` written out (float64)."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(40, dtype=torch.float64))
    opt = GatedAdamW([p], lr=1e-2, weight_decay=0.1, gate=gate, gate_on=gate_on)
    ref_p = p.detach().clone()
    ref_state = {"exp_avg": torch.zeros_like(ref_p), "exp_avg_sq": torch.zeros_like(ref_p),
                 "step": torch.tensor(0.0)}
    for _ in range(12):
        contrib = torch.randn(6, 40, dtype=torch.float64) * 0.5 + 0.2   # b = 6 contributions
        mom = GradMoments(contrib.sum(0), (contrib ** 2).sum(0), 6)
        p.grad = contrib.sum(0).clone()
        opt.step(moments={p: mom})
        ref_state["step"] += 1
        gate_v = gate_from_sums(mom.grad_sum, mom.grad_sq_sum, 6, 1.0, gate)
        ref_p += gated_adamw_delta(ref_p, mom.grad_sum, ref_state, lr=1e-2, beta1=0.9,
                                   beta2=0.999, eps=1e-8, weight_decay=0.1, gate=gate_v,
                                   gate_on=gate_on)
        frac = opt.gate_stats()["fraction_updated"][0]
        assert frac == pytest.approx(float(gate_v.mean()))
    torch.testing.assert_close(p.detach(), ref_p, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(opt.state[p]["exp_avg"], ref_state["exp_avg"])


def test_placements_do_what_the_docs_say_on_a_gated_coordinate():
    """Coordinate 0 always gated off (pure noise), coordinate 1 always on."""
    contrib = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    mom = GradMoments(contrib.sum(0), (contrib ** 2).sum(0), 4)        # S1 = (0, 4): gate (0, 1)
    results = {}
    for on in ("update", "grad", "moments"):
        p = nn.Parameter(torch.ones(2, dtype=torch.float64))
        opt = GatedAdamW([p], lr=0.1, weight_decay=0.5, gate_on=on)
        # first an ungated step, so the moments are non-zero
        p.grad = torch.tensor([0.3, 0.3], dtype=torch.float64)
        opt.step(moments={p: GradMoments(p.grad * 2, p.grad ** 2 * 2, 2)})
        m0, v0, w0 = (opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone(),
                      p.detach().clone())
        p.grad = mom.grad_sum.clone()
        opt.step(moments={p: mom})
        st = opt.state[p]
        results[on] = (st["exp_avg"][0] / m0[0], st["exp_avg_sq"][0] / v0[0],
                       p[0].item() - w0[0] * (1 - 0.1 * 0.5))
    # update: moments take the raw gradient (here 0 on coord 0 → decay); no move but decay
    assert results["update"][0] == pytest.approx(0.9) and results["update"][2] == 0
    # grad: the moments see a zero gradient (decay), momentum still moves the coordinate
    assert results["grad"][0] == pytest.approx(0.9) and results["grad"][2] < 0
    # moments: frozen moments, no move but decay
    assert results["moments"][:2] == (1.0, 1.0) and results["moments"][2] == 0


def test_state_dict_round_trip_and_torch_compatibility():
    data = _data(40)
    for kw in (dict(gate_on="update"), dict(gate_on="grad", gate="soft")):
        m1, m2 = _model(), _model()
        full = GatedAdamW(m1.parameters(), lr=1e-2, **kw)
        a = _train(m1, full, data)
        half = GatedAdamW(m2.parameters(), lr=1e-2, **kw)
        _train(m2, half, data[:20])
        buf = io.BytesIO()
        torch.save(half.state_dict(), buf)
        buf.seek(0)
        resumed = GatedAdamW(m2.parameters(), lr=1e-2, **kw)
        resumed.load_state_dict(torch.load(buf))
        b = _train(m2, resumed, data[20:])
        assert torch.equal(a, b)
    # a torch.optim.AdamW checkpoint continues in GatedAdamW(gate=False) and vice versa
    m1, m2 = _model(), _model()
    ref = torch.optim.AdamW(m1.parameters(), lr=1e-2)
    a = _train(m1, ref, data)
    tmp = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    _train(m2, tmp, data[:20])
    ours = GatedAdamW(m2.parameters(), lr=1e-2, gate=False)
    ours.load_state_dict(tmp.state_dict())   # torch's groups bring their fused=None: ours
    for g in ours.param_groups:              # then takes the fused kernel (1e-6, its sqrt);
        g["fused"] = False                   # the eager kernels continue it bit for bit
    assert torch.equal(a, _train(m2, ours, data[20:]))
    assert set(adam_preconditioner(ours, m2)) == {n for n, _ in m2.named_parameters()}


def test_closure_and_per_group_settings():
    m = _model()
    opt = GatedAdamW(_groups(m, gate=False), lr=1e-2, gate_on="grad")
    x, y = _data(1)[0]

    def closure():
        opt.zero_grad()
        loss = _loss(m, x, y)
        loss.backward()
        return loss

    for _ in range(3):
        loss = opt.step(closure)
    assert torch.is_tensor(loss)
    st = opt.gate_stats()
    assert st["step"] == 3 and st["fraction_updated"][1] is None
    assert 0 <= st["fraction_updated"][0] <= 1 and st["numel"][0] == 5 * 16 + 16
    flat = opt.gate_stats(flat=True)
    assert set(flat) == {"gate/step", "gate/skipped", "gate/fraction/0"}
    assert [r["step"] for r in opt.gate_history()] == [1, 2, 3]
    assert opt.gate_history()[0]["fraction_updated"][0] == 1.0     # streaming: open at step 1
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "threshold": 2.0})
    with pytest.raises(ConfigError, match="threshold"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "threshold": -1.0})


def test_nonfinite_gradients_skip_raise_or_ignore():
    x, y = _data(1)[0]
    for policy in ("skip", "raise", "ignore"):
        m = _model()
        opt = GatedAdamW(m.parameters(), lr=1e-2, nonfinite=policy)
        _loss(m, x, y).backward()
        opt.step()
        before = [p.detach().clone() for p in m.parameters()]
        state = {k: v.clone() for k, v in opt.state[m[0].weight].items() if torch.is_tensor(v)}
        opt.zero_grad()
        _loss(m, x, y).backward()
        m[0].weight.grad[0, 0] = float("nan")
        if policy == "skip":
            with pytest.warns(RuntimeWarning, match="non-finite gradient, step skipped"):
                opt.step()
            assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
            assert torch.equal(opt.state[m[0].weight]["exp_avg"], state["exp_avg"])
            assert opt.gate_stats()["skipped"] and opt.gate_stats()["skipped_steps"] == 1
        elif policy == "raise":
            with pytest.raises(NonFiniteError, match="nonfinite='skip'"):
                opt.step()
        else:
            opt.step()
            assert torch.isnan(m[0].weight).any()


def test_bad_input_is_refused_before_any_work():
    m = _model()
    for kw, match in ((dict(gate="maybe"), "gate must be"), (dict(threshold=-1), "threshold"),
                      (dict(gate_on="loss"), "gate_on"), (dict(stats="exact"), "StatsSource"),
                      (dict(nonfinite="warn"), "nonfinite"), (dict(betas=(0.9, 1.0)), "betas"),
                      (dict(noise_beta=1.5), "noise_beta"), (dict(gate_warmup=-1), "warmup")):
        with pytest.raises(ConfigError, match=match):
            GatedAdamW(m.parameters(), **kw)
    # exact statistics from a batch of one: the variance is undefined
    opt = GatedAdamW(m.parameters(), stats=PerExampleStats(m))
    x, y = _data(1)[0]
    _loss(m, x[:1], y[:1]).backward()
    with pytest.raises(ConfigError, match=r"batch of >= 2.*streaming"):
        opt.step()
    # a source that does not cover every optimized parameter
    extra = nn.Parameter(torch.zeros(3))
    opt = GatedAdamW(list(m.parameters()) + [extra], stats=PerExampleStats(m))
    m.zero_grad()
    (_loss(m, x, y) + extra.sum()).backward()
    with pytest.raises(ConfigError, match="collected nothing"):
        opt.step()
    # sparse gradients
    emb = nn.Embedding(5, 2, sparse=True)
    opt = GatedAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


def test_gate_warmup_and_exact_stats_in_low_precision():
    m = _model(torch.bfloat16)
    opt = GatedAdamW(m.parameters(), lr=1e-2, stats=PerExampleStats(m), gate_warmup=2)
    fr = []
    for x, y in _data(4, torch.bfloat16):
        opt.zero_grad()
        _loss(m, x, y).backward()
        opt.step()
        fr.append(opt.gate_stats()["fraction_updated"][0])
    assert fr[:2] == [1.0, 1.0] and all(f < 1 for f in fr[2:])
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in m.parameters())


def test_fused_is_refused_where_it_does_not_apply():
    m = _model()
    with pytest.raises(ConfigError, match="fused=True implements gate_on='update' only"):
        GatedAdamW(m.parameters(), fused=True, gate_on="grad")
    with pytest.raises(ConfigError, match="fused must be"):
        GatedAdamW(m.parameters(), fused="yes")


@pytest.mark.parametrize("kw", [dict(gate=False), dict(), dict(gate="soft"), dict(threshold=0.0),
                                dict(stats="exact"), dict(stats="exact", gate="soft")])
def test_fused_kernel_equals_the_eager_step(kw):
    """``fused=True`` (the fused kernel, its hardware sqrt) against the eager step: same math
    (bit-for-bit checks of the default fused step: tests/test_optim_fused.py)."""
    data = _data(30)
    outs, fracs = [], []
    for fused in (False, True):
        m = _model()
        k = dict(kw)
        if k.get("stats") == "exact":
            k["stats"] = PerExampleStats(m)
        opt = GatedAdamW(m.parameters(), lr=1e-2, fused=fused, **k)
        outs.append(_train(m, opt, data))
        fracs.append(opt.gate_stats()["fraction_updated"][0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=2e-7)
    if fracs[0] is not None:
        assert fracs[0] == pytest.approx(fracs[1], abs=1e-6)
