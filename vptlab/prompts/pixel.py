"""Pixel-space visual prompting (Bahng et al. 2022, "Exploring Visual Prompts for Adapting
Large-Scale Models"): a learnable border, patch or perturbation on the input image of a frozen
classifier whose own output classes are mapped to the task's labels (label_mapping.py).

`PixelPrompted(model, prompt, mapping)` is `mapping(model(prompt(x)))`. The prompt acts on pixels
in [0,1] before the model's own normalization, so it works with every registered model (CNNs,
ViTs, TinyViT): nothing inside the net is touched, and its weights and buffers stay bit-identical
(requires_grad False, always in eval mode, also while the prompt trains).

Prompts, each keeping the prompted input in [0,1]:
- `padding` (Bahng's design, as ILM-VP applies it): the image is resized to (S - 2p) and framed by
  a learnable border p pixels wide, so the prompt never covers image content. Frame pixels are
  sigmoid(theta).
- `patch`: a learnable p x p square in the top-left corner (Bahng's fixed patch), pixels
  sigmoid(theta), pasted over the image.
- `full`: clamp(x + eps * tanh(theta), 0, 1), an additive perturbation of every pixel.

Why sigmoid for the frame and patch, a clamp for `full`: frame and patch pixels belong to the
prompt alone, so a squashing function maps any parameter to a valid pixel and keeps a gradient
everywhere (a clamp would zero it once a pixel left [0,1], freezing it there). The full
perturbation is added to an image: x + P must stay additive (P = 0 is the identity, as in the
paper), and no squashing of x + P gives that without distorting the image itself (a sigmoid of
logit(x) + theta is infinite on the exact 0 and 1 pixels MNIST is made of). `clamp_prompted`
gives the input its true gradient (attacks see the prompted model as it is) and the prompt a
one-sided one on the faces of [0,1], so a zero-initialized prompt can still learn to change a
black or white pixel.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vptlab.config import PixelConfig
from vptlab.errors import ConfigError, DataError
from vptlab.prompts.label_mapping import LabelMapping, prediction_counts
from vptlab.registry import Registry

# Pixel-prompt kinds by name (adapt.pixel.kind); each takes image_size, size, eps, channels.
PIXEL_PROMPTS = Registry["PixelPrompt"]("pixel prompt")


class _PromptClamp(torch.autograd.Function):
    """clamp(x + prompt, 0, 1) with one gradient rule per argument (see `clamp_prompted`)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        v = x + prompt
        ctx.save_for_backward(v)
        ctx.shapes = (x.shape, prompt.shape)
        return v.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        (v,) = ctx.saved_tensors
        x_shape, prompt_shape = ctx.shapes
        grad_x = grad_prompt = None
        if ctx.needs_input_grad[0]:
            # The input's true derivative on the closed box: 1 wherever clamp is the identity,
            # faces included (there torch.clamp returns 0, which would blind an attacker on every
            # black or white pixel), 0 where the prompt pushed the pixel past a face.
            grad_x = (grad * ((v >= 0) & (v <= 1))).sum_to_size(x_shape)
        if ctx.needs_input_grad[1]:
            # The prompt's own training signal. On a face (a pixel exactly 0 or 1, as MNIST's
            # are) it passes only when a descent step (-grad) moves the pixel inside: torch's
            # zero there would keep a zero-initialized prompt from ever dimming a saturated pixel,
            # and a two-way gradient would push it out where it changes nothing. Beyond a face
            # it is 0, as torch's: a pixel the prompt has blanked stays blanked (passing the
            # inward gradient there let clean batches pull the prompt defense's blanking of a
            # trigger back: ASR 6% -> 42% on the test fixture's backdoored CNN).
            inside = (v > 0) & (v < 1)
            inward = ((v == 0) & (grad < 0)) | ((v == 1) & (grad > 0))
            grad_prompt = (grad * (inside | inward)).sum_to_size(prompt_shape)
        return grad_x, grad_prompt


