"""Dynamics: frozen-kernel flows; the recorder, trajectory operators and channel analysis.

The main entry points are re-exported here; each module (``label_noise``, ``linearized``,
``jump``, ``noise_accounting``, ``reservoir``, ``channel_score``, ``pruning``, ``diffusion``, the
matrix-free ``matfree*``) documents the rest of its API.
"""

from .channel_score import ChannelScores, channel_scores
from .channels import (
                       ChannelSplit,
                       ChannelTimeline,
                       NoiseTransfer,
                       VectorEnergy,
                       Visibility,
                       channel_timeline,
                       label_noise_gradients,
                       mode_visibility,
                       noise_transfer,
                       split_channels,
)
from .diffusion import DriftNoiseSplit, ScalingFit, scaling_exponent
from .flow import FlowSolution, analytic_jump, eigh_kernel, integrate_flow, squared_loss_flow
from .jump import JumpSchedule, ParameterJump, apply_jump, parameter_jump
from .label_noise import NoiseChannelReport, classification_error, noise_channel_analysis
from .linearized import LinearizedComparison, linearized_comparison
from .noise_accounting import NoiseAccounting, noise_accounting
from .operators import (
                       DISCRETIZATIONS,
                       IdentityResiduals,
                       WindowOperators,
                       accumulate_operators,
                       dissipation_gramian,
                       identity_residuals,
                       integrated_entk,
                       propagator,
                       transfer_operator,
                       window_operators,
)
from .recorder import KernelRecorder
from .reservoir import GapTimeline, ReservoirGap, gap_timeline, reservoir_gap
from .schedule import Schedule, at_steps, every, logspaced, manual
from .spectrum import (
                       KernelRotation,
                       KernelSpectra,
                       SpectralSchedule,
                       kernel_alignment,
                       kernel_rotation,
                       kernel_spectra,
                       residual,
                       spectral_schedule,
)
from .store import TrajectoryStore
from .trajectory import KernelTrajectory

__all__ = [
    "FlowSolution", "analytic_jump", "eigh_kernel", "integrate_flow", "squared_loss_flow",
    "KernelRecorder", "KernelTrajectory", "Schedule", "every", "logspaced", "at_steps", "manual",
    "DISCRETIZATIONS", "WindowOperators", "IdentityResiduals", "accumulate_operators",
    "window_operators", "propagator", "integrated_entk", "dissipation_gramian", "transfer_operator",
    "identity_residuals", "ChannelSplit", "VectorEnergy", "split_channels", "Visibility",
    "mode_visibility", "NoiseTransfer", "noise_transfer", "label_noise_gradients",
    "ChannelTimeline", "channel_timeline", "KernelSpectra", "kernel_spectra", "kernel_alignment",
    "KernelRotation", "kernel_rotation", "SpectralSchedule", "spectral_schedule", "residual",
    "TrajectoryStore", "NoiseChannelReport", "noise_channel_analysis", "classification_error",
    "LinearizedComparison", "linearized_comparison", "ParameterJump", "parameter_jump",
    "apply_jump", "JumpSchedule", "NoiseAccounting", "noise_accounting", "ReservoirGap",
    "reservoir_gap", "GapTimeline", "gap_timeline", "ChannelScores", "channel_scores",
    "DriftNoiseSplit", "ScalingFit", "scaling_exponent",
]
