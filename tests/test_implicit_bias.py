"""Implicit bias: the linearized / min-norm comparisons against closed forms, the path-averaged
kernel, the GD step size, and the experiment end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tangentscope.dynamics import KernelRecorder, KernelTrajectory, every
from tangentscope.dynamics.linearized import (
    gd_step_size,
    linearized_comparison,
    minnorm_rel_errors,
    path_average_kernel,
)
from tangentscope.experiments import run_experiment
from tangentscope.experiments._harness import param_vector, train_network
from tangentscope.models import mlp
from tangentscope.optim.spec import build_optimizer
from zoo import brute_force_entk


def _fit_linear(steps: int, every_k: int = 5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 15, generator=g, dtype=torch.float64)     # n < d: interpolation possible
    xt = torch.randn(6, 15, generator=g, dtype=torch.float64)
    y = torch.randn(8, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    net = torch.nn.Linear(15, 1).double()
    w0 = param_vector(net.parameters())
    lr = gd_step_size(net, x, 0.5)
    opt = build_optimizer("sgd", net, lr=lr).optimizer
    rec = KernelRecorder(net, x, y, loss="squared", x_test=xt, optimizer=opt,
                         schedule=every(every_k), verbose=False)
    train_network(net, x, y, (y[:, 0] > 0).long(), opt, steps)
    rec.close()
    dist = float(torch.linalg.norm(param_vector(net.parameters()) - w0))
    return rec.trajectory(), y, lr, dist


def test_gd_step_size_uses_the_largest_eNTK_eigenvalue():
    net = mlp(3, 7, 1, 1, activation="tanh").double()
    x = torch.randn(9, 3, dtype=torch.float64)
    K = brute_force_entk(net, x)[:, :, 0, 0]
    assert gd_step_size(net, x, 0.3) == pytest.approx(0.3 * 9 / float(
        torch.linalg.eigvalsh(K)[-1]), rel=1e-10)


@pytest.mark.parametrize("steps", [25, 3000])
def test_a_linear_model_is_its_own_linearization(steps):
    """For a linear model the network *is* the linearized model: zero relative error at the
    same step, no kernel movement, and ``‖Δw‖`` equal to the closed form; after many steps it
    is the minimum-norm interpolant (``‖Δw‖ = √(r₀ᵀK⁺r₀)``)."""
    traj, y, lr, dist = _fit_linear(steps)
    assert traj.U_Q is not None
    cmp = linearized_comparison(traj.kernel(0), traj.cross_kernel(0), traj.u[0], traj.U_Q[0], y,
                                traj.u[-1], traj.U_Q[-1], steps=steps, lr=lr, KT=traj.kernel(-1),
                                param_distance=dist)
    assert cmp.test_rel_error < 1e-9 and cmp.train_rel_error < 1e-9
    assert cmp.kernel_distance < 1e-12 and cmp.test_agreement == 1.0
    assert cmp.linearized_param_distance == pytest.approx(dist, rel=1e-8)
    mn = minnorm_rel_errors(traj, y)
    if steps == 3000:
        assert cmp.minnorm_rel_error < 1e-8 and cmp.minnorm_param_distance == pytest.approx(
            dist, rel=1e-8)
        assert max(mn.values()) < 1e-8
    else:
        assert cmp.minnorm_rel_error > 1e-3          # not converged yet: a real difference
        assert mn["minnorm_init_rel_error"] == pytest.approx(mn["minnorm_path_rel_error"])


def test_min_norm_parameter_distance_is_the_pinv_solution_norm():
    traj, y, _lr, dist = _fit_linear(3000)
    X1 = torch.cat([traj.data["x"].double(), torch.ones(8, 1, dtype=torch.float64)], 1)
    r0 = traj.u[0] - y
    dw = torch.linalg.pinv(X1) @ r0                  # min-norm parameter update
    assert dist == pytest.approx(float(dw.norm()), rel=1e-8)


def test_path_average_kernel_is_the_time_average():
    """With snapshots of a kernel linear in time, the trapezoid rule is exact."""
    n, m = 4, 3
    g = torch.Generator().manual_seed(0)
    A0, A1 = (torch.randn(n, n, generator=g, dtype=torch.float64) for _ in range(2))
    C0, C1 = (torch.randn(m, n, generator=g, dtype=torch.float64) for _ in range(2))
    times = [0.0, 0.5, 2.0, 3.0]
    K = [A0 @ A0.T + t * A1 @ A1.T for t in times]
    KQ = [C0 + t * C1 for t in times]
    z = [torch.zeros(n, 1, dtype=torch.float64)] * 4
    traj = KernelTrajectory.from_arrays(times, K, z, z, [torch.eye(1).expand(n, 1, 1) / n] * 4,
                                        [0.0] * 4, K_QS=KQ,
                                        U_Q=[torch.zeros(m, 1, dtype=torch.float64)] * 4)
    Kbar, KQbar = path_average_kernel(traj)
    assert torch.allclose(Kbar, A0 @ A0.T + 1.5 * A1 @ A1.T, atol=1e-12)
    assert torch.allclose(KQbar, C0 + 1.5 * C1, atol=1e-12)


def test_implicit_bias_smoke_run_and_resume(tmp_path, monkeypatch):
    rd = run_experiment("implicit-bias", preset="smoke", out=tmp_path / "ib", quiet=True)
    table = rd.read_summary()["table"]
    assert [r["width"] for r in table] == [8, 256]
    wide = table[-1]
    for k in ("test_rel_error", "minnorm_init_rel_error", "minnorm_path_rel_error",
              "kernel_distance", "schedule_spearman", "param_ratio_same_step"):
        assert np.isfinite(wide[k]["median"]), k
    assert wide["schedule_spearman"]["median"] < 0            # big eigenvalues learned first
    for f in ("implicit_schedule", "implicit_linearized"):
        assert (rd.path / "figures" / f"{f}.png").stat().st_size > 1000
    import tangentscope.experiments.implicit_bias as ib

    monkeypatch.setattr(ib, "_cell", lambda *a, **k: pytest.fail("recomputed a cell"))
    run_experiment(None, resume=rd.path, quiet=True, plot=False)
