"""The population-risk gate (SPEC.md component G) and the validation-free population-risk
estimate (component E).

* :class:`GatedAdamW` — AdamW with the per-parameter gate, a drop-in ``torch.optim.Optimizer``.
* :class:`GatedOptimizer` / :func:`gate` — the gate around any ``torch.optim`` optimizer.
* Statistics sources (:mod:`.stats`): streaming (default, inside the optimizer),
  :class:`PerExampleStats` (closed forms), :class:`VmapStats`, :class:`MicrobatchStats`.
* The math as pure functions (:mod:`.transforms`): :func:`snr_gate`, :func:`noise_variance`,
  :func:`loo_decrease`.
* :class:`PopulationRiskEstimator` — the population-loss curve and an early-stopping rule.

See docs/gate.md (derivation, placements, sources) and docs/estimator.md (measured results).
"""

from .adamw import GatedAdamW
from .estimator import (PopulationRiskCurve, PopulationRiskEstimator, curve_agreement,
                        predicted_change, stopping_step)
from .gated import GatedOptimizer, gate
from .grokfast import GrokfastEMA, GrokfastMA, grokfast_ema, grokfast_ma
from .stats import (GradMoments, MicrobatchStats, PerExampleStats, StatsSource, VmapStats,
                    per_example_moments, supported_modules)
from .transforms import deviation_inflation, gate_from_sums, loo_decrease, noise_variance, snr_gate

__all__ = [
    "GatedAdamW", "GatedOptimizer", "gate", "GrokfastEMA", "GrokfastMA", "grokfast_ema",
    "grokfast_ma", "GradMoments", "MicrobatchStats", "PerExampleStats",
    "StatsSource", "VmapStats", "per_example_moments", "supported_modules", "PopulationRiskCurve",
    "PopulationRiskEstimator", "curve_agreement", "predicted_change", "stopping_step",
    "deviation_inflation", "gate_from_sums", "loo_decrease", "noise_variance", "snr_gate",
]
