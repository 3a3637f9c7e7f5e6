"""Datasets (each returns [0,1] float images and int64 labels), seeded splits and device loaders."""

from __future__ import annotations

from vptlab.data.base import DATASETS, DataSplits, TensorSplit, subset
from vptlab.data.datasets import dataset_options, load_dataset
from vptlab.data.folders import ImageFileDataset
from vptlab.data.loaders import (
    BatchAugment,
    StreamLoader,
    TensorLoader,
    make_loader,
    resize,
    to_rgb,
)
from vptlab.data.safe_pickle import safe_load

__all__ = [
    "DATASETS",
    "BatchAugment",
    "DataSplits",
    "ImageFileDataset",
    "StreamLoader",
    "TensorLoader",
    "TensorSplit",
    "dataset_options",
    "load_dataset",
    "make_loader",
    "resize",
    "safe_load",
    "subset",
    "to_rgb",
]
