"""vptlab: robustness of adapted vision models (train, adapt, attack, defend, report)."""

__version__ = "0.1.0"
