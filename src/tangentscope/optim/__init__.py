"""The population-risk gate and the validation-free population-risk estimate (symbols:
docs/notation.md).

* :class:`GatedAdamW` — AdamW with the per-parameter gate, a drop-in ``torch.optim.Optimizer``.
* :class:`GatedOptimizer` / :func:`gate` — the gate around any ``torch.optim`` optimizer.
* Statistics sources (:mod:`.stats`): streaming (default, inside the optimizer),
  :class:`PerExampleStats` (closed forms), :class:`VmapStats`, :class:`MicrobatchStats`.
* The math as pure functions (:mod:`.transforms`): :func:`snr_gate`, :func:`noise_variance`,
  :func:`loo_decrease`.
* :class:`PopulationRiskEstimator` — the population-loss curve and an early-stopping rule.
* Step observers: ``opt.register_step_observer(fn, needs_terms=False)`` on both optimizers,
  ``fn(opt, info)`` with a frozen :class:`StepInfo` after every step.
* One name per optimizer (:mod:`.spec`): :func:`parse_optimizer` (``'gated@threshold=2'`` →
  :class:`OptimizerSpec`) and :func:`build_optimizer` (→ :class:`BuiltOptimizer`).

See docs/gate.md (derivation, placements, sources) and docs/estimator.md (measured results).
"""

from ._common import GroupInfo, StepInfo, StepTerms
from .adamw import GatedAdamW
from .estimator import (
    PopulationRiskCurve,
    PopulationRiskEstimator,
    curve_agreement,
    predicted_change,
    stopping_step,
)
from .gated import GatedOptimizer, gate
from .grokfast import GrokfastEMA, GrokfastMA, grokfast_ema, grokfast_ma
from .spec import BuiltOptimizer, OptimizerSpec, build_optimizer, parse_optimizer
from .stats import (
    GradMoments,
    MicrobatchStats,
    PerExampleStats,
    StatsSource,
    VmapStats,
    per_example_moments,
    supported_modules,
)
from .transforms import deviation_inflation, gate_from_sums, loo_decrease, noise_variance, snr_gate

__all__ = [
    "GatedAdamW", "GatedOptimizer", "gate", "GrokfastEMA", "GrokfastMA", "grokfast_ema",
    "grokfast_ma", "GradMoments", "MicrobatchStats", "PerExampleStats",
    "StatsSource", "VmapStats", "per_example_moments", "supported_modules", "PopulationRiskCurve",
    "PopulationRiskEstimator", "curve_agreement", "predicted_change", "stopping_step",
    "deviation_inflation", "gate_from_sums", "loo_decrease", "noise_variance", "snr_gate",
    "BuiltOptimizer", "OptimizerSpec", "build_optimizer", "parse_optimizer", "GroupInfo",
    "StepInfo", "StepTerms",
]
