"""Experiments: YAML sweeps expanded to points, a resumable runner, reports and comparisons.

    numabench sweep plans/experiment-batch-scaling.yaml -o results/bs
    numabench report results/bs
    numabench compare runs/a runs/b
"""
from numabench.experiments.points import Point, expand, validate_points
from numabench.experiments.spec import (
    EXPERIMENT_VERSION,
    KINDS,
    Experiment,
    ExperimentError,
    load_experiment,
    parse_experiment,
)

__all__ = [
    "EXPERIMENT_VERSION", "KINDS", "Experiment", "ExperimentError", "Point", "expand",
    "load_experiment", "parse_experiment", "validate_points",
]
