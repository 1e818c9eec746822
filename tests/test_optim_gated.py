"""GatedOptimizer: the gate around any torch.optim optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tangentscope import ConfigError
from tangentscope.optim import GatedAdamW, GatedOptimizer, GradMoments, PerExampleStats, gate
from test_optim_adamw import _data, _model, _train
from test_optim_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

BASES = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True,
                                      weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
}


@pytest.mark.parametrize("base", list(BASES))
def test_gate_off_is_the_base_optimizer_with_a_scheduler(base):
    data = _data(30)
    m1, m2 = _model(), _model()
    ref = BASES[base](m1.parameters())
    opt = GatedOptimizer(BASES[base](m2.parameters()), gate=False)
    a = _train(m1, ref, data, torch.optim.lr_scheduler.StepLR(ref, 10, 0.5))
    b = _train(m2, opt, data, torch.optim.lr_scheduler.StepLR(opt, 10, 0.5))
    assert torch.equal(a, b)
    assert opt.param_groups[0]["lr"] == opt.optimizer.param_groups[0]["lr"] == pytest.approx(
        BASES[base]([nn.Parameter(torch.zeros(1))]).defaults["lr"] / 8)


def test_wrapping_adam_reproduces_gated_adamw():
    """The wrapper's streaming mean (β = 0.9) and noise EMA (0.999) equal GatedAdamW's exp_avg
    reference and noise_beta = β2, so on Adam without weight decay both give the same steps."""
    data = _data(40)
    for on in ("update", "moments"):
        m1, m2 = _model(), _model()
        a = _train(m1, GatedAdamW(m1.parameters(), lr=1e-2, weight_decay=0.0, gate_on=on), data)
        b = _train(m2, gate(torch.optim.Adam(m2.parameters(), lr=1e-2), gate_on=on), data)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_placements_on_sgd_with_momentum():
    contrib = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, 1.0]])
    mom = GradMoments(contrib.sum(0), (contrib ** 2).sum(0), 4)           # gate (0, 1)
    out = {}
    for on in ("update", "grad", "moments"):
        p = nn.Parameter(torch.ones(2))
        opt = GatedOptimizer(torch.optim.SGD([p], lr=0.1, momentum=0.5), gate_on=on)
        p.grad = torch.tensor([0.4, 0.4])
        opt.step(moments={p: GradMoments(p.grad * 2, p.grad ** 2 * 2, 2)})   # gate open
        buf0, w0 = opt.state[p]["momentum_buffer"].clone(), p.detach().clone()
        p.grad = mom.grad_sum.clone()
        opt.step(moments={p: mom})
        w = p.detach()
        out[on] = (float(opt.state[p]["momentum_buffer"][0] / buf0[0]), float(w[0] - w0[0]))
        assert float(w[1] - w0[1]) < 0                                   # passed coordinate
    assert out["update"] == pytest.approx((0.5, 0.0))        # moments as the base, no move
    assert out["grad"][0] == pytest.approx(0.5) and out["grad"][1] < 0   # momentum carries on
    assert out["moments"] == pytest.approx((1.0, 0.0))       # coordinate skipped entirely
    assert opt.gate_stats()["fraction_updated"] == [0.5]


def test_factored_state_cannot_be_frozen_per_coordinate():
    m = _model()
    opt = GatedOptimizer(torch.optim.Adafactor(m.parameters(), lr=1e-2), gate_on="moments")
    data = _data(2)
    _train(m, opt, data[:1])                                   # first step: state is created
    with pytest.raises(ConfigError, match="row_var.*gate_on='update' or 'grad'"):
        _train(m, opt, data[1:])


def test_state_dict_round_trip_and_exact_statistics():
    data = _data(30)
    m1, m2 = _model(), _model()
    full = GatedOptimizer(torch.optim.SGD(m1.parameters(), lr=0.05, momentum=0.9))
    a = _train(m1, full, data)
    half = GatedOptimizer(torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9))
    _train(m2, half, data[:15])
    sd = half.state_dict()
    resumed = GatedOptimizer(torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9))
    resumed.load_state_dict(sd)
    assert torch.equal(a, _train(m2, resumed, data[15:]))
    with pytest.raises(ConfigError, match="not a GatedOptimizer state dict"):
        resumed.load_state_dict(torch.optim.SGD(m2.parameters(), lr=0.1).state_dict())

    m = _model()
    opt = gate(torch.optim.Adam(m.parameters(), lr=1e-2), stats=PerExampleStats(m))
    _train(m, opt, data[:3])
    assert 0 < opt.gate_stats()["fraction_updated"][0] < 1


def test_wrapper_errors():
    with pytest.raises(ConfigError, match="torch.optim.Optimizer"):
        GatedOptimizer(object())
    opt = gate(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1))
    with pytest.raises(ConfigError, match="already gated"):
        GatedOptimizer(opt)
    with pytest.raises(ConfigError, match="mean_beta"):
        gate(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1), mean_beta=1.0)
