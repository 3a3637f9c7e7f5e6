"""`load_dataset(name, root, seed, **options)`: every dataset by its registry name.

Importing this module registers the readers: small.py (digits, mnist-5k, fashion-mnist), cifar.py
(cifar10, cifar100), folders.py (imagefolder, miniplaces) and captions.py (mnist-captions,
fashion-captions, digits-captions, image-text).
"""

from __future__ import annotations

import inspect
from typing import Any

from vptlab.data import captions, cifar, folders, small  # noqa: F401  (imported to register their readers)
from vptlab.data.base import DATASETS, DataSplits

# Parameters the loaders pass to the readers themselves, and where a user sets them instead.
DATA_SUPPLIED = {"root": "set it as data.root", "seed": "set it as seed"}


def dataset_options(name: str) -> list[str]:
    """The keyword options a dataset accepts beyond root and seed (e.g. img_size, limit_train)."""
    parameters = inspect.signature(DATASETS.get(name)).parameters
    return [p for p in parameters if p not in ("root", "seed")]


def load_dataset(name: str, root: str | None = None, seed: int = 0, **kwargs: Any) -> DataSplits:
    """Load dataset `name`: [0,1] float32 (N,C,H,W) images, int64 labels, splits fixed by `seed`."""
    reader = DATASETS.get(name)
    DATASETS.check_options(name, kwargs, where="data.options", supplied=DATA_SUPPLIED)
    return reader(root=root, seed=seed, **kwargs)
