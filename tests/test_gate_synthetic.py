"""Gate pass rates on a problem with known per-coordinate signal and noise.

Per-example gradients ``g_ik = μ_k + σ ξ_ik`` (Gaussian), realized exactly by a linear model
whose loss is the mean output: ``∇_w ℓ_i = x_i``. With ``δ = μ√b/σ`` (the signal-to-noise ratio
of the batch mean), the exact hard gate ``μ̂² > τ s²/b`` passes with probability
``P(|T| > √τ)``, ``T ~ noncentral t(b−1, δ)``; the streaming gate, whose ``ν̂`` converges to
``σ²/b``, passes with ``P(χ²₁(δ²) > τ)``. Each SNR level is its own param group, so the
optimizer's telemetry reports the per-level pass rates directly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tangentscope.optim import GatedAdamW, PerExampleStats
from test_optim_helpers import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


scipy_stats = pytest.importorskip("scipy.stats")

SNR = (0.0, 0.5, 1.0, 2.0, 3.0)
B, R, SIGMA = 8, 400, 1.0


class Levels(nn.Module):
    """One bias-free ``Linear(R, 1)`` per SNR level; ``loss = mean_i Σ_levels out``."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(R, 1, bias=False) for _ in SNR)

    def forward(self, x):                                   # x: (b, levels, R)
        return torch.cat([lay(x[:, j]) for j, lay in enumerate(self.layers)], 1)


def _batches(steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    mu = torch.tensor(SNR)[:, None] * SIGMA / np.sqrt(B)    # δ = μ√b/σ
    for _ in range(steps):
        yield mu + SIGMA * torch.randn(B, len(SNR), R, generator=g)


def _run(make_opt, steps: int, seed: int = 0, skip: int = 0):
    torch.manual_seed(0)
    model = Levels()
    opt = make_opt(model)
    rates = []
    for t, x in enumerate(_batches(steps, seed)):
        opt.zero_grad()
        model(x).sum(1).mean().backward()
        opt.step()
        if t >= skip:
            rates.append(opt.gate_stats()["fraction_updated"])
    return np.array(rates).mean(0), len(rates)


def _groups(model):
    return [{"params": lay.parameters()} for lay in model.layers]


def test_exact_gate_pass_rates_match_noncentral_t():
    rates, n = _run(lambda m: GatedAdamW(_groups(m), lr=1e-3, stats=PerExampleStats(m)),
                    steps=60)
    for delta, got in zip(SNR, rates):
        dist = scipy_stats.t(B - 1) if delta == 0 else scipy_stats.nct(B - 1, delta)
        want = dist.sf(1.0) + dist.cdf(-1.0)
        se = np.sqrt(want * (1 - want) / (n * R))
        assert abs(got - want) < 5 * se + 2e-3, (delta, got, want)
    # signal coordinates pass more often than pure-noise ones, and noise still passes often
    assert np.all(np.diff(rates) > 0) and 0.3 < rates[0] < 0.4


@pytest.mark.parametrize("gate_on", ["update", "grad"])
def test_streaming_gate_pass_rates_match_noncentral_chi2(gate_on):
    rates, _n = _run(lambda m: GatedAdamW(_groups(m), lr=1e-3, gate_on=gate_on,
                                          noise_beta=0.99), steps=900, skip=300)
    for delta, got in zip(SNR, rates):
        want = (scipy_stats.chi2(1).sf(1.0) if delta == 0
                else scipy_stats.ncx2(1, delta ** 2).sf(1.0))
        # ν̂ fluctuates (EMA of ~200 effective samples): a few-% relative jitter in the cutoff
        assert abs(got - want) < 0.02, (delta, got, want)


def test_streaming_noise_without_the_inflation_correction_would_be_biased():
    """The deviation-inflation factor matters: early steps compare against a mean of few
    gradients (f₁ = 2), so an uncorrected EMA would overestimate ν and under-pass."""
    from tangentscope.optim import deviation_inflation

    assert deviation_inflation(0.9, 1) == pytest.approx(2.0)
    assert deviation_inflation(0.9, 10 ** 6) == pytest.approx(2 / 1.9)
    torch.manual_seed(0)
    nu_true, beta = 0.25, 0.9
    for n in (1, 3, 50):
        g = torch.randn(n + 1, 200_000, dtype=torch.float64) * np.sqrt(nu_true)   # i.i.d. ĝ
        w = (1 - beta) * beta ** torch.arange(n - 1, -1, -1, dtype=torch.float64)
        mean_hat = (w[:, None] * g[:n]).sum(0) / (1 - beta ** n)
        d2 = ((g[n] - mean_hat) ** 2).mean()
        assert float(d2) / nu_true == pytest.approx(deviation_inflation(beta, n), rel=0.015)
