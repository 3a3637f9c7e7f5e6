"""Input-aware dynamic backdoor (Nguyen & Tran 2020, "Input-aware dynamic backdoor attack",
NeurIPS): every image gets its own trigger, drawn by a generator from the image itself.

    x' = x + m(x) (p(x) - x),   p = G(x) in [0, 1]^(C, H, W),   m = threshold(M(x)) in [0, 1]^(H, W)

G (the pattern generator) and M (the mask generator) are the authors' MNIST encoder-decoder
(`networks/models.py`, `Generator`), narrower here for the CPU. The trigger is fitted on the clean
train split as the authors train it (`train.py`), against a classifier trained with it:
  1. M alone (`mask_epochs`): lambda_norm mean(relu(m(x1) - mask_density)) + lambda_div
     ||x1 - x2|| / ||m(x1) - m(x2)||, then frozen;
  2. G with the classifier (`epochs`): per batch, a fraction p_attack of the samples stamped with
     their own trigger and labelled `target`, a fraction p_cross (= cross_ratio p_attack) stamped
     with the trigger of ANOTHER image and their labels kept (cross mode), the rest clean;
     cross-entropy plus lambda_div ||x1 - x2|| / ||G(x1) - G(x2)|| (norms per image, RMS).
The frozen G and M are the trigger's state; the classifier is thrown away: the victim learns the
trigger from its poisoned samples (apply) and cross samples (noise, through `CrossNoise`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vptlab.backdoors.surrogate import surrogate_model
from vptlab.backdoors.triggers import TRIGGERS, Trigger
from vptlab.data.base import seeded_generator
from vptlab.errors import ConfigError, VptlabError

# The authors' constants (config.py; BackdoorBench's config/attack/inputaware/default.yaml).
P_ATTACK = 0.1  # share of each fit batch given its own trigger and the target label
LAMBDA_DIV = 1.0  # weight of the diversity loss
LAMBDA_NORM = 100.0  # weight of the mask's norm loss
BATCH = 128  # the authors' batch size, for the joint stage
MASK_BATCH = 32  # smaller for the mask stage: its steps, not its samples, make the mask converge
CALIBRATION = 1024  # images whose BatchNorm statistics the frozen generators keep
STEPS = 2  # the MNIST generator's down/up-sampling steps: sizes are padded to multiples of 4
_EPSILON = 1e-7
_FIT_STREAM = 3  # the fit's batch order, apart from the pattern (1) and poison (2) streams


def _block(cin: int, cout: int, relu: bool = True) -> list[nn.Module]:
    """The authors' Conv2dBlock: 3x3 conv, BatchNorm (momentum 0.05), ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout, momentum=0.05)]
    return [*layers, nn.ReLU(inplace=True)] if relu else layers


class Generator(nn.Sequential):
    """The authors' MNIST generator (`networks/models.py`): two (conv, conv, maxpool) steps down
    from `width` channels (doubling), a middle conv, two (upsample, conv, conv) steps back, the
    last conv without ReLU, then tanh / 2 + 1/2: an image (N, C, H, W) in [0, 1] to an output
    (N, out_channels, H, W) in (0, 1). The authors' MNIST width is 16. Any H, W: the input is
    padded (replicate) to multiples of 4 and the output cropped back."""

    def __init__(self, channels: int, out_channels: int, width: int) -> None:
        layers: list[nn.Module] = []
        cin, cout = channels, width
        for step in range(STEPS):
            layers += [*_block(cin, cout), *_block(cout, cout), nn.MaxPool2d(2)]
            if step < STEPS - 1:
                cin, cout = cout, cout * 2
        layers += _block(cout, cout)
        for step in range(STEPS):
            last = step == STEPS - 1
            nxt = out_channels if last else cout // 2
            layers += [nn.Upsample(scale_factor=2, mode="bilinear"), *_block(cout, cout),
                       *_block(cout, nxt, relu=not last)]  # fmt: skip
            cout = nxt
        super().__init__(*layers)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        unit = 2**STEPS
        pad = (0, -w % unit, 0, -h % unit)
        # The authors feed MNIST normalized by mean 0.5, std 0.5.
        out = super().forward(F.pad(x * 2 - 1, pad, mode="replicate") if any(pad) else x * 2 - 1)
        return torch.tanh(out[..., :h, :w]) / (2 + _EPSILON) + 0.5

    @staticmethod
    def threshold(m: torch.Tensor) -> torch.Tensor:
        """The authors' soft step at 1/2 that makes the mask almost binary."""
        return torch.tanh(m * 20 - 10) / (2 + _EPSILON) + 0.5


