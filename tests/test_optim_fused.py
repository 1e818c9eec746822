"""The fused gated-AdamW step (the ``compiled`` kernel: C++ on CPU) against the reference
transforms and ``torch.optim.AdamW``; when it is the default; its fallbacks and its build."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from tangentscope.optim import GatedAdamW, GradMoments, PerExampleStats, _fused, _native
from tangentscope.optim import _kernels as K
from test_optim_helpers import one_thread  # noqa: F401
from test_optim_kernels import _grads, _params, _run, _state

with warnings.catch_warnings():                  # no compiler: the module is skipped
    warnings.simplefilter("ignore")
    HAVE_EXTENSION = _native.load() is not None
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not HAVE_EXTENSION, reason="no C++ compiler here")]
REFERENCE = K.KERNELS[-1]
KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_dev_sq")
CONFIGS = [dict(gate=False), dict(), dict(gate="soft"), dict(gate_warmup=3),
           dict(threshold=0.0), dict(threshold=2.5, noise_beta=0.9),
           dict(gate="soft", threshold=0.0),
           dict(betas=(0.3, 0.99)), dict(betas=(0.3, 0.99), gate="soft")]  # lerp's w >= 0.5 form


def _compare(a, oa, fa, b, ob, fb, exact, soft):
    for p, q in zip(a, b):
        if exact:
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    for key in KEYS:
        if key in oa.state[a[0]]:
            assert torch.equal(_state(oa, a, key), _state(ob, b, key))   # no sqrt in these
    assert [oa.state[p].get("noise_n") for p in a] == [ob.state[p].get("noise_n") for p in b]
    if soft:                                  # the soft gate's sum: summation order differs
        assert fa == pytest.approx(fb, rel=1e-6)
    else:
        assert fa == fb


@pytest.mark.parametrize("fused", [None, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", CONFIGS)
def test_fused_step_equals_the_reference_to_rounding(fused, dtype, kw):
    """The fused step (default ``fused=None`` and ``fused=True`` alike) takes the hardware sqrt,
    as torch's fused AdamW does: moments and noise state bit for bit the eager reference chain's
    (hard gate: the telemetry too), weights within 1e-6."""
    a, oa, fa = _run("reference", dtype, **kw)
    b, ob, fb = _run("compiled", dtype, fused=fused, **kw)
    _compare(a, oa, fa, b, ob, fb, exact=False, soft=kw.get("gate") == "soft")


def test_fused_sqrt_is_correctly_rounded():
    """The one rounding the fused step does differently: its denominator is the correctly
    rounded sqrt (checked in float64), wherever torch's eager sqrt is or is not."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(4096))
    p.grad = torch.rand(4096) * 10 + 1e-3
    opt = GatedAdamW([p], lr=1.0, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0, gate=False,
                     fused=True)
    opt.step()
    # β1 = β2 = 0: m = g, v = g², update = g / sqrt(g²) rounded through the float32 sqrt
    v = (p.grad.double() ** 2).float()
    want = -(p.grad / v.double().sqrt().float())
    assert torch.equal(p.detach(), want)


def _exact_run(fused, gate="hard", steps=12, warm=0):
    torch.manual_seed(0)
    ps = _params(torch.float32)
    opt = GatedAdamW(ps, lr=3e-2, weight_decay=0.1, gate=gate, gate_warmup=warm, fused=fused)
    if fused is False:
        opt.kernels = (REFERENCE,)
    used, fr = set(), []
    opt.register_step_observer(lambda o, info: used.update(g.kernel for g in info.groups))
    g = torch.Generator().manual_seed(3)
    for _ in range(steps):
        mom = {}
        for p in ps:
            c = 0.3 * torch.randn(5, *p.shape, generator=g) + 0.05
            mom[p] = GradMoments(c.sum(0), (c * c).sum(0), 5)
            p.grad = c.sum(0)
        opt.step(moments=mom)
        fr.append(opt.gate_stats()["fraction_updated"][0])
    return ps, fr, used


