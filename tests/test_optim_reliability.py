"""Issue 12, area O: the optimizers' reload, wrapping and refusal cases (each failed before its
fix)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tangentscope import ConfigError, TangentscopeError
from tangentscope.optim import GatedAdamW, GradMoments, PerExampleStats, gate
from test_optim_adamw import _data, _loss, _model, _train
from test_optim_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


# -- 12.3: a reloaded wrapper keeps sharing param_groups / state with its base ----------------
@pytest.mark.parametrize("gate_on", ["update", "moments"])
def test_reloaded_wrapper_keeps_sharing_with_the_base(gate_on):
    """save / reload into a fresh wrapper + scheduler / continue == an uninterrupted run."""
    data = _data(24)
    make = lambda m: gate(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                          gate_on=gate_on)
    m1 = _model()
    o1 = make(m1)
    s1 = torch.optim.lr_scheduler.StepLR(o1, 4, 0.5)
    want = _train(m1, o1, data, s1)

    m2 = _model()
    o2 = make(m2)
    s2 = torch.optim.lr_scheduler.StepLR(o2, 4, 0.5)
    _train(m2, o2, data[:12], s2)
    saved = copy.deepcopy((m2.state_dict(), o2.state_dict(), s2.state_dict()))
    m3 = _model(seed=5)
    o3 = make(m3)
    s3 = torch.optim.lr_scheduler.StepLR(o3, 4, 0.5)
    m3.load_state_dict(saved[0])
    o3.load_state_dict(saved[1])
    s3.load_state_dict(saved[2])
    assert o3.param_groups is o3.optimizer.param_groups and o3.state is o3.optimizer.state
    got = _train(m3, o3, data[12:], s3)
    assert torch.equal(got, want)
    assert o3.optimizer.param_groups[0]["lr"] == o1.optimizer.param_groups[0]["lr"]


# -- 12.6: non-diagonal bases, closures, bad groups, unused layers, counters, AdamW flags -----
class _RotatedAdam(torch.optim.Optimizer):
    """SOAP-like: Adam moments kept in a rotated basis, the rotation in the state."""

    def __init__(self, params, lr=1e-2):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                st = self.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p)
                    st["Q"] = [torch.eye(p.shape[0]), torch.eye(p.shape[-1])]
                st["exp_avg"].lerp_(p.grad, 0.1)
                p.add_(st["exp_avg"], alpha=-g["lr"])


def test_moments_gate_refused_where_the_preconditioner_is_not_diagonal():
    lin = nn.Linear(6, 4, bias=False)
    with pytest.raises(ConfigError, match="not diagonal.*gate_on='update' or 'grad'"):
        gate(torch.optim.Muon([lin.weight], lr=0.02), gate_on="moments")
    gate(torch.optim.Muon([lin.weight], lr=0.02), gate_on="update")          # fine
    opt = gate(_RotatedAdam([lin.weight]), gate_on="moments")
    x = torch.randn(8, 6)
    (lin(x) ** 2).mean().backward()
    opt.step()                                                # no state yet: nothing to freeze
    w = lin.weight.detach().clone()
    lin.weight.grad = None
    (lin(x) ** 2).mean().backward()
    with pytest.raises(ConfigError, match="'Q'.*gate_on='update' or 'grad'"):
        opt.step()
    assert torch.equal(lin.weight, w)                         # refused before any change


def test_wrapper_passes_the_closure_on_to_lbfgs():
    m1, m2 = _model(), _model()
    x, y = _data(1)[0]
    ref = torch.optim.LBFGS(m1.parameters(), lr=0.5, max_iter=5)
    opt = gate(torch.optim.LBFGS(m2.parameters(), lr=0.5, max_iter=5), gate=False)
    calls = [0, 0]

    def closure_for(m, o, i):
        def closure():
            calls[i] += 1
            o.zero_grad()
            loss = _loss(m, x, y)
            loss.backward()
            return loss
        return closure

    for _ in range(3):
        ref.step(closure_for(m1, ref, 0))
        opt.step(closure_for(m2, opt, 1))
    assert calls[0] == calls[1] > 3                           # LBFGS re-evaluates; no extra call
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    gated = gate(torch.optim.LBFGS(m2.parameters(), lr=0.5, max_iter=5))
    gated.step(closure_for(m2, gated, 1))                     # the gated move, LBFGS inside
    with pytest.raises(ConfigError, match="LBFGS re-evaluates the closure.*gate_on='update'"):
        gate(torch.optim.LBFGS(m2.parameters()), gate_on="grad")


def test_sgd_closure_is_evaluated_once():
    m = _model()
    opt = gate(torch.optim.SGD(m.parameters(), lr=0.1), gate_on="grad")
    x, y = _data(1)[0]
    n = [0]

    def closure():
        n[0] += 1
        opt.zero_grad()
        loss = _loss(m, x, y)
        loss.backward()
        return loss

    assert torch.is_tensor(opt.step(closure)) and n[0] == 1


def test_add_param_group_with_a_bad_value_keeps_nothing():
    m = _model()
    q = nn.Parameter(torch.zeros(3))
    opt = GatedAdamW(m.parameters(), lr=1e-2)
    for bad in ({"threshold": -1.0}, {"lr": -1.0}, {"gate_on": "loss"}, {"betas": (0.9, 1.5)}):
        with pytest.raises(ConfigError):
            opt.add_param_group({"params": [q], **bad})
        assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [q], "threshold": 2.0})   # q was not kept by a failed add
    assert len(opt.param_groups) == 2
    w = gate(torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(ConfigError, match="gate_on"):
        w.add_param_group({"params": [q], "gate_on": "loss"})
    assert len(w.param_groups) == len(w.optimizer.param_groups) == 1
    w.add_param_group({"params": [q]})
    assert len(w.optimizer.param_groups) == 2


class _TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x, use_b=True):
        return self.a(x) + (self.b(x) if use_b else 0)


@pytest.mark.parametrize("wrapper", [False, True])
def test_exact_statistics_with_zeroed_grads_and_an_unused_layer(wrapper):
    """``zero_grad(set_to_none=False)`` leaves a zero gradient on a layer the step did not use:
    a zero contribution, not a ConfigError: no move (GatedAdamW: but the decoupled decay; the
    wrapper gates the base's whole move, decay included)."""
    torch.manual_seed(0)
    m = _TwoBranches()
    stats = PerExampleStats(m)
    opt = (gate(torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1), stats=stats)
           if wrapper else GatedAdamW(m.parameters(), lr=1e-2, weight_decay=0.1, stats=stats))
    x = torch.randn(8, 4)
    for use_b in (True, False):
        opt.zero_grad(set_to_none=False)
        (m(x, use_b) ** 2).mean().backward()
        b_before = m.b.weight.detach().clone()
        opt.step()
    want = b_before if wrapper else b_before * (1 - 1e-2 * 0.1)
    torch.testing.assert_close(m.b.weight, want, rtol=0, atol=1e-7)
    # a parameter with a non-zero gradient the source did not see still raises
    extra = nn.Parameter(torch.ones(2))
    opt2 = GatedAdamW(list(m.parameters()) + [extra], stats=stats)
    opt2.zero_grad()
    (m(x).sum() + extra.sum()).backward()
    with pytest.raises(ConfigError, match="collected nothing"):
        opt2.step()


