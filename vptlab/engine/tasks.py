"""Training objectives for the one loop: a task turns a batch into (loss, logits).

`ClassificationTask` is cross-entropy on labels; `ContrastiveTask` is CLIP's symmetric InfoNCE on
image-text pairs (`train.objective: clip`).

A task gets the model the step runs through (maybe wrapped in DDP or compiled) and the bare model
beside it: an inner attack (adversarial training) or a frozen teacher's hooks (distillation) run
on the bare model, so they neither trigger DDP's gradient sync nor recompile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from vptlab.data.base import TensorSplit
from vptlab.data.captions import split_captions
from vptlab.data.loaders import Batch
from vptlab.errors import ConfigError
from vptlab.models.clip import clip_net, is_clip
from vptlab.registry import Registry

if TYPE_CHECKING:
    from vptlab.config import TrainConfig
    from vptlab.data.base import DataSplits


class Task(Protocol):
    """What the loop asks of an objective; adversarial training and distillation are tasks too.

    A task may also define `set_progress(epochs_done: float)`: the loop then calls it before
    every step with the epoch plus the fraction of it done (vptlab/defenses/adversarial.py ramps
    its eps with it); and `correct(logits, batch) -> tensor`, the count of right answers the
    loop's train accuracy sums (default: argmax == label; the contrastive task counts captions
    retrieved in the batch instead).

    A task with phases (ABL, vptlab/defenses/abl.py) may also define, all optional:
    - `before_epoch(model, ctx, epoch)`: run with the bare model and the `EvalContext` before
      each epoch's first step, as the loop's epoch hooks (not when resuming inside an epoch);
    - `skip(batch) -> bool`: True makes the loop skip this batch: no forward, no optimizer step
      (AdamW's momentum and weight decay would move the weights on a zero gradient), nothing
      counted; the schedule still advances. Under DDP it must answer the same on every rank;
    - `step_lr() -> float | None`: the lr of this step's optimizer step in every parameter group
      instead of the schedule's (None: the schedule's), e.g. an unlearning stage's own lr;
    - `task_state() -> dict` and `load_task_state(state)`: what the task learned while training
      (tensors and plain values), saved with the optimizer in every checkpoint and restored on
      resume;
    - `summary() -> dict`: top-level entries for the run's metrics.json, written each epoch.
    """

    def loss(
        self, model: nn.Module, batch: Batch, raw_model: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


# Training objectives by name (`train.objective`): `factory(train, model, data) -> Task`, with
# the train section, the model it trains and the data (an image-text objective tokenizes the
# captions once). Metadata: `adversarial` (trains on attacked inputs, `train.attack` being its
# budget; the robust probe is on by default), `norms` (the attack norms it supports) and
# `image_text` (needs an image-text model and captions). Adversarial ones register in
# vptlab/defenses/adversarial.py.
OBJECTIVES = Registry[Task]("objective")


class ClassificationTask:
    """Cross-entropy on clean inputs, with optional label smoothing."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def loss(
        self, model: nn.Module, batch: Batch, raw_model: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(batch.x)
        loss = F.cross_entropy(logits.float(), batch.y, label_smoothing=self.label_smoothing)
        return loss, logits


def _gather_with_local_grad(features: torch.Tensor) -> torch.Tensor:
    """Every rank's rows concatenated in rank order; only this rank's rows carry gradient.

    As open_clip's ClipLoss (gather_with_grad=False): the others' features are constants here and
    get their gradient on their own rank, and DDP's all-reduce sums the parts.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    parts = [torch.empty_like(features) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, features.detach().contiguous())
    parts[dist.get_rank()] = features
    return torch.cat(parts)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over image-text pairs (Radford et al. 2021), and the image-to-text logits.

    Shape:
        image_features, text_features: (B, D), L2-normalized, row i of each a pair.
        scale: () the temperature's inverse, exp(logit_scale), already clamped.
        returns: loss (), logits (B, B x world_size): this rank's images against all captions.

    loss = (CE(scale * I T^T, pairs) + CE(scale * T I^T, pairs)) / 2, with the features of all
    ranks as negatives under DDP (this rank's pairs sit at offset rank x B).
    """
    all_images = _gather_with_local_grad(image_features)
    all_texts = _gather_with_local_grad(text_features)
    logits_per_image = scale * image_features @ all_texts.T
    logits_per_text = scale * text_features @ all_images.T
    targets = torch.arange(len(image_features), device=image_features.device)
    targets = targets + _rank() * len(image_features)
    loss = (
        F.cross_entropy(logits_per_image.float(), targets)
        + F.cross_entropy(logits_per_text.float(), targets)
    ) / 2
    return loss, logits_per_image


class ContrastiveTask:
    """CLIP pretraining: `clip_loss` between a batch's images and their captions' token ids.

    `tokens` (N, context_length) are the train split's captions, tokenized once; a batch's
    `index` (its samples' places in the split) picks its rows, so loaders and batches stay what
    they are for classification. The model is called as `model(x, text=tokens)` and returns
    (image features, text features, scale): through the DDP wrapper, so both towers sync.
    """

    def __init__(self, tokens: torch.Tensor) -> None:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (N, context_length), got {tuple(tokens.shape)}")
        self.tokens = tokens.long()

    def loss(
        self, model: nn.Module, batch: Batch, raw_model: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokens.device != batch.x.device:
            self.tokens = self.tokens.to(batch.x.device)  # once: the table then stays there
        text = self.tokens[batch.index]
        image_features, text_features, scale = model(batch.x, text=text)
        return clip_loss(image_features, text_features, scale)

    def correct(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return captions_retrieved(logits)


def captions_retrieved(logits: torch.Tensor) -> torch.Tensor:
    """How many images' own caption scores highest among all captions of the (global) batch,
    from `clip_loss`'s image-to-text logits: a contrastive task's count of right answers."""
    targets = torch.arange(len(logits), device=logits.device) + _rank() * len(logits)
    return (logits.detach().argmax(1) == targets).sum()


def caption_tokens(model: nn.Module, split: TensorSplit | Dataset) -> torch.Tensor:
    """`split`'s captions tokenized once by image-text `model`'s own tokenizer."""
    return clip_net(model).tokenize(split_captions(split))


def contrastive_task(model: nn.Module, split: TensorSplit | Dataset) -> ContrastiveTask:
    """CLIP's objective on `split`'s captions."""
    return ContrastiveTask(caption_tokens(model, split))


@OBJECTIVES.register("standard", adversarial=False, image_text=False)
def standard_objective(train: TrainConfig, model: nn.Module, data: DataSplits | None) -> Task:
    """Cross-entropy with the recipe's label smoothing."""
    return ClassificationTask(train.label_smoothing)


@OBJECTIVES.register("clip", adversarial=False, image_text=True)
def clip_objective(train: TrainConfig, model: nn.Module, data: DataSplits | None) -> Task:
    """CLIP's contrastive loss on the train split's captions, tokenized once here."""
    if data is None or model is None:
        raise ValueError("objective clip needs the data and the model")
    if not is_clip(model):
        raise ConfigError(
            "train.objective clip needs an image-text model (model.name clip or clip-tiny), "
            f"got {type(model).__name__}"
        )
    return contrastive_task(model, data.train)


def create_objective(
    train: TrainConfig, model: nn.Module | None = None, data: DataSplits | None = None, **_: Any
) -> Task:
    """The task of `train.objective` (`OBJECTIVES`)."""
    return OBJECTIVES.create(train.objective, train=train, model=model, data=data)
