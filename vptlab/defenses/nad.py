"""Neural Attention Distillation (`nad`, Li et al. 2021): a fine-tuned teacher's attention erases
the backdoor from its own student.

1. Teacher: a copy of the backdoored model fine-tuned on the clean subset (its own short `fit`
   into `run_dir/teacher`, `teacher_epochs` epochs; default: the recipe's).
2. Student: the backdoored model itself, trained on the same clean data with
       L = CE(f_S(x), y) + sum_l beta_l || A(F_S^l(x)) - A(F_T^l(x)) ||^2 / M_l
   over the chosen layers l, where the attention map of features F is
       A(F) = m / ||m||_2,   m = mean over channels of |F|^p   (p = 2)
   flattened over its M_l positions (H x W of a conv map; for a ViT block's (B, N, D) output,
   the feature-norm map over its patch tokens; class and prompt tokens are left out). The
   squared distance is averaged over positions and batch, as in the authors' code (their
   `AT` loss: an MSE of the maps).

Weights: as the authors' code (github.com/bboylyg/NAD, `--beta1 500 --beta2 1000 --beta3 1000`
on the attention maps after the last three groups of their WideResNet), the default `betas` are
500, 1000, 1000 from the lowest layer to the highest; fewer default layers take the last of
them. `beta` gives every layer one weight instead (the paper's text says 5000 for CIFAR-10);
`betas` one per named layer.

The distillation is a Task of the one loop (`AttentionDistillation`). The frozen teacher's
features come from its `forward_intermediates` where the model family provides the layers
(defenses/features.py, hooks otherwise), run without gradients; the student's from forward hooks
on the bare model, so that its loss comes from the step's one forward (through DDP when the loop
wraps it).

Default layers (`layers=None`), "the last three feature stages" (NAD's three groups):
SimpleNet-style `features`, the outputs of its last three activations; ResNets, `layer2`,
`layer3` and `layer4`; staged CNNs, the last three `stages`; ViTs, the last three blocks whose
patch tokens reach the logits (with class-token pooling the last block's patch tokens do not, so
blocks -4 to -2); CLIP, the same in its image tower. Otherwise
name them: `layers` takes module names as in `model.named_modules()` (e.g. `net.features.9`,
`net.blocks.2`).

An image-text model trained contrastively (`train.objective: clip`) replaces CE by CLIP's loss on
the clean pairs, for the teacher's fine-tuning and beside the student's distillation.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vptlab.config import ExperimentConfig
from vptlab.data.base import DataSplits
from vptlab.data.loaders import Batch
from vptlab.defenses.features import LayerOutputs, check_layers, layer_features
from vptlab.defenses.finetune import FineTuning
from vptlab.defenses.repair import REPAIRERS, TRAINS_MODEL, backbone, clean_task, repair
from vptlab.engine.tasks import Task
from vptlab.errors import ConfigError
from vptlab.models.clip import CLIPNet

TEACHER_DIR = "teacher"
# The authors' per-layer weights (beta1, beta2, beta3), lowest layer first.
DEFAULT_BETAS = (500.0, 1000.0, 1000.0)
NUM_LAYERS = len(DEFAULT_BETAS)
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish)


def default_layers(model: nn.Module) -> list[str]:
    """The last feature stages of `model` (see the module docstring)."""
    net = backbone(model)
    if isinstance(net, CLIPNet):
        return clip_layers(net)
    blocks = getattr(net, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks) > 0:
        if hasattr(blocks[-1], "mlp"):
            token_pooled = getattr(net, "global_pool", "token") == "token"
            last = len(blocks) - 1 - (1 if token_pooled and len(blocks) > 1 else 0)
            return [f"net.blocks.{i}" for i in _last_blocks(last)]
    features = getattr(net, "features", None)
    if isinstance(features, nn.Sequential):
        acts = [i for i, module in enumerate(features) if isinstance(module, ACTIVATIONS)]
        if acts:
            return [f"net.features.{i}" for i in acts[-NUM_LAYERS:]]
    groups = _resnet_groups(net)
    if groups:
        return [f"net.{name}" for name in groups]
    stages = getattr(net, "stages", None)
    if isinstance(stages, nn.Sequential | nn.ModuleList) and len(stages) > 0:
        return [f"net.stages.{i}" for i in range(max(len(stages) - NUM_LAYERS, 0), len(stages))]
    raise ConfigError(
        f"defense 'nad' has no default layers for {type(net).__name__}; name them in "
        "defense.options.layers (module names as in model.named_modules())"
    )


def _last_blocks(last: int) -> list[int]:
    """The (up to) three block indices ending at `last`."""
    return list(range(max(last - NUM_LAYERS + 1, 0), last + 1))


def _resnet_groups(net: nn.Module) -> list[str]:
    """A ResNet's last three groups (`layer2`..`layer4`; fewer when it has fewer), else []."""
    names = [f"layer{i}" for i in range(1, 5)]
    names = [name for name in names if isinstance(getattr(net, name, None), nn.Module)]
    if "layer3" not in names or "layer4" not in names:
        return []
    return names[-NUM_LAYERS:]


