"""Metrics: clean top-k accuracy now; robust accuracy, ASR and DER join as attacks land."""

from vptlab.metrics.accuracy import evaluate, topk_correct

__all__ = ["evaluate", "topk_correct"]
