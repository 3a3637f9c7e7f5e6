"""Defenses: adversarial-training objectives, backdoor repairers and detectors.

Importing the package imports every module in it, which registers every objective, repairer and
detector. Each plug-in module imports its registry (`repair.REPAIRERS`, ...), never the other way
round (that circle once made `import vptlab.defenses.prompt_defense` fail in a fresh interpreter).
"""

from vptlab.registry import import_plugins

# Every module registers its plug-ins on import (objectives, repairers, detectors): a new file
# here is found without an edit.
import_plugins(__name__, __path__)
