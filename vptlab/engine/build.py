"""Turn a resolved config into its dataset and its (adapted) model."""

from __future__ import annotations

from torch import nn

from vptlab.config import ExperimentConfig
from vptlab.data import load_dataset
from vptlab.data.base import DataSplits, TensorSplit
from vptlab.data.loaders import resize
from vptlab.engine.checkpoint import is_vptlab_checkpoint, load_backbone
from vptlab.models import create_model
from vptlab.prompts import PromptConfig, adapt


def build_data(cfg: ExperimentConfig) -> DataSplits:
    dcfg = cfg.data
    options = dict(dcfg.options)
    splits = load_dataset(dcfg.name, root=dcfg.root, seed=cfg.seed, **options)
    if dcfg.img_size is not None:
        for split in (splits.train, splits.test):
            if isinstance(split, TensorSplit) and split.x.shape[-1] != dcfg.img_size:
                split.x = resize(split.x, dcfg.img_size)
    return splits


def image_size(splits: DataSplits, cfg: ExperimentConfig) -> int:
    if cfg.data.img_size is not None:
        return cfg.data.img_size
    split = splits.train
    if isinstance(split, TensorSplit):
        return int(split.x.shape[-1])
    return int(split[0][0].shape[-1])


def build_model(cfg: ExperimentConfig, num_classes: int, img_size: int) -> nn.Module:
    pretrained = cfg.model.pretrained
    # A backbone we trained ourselves (e.g. the cached offline one) has our own key layout.
    own_backbone = isinstance(pretrained, str) and is_vptlab_checkpoint(pretrained)
    model = create_model(
        cfg.model.name,
        num_classes=num_classes,
        img_size=img_size,
        pretrained=False if own_backbone else pretrained,
        **cfg.model.options,
    )
    if own_backbone:
        load_backbone(model, pretrained)
    p = cfg.adapt.prompt
    prompt = PromptConfig(num_prompts=p.num_prompts, deep=p.deep, depth=p.depth, dropout=p.dropout)
    return adapt(model, cfg.adapt.mode, prompt)