@pytest.mark.parametrize("gate", ["hard", "soft"])
def test_exact_statistics_through_the_fused_kernel(gate):
    a, fa, ua = _exact_run(False, gate, warm=2)
    b, fb, ub = _exact_run(None, gate, warm=2)
    assert ua == {"reference"} and ub == {"compiled"}
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert fa == pytest.approx(fb, rel=1e-6) and fa[:2] == [1.0, 1.0]


def test_per_example_stats_source_and_per_group_settings():
    """A real statistics source and param groups with their own lr / decay / gate settings."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 3))
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    out = []
    for fused in (False, None):
        m = copy.deepcopy(base)
        groups = [{"params": m[0].parameters(), "threshold": 2.0},
                  {"params": m[2].parameters(), "lr": 3e-3, "weight_decay": 0.0,
                   "gate": "soft"}]
        opt = GatedAdamW(groups, lr=1e-2, stats=PerExampleStats(m), fused=fused)
        if fused is False:
            opt.kernels = (REFERENCE,)
        for _ in range(8):
            opt.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            opt.step()
        out.append(([p.detach().clone() for p in m.parameters()], opt.gate_stats()))
    for p, q in zip(out[0][0], out[1][0]):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert out[0][1]["fraction_updated"] == pytest.approx(out[1][1]["fraction_updated"])


@pytest.mark.parametrize("fused", [None, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gate_off_against_torch_adamw(fused, dtype):
    """Gate off: the fused step (``fused=None`` or ``True``) within 1e-6 of ``torch.optim.AdamW``
    (single-tensor/foreach) and of ``AdamW(fused=True)``; with a scheduler and two param
    groups."""
    torch.manual_seed(0)
    m1 = nn.Sequential(nn.Linear(5, 40), nn.Tanh(), nn.Linear(40, 3)).to(dtype)
    m2, m3 = copy.deepcopy(m1), copy.deepcopy(m1)
    groups = lambda m: [{"params": m[0].parameters()},
                        {"params": m[2].parameters(), "lr": 3e-3, "weight_decay": 0.0}]
    ref = torch.optim.AdamW(groups(m1), lr=1e-2, weight_decay=0.1)
    tfu = torch.optim.AdamW(groups(m3), lr=1e-2, weight_decay=0.1, fused=True)
    opt = GatedAdamW(groups(m2), lr=1e-2, weight_decay=0.1, gate=False, fused=fused)
    kernels = set()
    opt.register_step_observer(lambda o, info: kernels.update(g.kernel for g in info.groups))
    scheds = [torch.optim.lr_scheduler.StepLR(o, 10, 0.5) for o in (ref, opt, tfu)]
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        x = torch.randn(8, 5, generator=g).to(dtype)
        for m, o, s in zip((m1, m2, m3), (ref, opt, tfu), scheds):
            o.zero_grad()
            (m(x) ** 2).mean().backward()
            o.step()
            s.step()
    assert kernels == {"compiled"}
    for p, q, r in zip(m1.parameters(), m2.parameters(), m3.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(q, r, rtol=1e-6, atol=1e-6)
    # the state dict loads into torch's AdamW and back
    sd = opt.state_dict()
    torch.optim.AdamW(groups(copy.deepcopy(m2)), lr=1e-2).load_state_dict(sd)


def _kernel_of(ps, **kw):
    names = []
    opt = GatedAdamW(list(ps), lr=1e-3, **kw)
    opt.register_step_observer(lambda o, info: names.append(info.groups[0].kernel))
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    return names[-1]


def test_where_the_fused_kernel_is_the_default(monkeypatch):
    """Available = float32/float64 contiguous tensors, the update placement (or the gate off)
    and, for the default ``fused=None``, the extension already built; else the eager kernels."""
    ps = _params(torch.float32)
    assert _kernel_of(ps) == "compiled"
    assert _kernel_of(ps, gate=False) == "compiled"
    assert _kernel_of(ps, gate="soft") == "compiled"
    assert _kernel_of(ps, fused=False) == "streaming-hard"
    assert _kernel_of(ps, gate_on="grad") == "reference"          # placement not covered
    assert _kernel_of([p.detach().to(torch.bfloat16).requires_grad_() for p in ps],
                      gate=False) == "reference"                # bfloat16: eager
    wide = [nn.Parameter(torch.randn(6, 4).t())]                  # not contiguous
    assert _kernel_of(wide) == "streaming-hard"
    # the default never compiles: with the library not built it runs eagerly, silently
    monkeypatch.setattr(_native, "is_built", lambda: False)
    assert _kernel_of(ps) == "streaming-hard"
    assert _kernel_of(ps, gate=False) == "foreach"
    assert not _fused.fused_available("cpu", build=False)
    assert _fused.fused_available("cpu", build=True)              # fused=True loads/builds it


def test_without_a_compiler_fused_true_warns_once_and_runs_eagerly(monkeypatch, tmp_path):
    monkeypatch.setenv("TANGENTSCOPE_CACHE", str(tmp_path))       # nothing built there
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(_native, "_compiler", lambda: None)
    monkeypatch.setitem(_native._STATE, "op", None)
    _native._reset_for_tests()
    try:
        ps = _params(torch.float32)
        assert _kernel_of(ps) == "streaming-hard"                 # default: silently eager
        with pytest.warns(RuntimeWarning, match="fused CPU kernel is unavailable.*g\\+\\+"):
            assert _kernel_of(ps, fused=True) == "streaming-hard"
        assert _kernel_of(ps, fused=True, gate=False) == "foreach"   # no second warning
        assert not list(tmp_path.rglob("*.so"))
    finally:
        _native._reset_for_tests()


def test_build_is_cached_and_the_cli_reports_it(tmp_path):
    """``--build`` compiles into the cache once; a second call (a new process) only finds it."""
    env = {**os.environ, "TANGENTSCOPE_CACHE": str(tmp_path)}
    cmd = [sys.executable, "-m", "tangentscope.optim._build", "--build"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "built in" in first.stdout and not first.stderr
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert "already built" in second.stdout
    libs = list((tmp_path / "ext").glob("*.so"))
    assert len(libs) == 1 and libs[0].name.startswith("gated_adamw_")


def test_import_compiles_and_loads_nothing(tmp_path):
    code = ("import tangentscope, torch, tangentscope.optim as o\n"
            "assert o._native._STATE['op'] is None\n"
            "assert not hasattr(torch.ops.tangentscope_optim, 'gated_adamw_step_')\n")
    env = {**os.environ, "TANGENTSCOPE_CACHE": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert not any(Path(tmp_path).rglob("*"))


def test_source_hash_names_the_library():
    assert _native.library_path().name == f"gated_adamw_{_native._tag()}.so"
    assert _native.SOURCE.exists() and _native.is_built()


def test_long_run_mixed_sizes_matches_the_reference():
    """300 steps, tensors above and below the inner block size: gate decisions, moments and
    noise state bit for bit, weights within 1e-6 (the hardware sqrt's rounding)."""
    a, oa, fa = _run("reference", torch.float32, steps=300)
    b, ob, fb = _run("compiled", torch.float32, steps=300)
    _compare(a, oa, fa, b, ob, fb, exact=False, soft=False)
    assert len(set(fa)) > 10                                      # the gate really varies


def test_grads_independent_of_kernel_helper():
    """Guard for the helper the comparisons rely on (gradients fixed in advance)."""
    g1, g2 = _grads(2, torch.float32), _grads(2, torch.float32)
    assert all(torch.equal(x, y) for r1, r2 in zip(g1, g2) for x, y in zip(r1, r2))
