"""The structured-derivatives eNTK against its brute-force twins (float64, 1e-10).

Twins: ``zoo.brute_force_entk`` (one autograd call per example and output) and the generic
``implementation="jacobian"`` path. Every contraction route (hadamard, positional, materialize)
is forced in turn on the layers where it is valid, over every setting of the shared zoo.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tangentscope as ts
from tangentscope.kernels import _factors as FA
from tangentscope.kernels import structured as S
from tangentscope.models import resnet8x
from zoo import MODELS, ZOO, Convs, Shared, Tokens, brute_force_entk, inputs_for, kind, make_mlp

TOL = dict(rtol=1e-10, atol=1e-10)


def structured(model, x1, x2=None, **kw):
    return ts.entk(model, x1, x2, implementation="structured", **kw)


@pytest.fixture(params=["cheapest", "materialize", "positional"])
def route(request, monkeypatch):
    """Force a contraction route wherever it is valid for a block (else the cheapest)."""
    if request.param != "cheapest":
        chosen = S._route

        def forced(b, c1, c2, p, trace, has_d):
            if request.param in S._route_costs(b, c1, c2, p, trace, has_d):
                return request.param
            return chosen(b, c1, c2, p, trace, has_d)

        monkeypatch.setattr(S, "_route", forced)
    return request.param


# -- the zoo --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_zoo_matches_brute_force(name, route):
    model = MODELS[name]()
    x1, x2 = inputs_for(kind(name), 5, seed=1), inputs_for(kind(name), 3, seed=2)
    ref_11, ref_12 = brute_force_entk(model, x1), brute_force_entk(model, x1, x2)
    torch.testing.assert_close(structured(model, x1), ref_11, **TOL)
    torch.testing.assert_close(structured(model, x1, x2), ref_12, **TOL)
    torch.testing.assert_close(structured(model, x1, x2, trace_outputs=True),
                               ref_12.diagonal(dim1=2, dim2=3).sum(-1), **TOL)
    torch.testing.assert_close(structured(model, x1, trace_outputs=True),
                               ref_11.diagonal(dim1=2, dim2=3).sum(-1), **TOL)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own
@pytest.mark.parametrize("setting", ZOO, ids=lambda s: s.name)
def test_every_zoo_setting_matches_brute_force(setting, route):
    model = setting.build()
    x1, x2 = setting.inputs(4, 1), setting.inputs(3, 2)
    plan = S.structured_plan(model, x1)
    assert set(plan.generic) == set(setting.generic)
    torch.testing.assert_close(structured(model, x1), brute_force_entk(model, x1), **TOL)
    ref = brute_force_entk(model, x1, x2)
    torch.testing.assert_close(structured(model, x1, x2), ref, **TOL)
    torch.testing.assert_close(structured(model, x1, x2, trace_outputs=True, chunk_size=2),
                               ref.diagonal(dim1=2, dim2=3).sum(-1), **TOL)


@pytest.mark.parametrize("name", list(MODELS))
def test_auto_picks_structured_on_the_zoo(name):
    model = MODELS[name]()
    x = inputs_for(kind(name), 4)
    fm = ts.functionalize(model)
    assert S.supports(fm, x)
    plan = S.structured_plan(model, x)
    expected_generic = {"pos.weight"} if name == "transformer" else set()
    assert set(plan.generic) == expected_generic
    if name == "transformer":  # the position table is indexed without the batch
        assert "not per-example" in plan.generic["pos.weight"]
    torch.testing.assert_close(ts.entk(model, x), brute_force_entk(model, x), **TOL)


def test_symmetric_strips_chunks_and_budget(route):
    """Enough rows for several strips of the symmetric Gram; chunks of every size."""
    model = make_mlp(4, width=12)
    x1, x2 = inputs_for("vec", 40, 1), inputs_for("vec", 7, 2)
    assert len(S._strips(40, 4)) > 1
    ref = brute_force_entk(model, x1)
    torch.testing.assert_close(structured(model, x1), ref, **TOL)
    for c in (1, 3, 16):
        torch.testing.assert_close(structured(model, x1, chunk_size=c), ref, **TOL)
        torch.testing.assert_close(structured(model, x1, x2, chunk_size=c),
                                   brute_force_entk(model, x1, x2), **TOL)
        torch.testing.assert_close(structured(model, x1, chunk_size=c, trace_outputs=True),
                                   ref.diagonal(dim1=2, dim2=3).sum(-1), **TOL)
    est = ts.estimate_memory(model, x1, implementation="structured")
    K = structured(model, x1, memory_budget=est["output"] + est["working"] // 6)
    torch.testing.assert_close(K, ref, **TOL)


@pytest.mark.parametrize("by_block", [True, False])
@pytest.mark.parametrize("setting", [s for s in ZOO if s.name in ("resnet8x", "resnet20")],
                         ids=lambda s: s.name)
def test_one_chunk_symmetric_kernel_block_by_block_or_in_strips(setting, by_block, route,
                                                               monkeypatch):
    """The one-chunk symmetric kernel contracted block by block (factors released as it goes)
    and strip by strip (all factors held) both equal the brute force, with groups, a
    preconditioner and traced outputs; a second chunk never goes block by block."""
    monkeypatch.setattr(S, "_by_block", lambda *a: by_block)
    used = []
    real = S._diagonal_by_block
    monkeypatch.setattr(S, "_diagonal_by_block", lambda *a: used.append(1) or real(*a))
    model = setting.build()
    x = setting.inputs(7, 1)  # 7 rows: several strips of the Gram
    ref = brute_force_entk(model, x)
    torch.testing.assert_close(structured(model, x), ref, **TOL)
    assert bool(used) == by_block
    torch.testing.assert_close(structured(model, x, trace_outputs=True),
                               ref.diagonal(dim1=2, dim2=3).sum(-1), **TOL)
    got = structured(model, x, groups="layer")
    torch.testing.assert_close(sum(got.values()), ref, **TOL)
    P = sum(q.numel() for q in model.parameters())
    d = torch.rand(P, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.1
    torch.testing.assert_close(structured(model, x, precondition=d),
                               brute_force_entk(model, x, d=d), **TOL)
    used.clear()
    torch.testing.assert_close(structured(model, x, chunk_size=4), ref, **TOL)
    assert not used


def test_one_output_streams_blocks_through_the_single_backward(route):
    """p = 1: the one backward's gradients are the sensitivities, and streamed blocks (convs at
    many positions, BatchNorm) are formed from it."""
    from zoo import with_bn_stats
    model = with_bn_stats(resnet8x(1, width=2, blocks=1))
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref = brute_force_entk(model, x)
    torch.testing.assert_close(structured(model, x), ref, **TOL)
    torch.testing.assert_close(structured(model, x, chunk_size=2), ref, **TOL)


def test_early_convolutions_stream_and_late_ones_are_formed_after_the_backward():
    """Which materialized blocks are formed output by output during the backward passes."""
    model = resnet8x(10).eval()
    plan = S.structured_plan(model, torch.randn(2, 3, 32, 32))
    blocks = {b.names[0]: b for b in plan.blocks}
    assert FA.streams(blocks["stem.weight"]) and FA.streams(blocks["blocks.0.conv1.weight"])
    assert FA.streams(blocks["bn.weight"])
    assert not FA.streams(blocks["blocks.7.conv2.weight"])  # 16 positions, 1,152 features


@pytest.mark.parametrize("inplace", [False, True])
def test_recording_keeps_output_edges_not_outputs(inplace):
    """A recording holds each layer output's autograd edge and shape, not its storage (tanh
    and ReLU save their results, so nothing else keeps the linear outputs alive), including
    the first layer's, whose input needs no gradient; the sensitivities through the edges
    match autograd on the plain model (with ``ReLU(inplace=True)`` the forward is re-recorded
    on clones)."""
    import weakref

    from tangentscope.kernels._capture import record, sensitivities

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 6), nn.Linear(6, 5), nn.Linear(5, 2)
            self.seen: list = []

        def forward(self, x):
            z1 = self.a(x)
            self.seen.append(weakref.ref(z1))
            h = F.relu(z1, inplace=True) if inplace else torch.tanh(z1)
            z2 = self.b(h)
            self.seen.append(weakref.ref(z2))
            return self.c(torch.tanh(z2))

    torch.manual_seed(0)
    model = Net().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    fm = ts.functionalize(model)
    rec = record(fm.apply, fm.params, x)
    assert [c.z.device.type for c in rec.calls] == ["meta"] * 3
    assert [tuple(c.z.shape) for c in rec.calls] == [(4, 6), (4, 5), (4, 2)]
    if not inplace:  # the clones of a re-recorded forward are what the model mutates
        assert all(r() is None for r in model.seen[-2:])
    deltas = sensitivities(rec, 2)
    for a in range(2):  # δ of the first two layers by autograd on the plain model
        h1 = model.a(x)
        h1.retain_grad()
        h = F.relu(h1.clone()) if inplace else torch.tanh(h1)
        h2 = model.b(h)
        h2.retain_grad()
        model.c(torch.tanh(h2))[:, a].sum().backward()
        for d, g in zip(deltas[:2], (h1.grad, h2.grad)):
            torch.testing.assert_close(d[:, a], g, rtol=1e-12, atol=1e-12)


# -- groups and preconditioners ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp_p4", "cnn", "bn_eval", "transformer"])
@pytest.mark.parametrize("groups", ["layer", "param", "split"])
def test_groups_match_jacobian(name, groups):
    model = MODELS[name]()
    x1, x2 = inputs_for(kind(name), 4, 1), inputs_for(kind(name), 3, 2)
    if groups == "split":  # weights and biases in different groups: no merged [W | b] blocks
        groups = lambda n: n.rsplit(".", 1)[-1]
    got = structured(model, x1, x2, groups=groups)
    want = ts.entk(model, x1, x2, implementation="jacobian", groups=groups)
    assert list(got) == list(want)
    for g in want:
        torch.testing.assert_close(got[g], want[g], **TOL)
    torch.testing.assert_close(sum(got.values()), brute_force_entk(model, x1, x2), **TOL)


@pytest.mark.parametrize("name", list(MODELS))
def test_precondition_matches_brute_force(name, route):
    model = MODELS[name]()
    x1, x2 = inputs_for(kind(name), 4, 1), inputs_for(kind(name), 3, 2)
    P = sum(q.numel() for q in model.parameters())
    d = torch.rand(P, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.1
    ref = brute_force_entk(model, x1, x2, d=d)
    torch.testing.assert_close(structured(model, x1, x2, precondition=d), ref, **TOL)
    dd, i = {}, 0
    for n, q in model.named_parameters():
        dd[n] = d[i:i + q.numel()].reshape(q.shape)
        i += q.numel()
    got = structured(model, x1, x2, precondition=dd, trace_outputs=True, groups="layer")
    torch.testing.assert_close(sum(got.values()), ref.diagonal(dim1=2, dim2=3).sum(-1), **TOL)


# -- layers beyond the zoo -------------------------------------------------------------------
def test_embedding_repeated_tokens_and_padding(route):
    model = Tokens().double()
    x1 = torch.tensor([[1, 1, 0, 3], [5, 0, 0, 5], [2, 3, 2, 2]])
    x2 = torch.tensor([[0, 0, 0, 0], [1, 5, 5, 4]])
    assert not S.structured_plan(model, x1).generic
    torch.testing.assert_close(structured(model, x1), brute_force_entk(model, x1), **TOL)
    torch.testing.assert_close(structured(model, x1, x2), brute_force_entk(model, x1, x2),
                               **TOL)
    # padding tokens get no gradient (emb pads 0; emb2 pads -1, i.e. 5)
    K = structured(model, torch.tensor([[0, 0, 0, 0], [5, 5, 5, 5]]), groups="layer")
    assert K["emb"][0, 0].abs().max() == 0 and K["emb"][1, 1].abs().max() > 0
    assert K["emb2"][1, 1].abs().max() == 0 and K["emb2"][0, 0].abs().max() > 0


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own
@pytest.mark.parametrize("chunk", [1, 700])  # one example j per chunk / a few, ragged end
def test_positional_route_in_chunks_of_examples(chunk, monkeypatch):
    """The positional route forms its intermediate ``R`` a chunk of examples at a time
    (:func:`_factors.positional_columns`): one example (no permutation) and several (a ragged
    last chunk) both equal the brute force, and the estimate counts the chunk, not all of R."""
    model = Convs().double().eval()
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(4, 2, 6, 6, dtype=torch.float64, generator=g)
    x2 = torch.randn(5, 2, 6, 6, dtype=torch.float64, generator=g)
    blocks = S.structured_plan(model, x1).blocks
    conv = [b for b in blocks if "positional" in S._route_costs(b, 4, 5, 2, False, False)]
    assert conv
    monkeypatch.setattr(FA, "POSITIONAL_CHUNK", chunk)
    cols = {FA.positional_columns(4, 5, 2, b.d_out, b.L) for b in conv}
    assert (1 in cols) if chunk == 1 else any(1 < c < 5 for c in cols), cols
    monkeypatch.setattr(S, "_route", lambda b, c1, c2, p, trace, has_d: "positional" if
                        "positional" in S._route_costs(b, c1, c2, p, trace, has_d)
                        else "materialize")
    torch.testing.assert_close(structured(model, x1, x2), brute_force_entk(model, x1, x2),
                               **TOL)
    torch.testing.assert_close(structured(model, x1, chunk_size=3), brute_force_entk(model, x1),
                               **TOL)
    b = max(conv, key=lambda b: b.L * b.d_out)
    full = S._route_costs(b, 4, 5, 2, False, False)["positional"][1]
    monkeypatch.setattr(FA, "POSITIONAL_CHUNK", 1 << 40)
    assert S._route_costs(b, 4, 5, 2, False, False)["positional"][1] >= full


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own
def test_conv_variants_and_norms(route):
    model = Convs().double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(3, 2, 6, 6, dtype=torch.float64, generator=g)
    x2 = torch.randn(2, 2, 6, 6, dtype=torch.float64, generator=g)
    assert not S.structured_plan(model, x1).generic
    torch.testing.assert_close(structured(model, x1, x2), brute_force_entk(model, x1, x2),
                               **TOL)
    torch.testing.assert_close(structured(model, x1), brute_force_entk(model, x1), **TOL)


def test_weight_sharing_is_exact(route):
    model = Shared().double()
    x1, x2 = (torch.randn(n, 4, 3, dtype=torch.float64) for n in (4, 3))
    plan = S.structured_plan(model, x1)
    assert not plan.generic
    rec = next(b for b in plan.blocks if b.names[0] == "rec.weight")
    assert len(rec.calls) == 2 and rec.L == 8  # two calls x four positions
    torch.testing.assert_close(structured(model, x1, x2), brute_force_entk(model, x1, x2),
                               **TOL)


class Mixed(nn.Module):
    """Parameters outside supported layers: a custom mixing matrix, an Embedding tied to the
    output Linear, and a Linear weight also read through a slice."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.mix = nn.Parameter(torch.eye(4) + 0.1 * torch.randn(4, 4))
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t):
        h = torch.einsum("bld,de->ble", self.emb(t), self.mix)
        h = torch.tanh(self.fc(h)) + h @ self.fc.weight[:, :4].T * 0.1
        return self.head(h[:, -1])


