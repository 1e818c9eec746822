"""Pruning saliencies and masks (dynamics/pruning.py) against float64 brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tangentscope import ConfigError
from tangentscope.dynamics.pruning import (
    apply_masks,
    compact_mlp,
    global_masks,
    hidden_layers,
    keep_masked,
    magnitude_saliency,
    neuron_masks,
    neuron_saliency,
    obd_saliency,
    random_saliency,
    snip_saliency,
    sparsity_of,
    weight_names,
)
from tangentscope.errors import ShapeError, UnsupportedModelError
from tangentscope.models import mlp


def _net(seed=0, d=4, w=6, depth=2, p=3, act="tanh"):
    torch.manual_seed(seed)
    return mlp(d, w, depth, p, activation=act).double()


def _jacobian(net, x):
    """``{name: (N, *shape)}`` explicit Jacobian of the stacked outputs."""
    params = dict(net.named_parameters())
    names = list(params)

    def f(*vals):
        return torch.func.functional_call(net, dict(zip(names, vals)), (x,)).reshape(-1)

    J = torch.autograd.functional.jacobian(f, tuple(params.values()))
    return dict(zip(names, J))


# -- saliencies ---------------------------------------------------------------------------------
def test_snip_equals_weight_times_a_central_difference_gradient():
    net = _net(1, p=2)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    sal = snip_saliency(net, x, y)

    def loss():
        return float(0.5 * (net(x) - y).pow(2).sum(1).mean())

    h = 1e-6
    with torch.no_grad():
        for k, v in net.named_parameters():
            flat = v.view(-1)
            for i in range(0, flat.numel(), 3):           # every third entry
                w0 = float(flat[i])
                flat[i] = w0 + h
                lp = loss()
                flat[i] = w0 - h
                lm = loss()
                flat[i] = w0
                want = abs(w0 * (lp - lm) / (2 * h))
                assert float(sal[k].reshape(-1)[i]) == pytest.approx(want, rel=1e-5, abs=1e-12)


def test_obd_equals_the_explicit_gauss_newton_diagonal_for_identity_and_general_hessians():
    net = _net(2, d=3, w=4, depth=1, p=2)
    n = 6
    x = torch.randn(n, 3, dtype=torch.float64)
    J = _jacobian(net, x)
    params = dict(net.named_parameters())
    sal = obd_saliency(net, x, chunk_size=4)                  # default B_i = I / n
    for k, Jk in J.items():
        want = 0.5 * params[k].detach().reshape(-1).pow(2) * Jk.reshape(n * 2, -1).pow(2).sum(
            0) / n
        np.testing.assert_allclose(sal[k].reshape(-1).numpy(), want.numpy(), rtol=1e-10)
    # softmax cross-entropy Hessian blocks (PSD, not diagonal)
    with torch.no_grad():
        prob = torch.softmax(net(x), 1)
    B = (torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]) / n
    sal_b = obd_saliency(net, x, B, chunk_size=5)
    for k, Jk in J.items():
        Jr = Jk.reshape(n, 2, -1)                                   # (n, p, P_k)
        diag = torch.einsum("iap,iab,ibp->p", Jr, B, Jr)
        want = 0.5 * params[k].detach().reshape(-1).pow(2) * diag
        np.testing.assert_allclose(sal_b[k].reshape(-1).numpy(), want.numpy(), rtol=1e-9,
                                   atol=1e-15)
    with pytest.raises(ShapeError, match="hessian"):
        obd_saliency(net, x, B[:, :1, :1])


def test_magnitude_and_random_saliencies():
    net = _net(3)
    mag = magnitude_saliency(net)
    for k, v in net.named_parameters():
        assert torch.equal(mag[k], v.detach().abs())
    a, b, c = random_saliency(net, 5), random_saliency(net, 5), random_saliency(net, 6)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["0.weight"],
                                                                      c["0.weight"])
    assert weight_names(net) == ["0.weight", "2.weight", "4.weight"]


# -- masks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_global_masks_hit_the_sparsity_exactly_and_keep_the_largest(sparsity):
    net = _net(4)
    sal = magnitude_saliency(net)
    names = weight_names(net)
    total = sum(sal[k].numel() for k in names)
    m = global_masks(sal, sparsity)
    assert sum(int((~m[k]).sum()) for k in names) == int(round(sparsity * total))
    assert sparsity_of(m, names) == pytest.approx(sparsity, abs=0.5 / total)
    kept = torch.cat([sal[k][m[k]] for k in names])
    dropped = torch.cat([sal[k][~m[k]] for k in names])
    assert dropped.numel() == 0 or float(dropped.max()) <= float(kept.min())
    assert bool(m["0.bias"].all()) and bool(m["4.bias"].all())       # biases untouched


def test_global_masks_are_exact_under_ties_and_respect_names():
    sal = {"a": torch.ones(4, 5, dtype=torch.float64), "b": torch.zeros(3, 3,
                                                                         dtype=torch.float64)}
    m = global_masks(sal, 0.5)
    assert int((~m["a"]).sum()) + int((~m["b"]).sum()) == round(0.5 * 29)
    assert not bool(m["b"].any())                                    # zeros go first
    m2 = global_masks(sal, 0.25, names=["a"])
    assert int((~m2["a"]).sum()) == 5 and bool(m2["b"].all())
    with pytest.raises(ConfigError, match="sparsity"):
        global_masks(sal, 1.0)
    with pytest.raises(ConfigError, match="no saliency"):
        global_masks(sal, 0.5, names=["c"])


def test_neuron_masks_remove_whole_units_and_equal_the_smaller_dense_network():
    net = _net(5, d=4, w=8, depth=2, p=3, act="gelu")
    sal = magnitude_saliency(net)
    assert hidden_layers(net) == [("0", "2"), ("2", "4")]
    ns = neuron_saliency(net, sal)
    assert ns["0"].shape == (8,) and ns["2"].shape == (8,)
    assert float(ns["2"][3]) == pytest.approx(float(sal["2.weight"][3].sum() + sal["2.bias"][3]
                                                    + sal["4.weight"][:, 3].sum()))
    m = neuron_masks(net, ns, 0.5)
    offs = {}
    for a, b in hidden_layers(net):
        off = offs[a] = (~m[f"{a}.weight"]).all(1)
        assert int(off.sum()) == 4
        assert set(torch.nonzero(off).reshape(-1).tolist()) == set(
            torch.argsort(ns[a])[:4].tolist())                      # the least salient units
        assert bool((~m[f"{b}.weight"][:, off]).all()) and bool((~m[f"{a}.bias"][off]).all())
        assert bool(m[f"{a}.bias"][~off].all())
    # what survives: exactly the rows of kept units times the columns of kept inputs
    assert bool(m["0.weight"][~offs["0"]].all())
    want2 = (~offs["2"])[:, None] & (~offs["0"])[None, :]
    assert torch.equal(m["2.weight"], want2) and torch.equal(m["4.weight"],
                                                             (~offs["2"]).expand(3, 8))
    small = compact_mlp(net, m)
    assert [lin.out_features for lin in small if isinstance(lin, torch.nn.Linear)] == [4, 4, 3]
    x = torch.randn(7, 4, dtype=torch.float64)
    apply_masks(net, m)
    np.testing.assert_allclose(small(x).detach().numpy(), net(x).detach().numpy(), rtol=1e-12,
                               atol=1e-14)
    assert sum(p.numel() for p in small.parameters()) == 4 * 4 + 4 + 4 * 4 + 4 + 4 * 3 + 3
    with pytest.raises(ConfigError, match="fraction"):
        neuron_masks(net, ns, 1.0)
    with pytest.raises(UnsupportedModelError, match="Linear"):
        hidden_layers(torch.nn.Linear(3, 2))


def test_compact_mlp_also_drops_unstructured_zeros_and_refuses_an_empty_layer():
    net = _net(6, d=3, w=5, depth=1, p=2)
    m = global_masks(magnitude_saliency(net), 0.4)
    apply_masks(net, m)
    small = compact_mlp(net, m)
    x = torch.randn(4, 3, dtype=torch.float64)
    np.testing.assert_allclose(small(x).detach().numpy(), net(x).detach().numpy(), rtol=1e-12,
                               atol=1e-14)
    dead = {k: torch.zeros_like(v, dtype=torch.bool) if k == "0.weight" else
            torch.ones_like(v, dtype=torch.bool) for k, v in net.named_parameters()}
    with pytest.raises(UnsupportedModelError, match="keeps no hidden unit"):
        compact_mlp(net, dead)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_keep_masked_keeps_pruned_entries_at_zero_through_training(opt_name):
    net = _net(7)
    m = neuron_masks(net, neuron_saliency(net, magnitude_saliency(net)), 0.5)
    opt = (torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(net.parameters(), lr=0.05))
    handle = keep_masked(opt, net, m)
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    w_before = net[0].weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        (net(x) - y).pow(2).mean().backward()
        opt.step()
    handle.remove()
    named = dict(net.named_parameters())
    for k, mk in m.items():
        assert float(named[k].detach()[~mk].abs().sum()) == 0.0
    assert not torch.equal(net[0].weight.detach()[m["0.weight"]], w_before[m["0.weight"]])
    with pytest.raises(ConfigError, match="not a parameter"):
        apply_masks(net, {"nope": torch.ones(1, dtype=torch.bool)})
