"""Metrics: per-sample predictions and clean top-k accuracy; robust accuracy, ASR and DER build on
`Predictions` as attacks land."""

from vptlab.metrics.accuracy import Predictions, evaluate, predict, topk_correct

__all__ = ["Predictions", "evaluate", "predict", "topk_correct"]