def test_unsupported_parameters_take_the_generic_path():
    model = Mixed().double()
    x1, x2 = torch.randint(0, 5, (4, 3)), torch.randint(0, 5, (3, 3))
    plan = S.structured_plan(model, x1)
    assert set(plan.generic) == {"mix", "emb.weight", "fc.weight"}
    assert "several roles" in plan.generic["emb.weight"] and "einsum" in plan.generic["mix"]
    assert S.generic_numel(ts.functionalize(model), x1) == 16 + 20 + 16
    for impl_x2 in (None, x2):
        torch.testing.assert_close(structured(model, x1, impl_x2),
                                   brute_force_entk(model, x1, impl_x2), **TOL)
    d = torch.rand(sum(q.numel() for q in model.parameters()), dtype=torch.float64) + 0.5
    got = structured(model, x1, x2, precondition=d, groups="layer", chunk_size=2)
    torch.testing.assert_close(sum(got.values()), brute_force_entk(model, x1, x2, d=d), **TOL)
    # MultiheadAttention's packed projections are generic; its plain output Linear too, since
    # the fused attention function receives it (analysis only: no kernel needed here)
    att = nn.MultiheadAttention(4, 2, batch_first=True).double().eval()
    fm = ts.functionalize(lambda prm, x: torch.func.functional_call(att, prm, (x, x, x))[0],
                          dict(att.named_parameters()))
    plan = S.structured_plan(fm, torch.randn(2, 3, 4, dtype=torch.float64))
    assert {"in_proj_weight", "out_proj.weight"} <= set(plan.generic)


