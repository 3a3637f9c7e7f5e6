"""Tiny, seeded ViT and TinyViT classifiers for the prompt tests (built in milliseconds).

Tests reach the builders through fixtures (`tiny_vit`, `tiny_tinyvit`, `builders`, `images`)
rather than `from conftest import ...`: with no `__init__.py`, every conftest.py is a top-level
module named `conftest`, so such an import gets whichever one pytest loaded last (tests/data's,
for instance, when both folders are on the command line).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from timm.models.tiny_vit import TinyVit
from timm.models.vision_transformer import VisionTransformer

from vptlab.models.base import IMAGENET_MEAN, IMAGENET_STD, ImageClassifier


def build_tiny_vit(seed: int = 0, **kwargs) -> ImageClassifier:
    torch.manual_seed(seed)
    cfg = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=10)
    net = VisionTransformer(**(cfg | kwargs))
    return ImageClassifier(net, IMAGENET_MEAN, IMAGENET_STD).eval()


def build_tiny_tinyvit(seed: int = 0, **kwargs) -> ImageClassifier:
    # TinyVit takes any input size. At 64 px the attention stages see 8x8 (window 4: 4 windows),
    # 4x4 (window 3: padded to 6x6) and 2x2 (window 2: no partition): every path of the block.
    torch.manual_seed(seed)
    cfg = dict(
        num_classes=10,
        embed_dims=[8, 16, 24, 32],
        depths=[1, 2, 1, 1],
        num_heads=[1, 2, 3, 4],
        window_sizes=[4, 4, 3, 2],
        drop_path_rate=0.0,
    )
    net = TinyVit(**(cfg | kwargs))
    return ImageClassifier(net, IMAGENET_MEAN, IMAGENET_STD).eval()


BUILDERS: dict[str, Callable[..., ImageClassifier]] = {
    "vit": build_tiny_vit,
    "tinyvit": build_tiny_tinyvit,
}
IMG_SIZE = {"vit": 32, "tinyvit": 64}


@pytest.fixture(params=sorted(BUILDERS))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def make_images(kind: str, n: int = 4, seed: int = 1) -> torch.Tensor:
    """`n` seeded random images of the size the `kind` model takes."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, IMG_SIZE[kind], IMG_SIZE[kind], generator=g)


@pytest.fixture
def tiny_vit() -> Callable[..., ImageClassifier]:
    """`tiny_vit(seed=0, **VisionTransformer kwargs)` builds a 32 px ViT in eval mode."""
    return build_tiny_vit


@pytest.fixture
def tiny_tinyvit() -> Callable[..., ImageClassifier]:
    """`tiny_tinyvit(seed=0, **TinyVit kwargs)` builds a TinyViT (64 px inputs) in eval mode."""
    return build_tiny_tinyvit


@pytest.fixture
def builders() -> dict[str, Callable[..., ImageClassifier]]:
    """The builders by `kind`: "vit" and "tinyvit"."""
    return dict(BUILDERS)


@pytest.fixture
def images() -> Callable[..., torch.Tensor]:
    """`images(kind, n=4, seed=1)`: seeded random inputs sized for that kind of model."""
    return make_images


@pytest.fixture(autouse=True)
def one_thread():
    # Models this small gain nothing from intra-op threads and lose a lot to their hand-offs
    # when the cores are shared; restored afterwards for the other test folders.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
