"""Metrics: per-sample predictions and clean top-k accuracy, and the one evaluation suite (clean
accuracy plus each threat's metrics, e.g. robust accuracy per attack and budget)."""

from vptlab.metrics.accuracy import Predictions, evaluate, predict, topk_correct
from vptlab.metrics.suite import AttackThreat, Threat, evaluate_suite, suite_predictions

__all__ = [
    "AttackThreat",
    "Predictions",
    "Threat",
    "evaluate",
    "evaluate_suite",
    "predict",
    "suite_predictions",
    "topk_correct",
]