def test_functional_model_with_supported_ops_and_float32():
    W1, W2 = torch.randn(8, 3, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)

    def f(prm, x):
        return F.linear(torch.tanh(F.linear(x, prm["W1"])), prm["W2"])

    x = torch.randn(6, 3, dtype=torch.float64)
    K = structured(f, x, params={"W1": W1, "W2": W2})
    torch.testing.assert_close(K, ts.entk(f, x, params={"W1": W1, "W2": W2},
                                          implementation="jacobian"), **TOL)
    model = make_mlp(3)
    K32 = structured(model.float(), x.float())
    assert K32.dtype == torch.float32
    torch.testing.assert_close(K32.double(), brute_force_entk(model.double(), x), rtol=1e-4,
                               atol=1e-4)


# -- auto selection, the plan per call and errors ---------------------------------------------
def test_auto_prefers_jacobian_when_little_is_structured():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(30, 3))
            self.out = nn.Linear(30, 1)

        def forward(self, x):
            return self.out(torch.tanh(x @ self.W.T))

    model = Custom().double()
    x = inputs_for("vec", 4)
    assert not S.supports(ts.functionalize(model), x)  # 31 of 121 scalars structured
    torch.testing.assert_close(ts.entk(model, x), brute_force_entk(model, x), **TOL)
    torch.testing.assert_close(structured(model, x), brute_force_entk(model, x), **TOL)


