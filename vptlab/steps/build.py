"""Turn a resolved config into its dataset, its (adapted) model, its training task and evaluators.

This is the floor that composes the others: it imports the objectives and repairers of
`vptlab.defenses`, which import the engine's lower modules (the task protocol, checkpoint files;
repairers also the loop they train with), never this one or the runner.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from vptlab.backdoors.metrics import BackdoorAccuracy, BackdoorThreat
from vptlab.backdoors.poison import PoisonRecord, poison_data, poison_trigger
from vptlab.config import ExperimentConfig, PixelConfig
from vptlab.data import dataset_options, load_dataset
from vptlab.data.base import DataSplits, TensorSplit, hold_out
from vptlab.defenses.adversarial import RobustProbe, probe_size
from vptlab.defenses.repair import create_repairer
from vptlab.engine.evaluators import Evaluator, TestAccuracy, ZeroShotAccuracy
from vptlab.engine.hooks import EpochHook, LabelRemap
from vptlab.engine.tasks import Task, create_objective
from vptlab.errors import ConfigError
from vptlab.models import create_model
from vptlab.models.clip import (
    DEFAULT_TEMPLATES,
    IMAGE_TEXT_MODELS,
    LinearProbeHead,
    clip_net,
    is_clip,
)
from vptlab.prompts import adapt
from vptlab.prompts.label_mapping import DATA_MAPPINGS


def build_data(cfg: ExperimentConfig, saved: PoisonRecord | None = None) -> DataSplits:
    """Load the dataset; `data.img_size` reaches folder readers here and the loaders per batch.

    With the robust probe on (`train.robust_probe`), `probe_size` samples drawn by the seed leave
    the train split for `data.probe` (the probe's held-out slice; data/base.py `hold_out`), so
    the model never trains on them. With `data.poison`, the train split is poisoned
    (backdoors/poison.py: a new split beside the clean one, carrying its record as `.poison`);
    the test split stays clean. `saved`: the run's poison record, whose fitted trigger and
    poisoned samples a reload takes as trained (`poison_split`).
    """
    dcfg = cfg.data
    options = dict(dcfg.options)
    if dcfg.img_size is not None and "img_size" in dataset_options(dcfg.name):
        options.setdefault("img_size", dcfg.img_size)
    data = load_dataset(dcfg.name, root=dcfg.root, seed=cfg.seed, **options)
    if probe_size(cfg.train) > 0:
        # Held out of the clean split, before poisoning: the probe's samples keep their true
        # labels and no trigger, and the poison record's indices are those of the split the model
        # trains on (poisoning after the cut needs no index remapping).
        data = hold_out_probe(data, probe_size(cfg.train), cfg.seed)
    if dcfg.poison is not None:
        data = poison_data(data, dcfg.poison, seed=cfg.seed, saved=saved)
    return data


def hold_out_probe(data: DataSplits, size: int, seed: int) -> DataSplits:
    """`data` with `size` train samples moved to `data.probe` (seeded: the same on resume,
    `load_run` and every DDP rank)."""
    available = len(data.train)  # type: ignore[arg-type]
    if size >= available:
        raise ConfigError(
            f"train.robust_probe: {size} held-out samples would leave none of the {available} "
            f"of {data.name}'s train split to train on; lower it (0 turns the probe off)"
        )
    train, probe = hold_out(data.train, size, seed)
    return replace(data, train=train, probe=probe)


def image_size(splits: DataSplits, cfg: ExperimentConfig) -> int:
    if cfg.data.img_size is not None:
        return cfg.data.img_size
    split = splits.train
    if isinstance(split, TensorSplit):
        return int(split.x.shape[-1])
    return int(split[0][0].shape[-1])


def build_model(cfg: ExperimentConfig, num_classes: int, img_size: int) -> nn.Module:
    # A path may also be a run's own model.safetensors (e.g. the cached offline backbone):
    # the models' loader strips our `net.` prefix and keeps its head only with model.keep_head.
    # A pixel prompt keeps the model's own classifier (its classes are what the label mapping
    # maps); the task's labels reach it through the mapping.
    # An image-text model's classifier is made from the data's class names (_adapt_clip).
    pixel = cfg.adapt.mode == "pixel" and cfg.model.name not in IMAGE_TEXT_MODELS
    model = create_model(
        cfg.model.name,
        num_classes=cfg.adapt.pixel_prompt.source_classes if pixel else num_classes,
        img_size=img_size,
        pretrained=cfg.model.pretrained,
        keep_head=cfg.model.keep_head or pixel,
        **cfg.model.options,
    )
    pixel_cfg = cfg.adapt.pixel_prompt
    if is_clip(model):
        pixel_cfg = _adapt_clip(model, cfg, num_classes)
    model = adapt(
        model, cfg.adapt.mode, cfg.adapt.prompt, pixel_cfg,
        num_classes=num_classes, img_size=img_size,
    )  # fmt: skip
    if cfg.defense is not None:
        # A defended run's structure (a pruning mask...), so that its saved weights load.
        model = create_repairer(cfg.defense.name, **cfg.defense.options).prepare(model)
    return model


def _adapt_clip(model: nn.Module, cfg: ExperimentConfig, num_classes: int) -> PixelConfig:
    """An image-text model's head for its adaptation mode; its pixel prompt's settings.

    Its classifier is the data's class prompts embedded by the text tower (fixed): mode full trains
    the towers under it, linear swaps it for a linear probe started at it (LinearProbeHead), and
    pixel puts a prompt in front of it, its outputs already the task's classes (the text-based
    zero-shot head of Bahng et al.), so the mapping maps num_classes onto num_classes. VPT's token
    prompts would train nothing of the head, and are refused.
    """
    mode, net = cfg.adapt.mode, clip_net(model)
    if mode == "linear":
        net.use_head(LinearProbeHead, num_classes)
    elif mode == "pixel":
        return cfg.adapt.pixel_prompt.model_copy(update={"source_classes": num_classes})
    elif mode != "full":
        raise ConfigError(
            f"adapt.mode: {cfg.model.name} adapts in mode full, linear or pixel, got {mode}"
        )
    return cfg.adapt.pixel_prompt


def build_experiment(
    cfg: ExperimentConfig, saved: PoisonRecord | None = None
) -> tuple[DataSplits, nn.Module]:
    """Data (`saved`: see `build_data`) and adapted model of a config; seeded, so the same
    config gives the same start."""
    torch.manual_seed(cfg.seed)
    data = build_data(cfg, saved)
    model = build_model(cfg, data.num_classes, image_size(data, cfg))
    if is_clip(model):
        # An image-text model classifies through its text tower: the head starts as the
        # (pretrained) zero-shot classifier of the data's classes; a run's saved head replaces it.
        clip_net(model).set_zero_shot_head(*zero_shot_prompts(data))
    return data, model


def zero_shot_prompts(data: DataSplits) -> tuple[list[str], list[str]]:
    """The class names and templates an image-text model classifies `data` with."""
    classes = data.classes or [str(i) for i in range(data.num_classes)]
    return classes, data.templates or list(DEFAULT_TEMPLATES)


def build_task(
    cfg: ExperimentConfig, data: DataSplits | None = None, model: nn.Module | None = None
) -> Task:
    """The loss of `train.objective` (`vptlab.engine.tasks.OBJECTIVES`): standard, clip
    (contrastive pretraining on the train split's captions, tokenized once with the model's
    tokenizer, so it needs `data` and `model`), or adversarial (pgd, fgsm_rs, trades: see
    defenses/adversarial.py)."""
    return create_objective(cfg.train, model=model, data=data)


def build_evaluators(
    cfg: ExperimentConfig, data: DataSplits, run_dir: str | Path, task: Task | None = None
) -> list[Evaluator]:
    """Clean test accuracy (zero-shot for objective clip), plus the robust-accuracy probe when
    `train.robust_probe` asks for it (by default: adversarial objectives), plus ASR and RA of
    the trigger on the test split when the train split is poisoned (`data.poison`): the trigger
    of the train split's poison record, so a fitted trigger is evaluated as it was fitted.

    The probe attacks `data.probe` (held out of the train split by `build_data`) at the eps the
    training `task` has reached (its eps ramp), or at `train.attack.eps` for a task without one.
    """
    evaluators: list[Evaluator] = [TestAccuracy(data.test)]
    if cfg.train.objective == "clip":  # the text tower trains: rebuild the head, then score
        evaluators = [ZeroShotAccuracy(data.test, *zero_shot_prompts(data))]
    poison = cfg.data.poison
    if poison is not None:
        # The poisoned split's own trigger: a fitted one (TrojanNN ...) is what was learnt there.
        record = getattr(data.train, "poison", None)
        trigger = record.trigger if record is not None else poison_trigger(poison, cfg.seed)
        threat = BackdoorThreat(trigger, poison.target, poison.mode,
                                num_classes=data.num_classes)  # fmt: skip
        evaluators.append(BackdoorAccuracy(data.test, threat))
    tcfg = cfg.train
    if probe_size(tcfg) > 0:
        if data.probe is None:
            raise ValueError("train.robust_probe is on but the data hold no probe slice: "
                             "build them with build_data (or build_experiment)")  # fmt: skip
        evaluators.append(
            RobustProbe(data.probe, tcfg.attack, eps=getattr(task, "current_eps", None),
                        run_dir=run_dir, keep_best=tcfg.keep_best_robust,
                        trainable_only=cfg.adapt.frozen_backbone)  # fmt: skip
        )
    return evaluators


def build_epoch_hooks(cfg: ExperimentConfig, data: DataSplits) -> list[EpochHook]:
    """A pixel prompt's frequency / iterative label mapping, chosen from the frozen model's
    predictions on the (possibly poisoned) train split before the first / every epoch."""
    if cfg.adapt.mode != "pixel" or cfg.adapt.pixel_prompt.mapping not in DATA_MAPPINGS:
        return []
    return [LabelRemap(data.train, every_epoch=cfg.adapt.pixel_prompt.mapping == "iterative")]
