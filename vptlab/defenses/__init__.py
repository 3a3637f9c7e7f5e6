"""Defenses: adversarial-training objectives, backdoor repairers and detectors.

Importing the package registers every repairer in `repair.REPAIRERS`: each plug-in module imports
`repair` for the registry, so the registry module itself imports none of them (that circle made
`import vptlab.defenses.prompt_defense` fail in a fresh interpreter).
"""

from vptlab.defenses import (  # noqa: F401  (each registers its repairer)
    cleanclip,
    clip_prompt,
    fine_pruning,
    finetune,
    nad,
    prompt_defense,
)