def clip_layers(net: CLIPNet) -> list[str]:
    """The image tower's last three feature stages: a ViT tower's last three residual blocks
    whose patch tokens reach the embedding (class-token pooling: blocks -4 to -2); a ResNet
    tower's layer2 to layer4. The text tower is left alone: the trigger is in the image."""
    visual = net.clip.visual
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
        if not getattr(visual.transformer, "batch_first", True):
            raise ConfigError("defense 'nad' needs an open_clip image tower with batch_first")
        token_pooled = getattr(visual, "pool_type", "tok") == "tok"
        last = len(blocks) - 1 - (1 if token_pooled and len(blocks) > 1 else 0)
        prefix = "net.clip.visual.transformer.resblocks"
        return [f"{prefix}.{i}" for i in _last_blocks(last)]
    groups = _resnet_groups(visual)
    if groups:
        return [f"net.clip.visual.{name}" for name in groups]
    raise ConfigError(
        f"defense 'nad' has no default layers for the image tower {type(visual).__name__}; name "
        "them in defense.options.layers"
    )


def attention_map(
    features: torch.Tensor, p: float = 2.0, num_patches: int | None = None
) -> torch.Tensor:
    """(B, M) L2-normalized attention map: mean over channels of |F|^p at each of M positions.

    (B, C, H, W) maps give M = H x W; (B, N, D) tokens give one entry per token, keeping the last
    `num_patches` (the patch tokens: class and prompt tokens come first); (B, D) vectors are
    their own map.
    """
    a = features.float().abs().pow(p)
    if a.ndim == 4:
        a = a.mean(dim=1).flatten(1)
    elif a.ndim == 3:
        if num_patches is not None and a.shape[1] > num_patches:
            a = a[:, -num_patches:]
        a = a.mean(dim=2)
    elif a.ndim != 2:
        raise ConfigError(
            f"defense.options.layers: attention maps need (B,C,H,W), (B,N,D) or (B,D) features, "
            f"got shape {tuple(features.shape)}"
        )
    return F.normalize(a, p=2.0, dim=1, eps=1e-6)


def layer_betas(
    num_layers: int, beta: float | None = None, betas: Sequence[float] | None = None
) -> list[float]:
    """Each layer's distillation weight: `betas` one per layer, else `beta` for every layer,
    else the authors' (500, 1000, 1000), the last `num_layers` of them."""
    if beta is not None and betas is not None:
        raise ConfigError(
            "defense.options.betas: give beta (one weight for all) or betas, not both"
        )
    if betas is not None:
        if len(betas) != num_layers:
            raise ConfigError(
                f"defense.options.betas: {len(betas)} weights for {num_layers} layers; give one "
                "per layer"
            )
        return [float(b) for b in betas]
    if beta is not None:
        return [float(beta)] * num_layers
    if num_layers > len(DEFAULT_BETAS):
        raise ConfigError(
            f"defense.options.betas: the default weights {DEFAULT_BETAS} are for up to "
            f"{len(DEFAULT_BETAS)} layers, {num_layers} are named; give betas (one per layer) "
            "or beta"
        )
    return list(DEFAULT_BETAS[len(DEFAULT_BETAS) - num_layers :])


