"""Fuzzing the kernels' public API with bad inputs: every one must end in a
:class:`~tangentscope.TangentscopeError` subclass whose message names a fix (no raw PyTorch or
Python error), before any expensive work; good inputs around them still give the brute-force
kernel."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import tangentscope as ts
from tangentscope.kernels import estimate_memory, select_implementation
from zoo import brute_force_entk, make_mlp

FIX = re.compile(r"\b(use|pass|call|make|set|remove|replace|freeze|check|try|wrap|ask|"
                 r"register|list|give)\b", re.I)
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
MODEL = make_mlp(2)
X = torch.randn(4, 3, dtype=torch.float64)
P = sum(q.numel() for q in MODEL.parameters())
CALLS = {
    "entk": lambda **kw: ts.entk(MODEL, kw.pop("x1", X), **kw),
    "estimate_memory": lambda **kw: estimate_memory(MODEL, kw.pop("x1", X), **kw),
    "select_implementation": lambda **kw: select_implementation(MODEL, kw.pop("x1", X), **kw),
}


def assert_clear(fn, *args, **kwargs):
    """``fn`` raises a TangentscopeError whose message names a fix."""
    with pytest.raises(ts.TangentscopeError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert FIX.search(msg), f"{type(e.value).__name__} without a fix: {msg}"
    assert "Traceback" not in msg
    return e.value


def _not_a_size(s: str) -> bool:
    try:
        v = ts.kernels._plan.resolve_budget(s)  # the parser, as the strategy's oracle
    except ts.TangentscopeError:
        return True
    return v <= 0


bad_budget = st.one_of(
    st.text(max_size=8).filter(_not_a_size),
    st.integers(max_value=0), st.floats(max_value=0.0), st.just(math.nan), st.just(math.inf),
    st.booleans(), st.lists(st.integers(), max_size=2))
bad_dtype = st.sampled_from([torch.int64, torch.int32, torch.bool, torch.complex64, "float64",
                             3, torch.uint8])
bad_chunk = st.one_of(st.integers(max_value=0), st.floats(allow_nan=True), st.text(max_size=3),
                      st.booleans())
bad_impl = st.text(max_size=12).filter(lambda s: s not in ("auto", "structured", "jacobian",
                                                           "ntvp", "loop"))


@pytest.mark.parametrize("call", list(CALLS))
@SETTINGS
@given(budget=bad_budget)
def test_bad_memory_budget(call, budget):
    assert_clear(CALLS[call], memory_budget=budget)


@pytest.mark.parametrize("call", list(CALLS))
@SETTINGS
@given(dtype=bad_dtype)
def test_bad_dtype(call, dtype):
    assert_clear(CALLS[call], dtype=dtype)


@pytest.mark.parametrize("call", list(CALLS))
@SETTINGS
@given(chunk=bad_chunk)
def test_bad_chunk_size(call, chunk):
    assert_clear(CALLS[call], chunk_size=chunk)


@pytest.mark.parametrize("call", list(CALLS))
@SETTINGS
@given(impl=bad_impl)
def test_bad_implementation(call, impl):
    assert_clear(CALLS[call], implementation=impl)


@st.composite
def bad_preconditioners(draw):
    kind = draw(st.sampled_from(["negative", "nan", "inf", "length", "type", "dict-missing",
                                 "dict-shape", "dict-text"]))
    if kind in ("negative", "nan", "inf"):
        d = torch.rand(P, dtype=torch.float64) + 0.1
        i = draw(st.integers(0, P - 1))
        d[i] = {"negative": -draw(st.floats(1e-12, 1e6)), "nan": math.nan, "inf": math.inf}[kind]
        return d
    if kind == "length":
        return torch.ones(draw(st.integers(0, 2 * P).filter(lambda k: k != P)))
    if kind == "type":
        return draw(st.sampled_from(["abc", 3.0, [1.0, 2.0], None.__class__]))
    names = [n for n, _ in MODEL.named_parameters()]
    d = {n: torch.ones_like(q) for n, q in MODEL.named_parameters()}
    if kind == "dict-missing":
        del d[draw(st.sampled_from(names))]
    elif kind == "dict-shape":
        d[draw(st.sampled_from(names))] = torch.ones(7)
    else:
        d[draw(st.sampled_from(names))] = "x"
    return d


@SETTINGS
@given(d=bad_preconditioners())
def test_bad_preconditioner(d):
    for call in CALLS.values():
        assert_clear(call, precondition=d)
    assert_clear(ts.EntkOperator, MODEL, X, precondition=d)


@st.composite
def bad_inputs(draw):
    kind = draw(st.sampled_from(["features", "empty", "scalar", "1d", "text", "x2-shape"]))
    if kind == "features":
        return {"x1": torch.randn(3, draw(st.integers(1, 6).filter(lambda k: k != 3)),
                                  dtype=torch.float64)}
    if kind == "empty":
        return {"x1": torch.randn(0, 3, dtype=torch.float64)}
    if kind == "scalar":
        return {"x1": torch.tensor(draw(st.floats(-5, 5)), dtype=torch.float64)}
    if kind == "1d":
        return {"x1": torch.randn(draw(st.integers(1, 6)), dtype=torch.float64)}
    if kind == "text":
        return {"x1": draw(st.sampled_from(["abc", object(), {"a": 1}]))}
    return {"x2": torch.randn(2, draw(st.integers(1, 5).filter(lambda k: k != 3)),
                              dtype=torch.float64)}


@SETTINGS
@given(kw=bad_inputs())
def test_bad_inputs(kw):
    for call in CALLS.values():
        assert_clear(call, **dict(kw))
    if "x1" in kw:
        assert_clear(ts.EntkOperator, MODEL, kw["x1"])


@SETTINGS
@given(groups=st.one_of(
    st.integers(), st.text(max_size=5).filter(lambda s: s not in ("layer", "param")),
    st.just({"a": ["0.weight"]}), st.just({"a": 3}), st.just({"a": ["nope"]}),
    st.just({"a": [n for n, _ in MODEL.named_parameters()], "b": ["0.weight"]})))
def test_bad_groups(groups):
    for call in CALLS.values():
        assert_clear(call, groups=groups)


def test_bad_models_and_operator_calls():
    assert_clear(ts.entk, 42, X)
    assert_clear(ts.entk, lambda prm, x: x @ prm["W"].T, X)                # no params
    assert_clear(ts.entk, lambda prm, x: x @ prm["W"].T, X, params={"W": "abc"})
    assert_clear(ts.entk, MODEL, X, params={"nope": torch.ones(1)})
    assert_clear(ts.entk, MODEL, X, params={"0.weight": 3})
    frozen = make_mlp(1).requires_grad_(False)
    assert_clear(ts.entk, frozen, X)
    assert_clear(ts.entk, nn.Linear(3, 2).double().train().requires_grad_(True), X,
                 implementation="structured", chunk_size=0)
    assert_clear(ts.entk, lambda prm, x: (x @ prm["W"].T).sum(), X,
                 params={"W": torch.ones(2, 3, dtype=torch.float64)})     # no batch dim
    op = ts.EntkOperator(MODEL, X)
    assert_clear(op.matvec, torch.ones(5, dtype=torch.float64))
    assert_clear(ts.lanczos_topk, lambda v: v, 4, 0)
    assert_clear(ts.flatten_kernel, torch.ones(2, 2, 2))
    assert_clear(ts.unflatten_kernel, torch.ones(3, 4), 2)
    for bad in (0, -1, 2.5, "3"):
        assert_clear(ts.EntkOperator, MODEL, X, chunk_size=bad)
    assert_clear(ts.EntkOperator, MODEL, X, dtype=torch.int64)


@SETTINGS
@given(budget=st.sampled_from(["1G", 2**28, "512M", 1e9]), trace=st.booleans(),
       chunk=st.one_of(st.none(), st.integers(1, 5)))
def test_good_arguments_next_to_the_bad_ones_still_work(budget, trace, chunk):
    K = ts.entk(MODEL, X, memory_budget=budget, trace_outputs=trace, chunk_size=chunk)
    ref = brute_force_entk(MODEL, X)
    torch.testing.assert_close(K, ref.diagonal(dim1=2, dim2=3).sum(-1) if trace else ref,
                               rtol=1e-10, atol=1e-10)