@torch.no_grad()
def _calibrate(net: Generator, x: torch.Tensor) -> None:
    """BatchNorm's running statistics recomputed as exact averages over x (train-mode passes):
    after a fit of tens of steps the running averages (momentum 0.05) still hold much of their
    initialisation, and the eval-mode generator would not be the one the classifier saw."""
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
    net.train()
    for part in x.split(MASK_BATCH * 4):
        net(part)
    for norm in norms:
        norm.momentum = 0.05
    net.eval()


def _diversity(
    x1: torch.Tensor, x2: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor
) -> torch.Tensor:
    """The authors' diversity loss: mean over pairs of RMS(x1 - x2) / RMS(p1 - p2)."""
    images = (x1 - x2).pow(2).mean(dim=(1, 2, 3)).sqrt()
    patterns = (p1 - p2).pow(2).mean(dim=(1, 2, 3)).sqrt()
    return (images / (patterns + _EPSILON)).mean()


@TRIGGERS.register("inputaware")
class InputAwareTrigger(Trigger):
    """Input-aware dynamic backdoor (Nguyen & Tran 2020): x' = x + m(x) (G(x) - x), a pattern
    and a mask generated from each image; fitted on the clean train split (see the module).

    `noise(x, generator)` is the cross mode: each image stamped with the pattern and mask of
    another image of the batch (a seeded derangement); training stamps int(`cross_ratio` x the
    batch's poisoned samples) other samples of every batch so, labels kept (`CrossNoise`), so
    the victim learns that only an image's own trigger flips it. cross_ratio 1: the authors'
    p_cross 0.1 beside p_attack 0.1 (BackdoorBench: num_cross = num_bd).

    What differs from the authors: the generators are `width` 4 wide (the authors' MNIST: 16),
    fitted for `mask_steps` 60 batches of 32 and `steps` 32 batches of 128 (the authors: 25 and
    600 epochs) without their random crop and rotation, against the surrogate's SimpleNet with
    AdamW (theirs: their MNIST net with SGD); BatchNorm statistics are recomputed over the fit
    data before freezing. The fit takes 8-30 s on one busy CPU thread for 4,000 28x28 digits
    (measured 16-33 s on a loaded 2-core machine). Defaults mask_density 0.032, lambda_div 1,
    lambda_norm 100, p_attack 0.1: the authors'. The generators are built for the channel count
    they are fitted on; another count is a ConfigError.

    Measured on mnist-5k, SimpleNet victim, 10% poison (tests/backdoors/test_backdoor_run.py):
    the frozen trigger is learnt only in part, ASR 38.0 after 2 epochs and 48.3 after 6, at no
    cost in CA (93.7 / 95.5 against 95.3 clean); a trigger from another digit sends 23% (18.7%
    after 6 epochs) of the digits to the target. Not the cross samples' doing: without them
    (cross_ratio 0) ASR is 33.4 after 2 epochs; a 3x longer joint fit (steps 96) gives 41.0;
    mask_density 0.1 gives 58.7 but a cross-trigger rate of 45% (less input-specific). Each
    digit's trigger is a different sparse pattern (masks cover ~7% of the pixels, where they
    differ between digits), which a victim trained on fixed samples of a frozen generator
    learns slowly; the authors' classifier learns it over 600 epochs with the generator.
    """

    name = "inputaware"
    fitted = True

    def __init__(
        self,
        seed: int = 0,
        cross_ratio: Annotated[float, Field(ge=0)] = 1.0,
        width: Annotated[int, Field(ge=1)] = 4,
        mask_density: Annotated[float, Field(gt=0, lt=1)] = 0.032,
        steps: Annotated[int, Field(ge=1)] = 32,
        mask_steps: Annotated[int, Field(ge=1)] = 60,
    ) -> None:
        super().__init__(seed)
        if cross_ratio < 0 or width < 1 or not 0 < mask_density < 1 or min(steps, mask_steps) < 1:
            raise ConfigError(
                f"inputaware needs cross_ratio >= 0, width >= 1, mask_density in (0, 1) and "
                f"steps, mask_steps >= 1, got {cross_ratio}, {width}, {mask_density}, "
                f"{steps}, {mask_steps}"
            )
        self.cross_ratio, self.width, self.mask_density = cross_ratio, width, mask_density
        self.steps, self.mask_steps = steps, mask_steps
        self.pattern_net: Generator | None = None
        self.mask_net: Generator | None = None
        self.fit_seconds: float | None = None
        self._moved: dict[torch.device, tuple[Generator, Generator]] = {}

    def options(self) -> dict[str, Any]:
        return {"cross_ratio": self.cross_ratio, "width": self.width,
                "mask_density": self.mask_density, "steps": self.steps,
                "mask_steps": self.mask_steps}  # fmt: skip

    # ---- the learnt state ----

    def _build(self, channels: int) -> tuple[Generator, Generator]:
        return Generator(channels, channels, self.width), Generator(channels, 1, self.width)

    def _freeze(self, pattern_net: Generator, mask_net: Generator) -> None:
        for net in (pattern_net, mask_net):
            net.eval().requires_grad_(False)
        self.pattern_net, self.mask_net, self._moved = pattern_net, mask_net, {}
        # The learnt state (`state()`): both generators' weights and BatchNorm statistics.
        self._state = {f"{name}.{k}": v.detach().clone()
                       for name, net in (("pattern", pattern_net), ("mask", mask_net))
                       for k, v in net.state_dict().items()}  # fmt: skip

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Rebuild the generators from `state()` (`pattern.<key>`, `mask.<key>`), for the
        channel count their first conv was fitted on."""
        if "pattern.0.weight" not in state:
            raise VptlabError(f"{self.name}: learnt state holds no pattern.0.weight")
        pattern_net, mask_net = self._build(int(state["pattern.0.weight"].shape[1]))
        for prefix, net in (("pattern.", pattern_net), ("mask.", mask_net)):
            part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            try:
                net.load_state_dict(part)
            except RuntimeError as error:
                first = str(error).splitlines()[0]
                raise VptlabError(
                    f"{self.name}: learnt state does not fit width {self.width}: {first}"
                ) from None
        self._freeze(pattern_net, mask_net)

    def __getstate__(self) -> dict[str, Any]:
        # Loader workers get the fitted generators; their float64 copies are rebuilt there.
        return {**super().__getstate__(), "_moved": {}}

    # ---- stamping ----

    def _nets(self, x: torch.Tensor) -> tuple[Generator, Generator]:
        self.require_state()
        assert self.pattern_net is not None and self.mask_net is not None
        if x.shape[-3] != self.pattern_net.channels:
            raise ConfigError(
                f"{self.name} was fitted on {self.pattern_net.channels}-channel images, got "
                f"{x.shape[-3]} channels"
            )
        if x.device not in self._moved:
            nets = (self.pattern_net, self.mask_net)
            pattern_net, mask_net = (copy.deepcopy(n).to(x.device, torch.float64) for n in nets)
            self._moved[x.device] = (pattern_net, mask_net)
        return self._moved[x.device]

    def trigger_of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (pattern (N, C, H, W), mask (N, 1, H, W)) generated from each image of x, in
        float64 (then x's dtype): the mask's steep threshold (slope 10) would otherwise turn
        float32 rounding that differs with the batch size into visible differences."""
        pattern_net, mask_net = self._nets(x)
        wide = x.double()
        pattern, mask = pattern_net(wide), Generator.threshold(mask_net(wide))
        return pattern.to(x.dtype), mask.to(x.dtype)

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        pattern, mask = self.trigger_of(x)
        return x + mask * (pattern - x)

    def noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The cross mode: image i stamped with the pattern and mask generated from image
        partner(i) != i of the batch, partner a derangement drawn from `generator` (a random
        cycle through the batch). A batch of one has no other image: it is returned as it is."""
        if x.ndim != 4:
            raise ValueError(f"{self.name}: expected a (N,C,H,W) batch, got {tuple(x.shape)}")
        if len(x) < 2:
            return x.clone()
        order = torch.randperm(len(x), generator=generator)
        partner = torch.empty_like(order)
        partner[order] = order.roll(-1)
        pattern, mask = self.trigger_of(x[partner.to(x.device)])
        return (x + mask * (pattern - x)).clamp(0.0, 1.0)

    # ---- the fit ----

    def fit(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, target: int) -> None:
        """The authors' two stages on (x, y) (the clean train split, CPU, seeded; see the module):
        the mask generator alone, then the pattern generator with a fresh classifier."""
        start = time.perf_counter()
        x, y = x.detach().float().cpu(), y.detach().long().cpu()
        n, batch = len(x), min(BATCH, len(x))
        g = seeded_generator(self.seed, _FIT_STREAM)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=g)))
            pattern_net, mask_net = self._build(int(x.shape[1]))
            # The surrogate's model, trained here WITH the generator from scratch, as the
            # authors' classifier is.
            classifier = surrogate_model(x, num_classes)

        def pairs(steps: int, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            # The authors' two shuffled loaders over the same split, whole batches only.
            done = 0
            while True:
                first, second = torch.randperm(n, generator=g), torch.randperm(n, generator=g)
                for i in range(0, n - batch + 1, batch):
                    if done == steps:
                        return
                    yield first[i : i + batch], second[i : i + batch]
                    done += 1

        adam = {"lr": 1e-2, "betas": (0.5, 0.9)}  # the authors' generator optimizers
        opt_m = torch.optim.Adam(mask_net.parameters(), **adam)
        mask_net.train()
        for i1, i2 in pairs(self.mask_steps, MASK_BATCH):
            x1, x2 = x[i1], x[i2]
            m1, m2 = Generator.threshold(mask_net(x1)), Generator.threshold(mask_net(x2))
            norm = F.relu(m1 - self.mask_density).mean()
            loss = LAMBDA_NORM * norm + LAMBDA_DIV * _diversity(x1, x2, m1, m2)
            opt_m.zero_grad(set_to_none=True)
            loss.backward()
            opt_m.step()
        _calibrate(mask_net, x[:CALIBRATION])
        mask_net.requires_grad_(False)

        opt_g = torch.optim.Adam(pattern_net.parameters(), **adam)
        opt_c = torch.optim.AdamW(classifier.parameters(), lr=3e-3, weight_decay=0.01)
        num_bd = max(1, int(P_ATTACK * batch))
        num_cross = int(P_ATTACK * self.cross_ratio * batch)
        pattern_net.train()
        classifier.train()
        for i1, i2 in pairs(self.steps, batch):
            x1, y1, x2 = x[i1], y[i1].clone(), x[i2]
            p1, m1 = pattern_net(x1[:num_bd]), Generator.threshold(mask_net(x1[:num_bd]))
            others = x2[num_bd : num_bd + max(num_bd, num_cross)]
            p2, m2 = pattern_net(others), Generator.threshold(mask_net(others))
            inputs = torch.cat([
                x1[:num_bd] + m1 * (p1 - x1[:num_bd]),
                x1[num_bd : num_bd + num_cross]
                + m2[:num_cross] * (p2[:num_cross] - x1[num_bd : num_bd + num_cross]),
                x1[num_bd + num_cross :],
            ])  # fmt: skip
            y1[:num_bd] = target
            loss = F.cross_entropy(classifier(inputs), y1)
            pairs_n = min(num_bd, len(p2))
            loss = loss + LAMBDA_DIV * _diversity(
                x1[:pairs_n], others[:pairs_n], p1[:pairs_n], p2[:pairs_n]
            )
            opt_g.zero_grad(set_to_none=True)
            opt_c.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
            opt_c.step()
        _calibrate(pattern_net, x[:CALIBRATION])
        self._freeze(pattern_net, mask_net)
        self.fit_seconds = time.perf_counter() - start


__all__ = ["Generator", "InputAwareTrigger"]
