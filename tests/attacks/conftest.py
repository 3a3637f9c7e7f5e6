"""A small digits classifier trained in about a second, and the digits it is attacked on.

The model is a two-conv CNN with BatchNorm and dropout (so train and eval mode differ) behind the
package's `ImageClassifier`, which normalizes [0,1] pixels itself as every vptlab model does.
SimpleNet would do the same job but takes close to a minute to train on two shared cores.
Tests reach these through fixtures, not imports (see tests/prompts/conftest.py for why).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vptlab.data import load_dataset
from vptlab.models import build_classifier
from vptlab.models.base import ImageClassifier


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: these models are tiny, and on two cores shared with other jobs two
    threads mostly wait on each other (the authors' AutoAttack on 32 digits took 181 s with two
    threads under load, 11 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cnn(seed: int = 0) -> ImageClassifier:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(32 * 4 * 4, 10),
    )
    return build_classifier(net, (0.5,) * 3, (0.5,) * 3)


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): 8x8 digits repeated to 3 channels, pixels in [0,1]."""
    data = load_dataset("digits", seed=0)
    rgb = lambda x: x.expand(-1, 3, -1, -1).contiguous()  # noqa: E731
    return rgb(data.train.x), data.train.y, rgb(data.test.x), data.test.y


def train_tiny_cnn(digits: tuple[torch.Tensor, ...], epochs: int = 8) -> ImageClassifier:
    x, y = digits[0], digits[1]
    model = tiny_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=order)
        for i in range(0, len(x), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def trained(digits: tuple[torch.Tensor, ...]) -> ImageClassifier:
    """The tiny CNN trained on the digits (about 97% test top-1), in eval mode."""
    return train_tiny_cnn(digits)


@pytest.fixture(scope="session")
def make_tiny_cnn() -> Callable[[int], ImageClassifier]:
    return tiny_cnn