def test_batch_coupled_model_is_refused():
    class Centered(nn.Module):  # outputs of one example depend on the others: not per-example
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 1)

        def forward(self, x):
            h = torch.tanh(self.l1(x))
            return self.l2(h - h.mean(0))

    model = Centered().double()
    x = inputs_for("vec", 4)
    assert not S.supports(ts.functionalize(model), x)
    with pytest.raises(ts.UnsupportedModelError, match="couples the examples"):
        structured(model, x)


def test_stale_cached_plan_is_detected():
    class Switch(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 2)
            self.extra = False

        def forward(self, x):
            h = torch.tanh(self.l1(x))
            if self.extra:  # l2's weight is now also used outside a Linear call
                h = h + x.sum(1, keepdim=True) * self.l2.weight.sum()
            return self.l2(h)

    model = Switch().double()
    x = inputs_for("vec", 4)
    structured(model, x)
    model.extra = True
    torch.testing.assert_close(structured(model, x), brute_force_entk(model, x), **TOL)


def test_data_dependent_forward_and_bad_use_are_clear_errors():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x) if x.shape[0] > 2 else self.b(x) + self.a(x)

    x = inputs_for("vec", 5)
    with pytest.raises(ts.UnsupportedModelError, match="jacobian"):
        structured(Branchy().double(), x)

    def raw(prm, x):
        return x @ prm["W"].T

    with pytest.raises(ts.UnsupportedModelError, match="no parameter.*jacobian"):
        structured(raw, x, params={"W": torch.randn(2, 3, dtype=torch.float64)})


