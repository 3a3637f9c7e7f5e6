"""Backdoors: triggers (`create_trigger`), poisoned train splits and triggered test splits
(`poison_split`, `backdoor_test_split`, saved in run folders), and their metrics (ASR, RA, DER)."""

from vptlab.backdoors.metrics import BackdoorAccuracy, BackdoorThreat, asr_drop, der
from vptlab.backdoors.poison import (
    PoisonRecord,
    backdoor_test_split,
    load_poison,
    poison_data,
    poison_split,
    save_poison,
)
from vptlab.backdoors.triggers import TRIGGERS, Trigger, create_trigger
from vptlab.registry import import_plugins

# Every module registers its plug-ins on import: a new file here is found without an edit.
import_plugins(__name__, __path__)

__all__ = [
    "TRIGGERS",
    "BackdoorAccuracy",
    "BackdoorThreat",
    "PoisonRecord",
    "Trigger",
    "asr_drop",
    "backdoor_test_split",
    "create_trigger",
    "der",
    "load_poison",
    "poison_data",
    "poison_split",
    "save_poison",
]