def clamp_prompted(x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """clamp(x + prompt, 0, 1): the one pixel clamp of every additive prompt in vptlab.

    Its value is torch's clamp. Its gradients differ by argument: the input `x` gets the true
    derivative of the prompted model (so a zero prompt leaves an attack exactly the bare model's
    gradient), while `prompt` gets a one-sided surrogate that only its own optimizer reads.
    `prompt` broadcasts against `x` (one prompt for the batch).
    """
    return _PromptClamp.apply(x, prompt)


class PixelPrompt(nn.Module):
    """(B, C, S, S) pixels in [0,1] -> prompted pixels in [0,1], for one input size S."""

    def __init__(self, image_size: int, channels: int = 3) -> None:
        super().__init__()
        self.image_size, self.channels = image_size, channels

    def check_input(self, x: torch.Tensor) -> None:
        expected = (self.channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise DataError(
                f"the pixel prompt was built for (B, {', '.join(map(str, expected))}) inputs, "
                f"got {tuple(x.shape)}; set data.img_size to the size it was trained at"
            )


class PaddingPrompt(PixelPrompt):
    """The image resized to S - 2p inside a learnable frame p pixels wide (sigmoid pixels).

    The four sides are separate tensors, as in Bahng et al.'s `PadPrompter`: up and down are
    p x S, left and right (S - 2p) x p, so the trainable count is exactly the frame's pixels.
    """

    def __init__(self, image_size: int, width: int, channels: int = 3) -> None:
        super().__init__(image_size, channels)
        inner = image_size - 2 * width
        if width < 1 or inner < 1:
            raise ConfigError(
                f"adapt.pixel.size: a padding frame {width} px wide leaves no image inside "
                f"{image_size} px inputs; use a width below {(image_size + 1) // 2}"
            )
        self.width, self.inner = width, inner
        self.up = nn.Parameter(torch.zeros(1, channels, width, image_size))
        self.down = nn.Parameter(torch.zeros(1, channels, width, image_size))
        self.left = nn.Parameter(torch.zeros(1, channels, inner, width))
        self.right = nn.Parameter(torch.zeros(1, channels, inner, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        # Antialiased bilinear weights are non-negative and sum to 1: the image stays in [0,1].
        inner = F.interpolate(
            x, size=(self.inner, self.inner), mode="bilinear", antialias=True, align_corners=False
        )
        b, dtype = x.shape[0], inner.dtype

        def side(p: nn.Parameter) -> torch.Tensor:
            return torch.sigmoid(p).to(dtype).expand(b, -1, -1, -1)

        middle = torch.cat([side(self.left), inner, side(self.right)], dim=3)
        return torch.cat([side(self.up), middle, side(self.down)], dim=2)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, width={self.width}"


class PatchPrompt(PixelPrompt):
    """A learnable p x p square (sigmoid pixels) pasted over the image's top-left corner."""

    def __init__(self, image_size: int, size: int, channels: int = 3) -> None:
        super().__init__(image_size, channels)
        if not 1 <= size <= image_size:
            raise ConfigError(
                f"adapt.pixel.size: a {size} px patch does not fit {image_size} px inputs"
            )
        self.size = size
        self.patch = nn.Parameter(torch.zeros(1, channels, size, size))
        mask = torch.zeros(1, 1, image_size, image_size, dtype=torch.bool)
        mask[..., :size, :size] = True
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        rest = self.image_size - self.size
        patch = F.pad(torch.sigmoid(self.patch).to(x.dtype), (0, rest, 0, rest))
        return torch.where(self.mask, patch, x)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}, size={self.size}"


class FullPrompt(PixelPrompt):
    """clamp(x + eps * tanh(theta), 0, 1) over the whole image (`clamp_prompted`).

    `frame`: the perturbation only on a border `frame` input pixels wide (a padding prompt,
    Bahng et al. 2022). `resize`: inputs of any size are taken, the stored `image_size` x
    `image_size` perturbation resized to theirs (bilinear, antialiased): the prompt defense's
    prompt (defenses/prompt_defense.py).
    """

    def __init__(
        self,
        image_size: int,
        eps: float,
        channels: int = 3,
        frame: int | None = None,
        resize: bool = False,
    ) -> None:
        super().__init__(image_size, channels)
        if not 0 < eps <= 1:
            raise ConfigError(f"adapt.pixel.eps must be in (0, 1], got {eps}")
        self.eps, self.frame, self.resize = eps, frame, resize
        self.delta = nn.Parameter(torch.zeros(1, channels, image_size, image_size))

    def perturbation(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """eps * tanh(theta), (1, C, H, W); with `like`, at its size and in its dtype."""
        prompt = self.eps * torch.tanh(self.delta)
        if like is None:
            return prompt
        size = tuple(like.shape[-2:])
        if tuple(prompt.shape[-2:]) != size:
            prompt = F.interpolate(prompt, size=size, mode="bilinear", antialias=True)
        if self.frame is not None:
            h, w = size
            inner = torch.zeros(h, w, device=prompt.device, dtype=torch.bool)
            inner[self.frame : h - self.frame, self.frame : w - self.frame] = True
            prompt = prompt.masked_fill(inner, 0.0)
        return prompt.to(like.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.resize:
            self.check_input(x)
        return clamp_prompted(x, self.perturbation(x))

    def extra_repr(self) -> str:
        frame = f", frame={self.frame}" if self.frame is not None else ""
        resize = ", resize=True" if self.resize else ""
        return f"image_size={self.image_size}, eps={self.eps:g}{frame}{resize}"


def create_pixel_prompt(
    kind: str, image_size: int, size: int = 30, eps: float = 1.0, channels: int = 3
) -> PixelPrompt:
    """The registered pixel prompt `kind` (`PIXEL_PROMPTS`): `padding` (frame width `size`),
    `patch` (side `size`) or `full` (bound `eps`)."""
    PIXEL_PROMPTS.require(kind, "adapt.pixel.kind")
    return PIXEL_PROMPTS.create(kind, image_size=image_size, size=size, eps=eps, channels=channels)


# Every kind is built from the same keywords (adapt.pixel's size and eps); each reads its own.
@PIXEL_PROMPTS.register("padding")
def _padding(image_size: int, size: int, eps: float, channels: int) -> PixelPrompt:
    return PaddingPrompt(image_size, size, channels)


@PIXEL_PROMPTS.register("patch")
def _patch(image_size: int, size: int, eps: float, channels: int) -> PixelPrompt:
    return PatchPrompt(image_size, size, channels)


@PIXEL_PROMPTS.register("full")
def _full(image_size: int, size: int, eps: float, channels: int) -> PixelPrompt:
    return FullPrompt(image_size, eps, channels)


class PixelPrompted(nn.Module):
    """`mapping(model(prompt(x)))` around a frozen classifier that takes pixels in [0,1].

    The one prompted-input wrapper: an attacker's or user's pixel prompt (adapt.mode pixel,
    with a label mapping) and the prompt defense's (`mapping=None`: the model's own outputs).
    The wrapped model is frozen here (requires_grad False) and kept in eval mode by `train()`,
    except modules given a trainable parameter of their own afterwards (VPT prompts the
    defense trains): only those, the prompt and a linear mapping's head train.
    `forward_features` and `forward_intermediates` see the prompted input and the model's
    features; `forward_head` maps the model's logits; `get_classifier()` is the mapping (the
    model's classifier without one). Extra forward arguments reach the model (an image-text
    model's `text=` tokens). State dict: `model.*` (the backbone, unchanged), `prompt.*`,
    `mapping.*`.

    Shape: x (B, C, S, S) in [0,1] with S the prompt's `image_size` -> (B, num_classes) logits.

    Example::

        net = create_model("tf_efficientnet_lite0", num_classes=1000, img_size=64,
                           pretrained=True)  # 1000 classes: ImageNet's head kept
        model = PixelPrompted(net, PaddingPrompt(64, 8), LabelMapping("frequency", 1000, 10))
        model.remap(batches)  # the frozen model's predictions choose the mapping
    """

    mode = "pixel"

    def __init__(
        self, model: nn.Module, prompt: PixelPrompt, mapping: LabelMapping | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.prompt = prompt
        self.mapping = mapping
        model.requires_grad_(False)
        weight = next(model.parameters(), None)
        if weight is not None:
            prompt.to(weight.device)
            if mapping is not None:
                mapping.to(weight.device)
        self.train(model.training)

    @property
    def backbone_file(self) -> str | None:
        return getattr(self.model, "backbone_file", None)

    @property
    def backbone_sha256(self) -> str | None:
        return getattr(self.model, "backbone_sha256", None)

    @property
    def normalize(self) -> nn.Module:
        return self.model.normalize

    @property
    def legacy_keys(self) -> dict[str, str]:
        """Checkpoint keys of older versions -> today's (engine/checkpoint.py `load_model`): the
        prompt defense's wrapper kept its prompt as one tensor, `prompt`."""
        if isinstance(self.prompt, FullPrompt) and self.prompt.resize:
            return {"prompt": "prompt.delta"}
        return {}

    def train(self, mode: bool = True) -> PixelPrompted:
        super().train(mode)
        # The frozen model: no dropout, no BatchNorm statistic updates. Only modules with a
        # trainable parameter of their own (VPT prompts made trainable) train.
        self.model.train(False)
        if mode:
            for module in self.model.modules():
                if any(p.requires_grad for p in module.parameters(recurse=False)):
                    module.train(True)
        return self

    def source_logits(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The frozen model's own outputs on the prompted input (B, source_classes)."""
        return self.model(self.prompt(x), *args, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.source_logits(x, *args, **kwargs)
        return out if self.mapping is None else self.mapping(out)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(self.prompt(x))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        out = self.model.forward_head(features, pre_logits=pre_logits)
        return out if pre_logits or self.mapping is None else self.mapping(out)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The model's `forward_intermediates` (timm's signature) on the prompted input."""
        return self.model.forward_intermediates(self.prompt(x), *args, **kwargs)

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier() if self.mapping is None else self.mapping

    @torch.no_grad()
    def prediction_counts(
        self, batches: Iterable[Any], amp_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """counts[j, s] over `batches` of (x, y, ...): how many images of label j the prompted
        frozen model predicts as its class s. Run in eval mode; the mode is restored."""
        if self.mapping is None:
            raise ConfigError("prediction_counts needs a label mapping; this prompt has none")
        was_training = self.training
        self.eval()
        m = self.mapping
        counts = torch.zeros(m.num_classes, m.source_classes, dtype=torch.long)
        try:
            for x, y, *_ in batches:
                with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    pred = self.source_logits(x).argmax(1)
                counts += prediction_counts(pred, y, m.num_classes, m.source_classes)
        finally:
            self.train(was_training)
        return counts

    def remap(self, batches: Iterable[Any]) -> torch.Tensor:
        """Choose a frequency mapping from `batches` (the train split): `LabelMapping.assign` on
        `prediction_counts`. The engine calls this through `LabelRemap` (vptlab/engine/hooks.py)
        before the first epoch (`frequency`) or before every epoch (`iterative`)."""
        counts = self.prediction_counts(batches)
        assert self.mapping is not None  # prediction_counts checked it
        return self.mapping.assign(counts)


def pixel_prompted(
    model: nn.Module, cfg: PixelConfig, num_classes: int, image_size: int
) -> PixelPrompted:
    """`model` (whose own classifier has `cfg.source_classes` outputs) wrapped with the prompt and
    label mapping `cfg` describes, for `num_classes` task labels and `image_size` inputs."""
    normalize = getattr(model, "normalize", None)
    channels = int(normalize.mean.shape[1]) if normalize is not None else 3
    outputs = getattr(model.get_classifier(), "out_features", None)
    if outputs is not None and outputs != cfg.source_classes:
        raise ConfigError(
            f"adapt.pixel.source_classes is {cfg.source_classes}, but the model's classifier has "
            f"{outputs} outputs"
        )
    prompt = create_pixel_prompt(cfg.kind, image_size, cfg.size, cfg.eps, channels)
    mapping = LabelMapping(cfg.mapping, cfg.source_classes, num_classes)
    return PixelPrompted(model, prompt, mapping)