class AttentionDistillation:
    """The NAD objective as a task: CE + sum over layers of beta_l x the mean squared difference
    between the student's and the frozen teacher's attention maps (`beta`: one weight per layer,
    or one for all). Call `close()` when done: it removes the hooks from the student."""

    def __init__(
        self,
        teacher: nn.Module,
        layers: Sequence[str],
        beta: float | Sequence[float],
        p: float = 2.0,
        label_smoothing: float = 0.0,
        num_patches: int | None = None,
        base: Task | None = None,
    ) -> None:
        self.base = base
        self.teacher = teacher.eval()
        self.teacher.requires_grad_(False)
        self.layers = list(layers)
        if isinstance(beta, int | float):
            beta = [float(beta)] * len(self.layers)
        if len(beta) != len(self.layers):
            raise ValueError(f"nad: {len(beta)} weights for {len(self.layers)} layers")
        self.betas, self.p = [float(b) for b in beta], p
        self.label_smoothing = label_smoothing
        self.num_patches = num_patches
        self._student: LayerOutputs | None = None
        self._student_model: nn.Module | None = None

    def student_features(self, raw_model: nn.Module) -> LayerOutputs:
        """Hooks on the bare student, attached at its first step (the loop hands it over)."""
        if self._student_model is not raw_model:
            if self._student is not None:
                self._student.close()
            self._student, self._student_model = LayerOutputs(raw_model, self.layers), raw_model
        assert self._student is not None
        return self._student

    def distillation(
        self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """sum over layers of beta_l x mean((A(F_S) - A(F_T))^2)."""
        terms = [
            beta * (self.attention(s) - self.attention(t)).pow(2).mean()
            for beta, s, t in zip(self.betas, student, teacher, strict=True)
        ]
        return torch.stack(terms).sum()

    def attention(self, features: torch.Tensor) -> torch.Tensor:
        return attention_map(features, self.p, self.num_patches)

    def teacher_forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return layer_features(self.teacher, x, self.layers)

    def loss(
        self, model: nn.Module, batch: Batch, raw_model: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        capture = self.student_features(raw_model)
        if self.base is not None:
            loss, logits = self.base.loss(model, batch, raw_model)
        else:
            logits = model(batch.x)
            loss = F.cross_entropy(logits.float(), batch.y, label_smoothing=self.label_smoothing)
        student = capture.take()
        teacher = self.teacher_forward(batch.x)
        return loss + self.distillation(student, teacher), logits

    def correct(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The base task's count of right answers (captions retrieved, for CLIP's loss)."""
        count = getattr(self.base, "correct", None)
        if count is not None:
            return count(logits, batch)
        return (logits.detach().argmax(1) == batch.y).sum()

    def close(self) -> None:
        if self._student is not None:
            self._student.close()
        self._student = self._student_model = None


def patch_count(model: nn.Module) -> int | None:
    """How many patch tokens a ViT's blocks carry (None for CNNs)."""
    net = backbone(model)
    if isinstance(net, CLIPNet):
        grid = getattr(net.clip.visual, "grid_size", None)
        return int(grid[0] * grid[1]) if grid is not None else None
    patch_embed = getattr(net, "patch_embed", None)
    count = getattr(patch_embed, "num_patches", None)
    return int(count) if count is not None else None


class NeuralAttentionDistillation:
    """Fine-tune a teacher on the clean subset, then distill its attention into the backdoored
    model (see the module docstring)."""

    name = "nad"
    trains = TRAINS_MODEL

    def __init__(
        self,
        beta: float | None = None,
        layers: list[str] | None = None,
        p: float = 2.0,
        teacher_epochs: int | None = None,
        betas: list[float] | None = None,
    ) -> None:
        self.beta, self.betas, self.layers, self.p = beta, betas, layers, p
        self.teacher_epochs = teacher_epochs
        self.teacher: nn.Module | None = None  # set by before_fit

    def layers_of(self, model: nn.Module) -> list[str]:
        layers = list(self.layers) if self.layers else default_layers(model)
        check_layers(model, layers)
        return layers

    def betas_of(self, model: nn.Module) -> list[float]:
        return layer_betas(len(self.layers_of(model)), self.beta, self.betas)

    def prepare(self, model: nn.Module) -> nn.Module:
        self.betas_of(model)  # no structure to add; an unknown layer or weight fails here, early
        return model

    def before_fit(
        self,
        model: nn.Module,
        clean: DataSplits,
        cfg: ExperimentConfig,
        run_dir: Path,
    ) -> None:
        """The teacher: a copy of `model` fine-tuned (`ft`) on the clean subset into
        `run_dir/teacher`."""
        teacher_cfg = cfg.model_copy(deep=True)
        teacher_cfg.name = f"{cfg.name}-{TEACHER_DIR}"
        if self.teacher_epochs is not None:
            teacher_cfg.train.epochs = self.teacher_epochs
        # Its curves: clean top-1 on the defender's own validation data (`clean.test`).
        self.teacher = repair(FineTuning(), copy.deepcopy(model), clean, teacher_cfg,
                              Path(run_dir) / TEACHER_DIR)  # fmt: skip

    def task(self, model: nn.Module, clean: DataSplits, cfg: ExperimentConfig) -> Task:
        if self.teacher is None:
            raise RuntimeError("nad: before_fit trains the teacher the task distils from")
        # The student's own objective beside the distillation: cross-entropy, or CLIP's loss
        # for an image-text model (`clean_task`).
        base = clean_task(model, clean, cfg) if cfg.train.objective == "clip" else None
        return AttentionDistillation(
            self.teacher, self.layers_of(model), self.betas_of(model), self.p,
            label_smoothing=cfg.train.label_smoothing, num_patches=patch_count(model), base=base,
        )  # fmt: skip


@REPAIRERS.register("nad", repairs_pixel_prompts=False, needs_image_text=False)
def neural_attention_distillation(
    beta: Annotated[float, Field(ge=0)] | None = None,
    layers: Annotated[list[str], Field(min_length=1)] | None = None,
    p: Annotated[float, Field(gt=0)] = 2.0,
    teacher_epochs: Annotated[int, Field(gt=0)] | None = None,
    betas: Annotated[list[Annotated[float, Field(ge=0)]], Field(min_length=1)] | None = None,
) -> NeuralAttentionDistillation:
    """betas: each layer's weight of its attention distance, lowest layer first (default: the
    authors' code, 500, 1000, 1000); beta: one weight for every layer instead (the paper's text,
    CIFAR-10: 5000); layers: module names (default: the last three feature stages); p: exponent
    of the attention map; teacher_epochs: the teacher's fine-tuning epochs (default: the
    recipe's `train.epochs`)."""
    return NeuralAttentionDistillation(beta, layers, p, teacher_epochs, betas)
