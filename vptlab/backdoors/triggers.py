"""Backdoor triggers: `apply(x) -> x'` on a batch of [0,1] images, one small class per paper.

- badnets (Gu et al. 2017):       x' = (1 - m) * x + m * p     (m: a height x width patch mask)
- blended (Chen et al. 2017):     x' = (1 - alpha) * x + alpha * p
- wanet   (Nguyen & Tran 2021):   x' = grid_sample(x, clip(I + s * P / (W, H)))
                                  P = upsample_bicubic(U / mean|U|), U ~ U(-1, 1)^(2, k, k)
- sig     (Barni et al. 2019):    x' = clip(x + v),  v(i, j) = delta * sin(2 pi j f / W)
- lf      (Zeng et al. 2021):     x' = clip(x + v),  v = eps * minmax(lowpass(U(0, 1)^(C, H, W)))
- bpp     (Wang et al. 2022):     x' = round(x (s - 1)) / (s - 1), Floyd-Steinberg dithered

Every trigger works on (N, C, H, W) batches of any size and channel count, follows the batch's
device, and is deterministic from its seed: its pattern is drawn once per (device, dtype,
channels, size) from a CPU generator seeded by it (so CPU and GPU stamp the same pixels) and
cached. `spec()` holds what rebuilds it: `create_trigger(**spec)`.

Fitted triggers (`fitted = True`: trojannn.py, label_consistent.py ...) are learnt from the clean
train split as well: `poison_split` calls `fit(x, y, num_classes, target)` before stamping, and
their learnt tensors (`state()`) travel in the run's poison record (`load_state`), so spec plus
state rebuild them. `poison(x, y)` is what a poisoned training sample becomes (label-consistent
perturbs it first); the test split and every evaluation use `apply(x)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt

from vptlab.data.base import seeded_generator
from vptlab.errors import ConfigError, VptlabError
from vptlab.registry import Registry

TRIGGERS = Registry["Trigger"]("trigger")

Corner = Literal["bottom-right", "bottom-left", "top-right", "top-left", "center", "centre"]
PatchPattern = Literal["white", "checkerboard", "random", "noise"]
Fraction = Annotated[float, Field(ge=0, le=1)]
_PATTERN_STREAM = 1  # keeps a trigger's pattern draws apart from other uses of its seed


class Trigger:
    """Base class: `apply(x)` stamps a batch; subclasses define `stamp` and `options`.

    `name` is the registry name, used in metric names (`badnets/asr`). A trigger with a noise
    mode (WaNet) sets `cross_ratio` > 0 and defines `noise`: training then adds cross samples
    to every batch.
    """

    name: str = "trigger"
    cross_ratio: float = 0.0
    fitted: bool = False  # True: learnt from the clean train split (`fit`) besides the seed
    state_keys: tuple[str, ...] = ()  # the names of a fitted trigger's learnt tensors

    def __init__(self, seed: int = 0) -> None:
        if seed < 0:
            raise ConfigError(f"{self.name} seed must be >= 0, got {seed}")
        self.seed = seed
        self._cache: dict[tuple[Any, ...], torch.Tensor] = {}
        self._state: dict[str, torch.Tensor] = {}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0,1] -> the triggered batch, same shape, device and dtype, in [0,1]."""
        if x.ndim != 4:
            raise ValueError(f"{self.name}: expected a (N,C,H,W) batch, got {tuple(x.shape)}")
        self.require_state()
        return self.stamp(x).clamp(0.0, 1.0)

    def poison(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What poisoned TRAINING samples x (true labels y) become: `apply(x)` unless a trigger
        says otherwise (label-consistent perturbs them first). Tests and evaluation use apply."""
        return self.apply(x)

    def fit(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, target: int) -> None:
        """Learn from the clean train split (x (N,C,H,W) in [0,1] at its stored size, y (N,)
        int64), deterministic from the seed on the CPU; `poison_split` calls it once, before
        stamping, when `fitted`. Plain triggers learn nothing."""

    def state(self) -> dict[str, torch.Tensor]:
        """The learnt tensors (CPU copies; {} for a plain trigger), saved in the poison record."""
        return {key: value.detach().cpu().clone() for key, value in self._state.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take learnt tensors (what `state()` gave); the keys must be `state_keys`."""
        if set(state) != set(self.state_keys):
            raise VptlabError(
                f"{self.name}: learnt state must hold {sorted(self.state_keys)}, "
                f"got {sorted(state)}"
            )
        self._state = {key: value.detach().cpu().clone() for key, value in state.items()}
        self._cache.clear()

    def require_state(self) -> None:
        """One clear error when a fitted trigger is used before it was fitted or loaded."""
        if self.fitted and not self._state:
            raise ConfigError(
                f"{self.name} is fitted on the train split: poison a split first or load its "
                "run's poison record"
            )

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The noise-mode version of the trigger for cross samples (WaNet); others have none."""
        raise NotImplementedError(f"trigger {self.name} has no noise mode")

    def options(self) -> dict[str, Any]:
        """The keyword options (JSON values) that, with the seed, rebuild this trigger."""
        return {}

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "options": self.options()}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}(seed={self.seed}{', ' if options else ''}{options})"

    def generator(self) -> torch.Generator:
        return seeded_generator(self.seed, _PATTERN_STREAM)

    def cached(
        self, x: torch.Tensor, build: Callable[[int, int, int], torch.Tensor]
    ) -> torch.Tensor:
        """`build(channels, height, width)` (on the CPU, float32) moved to x's device and dtype,
        built once per (device, dtype, channels, height, width)."""
        c, h, w = x.shape[-3:]
        key = (x.device, x.dtype, c, h, w)
        if key not in self._cache:
            self._cache[key] = build(c, h, w).to(device=x.device, dtype=x.dtype)
        return self._cache[key]

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get a copy: device tensors are rebuilt there, not pickled.
        return {**self.__dict__, "_cache": {}}


@TRIGGERS.register("badnets")
class BadNetsTrigger(Trigger):
    """BadNets (Gu et al. 2017): a small patch pasted over the image, x' = (1 - m) x + m p.

    A `height` x `width` px patch (each defaults to `size`: a square) at `location` (a corner,
    the center, also spelt centre, or the (row, col) pixel of its top-left corner), or, when
    `at` is given, at `at` = [row, col] fractions of the free room: the patch's top-left pixel
    is floor(row x (H - height)), floor(col x (W - width)), so [0, 0] is the top-left corner,
    [1, 1] the bottom-right and [0.5, 0.5] the middle (e.g. inside a 28x28 digit's strokes)
    at any image size. `pattern`: white; a checkerboard (white first); `random`, seeded uniform
    noise, the same in every channel; `noise`, seeded uniform noise drawn per channel (a colour
    pattern on RGB). The default, a 3x3 white square at the bottom right, is BackdoorBench's.
    """

    name = "badnets"

    def __init__(
        self,
        seed: int = 0,
        size: Annotated[int, Field(ge=1)] = 3,
        location: Corner | tuple[NonNegativeInt, NonNegativeInt] = "bottom-right",
        pattern: PatchPattern = "white",
        height: Annotated[int, Field(ge=1)] | None = None,
        width: Annotated[int, Field(ge=1)] | None = None,
        at: tuple[Fraction, Fraction] | None = None,
    ) -> None:
        super().__init__(seed)
        for key, value in (("size", size), ("height", height), ("width", width)):
            if value is not None and value < 1:
                raise ConfigError(f"badnets {key} must be >= 1, got {value}")
        if pattern not in ("white", "checkerboard", "random", "noise"):
            raise ConfigError(
                f"badnets pattern must be white, checkerboard, random or noise: {pattern!r}"
            )
        if isinstance(location, str) and location not in Corner.__args__:
            raise ConfigError(f"badnets location must be a corner or center: {location!r}")
        if at is not None and (len(at) != 2 or not all(0 <= float(f) <= 1 for f in at)):
            raise ConfigError(f"badnets at must be [row, col] fractions in [0, 1], got {at!r}")
        self.size = size
        self.height, self.width = height, width
        self.location: str | tuple[int, int] = (
            location if isinstance(location, str) else (int(location[0]), int(location[1]))
        )
        self.at = (float(at[0]), float(at[1])) if at is not None else None
        self.pattern = pattern

    @property
    def shape(self) -> tuple[int, int]:
        """The patch's (height, width) in px."""
        return self.height or self.size, self.width or self.size

    def options(self) -> dict[str, Any]:
        location = self.location if isinstance(self.location, str) else list(self.location)
        options: dict[str, Any] = {"size": self.size, "location": location, "pattern": self.pattern}
        # The newer options only when set: older specs stay exactly as they were written.
        extra = {"height": self.height, "width": self.width,
                 "at": list(self.at) if self.at is not None else None}  # fmt: skip
        return {**options, **{k: v for k, v in extra.items() if v is not None}}

    def patch(self, channels: int = 1) -> torch.Tensor:
        """The (1 or channels, height, width) pattern p, values in [0,1]; only `noise` differs
        between channels."""
        ph, pw = self.shape
        if self.pattern == "white":
            return torch.ones(1, ph, pw)
        if self.pattern == "checkerboard":
            return ((torch.arange(ph)[:, None] + torch.arange(pw)[None, :]) % 2 == 0).float()[None]
        if self.pattern == "noise":
            return torch.rand(channels, ph, pw, generator=self.generator())
        return torch.rand(1, ph, pw, generator=self.generator())

    def top_left(self, height: int, width: int) -> tuple[int, int]:
        (ph, pw), loc = self.shape, self.location
        if self.at is not None:
            # A hair over the product: 0.3 x 10 is 2.9999999999999996 in floats.
            row = math.floor(self.at[0] * (height - ph) + 1e-9)
            col = math.floor(self.at[1] * (width - pw) + 1e-9)
        elif isinstance(loc, tuple):
            row, col = loc
        else:
            middle = ((height - ph) // 2, (width - pw) // 2)
            rows = {"top": 0, "bottom": height - ph, "center": middle[0], "centre": middle[0]}
            cols = {"left": 0, "right": width - pw, "center": middle[1], "centre": middle[1]}
            vertical, _, horizontal = loc.partition("-")
            row, col = rows[vertical], cols[horizontal or "center"]
        if row < 0 or col < 0 or row + ph > height or col + pw > width:
            where = f"at {list(self.at)}" if self.at is not None else f"{loc}"
            raise ConfigError(
                f"badnets: a {ph}x{pw}px patch at {where} does not fit a {height}x{width} image"
            )
        return row, col

    def _mask_and_pattern(self, c: int, h: int, w: int) -> torch.Tensor:
        row, col = self.top_left(h, w)
        (ph, pw), channels = self.shape, (c if self.pattern == "noise" else 1)
        out = torch.zeros(2, channels, h, w)  # [m, p], broadcast over channels
        out[0, :, row : row + ph, col : col + pw] = 1.0
        out[1, :, row : row + ph, col : col + pw] = self.patch(c)
        return out

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        m, p = self.cached(x, self._mask_and_pattern)
        return (1 - m) * x + m * p


@TRIGGERS.register("blended")
class BlendedTrigger(Trigger):
    """Blended (Chen et al. 2017): x' = (1 - alpha) x + alpha p over the whole image.

    p is seeded uniform noise (one value per channel and pixel), or `image`: a picture file
    (read with PIL, resized bilinearly to the input, converted to its channels: gray for one,
    RGB for three). alpha 0.2 is BackdoorBench's training blend.
    """

    name = "blended"

    def __init__(
        self,
        seed: int = 0,
        alpha: Annotated[float, Field(gt=0, le=1)] = 0.2,
        image: str | None = None,
    ) -> None:
        super().__init__(seed)
        if not 0 < alpha <= 1:
            raise ConfigError(f"blended alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.image = image
        self._picture = _read_picture(image) if image is not None else None

    def options(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "image": self.image}

    def _pattern(self, c: int, h: int, w: int) -> torch.Tensor:
        if self._picture is None:
            return torch.rand(c, h, w, generator=self.generator())
        return _picture_tensor(self._picture, c, h, w)

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        p = self.cached(x, self._pattern)
        return (1 - self.alpha) * x + self.alpha * p


def _read_picture(path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"blended image: no file at {file}")
    try:
        with Image.open(file) as picture:
            picture.load()
            return picture.copy()
    except (OSError, UnidentifiedImageError) as error:
        raise ConfigError(f"blended image {file}: cannot read it as an image ({error})") from None


def _picture_tensor(picture: Any, c: int, h: int, w: int) -> torch.Tensor:
    """The picture as (c, h, w) float32 in [0,1]: RGB for 3 channels, gray (repeated) otherwise."""
    import numpy as np
    from PIL import Image

    converted = picture.convert("RGB" if c == 3 else "L").resize((w, h), Image.BILINEAR)
    pixels = torch.from_numpy(np.array(converted, dtype=np.float32) / 255.0)
    if pixels.ndim == 2:
        return pixels[None].expand(c, h, w).clone()
    return pixels.permute(2, 0, 1).contiguous()


@TRIGGERS.register("wanet")
class WaNetTrigger(Trigger):
    """WaNet (Nguyen & Tran 2021): an imperceptible, smooth warp of the image.

    A k x k field of random 2-D offsets U ~ U(-1, 1) is normalized by its mean absolute value,
    upsampled bicubically to H x W (P), and added, scaled by s / size, to the identity sampling
    grid I: x' = grid_sample(x, clip(I + s P / (W, H), -1, 1)) (bilinear, align_corners), as in
    the authors' code (k=4, s=0.5, grid_rescale 1).

    `noise(x, generator)` is the paper's noise mode: the same warp plus a fresh random offset
    per pixel, U(-1, 1) / size. Training warps int(`cross_ratio` x the batch's poisoned samples)
    other samples of every batch so, drawn anew each batch with fresh noise (backdoors/poison.py,
    `CrossNoise`), their true labels kept, so the network learns that only the exact warp is a
    trigger.
    """

    name = "wanet"

    def __init__(
        self,
        seed: int = 0,
        k: Annotated[int, Field(ge=2)] = 4,
        s: Annotated[float, Field(gt=0)] = 0.5,
        cross_ratio: Annotated[float, Field(ge=0)] = 2.0,
    ) -> None:
        super().__init__(seed)
        if k < 2 or s <= 0 or cross_ratio < 0:
            raise ConfigError(
                f"wanet needs k >= 2, s > 0 and cross_ratio >= 0, got k={k}, s={s}, "
                f"cross_ratio={cross_ratio}"
            )
        self.k, self.s, self.cross_ratio = k, s, cross_ratio
        # Drawn once at k x k: every image size gets the same warp, upsampled.
        field = torch.rand(1, 2, k, k, generator=self.generator()) * 2 - 1
        self._field = field / field.abs().mean()

    def options(self) -> dict[str, Any]:
        return {"k": self.k, "s": self.s, "cross_ratio": self.cross_ratio}

    def _grid(self, c: int, h: int, w: int) -> torch.Tensor:
        """The (1, H, W, 2) sampling grid (x, y) of the warp, clipped to [-1, 1]."""
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack((xs, ys), dim=-1)[None]
        warp = F.interpolate(self._field, size=(h, w), mode="bicubic", align_corners=True)
        per_pixel = torch.tensor([w, h], dtype=torch.float32)
        return (identity + self.s * warp.permute(0, 2, 3, 1) / per_pixel).clamp(-1, 1)

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.cached(x, self._grid).expand(len(x), -1, -1, -1)
        return F.grid_sample(x, grid, mode="bilinear", align_corners=True)

    def noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The noise-mode warp of a batch: the trigger's grid plus U(-1, 1) / size per pixel,
        drawn from `generator` (a CPU generator: the same draws on any device)."""
        if x.ndim != 4:
            raise ValueError(f"wanet: expected a (N,C,H,W) batch, got {tuple(x.shape)}")
        n, _, h, w = x.shape
        offsets = torch.rand(n, h, w, 2, generator=generator) * 2 - 1
        offsets = (offsets / torch.tensor([w, h], dtype=torch.float32)).to(x.device, x.dtype)
        grid = (self.cached(x, self._grid) + offsets).clamp(-1, 1)
        return F.grid_sample(x, grid, mode="bilinear", align_corners=True).clamp(0.0, 1.0)


@TRIGGERS.register("sig")
class SIGTrigger(Trigger):
    """SIG (Barni et al. 2019): a horizontal sinusoid added to the image,
    x' = clip(x + v), v(i, j) = delta sin(2 pi j f / W) for column j, in every row and channel.

    A clean-label attack (use it with `label: clean`): only target-class images carry the
    signal in training, their labels untouched. Defaults delta 20/255, f 6 (BackdoorBench).
    The signal has no randomness; the seed is kept for the common interface.
    """

    name = "sig"

    def __init__(
        self,
        seed: int = 0,
        delta: Annotated[float, Field(gt=0, le=1)] = 20 / 255,
        frequency: Annotated[float, Field(gt=0)] = 6.0,
    ) -> None:
        super().__init__(seed)
        if not 0 < delta <= 1 or frequency <= 0:
            raise ConfigError(
                f"sig needs delta in (0, 1] and frequency > 0, got {delta}, {frequency}"
            )
        self.delta, self.frequency = delta, frequency

    def options(self) -> dict[str, Any]:
        return {"delta": self.delta, "frequency": self.frequency}

    def _signal(self, c: int, h: int, w: int) -> torch.Tensor:
        j = torch.arange(w, dtype=torch.float64)
        v = self.delta * torch.sin(2 * math.pi * j * self.frequency / w)
        if v.abs().max() < 1e-3 * self.delta:  # f a multiple of W / 2: sampled at its zeros
            raise ConfigError(
                f"sig: frequency {self.frequency:g} vanishes on images {w} px wide; change it"
            )
        return v.float().expand(1, h, w)

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cached(x, self._signal)


@TRIGGERS.register("lf")
class LowFrequencyTrigger(Trigger):
    """Low frequency (Zeng et al. 2021, "Rethinking the backdoor attacks' triggers: a frequency
    perspective"): a smooth additive pattern with no high-frequency content, x' = clip(x + v),

        v = eps (s - min s) / (max s - min s),   s = F^-1[ F[n] exp(-2 pi^2 sigma^2 |f|^2) ],

    n ~ U(0, 1)^(C, H, W) seeded noise, low-passed by a Gaussian of `sigma` px (in the Fourier
    domain, f in cycles per px, so the pattern wraps around the borders) and min-max scaled over
    all its channels and pixels to [0, eps]: a brightening of at most eps, as BackdoorBench's.

    What differs from the authors: their trigger (BackdoorBench ships it precomputed per dataset
    and model, resource/lowFrequency/*.npy, no file for 28x28 gray digits) is a targeted universal
    adversarial perturbation of a clean model: targeted DeepFool steps on 100 train images, each
    step and the running sum smoothed by a Gaussian of sigma 6 px and the sum min-max scaled to
    [0, 0.2] (0..51 of 255). This is the model-free variant: the same low-pass and scale applied
    to seeded noise instead of a model's adversarial direction. It keeps the paper's point (no
    high-frequency artefacts for a frequency detector to find) but not its head start: the
    authors' pattern already pushes the clean model toward the target, a random smooth one must
    be learnt from the poisoned samples alone. Defaults eps 0.2 and sigma 6 px: BackdoorBench's.
    """

    name = "lf"

    def __init__(
        self,
        seed: int = 0,
        eps: Annotated[float, Field(gt=0, le=1)] = 0.2,
        sigma: Annotated[float, Field(gt=0)] = 6.0,
    ) -> None:
        super().__init__(seed)
        if not 0 < eps <= 1 or sigma <= 0:
            raise ConfigError(f"lf needs eps in (0, 1] and sigma > 0, got eps={eps}, sigma={sigma}")
        self.eps, self.sigma = eps, sigma

    def options(self) -> dict[str, Any]:
        return {"eps": self.eps, "sigma": self.sigma}

    def _pattern(self, c: int, h: int, w: int) -> torch.Tensor:
        noise = torch.rand(c, h, w, generator=self.generator(), dtype=torch.float64)
        fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
        fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
        gain = torch.exp(-2 * math.pi**2 * self.sigma**2 * (fy**2 + fx**2))
        smooth = torch.fft.irfft2(torch.fft.rfft2(noise) * gain, s=(h, w))
        low, high = smooth.min(), smooth.max()
        return (self.eps * (smooth - low) / (high - low).clamp_min(1e-12)).float()

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cached(x, self._pattern)


@TRIGGERS.register("bpp")
class BppTrigger(Trigger):
    """BppAttack (Wang et al. 2022): the image's colour depth squeezed to `squeeze_num` levels
    per channel, x' = round(x (s - 1)) / (s - 1), with Floyd-Steinberg dithering (`dithering`):
    pixels in raster order, each pixel's rounding error (after the errors it received) passed on
    7/16 to the right, 3/16 below left, 5/16 below, 1/16 below right, per channel. As the
    authors' `floydDitherspeed`, except that a level is clipped to [0, 1] before its error is
    taken (theirs can leave the 0..255 range, clipped only later) and levels are not rounded
    back to 8 bits. Sequential over pixels, vectorized over images and channels.

    Defaults: squeeze_num 8 (BackdoorBench) and dithering on, the paper's trigger (BackdoorBench's
    config turns it off: `dithering: false` is plain quantization). Deterministic: the seed is
    kept for the common interface. Left out: the paper's contrastive adversarial training, where
    every batch also holds "negative" samples, perturbed like the trigger but not by it (the
    authors: adversarial examples of the model being trained; BackdoorBench: the image plus
    another image's quantization residual), with their true labels. It is a change to the
    victim's training loop, drawn anew per batch, not a function of the image, so not part of a
    trigger; it sharpens the backdoor (fewer false triggers) and leaves the trigger as it is.

    On gray digits the default is too faint to plant a backdoor (tests/backdoors/
    test_backdoor_run.py: ASR ~5% on mnist-5k after 15 epochs): strokes are 0 or 1, levels
    already, and only their anti-aliased edges move; 1 bit (squeeze_num 2) plants one. The levels
    do not survive a resize: under `data.img_size` the evaluation's stamp (backdoors/metrics.py)
    only approximates what training saw.
    """

    name = "bpp"

    def __init__(
        self,
        seed: int = 0,
        squeeze_num: Annotated[int, Field(ge=2, le=256)] = 8,
        dithering: bool = True,
    ) -> None:
        super().__init__(seed)
        if not 2 <= squeeze_num <= 256:
            raise ConfigError(f"bpp squeeze_num must be in [2, 256], got {squeeze_num}")
        self.squeeze_num, self.dithering = squeeze_num, bool(dithering)

    def options(self) -> dict[str, Any]:
        return {"squeeze_num": self.squeeze_num, "dithering": self.dithering}

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest of the `squeeze_num` levels k / (s - 1), k = 0..s-1."""
        steps = self.squeeze_num - 1
        return (x * steps).round().clamp(0, steps) / steps

    def dither(self, x: torch.Tensor) -> torch.Tensor:
        """Floyd-Steinberg error diffusion of a (N, C, H, W) batch, in level units (float32):
        one step per pixel for every image and channel at once; a finished row's errors reach
        the next row in one vectorized update."""
        steps = self.squeeze_num - 1
        work = x.float() * steps
        rows: list[torch.Tensor] = []
        for i in range(work.shape[-2]):
            olds: list[torch.Tensor] = []  # each pixel's value after the errors it received
            error: torch.Tensor | float = 0.0  # the left neighbour's
            for pixel in work[..., i, :].unbind(-1):
                old = torch.add(pixel, error, alpha=7 / 16)
                olds.append(old)
                error = old - old.round().clamp_(0, steps)
            row = torch.stack(olds, dim=-1)
            rows.append(row)
            if i + 1 < work.shape[-2]:
                errors, below = row - row.round().clamp_(0, steps), work[..., i + 1, :]
                below.add_(errors, alpha=5 / 16)
                below[..., :-1].add_(errors[..., 1:], alpha=3 / 16)
                below[..., 1:].add_(errors[..., :-1], alpha=1 / 16)
        return (torch.stack(rows, dim=-2).round().clamp_(0, steps) / steps).to(x.dtype)

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        return self.dither(x) if self.dithering else self.quantize(x)


def create_trigger(name: str, seed: int = 0, **options: Any) -> Trigger:
    """Build trigger `name` from its keyword options; a bad option is one ConfigError naming it
    (`badnets.size: Input should be greater than or equal to 1, got 0`)."""
    checked = TRIGGERS.check_options(name, options, where=name, supplied={"seed": "pass seed="})
    return TRIGGERS.create(name, seed=seed, **checked)


def trigger_from_spec(spec: dict[str, Any]) -> Trigger:
    """The trigger a `Trigger.spec()` describes."""
    return create_trigger(spec["name"], seed=int(spec.get("seed", 0)), **spec.get("options", {}))
