"""The optimizer spec: one name per optimizer, one builder (tangentscope.optim.spec)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tangentscope import ConfigError
from tangentscope.optim import (
    GatedAdamW,
    GradMoments,
    GrokfastEMA,
    GrokfastMA,
    MicrobatchStats,
    PerExampleStats,
)
from tangentscope.optim.spec import (
    KEYS,
    OPTIMIZERS,
    BuiltOptimizer,
    OptimizerSpec,
    build_optimizer,
    parse_optimizer,
)
from test_optim_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _backward(model, seed=1, b=6):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(b, 4, generator=g), torch.randn(b, 2, generator=g)
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    return loss


# the variants the experiments use today, and a few more
VARIANTS = ["gated@gate=soft", "gated-grad@gate=soft", "gated@threshold=0.25",
            "gated-streaming@gate_on=grad", "gated@stats=microbatch", "gated@gate=false",
            "gated-streaming@gate=false@noise_beta=0.99", "adam@grokfast=ema",
            "grokfast@grokfast=ma@window_size=3", "grokfast@lamb=0.5@alpha=0.5",
            "gated-streaming@fused=false@gate_warmup=3", "gated@nonfinite=ignore",
            "gated-grad+grokfast@lamb=1", "sgd@grokfast=ma@lamb=1@window_size=2"]


@pytest.mark.parametrize("text", list(OPTIMIZERS) + VARIANTS)
def test_every_name_builds_and_steps(text):
    model = _model()
    built = build_optimizer(text, model, lr=1e-2)
    assert isinstance(built, BuiltOptimizer) and built.spec == parse_optimizer(text)
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(3):
        built.zero_grad()
        _backward(model, seed=step)
        if built.spec.stats == "microbatch":       # a second contribution
            _backward(model, seed=10 + step)
        built.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    want = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD,
            "gated-adamw": GatedAdamW}[built.spec.rule]
    assert type(built.optimizer) is want
    assert (built.grad_filter is not None) == (built.spec.grokfast != "none")


@pytest.mark.parametrize("text", list(OPTIMIZERS) + VARIANTS)
def test_str_round_trips(text):
    spec = parse_optimizer(text)
    assert parse_optimizer(str(spec)) == spec
    assert str(parse_optimizer(str(spec))) == str(spec)
    assert parse_optimizer(spec) is spec
    assert hash(spec) == hash(parse_optimizer(str(spec)))


def test_spelling_is_canonical():
    assert parse_optimizer("gated_streaming") == parse_optimizer("gated-streaming")
    assert str(parse_optimizer("Gated_Grad+Grokfast")) == "gated-grad+grokfast"
    assert parse_optimizer("gated@gate-on=grad") == parse_optimizer("gated@gate_on=grad")
    assert str(parse_optimizer("gated@threshold=1")) == "gated"          # the default
    assert str(parse_optimizer("gated@threshold=2@gate_on=grad")) == \
        "gated@gate_on=grad@threshold=2"                                 # key order: KEYS
    assert parse_optimizer("gated@gate=true") == parse_optimizer("gated@gate=hard")
    assert parse_optimizer("gated@threshold=2") == OptimizerSpec("gated", threshold=2.0)
    assert OptimizerSpec("gated", threshold="2") == OptimizerSpec("gated", threshold=2)
    s = parse_optimizer("gated")
    assert (s.gate, s.stats, s.gate_on, s.threshold, s.grokfast) == \
        ("hard", "exact", "update", 1.0, "none")
    assert parse_optimizer("grokfast").settings == {"grokfast": "ema", "alpha": 0.98,
                                                    "lamb": 2.0}
    assert parse_optimizer("grokfast-ma").settings == {"grokfast": "ma", "lamb": 5.0,
                                                       "window_size": 100}
    assert parse_optimizer("adamw").settings == {"grokfast": "none"}


def test_replace():
    s = parse_optimizer("gated-streaming")
    assert str(s.replace(threshold=2, gate_on="grad")) == \
        "gated-streaming@gate_on=grad@threshold=2"
    assert s.replace(threshold=1.0) == s
    g = parse_optimizer("grokfast@lamb=3")
    assert str(g.replace(grokfast="ma")) == "grokfast@grokfast=ma"     # the ema settings go
    # a new name keeps the keys set on top of the old one's registry settings
    assert str(s.replace(threshold=2).replace(name="gated")) == "gated@threshold=2"
    with pytest.raises(ConfigError, match="keys: gate, stats"):
        s.replace(tau=2)


@pytest.mark.parametrize("text,match", [
    ("gated_exact", "renamed: use 'gated@stats=microbatch"),
    ("lbfgs", "known: adamw, adam, sgd, grokfast"),
    ("gated@tau=2", "unknown optimizer key 'tau'.*keys: gate, stats, gate_on, threshold"),
    ("gated@threshold", "must read key=value"),
    ("gated@threshold=-1", "threshold must be"),
    ("gated@threshold=abc", "threshold must be a number"),
    ("gated@threshold=nan", "threshold must be"),
    ("gated@gate=maybe", "gate must be one of false, hard, soft"),
    ("gated@stats=vmap", "stats must be one of exact, microbatch, streaming"),
    ("gated@gate_on=loss", "gate_on must be one of update, grad, moments"),
    ("gated@gate_warmup=1.5", "gate_warmup must be an integer"),
    ("gated@noise_beta=1", "noise_beta must be"),
    ("gated@fused=yes", "fused must be true or false"),
    ("gated@fused=true@gate_on=grad", "gate_on=update only"),
    ("gated@threshold=1@threshold=2", "given twice"),
    ("adamw@threshold=2", "applies to the gated optimizers.*keys of 'adamw': grokfast"),
    ("grokfast@window_size=5", "applies to grokfast=ma.*add @grokfast=ma"),
    ("adamw@lamb=2", "applies to grokfast=ema or ma"),
    ("grokfast-ma@alpha=0.5", "applies to grokfast=ema"),
    ("grokfast@alpha=1", "alpha must be"),
    ("grokfast-ma@window_size=0", "window_size must be"),
    ("", "non-empty string"),
])
def test_errors_name_the_valid_names_and_keys(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_optimizer(text)


@pytest.mark.parametrize("old,new", [("gd", "sgd"), ("GD", "sgd"),
                                     ("gated_adamw", "gated-streaming"),
                                     ("gated-adamw", "gated-streaming"),
                                     ("gated_adamw@threshold=2", "gated-streaming@threshold=2")])
def test_deprecated_spellings_map_to_the_canonical_spec(old, new):
    """The two renamed spellings (old configs, the page's old value) still parse, to the same
    spec as the canonical name, and ``str()`` prints the canonical name."""
    assert parse_optimizer(old) == parse_optimizer(new)
    assert str(parse_optimizer(old)) == new
    if "@" not in old:
        assert OptimizerSpec(old) == parse_optimizer(new)


def test_registry_and_keys_are_documented():
    import tangentscope.optim.spec as S

    for name in OPTIMIZERS:
        assert f"``{name}``" in S.__doc__
        assert parse_optimizer(name).description == OPTIMIZERS[name]
    assert set(KEYS) == {f.name for f in S.dataclasses.fields(OptimizerSpec)} - {"name"}


# -- the old vocabularies, each spelled with the spec -----------------------------------------
OLD = [  # (old caller, old spelling, new spec, class, statistics source or None)
    ("harness", "gd", "sgd", torch.optim.SGD, None),
    ("harness", "adam", "adam", torch.optim.Adam, None),
    ("harness", "gated", "gated", GatedAdamW, PerExampleStats),
    ("harness", "gated_streaming", "gated-streaming", GatedAdamW, None),
    ("page", "adamw", "adamw", torch.optim.AdamW, None),
    ("page", "gated_adamw", "gated-streaming", GatedAdamW, None),
    ("page", "sgd", "sgd", torch.optim.SGD, None),
    ("hf", "adamw", "adamw", torch.optim.AdamW, None),
    ("hf", "gated", "gated-streaming", GatedAdamW, None),
    ("hf", "gated+stats=microbatch", "gated@stats=microbatch", GatedAdamW, MicrobatchStats),
    ("dpo", "gated", "gated-streaming", GatedAdamW, None),
    ("dpo", "gated_exact", "gated@stats=microbatch", GatedAdamW, MicrobatchStats),
    ("inr", "gated-moments", "gated-moments", GatedAdamW, PerExampleStats),
    ("inr", "adamw-es", "adamw", torch.optim.AdamW, None),
    ("poprisk", "off/exact", "gated@gate=false", GatedAdamW, PerExampleStats),
    ("poprisk", "soft/streaming", "gated-streaming@gate=soft", GatedAdamW, None),
    ("grokking", "gated-grad+grokfast", "gated-grad+grokfast", GatedAdamW, PerExampleStats),
    ("grokking", "base=adam grokfast", "adam@grokfast=ema", torch.optim.Adam, None),
]


@pytest.mark.parametrize("caller,old,new,cls,source", OLD)
def test_old_spellings_are_expressible(caller, old, new, cls, source):
    built = build_optimizer(new, _model(), lr=1e-3)
    assert type(built.optimizer) is cls
    assert (built.stats is None) if source is None else isinstance(built.stats, source)
    if cls is GatedAdamW:
        assert built.optimizer.stats is (built.stats or "streaming")


# -- the builder -------------------------------------------------------------------------------
def test_hyperparameters_reach_the_optimizer_and_defaults_are_the_optimizers():
    m = _model()
    o = build_optimizer("adamw", m, lr=3e-3, weight_decay=0.5, betas=(0.8, 0.9),
                        eps=1e-6).optimizer
    g = o.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["betas"], g["eps"]) == (3e-3, 0.5, (0.8, 0.9), 1e-6)
    assert build_optimizer("adamw", m, lr=1e-3).optimizer.param_groups[0]["weight_decay"] == 0.01
    assert build_optimizer("adam", m, lr=1e-3).optimizer.param_groups[0]["weight_decay"] == 0
    assert build_optimizer("sgd", m, lr=1e-3, momentum=0.9).optimizer.param_groups[0][
        "momentum"] == 0.9
    gg = build_optimizer("gated-streaming@threshold=2@gate_warmup=4@noise_beta=0.9", m,
                         lr=1e-3).optimizer.param_groups[0]
    assert (gg["threshold"], gg["gate_warmup"], gg["noise_beta"], gg["weight_decay"]) == \
        (2.0, 4, 0.9, 0.01)


def test_frozen_parameters_are_left_out_and_groups_pass_through():
    m = _model()
    m[0].bias.requires_grad_(False)
    built = build_optimizer("adamw", m, lr=1e-3)
    assert all(p.requires_grad for p in built.params) and len(built.params) == 3
    groups = [{"params": [m[0].weight], "weight_decay": 0.1}, {"params": [m[2].weight]}]
    o = build_optimizer("gated-streaming", groups, lr=1e-3, weight_decay=0.0).optimizer
    assert [g["weight_decay"] for g in o.param_groups] == [0.1, 0.0]


def test_same_trajectory_as_building_by_hand():
    """adamw / gated / grokfast through the builder == the classes by hand (bit for bit)."""
    for text in ("adamw", "gated", "gated-streaming@gate=soft", "grokfast", "grokfast-ma",
                 "gated-grad+grokfast"):
        a, b = _model(), _model()
        built = build_optimizer(text, a, lr=1e-2, weight_decay=0.1)
        sp = built.spec
        params = list(b.parameters())
        if sp.rule == "adamw":
            opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        else:
            opt = GatedAdamW(params, lr=1e-2, weight_decay=0.1, gate=sp.gate, gate_on=sp.gate_on,
                             stats=PerExampleStats(b) if sp.stats == "exact" else "streaming")
        filt = (GrokfastEMA(params) if sp.grokfast == "ema" else
                GrokfastMA(params, window_size=100) if sp.grokfast == "ma" else None)
        for step in range(4):
            for model, o, f in ((a, built, None), (b, opt, filt)):
                o.zero_grad()
                _backward(model, seed=step)
                if f is not None:
                    f()
                o.step()
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q), text


def test_exact_statistics_need_the_module():
    m = _model()
    with pytest.raises(ConfigError, match="needs the module.*model="):
        build_optimizer("gated", m.parameters(), lr=1e-3)
    built = build_optimizer("gated", m.parameters(), lr=1e-3, model=m)
    assert isinstance(built.stats, PerExampleStats)
    src = PerExampleStats(_model())
    assert build_optimizer("gated", m.parameters(), lr=1e-3, stats=src).stats is src
    assert isinstance(build_optimizer("gated@stats=microbatch", m.parameters(), lr=1e-3).stats,
                      MicrobatchStats)


def test_builder_errors_before_building():
    m = _model()
    for kw, match in [(dict(lr=0.0), "learning rate must be a finite positive number"),
                      (dict(lr=-1.0), "learning rate"), (dict(lr=float("nan")), "learning rate"),
                      (dict(lr=1e-3, momentum=0.9), "momentum is an argument of sgd")]:
        with pytest.raises(ConfigError, match=match):
            build_optimizer("adamw", m, **kw)
    with pytest.raises(ConfigError, match="not betas/eps"):
        build_optimizer("sgd", m, lr=1e-3, betas=(0.9, 0.99))
    with pytest.raises(ConfigError, match="uses streaming statistics"):
        build_optimizer("gated-streaming", m, lr=1e-3, stats=PerExampleStats(_model()))
    with pytest.raises(ConfigError, match="has no gate"):
        build_optimizer("adamw", m, lr=1e-3, moments=dict)
    with pytest.raises(ConfigError, match="not both"):
        build_optimizer("gated", m, lr=1e-3, stats=PerExampleStats(_model()), moments=dict)
    with pytest.raises(ConfigError, match="stats=microbatch"):
        build_optimizer("gated@stats=microbatch", m, lr=1e-3, moments=dict)
    with pytest.raises(ConfigError, match="no parameters"):
        build_optimizer("adamw", [], lr=1e-3)
    with pytest.raises(ConfigError, match="module, parameters or param groups"):
        build_optimizer("adamw", 3, lr=1e-3)
    with pytest.raises(ConfigError, match="needs a gated optimizer"):
        build_optimizer("adamw", m, lr=1e-3).step(moments={})


def test_moments_provider_sees_the_raw_gradient_before_the_filter():
    """A caller-supplied provider (the grokking ensemble's closed forms) is called before the
    Grokfast filter; the gate then uses the raw gradient, the step the filtered one."""
    a, b = _model(), _model()
    stats_b = PerExampleStats(b)
    calls = []

    def provider():
        calls.append([p.grad.clone() for p in a.parameters()])
        return {p: GradMoments(p.grad, torch.zeros_like(p) + 1e-3, 6) for p in a.parameters()}

    built = build_optimizer("gated-grad+grokfast", a, lr=1e-2, moments=provider)
    assert built.stats is None
    ref = GatedAdamW(b.parameters(), lr=1e-2, gate_on="grad")
    filt = GrokfastEMA(list(b.parameters()))
    for step in range(3):
        built.zero_grad()
        ref.zero_grad()
        _backward(a, seed=step)
        _backward(b, seed=step)
        stats_b.reset()
        mom = {p: GradMoments(p.grad.clone(), torch.zeros_like(p) + 1e-3, 6)
               for p in b.parameters()}
        filt()
        ref.step(moments=mom)
        built.step()
        assert len(calls) == step + 1
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_closure_runs_before_the_filter():
    m = _model()
    built = build_optimizer("grokfast", m, lr=1e-2)
    ref_m = copy.deepcopy(m)
    ref = torch.optim.AdamW(ref_m.parameters(), lr=1e-2)
    ref_f = GrokfastEMA(list(ref_m.parameters()))

    def closure():
        built.zero_grad()
        return _backward(m)

    loss = built.step(closure)
    ref.zero_grad()
    ref_loss = _backward(ref_m)
    ref_f()
    ref.step()
    assert float(loss.detach()) == float(ref_loss.detach())
    for p, q in zip(m.parameters(), ref_m.parameters()):
        assert torch.equal(p, q)


def test_state_dict_round_trip_includes_the_filter():
    a = _model()
    built = build_optimizer("gated-streaming@grokfast=ema", a, lr=1e-2)
    for step in range(3):
        built.zero_grad()
        _backward(a, seed=step)
        built.step()
    sd = copy.deepcopy(built.state_dict())
    b = copy.deepcopy(a)
    again = build_optimizer("gated-streaming@grokfast=ema", b, lr=1e-2)
    again.load_state_dict(sd)
    for model, o in ((a, built), (b, again)):
        o.zero_grad()
        _backward(model, seed=9)
        o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ConfigError, match="not a BuiltOptimizer state dict"):
        again.load_state_dict(built.optimizer.state_dict())
