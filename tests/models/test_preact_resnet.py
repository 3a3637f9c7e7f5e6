"""PreAct-ResNet18, BackdoorBench's model: its size and layout are theirs, and the backdoor
defenses find the layers they work on (fp's last feature map, NAD's stages)."""

from __future__ import annotations

import torch

from vptlab.defenses.fine_pruning import pruning_site
from vptlab.models import create_model


def test_preact_resnet18_has_backdoorbenchs_size_and_stages() -> None:
    torch.manual_seed(0)
    model = create_model("preact-resnet18", num_classes=10).eval()
    # 11,171,146 parameters at 10 classes, as PreActResNet18 in BackdoorBench's models/.
    assert sum(p.numel() for p in model.parameters()) == 11_171_146
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        stages = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(s.shape[1:]) for s in stages] == [(64, 32, 32), (128, 16, 16), (256, 8, 8),
                                                    (512, 4, 4)]  # fmt: skip
    assert pruning_site(model) == ("net.layer4", 1, 512)
    with torch.no_grad():
        assert torch.allclose(model.forward_head(stages[-1]), model(x), atol=1e-5)
