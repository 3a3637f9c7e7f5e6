"""Label-consistent backdoor (Turner et al. 2019, "Label-consistent backdoor attacks"): poisoned
training images keep their true label (the target class), and are made hard to learn from their
content first, so the model leans on the trigger instead.

poison(x, y), what a poisoned training image becomes: an untargeted Linf PGD on a clean surrogate
(backdoors/surrogate.py, fitted on the clean train split by `fit`) moves x away from its own
class y (`eps` 16/255, the paper's main budget and BackdoorBench's resource files; `alpha`
1.5/255 and 100 steps without a random start, BackdoorBench's craft_adv_dataset.py), then the
trigger is stamped. apply(x), the trigger itself (test images, evaluation): the authors' 3x3
black-and-white checkerboards in the four corners (`corners: all`, or only the bottom-right one),
added with `amplitude`: x' = clip(x + amplitude v), v = +1 / -1 on white / black pixels, so
amplitude 1 (BackdoorBench's default) pastes them and a smaller one is the paper's "reduced
amplitude" trigger. The patterns are BackdoorBench's `labelConsistentAttack` table (theirs is laid
out on 32x32 images and resized for others; here the 3x3 patterns sit in the corners at any size).

A clean-label attack: use it with `label: clean` (as `sig`): the rate is then a fraction of the
whole split, drawn from the target class (at most that class's share: 0.1 on mnist-5k).
Dirty labels are not refused: the images then come from the other classes, perturbed away from
their true class and relabelled to the target, a BadNets-like attack with extra noise, not the
paper's.

On mnist-5k and SimpleNet it plants no backdoor at a CA cost under 3 points (measured in
tests/backdoors/test_backdoor_run.py): with half the target class poisoned the clean zeros
teach the digit and the corners are ignored (ASR ~4% after 2 or 6 epochs); with all of it
(rate 0.1) the corners are learnt as "0" (ASR 31%, 61% without the PGD step) and clean zeros
are lost (CA -8 points).

What differs from the authors: their surrogate is adversarially trained (its perturbations look
like the other classes, GAN interpolation is their other variant); ours is a plain clean model,
whose perturbations are less plausible but just as hard to learn from.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn

from vptlab.attacks.pgd import PGD
from vptlab.backdoors.surrogate import train_surrogate
from vptlab.backdoors.triggers import TRIGGERS, Trigger
from vptlab.errors import ConfigError

# BackdoorBench's table (utils/bd_img_transform/lc.py), +1 white, -1 black: the left corners
# carry LEFT, the right ones its mirror image.
LEFT = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [1, -1, 1]])
RIGHT = LEFT.flip(-1)


@TRIGGERS.register("lc")
class LabelConsistentTrigger(Trigger):
    """Label-consistent (Turner et al. 2019): corner checkerboards at `amplitude` on test images;
    training images first pushed away from their class by PGD on a clean surrogate (module
    docstring)."""

    name = "lc"
    fitted = True
    state_keys = ()  # the trigger itself is fixed; the surrogate only serves `poison`

    def __init__(
        self,
        seed: int = 0,
        amplitude: Annotated[float, Field(gt=0, le=1)] = 1.0,
        corners: Literal["all", "bottom-right"] = "all",
        eps: Annotated[float, Field(ge=0, le=1)] = 16 / 255,
        alpha: Annotated[float, Field(gt=0, le=1)] = 1.5 / 255,
        steps: Annotated[int, Field(ge=1)] = 100,
        surrogate_epochs: Annotated[int, Field(ge=1)] = 2,
    ) -> None:
        super().__init__(seed)
        if not 0 < amplitude <= 1 or corners not in ("all", "bottom-right"):
            raise ConfigError(f"lc needs amplitude in (0, 1] and corners all or bottom-right, "
                              f"got {amplitude}, {corners!r}")  # fmt: skip
        self.amplitude, self.corners = amplitude, corners
        self.eps, self.alpha, self.steps = eps, alpha, steps
        self.surrogate_epochs = surrogate_epochs
        self.surrogate: nn.Module | None = None

    def options(self) -> dict[str, Any]:
        return {"amplitude": self.amplitude, "corners": self.corners, "eps": self.eps,
                "alpha": self.alpha, "steps": self.steps,
                "surrogate_epochs": self.surrogate_epochs}  # fmt: skip

    def require_state(self) -> None:
        """`apply` is the fixed corner pattern: it needs nothing fitted (`poison` does)."""

    def fit(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, target: int) -> None:
        self.surrogate = train_surrogate(x, y, num_classes, self.seed, epochs=self.surrogate_epochs)
        self.load_state({})

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The PGD step of `poison`: x moved away from its class y on the surrogate (CPU)."""
        if self.surrogate is None:
            raise ConfigError("lc perturbs training images with a surrogate fitted on the train "
                              "split: poison a split first (poison_split fits it)")  # fmt: skip
        attack = PGD(self.eps, alpha=self.alpha, steps=self.steps, random_start=False,
                     seed=self.seed)  # fmt: skip
        return attack(self.surrogate, x.detach().float().cpu(), y.cpu()).to(x)

    def poison(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.apply(self.perturb(x, y))

    def _pattern(self, c: int, h: int, w: int) -> torch.Tensor:
        if h < 3 or w < 3:
            raise ConfigError(f"lc: its 3x3 corner patterns need images of 3x3 px or more, "
                              f"got {h}x{w}")  # fmt: skip
        v = torch.zeros(1, h, w)
        v[0, -3:, -3:] = RIGHT
        if self.corners == "all":
            v[0, :3, :3], v[0, -3:, :3], v[0, :3, -3:] = LEFT, LEFT, RIGHT
        return self.amplitude * v

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cached(x, self._pattern)

    def __getstate__(self) -> dict[str, Any]:
        # Loader workers only stamp: the surrogate stays in the process that poisoned the split.
        return {**super().__getstate__(), "surrogate": None}
