"""SimpleNet, the small CNN of the MiniPlaces assignment, with a switch to run it on our own
im2col convolution (`simplenet-customconv`) so both can be trained and compared.

Layout: conv7x7(64) -> ReLU -> maxpool3/2 -> conv1x1(64) -> ReLU -> conv3x3(192) -> ReLU ->
maxpool3/2 -> global average pool -> fc, with BatchNorm after each conv (it trains much faster
on small data and makes the input normalization nearly irrelevant).
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch
from torch import nn

from vptlab.errors import ConfigError
from vptlab.models import MODELS, build_classifier
from vptlab.models.base import StagedCNN
from vptlab.models.custom_conv import CustomConv2d
from vptlab.models.pretrained import load_own_weights

ConvKind = Literal["torch", "custom"]
# Scratch models see gray digits and scenes alike; 0.5/0.5 maps [0,1] to [-1,1] and BatchNorm
# takes care of the rest, so no dataset's statistics are baked in.
SCRATCH_MEAN = (0.5, 0.5, 0.5)
SCRATCH_STD = (0.5, 0.5, 0.5)
# The assignment's stride-2 stem takes a 28x28 digit to 14x14, the 3x3 conv runs at 7x7 and the
# pooled map is 4x4: enough for MNIST (96% after 3 epochs on 4,000 digits) at 2.5x less compute
# per image than a stride-1 stem. Only images smaller than that (8x8 digits, 16x16 thumbnails),
# which stride 2 would pool down to a single pixel, get a stride-1 stem.
SMALL_IMAGE = 28


class SimpleNet(StagedCNN):
    """The MiniPlaces CNN with timm's `forward_features` / `forward_head` / `get_classifier` /
    `forward_intermediates` (one output per stage, `StagedCNN`)."""

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        stem_stride: int = 2,
        conv_layer: ConvKind = "torch",
        batch_norm: bool = True,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        conv = {"torch": nn.Conv2d, "custom": CustomConv2d}[conv_layer]

        def conv_block(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
            # BatchNorm's shift makes the conv bias redundant.
            layers = [conv(cin, cout, kernel, stride, kernel // 2, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(cout))
            return [*layers, nn.ReLU(inplace=True)]

        # Three stages, built in this order (the init's RNG order) and kept as one flat
        # Sequential (the state-dict keys `features.<i>`); `stage_ends` marks where each ends.
        stages = [
            [*conv_block(in_chans, 64, 7, stem_stride), nn.MaxPool2d(3, stride=2, padding=1)],
            conv_block(64, 64, 1),
            [*conv_block(64, 192, 3), nn.MaxPool2d(3, stride=2, padding=1)],
        ]
        self.features = nn.Sequential(*(layer for stage in stages for layer in stage))
        self.stage_ends = list(itertools.accumulate(len(stage) for stage in stages))
        self.num_features = 192
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def stage_modules(self) -> list[nn.Module]:
        """The stages as views of `features` (the same modules): stem + pool, 1x1, 3x3 + pool."""
        starts = [0, *self.stage_ends[:-1]]
        return [self.features[a:b] for a, b in zip(starts, self.stage_ends, strict=True)]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x).flatten(1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes)


def _simplenet(
    num_classes: int,
    img_size: int,
    pretrained: bool | str,
    keep_head: bool,
    conv_layer: ConvKind,
    stem_stride: int | None,
    batch_norm: bool,
    drop_rate: float,
) -> nn.Module:
    if conv_layer not in ("torch", "custom"):
        raise ConfigError(f"model.conv_layer must be 'torch' or 'custom', got {conv_layer!r}")
    if stem_stride is None:
        stem_stride = 1 if img_size < SMALL_IMAGE else 2
    net = SimpleNet(
        num_classes,
        stem_stride=stem_stride,
        conv_layer=conv_layer,
        batch_norm=batch_norm,
        drop_rate=drop_rate,
    )
    load_own_weights("simplenet", net, pretrained, keep_head)
    return build_classifier(net, SCRATCH_MEAN, SCRATCH_STD)


@MODELS.register("simplenet")
def simplenet(
    num_classes: int,
    img_size: int = 224,
    pretrained: bool | str = False,
    keep_head: bool = False,
    conv_layer: ConvKind = "torch",
    stem_stride: int | None = None,
    batch_norm: bool = True,
    drop_rate: float = 0.0,
) -> nn.Module:
    """SimpleNet; `stem_stride=None` picks 1 for images smaller than 28 pixels, else 2."""
    return _simplenet(
        num_classes, img_size, pretrained, keep_head, conv_layer, stem_stride, batch_norm, drop_rate
    )


@MODELS.register("simplenet-customconv")
def simplenet_customconv(
    num_classes: int,
    img_size: int = 224,
    pretrained: bool | str = False,
    keep_head: bool = False,
    stem_stride: int | None = None,
    batch_norm: bool = True,
    drop_rate: float = 0.0,
) -> nn.Module:
    """SimpleNet whose convolutions are `CustomConv2d` (im2col + matmul); same state dict keys."""
    return _simplenet(
        num_classes, img_size, pretrained, keep_head, "custom", stem_stride, batch_norm, drop_rate
    )
