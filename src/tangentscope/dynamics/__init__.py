"""Dynamics: frozen-kernel flows, and (operators issue) the recorder and trajectory operators."""

from .flow import FlowSolution, analytic_jump, eigh_kernel, integrate_flow, squared_loss_flow

__all__ = ["FlowSolution", "analytic_jump", "eigh_kernel", "integrate_flow", "squared_loss_flow"]
