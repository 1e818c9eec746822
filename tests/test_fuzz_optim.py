"""Bad inputs to the optimizer API (issue 12): every one ends in a ``TangentscopeError``
subclass whose message names the problem and a fix — never a raw ``TypeError``/``ValueError``
from torch or Python — and nothing is half-done. Valid inputs generated alongside must work."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from tangentscope import TangentscopeError
from tangentscope.optim import (
    GatedAdamW,
    GatedOptimizer,
    GradMoments,
    GrokfastEMA,
    GrokfastMA,
    PopulationRiskEstimator,
    curve_agreement,
    gate,
    stopping_step,
)
from tangentscope.optim.spec import KEYS, OPTIMIZERS, build_optimizer, parse_optimizer
from tangentscope.optim.transforms import (
    check_gate_args,
    deviation_inflation,
    noise_variance,
    snr_gate,
)
from test_optim_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
FIX = ("must", "use ", "pass ", "one of", "give", "add ", "drop", "choose", "keep", "known",
       "keys", "need", "call", "build", "turn", "e.g.", "names:", "load ")
BAD = st.sampled_from([-1, -1e-3, float("nan"), float("inf"), -float("inf"), "abc", "", None,
                       [], [1, 2, 3], (0.9,), (0.9, 1.0), (0.9, "x"), {}, True, 1.5, 2, 10 ** 9,
                       object()])


def _clear(fn, *args, **kw) -> bool:
    """Run ``fn``; True if it refused with a clear TangentscopeError (any other exception
    fails the test), False if it accepted."""
    try:
        fn(*args, **kw)
    except TangentscopeError as e:
        msg = str(e)
        assert len(msg) > 20 and any(w in msg for w in FIX), msg
        return True
    return False


def _param(n=4):
    return nn.Parameter(torch.zeros(n))


GATED_ADAMW_KEYS = ["lr", "betas", "eps", "weight_decay", "gate", "threshold", "gate_on",
                    "stats", "noise_beta", "gate_warmup", "nonfinite", "foreach", "fused",
                    "amsgrad", "maximize", "capturable", "differentiable"]


@SETTINGS
@given(key=st.sampled_from(GATED_ADAMW_KEYS), value=BAD)
def test_gated_adamw_arguments(key, value):
    p = _param()
    if not _clear(GatedAdamW, [p], **{key: value}):
        opt = GatedAdamW([p], **{key: value})          # accepted: it must step
        p.grad = torch.ones(4)
        opt.step()


@SETTINGS
@given(key=st.sampled_from(["lr", "betas", "eps", "weight_decay", "gate", "threshold",
                            "gate_on", "noise_beta", "gate_warmup", "fused", "amsgrad"]),
       value=BAD)
def test_gated_adamw_param_groups_and_add_param_group(key, value):
    p, q = _param(), _param()
    refused = _clear(GatedAdamW, [{"params": [p], key: value}])
    opt = GatedAdamW([p])
    assert _clear(opt.add_param_group, {"params": [q], key: value}) == refused
    assert len(opt.param_groups) == (1 if refused else 2)


@pytest.mark.parametrize("params", [[], torch.zeros(3), [torch.zeros(2)] * 2, 3, "abc"])
def test_gated_adamw_bad_parameter_lists(params):
    assert _clear(GatedAdamW, params)
    opt = GatedAdamW([_param()])
    assert _clear(opt.add_param_group, {"params": opt.param_groups[0]["params"]})


@SETTINGS
@given(key=st.sampled_from(["gate", "threshold", "gate_on", "stats", "gate_warmup",
                            "mean_beta", "noise_beta", "nonfinite"]), value=BAD)
def test_gated_optimizer_arguments(key, value):
    p = _param()
    if not _clear(gate, torch.optim.SGD([p], lr=0.1), **{key: value}):
        opt = gate(torch.optim.SGD([p], lr=0.1), **{key: value})
        p.grad = torch.ones(4)
        opt.step()


@pytest.mark.parametrize("base", [None, object(), "sgd", torch.nn.Linear(2, 2)])
def test_gated_optimizer_needs_an_optimizer(base):
    assert _clear(GatedOptimizer, base)


@SETTINGS
@given(shape=st.sampled_from([(4,), (3,), (2, 2), ()]), count=BAD | st.integers(-3, 5),
       kind=st.sampled_from(["adamw", "wrapper"]))
def test_caller_moments(shape, count, kind):
    p = _param()
    opt = GatedAdamW([p]) if kind == "adamw" else gate(torch.optim.SGD([p], lr=0.1))
    p.grad = torch.ones(4)
    mom = GradMoments(torch.ones(shape), torch.ones(shape) * 2, count)
    if _clear(opt.step, moments={p: mom}):
        assert torch.equal(p, torch.zeros(4))         # refused before any change


@pytest.mark.parametrize("moments", [{0: "x"}, {"p": 3}, {None: None}])
def test_caller_moments_of_the_wrong_type(moments):
    p = _param()
    p.grad = torch.ones(4)
    assert _clear(GatedAdamW([p]).step, moments=moments)


# -- the spec ---------------------------------------------------------------------------------
NAME_PARTS = st.sampled_from(list(OPTIMIZERS) + ["gd", "gated_streaming", "GATED", "x", ""])
KEY_PARTS = st.sampled_from(list(KEYS) + ["gate-on", "tau", "", "lr"])
VALUE_PARTS = st.sampled_from(["1", "0", "-1", "2.5", "nan", "inf", "true", "false", "none",
                               "hard", "soft", "ema", "ma", "exact", "streaming", "microbatch",
                               "update", "grad", "moments", "skip", "ignore", "abc", "", "1e3",
                               "0.5", "100"])


@SETTINGS
@given(name=NAME_PARTS, mods=st.lists(st.tuples(KEY_PARTS, VALUE_PARTS,
                                                st.sampled_from(["=", "", "=="])), max_size=4))
def test_parse_optimizer_text(name, mods):
    text = name + "".join(f"@{k}{eq}{v}" for k, v, eq in mods)
    if not _clear(parse_optimizer, text):
        spec = parse_optimizer(text)
        assert parse_optimizer(str(spec)) == spec
        built = build_optimizer(spec, nn.Linear(3, 2), lr=1e-2)
        assert built.spec == spec


@pytest.mark.parametrize("text", [None, 3, b"gated", ["gated"], "@", "gated@", "@gate=hard"])
def test_parse_optimizer_non_text(text):
    assert _clear(parse_optimizer, text)


@SETTINGS
@given(name=st.sampled_from(list(OPTIMIZERS)),
       key=st.sampled_from(["lr", "weight_decay", "betas", "eps", "momentum"]), value=BAD)
def test_build_optimizer_hyperparameters(name, key, value):
    kw = {"lr": 1e-2, key: value}
    if not _clear(build_optimizer, name, nn.Linear(3, 2), **kw):
        build_optimizer(name, nn.Linear(3, 2), **kw).step()


@pytest.mark.parametrize("params", [[], 3, "abc", None])
def test_build_optimizer_bad_parameters(params):
    assert _clear(build_optimizer, "adamw", params, lr=1e-2)


# -- filters, estimator, stopping rule, pure functions ----------------------------------------
@SETTINGS
@given(key=st.sampled_from(["alpha", "lamb"]), value=BAD)
def test_grokfast_ema_arguments(key, value):
    _clear(GrokfastEMA, [_param()], **{key: value})


@SETTINGS
@given(key=st.sampled_from(["window_size", "lamb"]), value=BAD)
def test_grokfast_ma_arguments(key, value):
    _clear(GrokfastMA, [_param()], **{key: value})


@pytest.mark.parametrize("cls", [GrokfastEMA, GrokfastMA])
def test_grokfast_bad_parameters_and_state(cls):
    assert _clear(cls, [])
    assert _clear(cls, 3)
    f = cls([_param()])
    assert _clear(f.load_state_dict, {"ema": [], "window": [], "steps": 0})


@SETTINGS
@given(patience=BAD | st.integers(-2, 3), min_delta=BAD | st.floats(-1, 1),
       start=BAD | st.integers(-2, 3))
def test_stopping_step_arguments(patience, min_delta, start):
    _clear(stopping_step, np.array([3.0, 2.0, 2.5, 1.0]), patience=patience,
           min_delta=min_delta, start=start)


@pytest.mark.parametrize("curves", [([1.0, 2.0, 3.0], [1.0, 2.0]), ("abc", [1.0]),
                                    ([[1.0, 2.0]], [1.0, 2.0])])
def test_curve_agreement_shapes(curves):
    assert _clear(curve_agreement, *curves)


@pytest.mark.parametrize("loss", ["abc", None, [1.0, 2.0], torch.ones(3), object()])
def test_estimator_observe_needs_a_scalar(loss):
    opt = GatedAdamW([_param()], gate=False)
    est = PopulationRiskEstimator(opt)
    assert _clear(est.observe, loss)
    assert _clear(PopulationRiskEstimator, opt, initial_loss=loss) == (loss is not None)
    assert _clear(PopulationRiskEstimator, torch.optim.SGD([_param()], lr=0.1))


@SETTINGS
@given(count=BAD | st.integers(-2, 3), mode=st.sampled_from(["hard", "soft", "x", None, 1]),
       threshold=BAD | st.floats(0, 3))
def test_pure_functions(count, mode, threshold):
    x = torch.ones(3)
    _clear(noise_variance, x, x, count)
    _clear(snr_gate, x, x, 1.0, mode)
    _clear(check_gate_args, "hard", threshold, "update")
    _clear(deviation_inflation, 0.9, count)


def test_every_message_checked_is_clear():
    """The helper itself: a raw error is not accepted as clear."""
    with pytest.raises(ZeroDivisionError):
        _clear(lambda: 1 / 0)
    assert not _clear(math.sqrt, 4.0)
