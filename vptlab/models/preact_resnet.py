"""PreAct-ResNet18 (He et al. 2016, identity mappings), BackdoorBench's CIFAR-10 model, so that
vptlab's backdoor numbers can be set beside BackdoorBench's on the same network.

The layout is BackdoorBench's `models/preact_resnet.py`: a 3x3 stem conv (64, stride 1, for
32x32 inputs), four stages of two pre-activation basic blocks (64, 128, 256, 512; stride 2 from
the second stage, a 1x1 conv shortcut where the shape changes), global average pooling and a
linear head; no BatchNorm-ReLU after the last stage, as there. Scratch weights only (the
benchmark trains it from scratch); at 11.2M parameters and stride-1 stem it is a GPU model:
the CPU presets use SimpleNet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vptlab.models import MODELS, build_classifier
from vptlab.models.base import StagedCNN
from vptlab.models.pretrained import load_own_weights
from vptlab.models.simplenet import SCRATCH_MEAN, SCRATCH_STD


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the shortcut, taken after the first BN-ReLU when it
    is a 1x1 conv (the block changes shape), else the identity."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(StagedCNN):
    """PreAct-ResNet with timm's `forward_features` / `forward_head` / `get_classifier` /
    `forward_intermediates` (`StagedCNN`: one output per stage, the stem inside the first)."""

    def __init__(
        self, num_classes: int, blocks: tuple[int, ...] = (2, 2, 2, 2), in_chans: int = 3
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        planes, stages = 64, []
        for i, (width, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            layers = []
            for j in range(count):
                layers.append(PreActBlock(planes, width, 2 if i > 0 and j == 0 else 1))
                planes = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = planes
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(planes, num_classes)

    def stage_modules(self) -> list[nn.Module]:
        return [nn.Sequential(self.conv1, self.layer1), self.layer2, self.layer3, self.layer4]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stage_modules():
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int) -> None:
        self.linear = nn.Linear(self.num_features, num_classes)


@MODELS.register("preact-resnet18")
def preact_resnet18(
    num_classes: int,
    img_size: int = 32,
    pretrained: bool | str = False,
    keep_head: bool = False,
    blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
) -> nn.Module:
    """PreAct-ResNet18 as BackdoorBench trains it (scratch; `pretrained`: a file of our own);
    `blocks`: blocks per stage, 18 layers at the default (fewer for quick tests)."""
    net = PreActResNet(num_classes, blocks)
    load_own_weights("preact-resnet18", net, pretrained, keep_head)
    return build_classifier(net, SCRATCH_MEAN, SCRATCH_STD)