def test_gate_telemetry_counter_survives_a_state_dict_round_trip():
    data = _data(8)
    m = _model()
    opt = GatedAdamW(m.parameters(), lr=1e-2)
    _train(m, opt, data[:5])
    fresh = GatedAdamW(m.parameters(), lr=1e-2)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    _train(m, fresh, data[5:6])
    assert fresh.gate_stats()["step"] == 6
    torch.optim.AdamW(m.parameters()).load_state_dict(fresh.state_dict())   # still loads
    w = gate(torch.optim.SGD(m.parameters(), lr=0.1))
    _train(m, w, data[:4])
    w2 = gate(torch.optim.SGD(m.parameters(), lr=0.1))
    w2.load_state_dict(copy.deepcopy(w.state_dict()))
    _train(m, w2, data[4:5])
    assert w2.gate_stats()["step"] == 5


@pytest.mark.parametrize("flag", ["amsgrad", "maximize", "capturable", "differentiable"])
def test_unsupported_adamw_flags_are_refused_clearly(flag):
    m = _model()
    with pytest.raises(ConfigError, match=f"{flag}=True.*torch.optim.AdamW"):
        GatedAdamW(m.parameters(), **{flag: True})
    GatedAdamW(m.parameters(), **{flag: False})
    ref = torch.optim.AdamW(m.parameters(), **{flag: True})
    opt = GatedAdamW(m.parameters())
    with pytest.raises(ConfigError, match=f"{flag}=True"):
        opt.load_state_dict(ref.state_dict())
    with pytest.raises(ConfigError, match=flag):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], flag: True})


def test_moments_of_the_wrong_shape_or_count_are_refused():
    p = nn.Parameter(torch.zeros(3))
    opt = GatedAdamW([p])
    p.grad = torch.ones(3)
    for mom, kind in ((GradMoments(torch.ones(4), torch.ones(4), 4), "shape"),
                      (GradMoments(torch.ones(3), torch.ones(3), 2.5), "count")):
        with pytest.raises(TangentscopeError, match=kind):
            opt.step(moments={p: mom})
        assert torch.equal(p, torch.zeros(3))
