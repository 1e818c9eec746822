"""The CUDA paths against their CPU twins (skipped where torch sees no GPU).

CI has no GPU: these run on a lent GPU machine (``bash benchmarks/gpu.sh``). Each compares a
result computed on CUDA with the same computation on the CPU — float64 where the path allows
(1e-10 relative), the float32 Triton optimizer step against the eager reference at 1e-6.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tangentscope as ts
from tangentscope.dynamics import window_operators
from tangentscope.dynamics.matfree import MatrixFreeOperators
from tangentscope.models import resnet8x
from tangentscope.optim import GatedAdamW, GradMoments
from test_matfree import _record
from test_matfree import _rel as _rel_cpu
from test_optim_kernels import SHAPES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU visible")
CUDA = torch.device("cuda")
CONFIGS = [dict(gate=False), dict(), dict(gate="soft"), dict(gate_warmup=3),
           dict(threshold=0.0), dict(threshold=2.5, noise_beta=0.9)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return _rel_cpu(a.double().cpu(), b.double().cpu())


def _gated_run(device, fused, steps=25, moments=False, **kw):
    g = torch.Generator().manual_seed(0)
    ps = [nn.Parameter(torch.randn(s, generator=g).to(device)) for s in SHAPES]
    opt = GatedAdamW(ps, lr=3e-2, weight_decay=0.1, fused=fused, **kw)
    used, fr = set(), []
    opt.register_step_observer(lambda o, info: used.update(x.kernel for x in info.groups))
    gg = torch.Generator().manual_seed(1)
    for _ in range(steps):
        mom = {}
        for p, s in zip(ps, SHAPES):
            c = 0.3 * torch.randn(5, *s, generator=gg) + 0.05
            c.view(5, -1)[:, :2] = 0.0
            c = c.to(device)
            p.grad = c.sum(0)
            mom[p] = GradMoments(c.sum(0), (c * c).sum(0), 5)
        opt.step(moments=mom) if moments else opt.step()
        fr.append(opt.gate_stats()["fraction_updated"][0])
    return ps, opt, fr, used


@pytest.mark.parametrize("moments", [False, True])
@pytest.mark.parametrize("kw", CONFIGS)
def test_triton_step_equals_the_cpu_reference(kw, moments):
    """The fused CUDA step (Triton) against the eager reference on the CPU: weights and moments
    within 1e-6, the gate's fraction updated equal to 1e-6."""
    a, oa, fa, _ = _gated_run("cpu", False, moments=moments, **kw)
    b, ob, fb, ub = _gated_run(CUDA, True, moments=moments, **kw)
    assert ub == {"compiled"}, ub
    for p, q in zip(a, b):
        torch.testing.assert_close(q.detach().cpu(), p.detach(), rtol=1e-6, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ob.state[q][key].cpu(), oa.state[p][key], rtol=1e-6,
                                       atol=1e-7)
    if kw.get("gate") is False:
        assert fa == fb == [None] * len(fa)
    else:
        assert fb == pytest.approx(fa, rel=1e-6, abs=1e-6)


def test_triton_gate_off_equals_torch_fused_adamw_on_cuda():
    torch.manual_seed(0)
    m1 = nn.Sequential(nn.Linear(5, 40), nn.Tanh(), nn.Linear(40, 3)).to(CUDA)
    m2 = copy.deepcopy(m1)
    ref = torch.optim.AdamW(m1.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    opt = GatedAdamW(m2.parameters(), lr=1e-2, weight_decay=0.1, gate=False)
    kernels = set()
    opt.register_step_observer(lambda o, info: kernels.update(g.kernel for g in info.groups))
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        x = torch.randn(8, 5, generator=g).to(CUDA)
        for m, o in ((m1, ref), (m2, opt)):
            o.zero_grad()
            (m(x) ** 2).mean().backward()
            o.step()
    assert kernels == {"compiled"}
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_entk_on_cuda_equals_cpu_float64(name):
    torch.manual_seed(0)
    if name == "mlp":
        model, x = ts.models.mlp(6, 32, 2, 3, activation="tanh"), torch.randn(9, 6)
    else:
        model, x = resnet8x(4).eval(), torch.randn(3, 3, 16, 16)
    model = model.double()
    k_cpu = ts.entk(model, x.double())
    k_gpu = ts.entk(copy.deepcopy(model).to(CUDA), x.double().to(CUDA))
    assert k_gpu.is_cuda
    assert _rel(k_gpu, k_cpu) < 1e-10


def test_matrix_free_operators_on_cuda_equal_dense_cpu():
    """A small run recorded with both storages (float64, SGD, cross-entropy); the matrix-free
    ``W_S·V``, ``G_Q·V`` on CUDA against the dense CPU operators of the same run."""
    traj, _, _, col = _record("cross_entropy", "sgd", collector=True)
    dense = window_operators(traj, discretization="exp")
    ops = MatrixFreeOperators(col.path(device="cuda"), discretization="exp", krylov_tol=1e-13)
    V = torch.randn(ops.N, 4, dtype=torch.float64)
    res = ops.apply(V, propagate=False, gramian=True, transfer=True)
    assert res.WV is not None and res.WV.is_cuda
    assert _rel(res.WV, dense.W @ V) < 1e-8
    assert res.GV is not None and _rel(res.GV, dense.G @ V) < 1e-8
