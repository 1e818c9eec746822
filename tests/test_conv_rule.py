"""The convolution rule's per-example weight gradients: both routes (the convolution's own
weight gradient with one group per example, and the product with unfolded patches) against
autograd, example by example, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tangentscope.derivatives import conv as C

TOL = dict(rtol=1e-10, atol=1e-12)

CASES = {
    "plain": (nn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=3, padding=1), 7),
    "stride-dilation-groups": (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3,
                                               stride=2, dilation=2, padding=2, groups=2), 9),
    "same-even-kernel": (nn.Conv2d, dict(in_channels=2, out_channels=4, kernel_size=2,
                                         padding="same", groups=2, bias=False), 6),
    "reflect": (nn.Conv2d, dict(in_channels=2, out_channels=3, kernel_size=3, padding=1,
                                padding_mode="reflect"), 5),
    "circular-rect": (nn.Conv2d, dict(in_channels=2, out_channels=4, kernel_size=(2, 3),
                                      padding=(1, 0), padding_mode="circular", groups=2,
                                      stride=(2, 1)), 6),
    "replicate-1d": (nn.Conv1d, dict(in_channels=4, out_channels=2, kernel_size=3, padding=1,
                                     padding_mode="replicate", groups=2), 11),
    "valid-1d": (nn.Conv1d, dict(in_channels=3, out_channels=5, kernel_size=4, stride=3), 14),
}


def _setup(name: str):
    cls, kw, size = CASES[name]
    torch.manual_seed(0)
    layer = cls(**kw).double()
    nd = 2 if cls is nn.Conv2d else 1
    x = torch.randn(3, kw["in_channels"], *([size] * nd), dtype=torch.float64)
    rule = C.ConvRule(nd)
    data = rule.data(rule.module_call(layer, x))
    z = layer(x)
    delta = torch.randn(3, 2, *z.shape[1:], dtype=torch.float64)  # (B, P, C_out, *spatial)
    return layer, x, rule, data, delta


def _autograd(layer: nn.Module, x: torch.Tensor, delta: torch.Tensor, bias: bool) -> torch.Tensor:
    rows = []
    for i in range(x.shape[0]):
        for a in range(delta.shape[1]):
            params = [layer.weight] + ([layer.bias] if bias else [])
            out = (layer(x[i:i + 1])[0] * delta[i, a]).sum()
            gs = torch.autograd.grad(out, params)
            w = gs[0].reshape(layer.groups, layer.out_channels // layer.groups, -1)
            if bias:
                w = torch.cat([w, gs[1].reshape(w.shape[0], w.shape[1], 1)], dim=-1)
            rows.append(w.reshape(-1))
    return torch.stack(rows).reshape(x.shape[0], delta.shape[1], -1)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own
@pytest.mark.parametrize("name", sorted(CASES))
def test_both_weight_gradient_routes_equal_autograd(name):
    layer, x, rule, data, delta = _setup(name)
    bias = layer.bias is not None
    roles = ("weight", "bias") if bias else ("weight",)
    want = _autograd(layer, x, delta, bias)
    B, P, Cout = delta.shape[:3]
    g = data["groups"]
    dl = delta.reshape(B, P, g, Cout // g, -1)
    by_conv = C._weight_grads(data, dl)
    by_unfold = torch.einsum("bpgol,bgql->bpgoq", dl, C.unfold(data))
    weights = want.reshape(B, P, g, Cout // g, -1)[..., :-1] if bias else want.reshape(
        by_conv.shape)
    torch.testing.assert_close(by_conv, weights.reshape(by_conv.shape), **TOL)
    torch.testing.assert_close(by_conv, by_unfold, **TOL)
    torch.testing.assert_close(rule.per_example(data, delta, roles), want, **TOL)


def test_the_rule_takes_the_convolution_route_where_positions_outnumber_patch_features(
        monkeypatch):
    _, _, rule, data, delta = _setup("plain")  # 49 positions, 27 patch features
    calls = []
    real = C._weight_grads
    monkeypatch.setattr(C, "_weight_grads", lambda d, dl: calls.append(1) or real(d, dl))
    rule.per_example(data, delta, ("weight", "bias"))
    assert calls
    _, _, rule, data, delta = _setup("valid-1d")  # 4 positions, 12 patch features
    calls.clear()
    rule.per_example(data, delta, ("weight",))
    assert not calls