def test_memory_estimate_and_refusal_before_work():
    model = make_mlp(2, width=32)
    x = inputs_for("vec", 64)
    est_s = ts.estimate_memory(model, x, implementation="structured")
    est_j = ts.estimate_memory(model, x, implementation="jacobian")
    assert 0 < est_s["working"] < est_j["working"]
    with pytest.raises(ts.KernelTooLargeError, match="chunk_size"):
        structured(model, x, memory_budget=est_s["output"] + 1000, chunk_size=64)
    with pytest.raises(ts.KernelTooLargeError, match="entk_topk"):
        structured(model, x, memory_budget=1000)


def test_a_rule_registered_for_a_function_is_factored():
    """A layer added once (``register_rule``) is factored by the structured eNTK: here an
    elementwise scale ``x * w`` (``torch.Tensor.mul``), exact through the materialize route."""
    from tangentscope.derivatives import LayerRule, register_rule

    class ScaleRule(LayerRule):
        kind = "scale"
        roles = ("weight",)
        arg_names = ("input", "weight")

        def data(self, bound):
            return {"x": bound["input"].detach()}

        def sizes(self, data, z):
            return z.shape[-1], 0, 1, data["x"].numel() // data["x"].shape[0]

        def per_example(self, data, delta, roles):
            return delta * data["x"].unsqueeze(1)

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.w = nn.Parameter(torch.linspace(0.5, 2.0, 4))
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(torch.tanh(torch.tanh(self.fc(x)).mul(self.w)))

    model = Scaled().double()
    x1, x2 = inputs_for("vec", 4, 1), inputs_for("vec", 3, 2)
    assert "w" in S.structured_plan(model, x1).generic
    register_rule(torch.Tensor.mul, ScaleRule())
    try:
        plan = S.structured_plan(model, x1)
        assert not plan.generic and any(b.kind == "scale" for b in plan.blocks)
        torch.testing.assert_close(structured(model, x1, x2), brute_force_entk(model, x1, x2),
                                   **TOL)
    finally:
        register_rule(torch.Tensor.mul, None)
    assert "w" in S.structured_plan(model, x1).generic
