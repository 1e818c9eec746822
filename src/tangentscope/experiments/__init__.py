"""Experiments: one module per experiment, each defining ``EXPERIMENT`` (see ``_framework``).

Run one with ``tangentscope run NAME [--preset smoke|full] [--seed N] [--field value ...]``.
"""

from ._framework import (
    DEFAULT_PRESET,
    Experiment,
    compare,
    get_experiment,
    list_experiments,
    make_config,
    parse_overrides,
    plot_run,
    register,
    run_experiment,
)

__all__ = ["DEFAULT_PRESET", "Experiment", "compare", "get_experiment", "list_experiments",
           "make_config", "parse_overrides", "plot_run", "register", "run_experiment"]
