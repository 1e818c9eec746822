"""Grokfast filters against a direct transcription of the paper's equations (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tangentscope import ConfigError
from tangentscope.optim.grokfast import GrokfastEMA, GrokfastMA, grokfast_ema, grokfast_ma


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _grad_sequence(T: int, shapes=((3, 4), (5,))) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(T)]


def _brute_ema(seq, alpha, lamb):
    """h_1 = g_1; h_t = α h_{t−1} + (1 − α) g_t; out_t = g_t + λ h_t — element by element."""
    outs, h = [], None
    for grads in seq:
        out_t, h_new = [], []
        for i, g in enumerate(grads):
            flat_g = g.flatten().tolist()
            prev = flat_g if h is None else h[i]
            hi = [alpha * a + (1 - alpha) * b for a, b in zip(prev, flat_g)]
            h_new.append(hi)
            out_t.append(torch.tensor([b + lamb * c for b, c in zip(flat_g, hi)]).view(g.shape))
        h = h_new
        outs.append(out_t)
    return outs


def _brute_ma(seq, w, lamb, warmup=True):
    outs = []
    for t, grads in enumerate(seq):
        window = seq[max(0, t - w + 1): t + 1]
        if warmup and len(window) < w:
            outs.append([g.clone() for g in grads])
            continue
        outs.append([g + lamb * sum(s[i] for s in window) / len(window)
                     for i, g in enumerate(grads)])
    return outs


def _params_with(grads):
    return [nn.Parameter(torch.zeros_like(g)) for g in grads]


@pytest.mark.parametrize("alpha,lamb", [(0.98, 2.0), (0.5, 0.3), (0.0, 1.0)])
def test_ema_matches_the_equations(alpha, lamb):
    seq = _grad_sequence(12)
    want = _brute_ema(seq, alpha, lamb)
    ps = _params_with(seq[0])
    filt = GrokfastEMA(ps, alpha=alpha, lamb=lamb)
    ema = None
    for grads, w in zip(seq, want):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        filt()
        pure, ema = grokfast_ema(grads, ema, alpha=alpha, lamb=lamb)
        for p, wi, pi in zip(ps, w, pure):
            torch.testing.assert_close(p.grad, wi, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(pi, wi, rtol=1e-12, atol=1e-12)


def test_ema_first_step_scales_by_one_plus_lambda_and_zero_gain_is_identity():
    g = torch.randn(7)
    out, h = grokfast_ema([g], None, alpha=0.9, lamb=2.0)
    torch.testing.assert_close(out[0], 3.0 * g)
    torch.testing.assert_close(h[0], g)
    out0, _ = grokfast_ema([g], [torch.randn(7)], alpha=0.9, lamb=0.0)
    torch.testing.assert_close(out0[0], g)


@pytest.mark.parametrize("w,warmup", [(1, True), (3, True), (4, False)])
def test_ma_matches_the_equations(w, warmup):
    seq = _grad_sequence(9)
    want = _brute_ma(seq, w, 5.0, warmup)
    ps = _params_with(seq[0])
    filt = GrokfastMA(ps, window_size=w, lamb=5.0, warmup=warmup)
    window: list = []
    for grads, wt in zip(seq, want):
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        filt()
        pure, window = grokfast_ma(grads, window, window_size=w, lamb=5.0, warmup=warmup)
        for p, wi, pi in zip(ps, wt, pure):
            torch.testing.assert_close(p.grad, wi, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(pi, wi, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls,kw", [(GrokfastEMA, {"alpha": 0.9}), (GrokfastMA,
                                                                   {"window_size": 3})])
def test_state_dict_round_trip_continues_exactly(cls, kw):
    seq = _grad_sequence(8)
    ps_a, ps_b = _params_with(seq[0]), _params_with(seq[0])
    a = cls(ps_a, **kw)
    b = cls(ps_b, **kw)
    for t, grads in enumerate(seq):
        if t == 4:  # b is rebuilt from a checkpoint of itself
            state = b.state_dict()
            b = cls(ps_b, **kw)
            b.load_state_dict(state)
        for pa, pb, g in zip(ps_a, ps_b, grads):
            pa.grad, pb.grad = g.clone(), g.clone()
        a()
        b()
        for pa, pb in zip(ps_a, ps_b):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=0)


def test_parameters_without_grad_are_skipped():
    p1, p2 = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    filt = GrokfastEMA([p1, p2], alpha=0.5, lamb=1.0)
    p1.grad = torch.ones(3)
    filt()
    torch.testing.assert_close(p1.grad, 2 * torch.ones(3))
    assert p2.grad is None and filt.ema[1] is None


def test_one_line_in_a_loop_zero_gain_matches_plain_adamw():
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    m1 = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    m2 = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    m2.load_state_dict(m1.state_dict())
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    gf = GrokfastEMA(m2, lamb=0.0)
    for _ in range(10):
        for m, o, f in ((m1, o1, None), (m2, o2, gf)):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            if f is not None:
                f()
            o.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_arguments_name_the_fix():
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ConfigError, match="alpha must be in"):
        GrokfastEMA(p, alpha=1.0)
    with pytest.raises(ConfigError, match="window_size must be a positive integer"):
        GrokfastMA(p, window_size=0)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        GrokfastEMA([nn.Parameter(torch.zeros(2), requires_grad=False)])
    with pytest.raises(ConfigError, match="lamb must be finite"):
        GrokfastEMA(p, lamb=float("nan"))
