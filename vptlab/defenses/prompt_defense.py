"""Our prompt defense (`prompt`): the backdoored model stays frozen, and a defensive pixel prompt
in front of it is trained on a little clean data against universal perturbations that stand in
for the unknown trigger. Method, recipe, measurements and limits: docs/prompt_defense_notes.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vptlab.attacks import frozen_parameters
from vptlab.config import ExperimentConfig
from vptlab.data.base import DataSplits
from vptlab.data.loaders import Batch
from vptlab.defenses.repair import REPAIRERS, TRAINS_PREPARED
from vptlab.errors import ConfigError
from vptlab.prompts.pixel import FullPrompt, PixelPrompted

Threat = Literal["patch", "linf"]
Starts = Literal["both", "scan", "uniform"]
DEFAULT_SIZE = 224  # the prompt's resolution when neither the options nor the model say one
_BISECTION_STEPS = 40  # halvings of the capped-simplex threshold: far below float32 resolution
_SCAN_IMAGES = 8  # images the patch search's first placement is judged on
_SCAN_CHUNK = 1024  # images per forward while scanning


def prompted_input(
    model: nn.Module, size: int, bound: float = 1.0, frame: int | None = None
) -> PixelPrompted:
    """`model(clamp(x + P, 0, 1))` with a learnable pixel prompt P, |P| <= bound: the one
    prompted-input wrapper (`PixelPrompted`, no label mapping) with a `FullPrompt` stored at
    `size` x `size` and resized to inputs of another size; `frame`: P only on a border `frame`
    input pixels wide. The model is frozen and kept in eval mode, except modules given a
    trainable parameter of their own afterwards (VPT prompts)."""
    normalize = getattr(model, "normalize", None)
    channels = int(normalize.mean.shape[1]) if normalize is not None else 3
    return PixelPrompted(model, FullPrompt(size, bound, channels, frame=frame, resize=True))


def is_defended(model: nn.Module) -> bool:
    """Whether `model` is already behind a defensive prompt (`prompted_input`)."""
    return isinstance(model, PixelPrompted) and model.mapping is None


def model_input_size(model: nn.Module, default: int = DEFAULT_SIZE) -> int:
    """The input size a model declares (a pixel prompt's, a ViT's patch embedding, timm's
    pretrained_cfg), else `default`: CNNs take any size."""
    pixel_size = getattr(getattr(model, "prompt", None), "image_size", None)
    if isinstance(pixel_size, int):  # a pixel-prompted model takes exactly its prompt's size
        return pixel_size
    net = getattr(model, "net", model)
    size = getattr(getattr(net, "patch_embed", None), "img_size", None)
    if size is None:  # open_clip's image tower (models/clip.py)
        size = getattr(getattr(getattr(net, "clip", None), "visual", None), "image_size", None)
    if size is None:
        input_size = (getattr(net, "pretrained_cfg", None) or {}).get("input_size")
        size = input_size[-2:] if input_size else None
    if size is None:
        return default
    return int(size if isinstance(size, int) else size[0])


def project_capped_simplex(m: torch.Tensor, budget: float) -> torch.Tensor:
    """Euclidean projection of each m[r] onto {0 <= m[r] <= 1, sum(m[r]) <= budget}.

    The projection is clamp(m[r] - tau_r, 0, 1) for the smallest tau_r >= 0 that meets the
    budget; the sum falls as tau grows, so bisection finds every tau_r at once.
    """
    clipped = m.clamp(0.0, 1.0)
    rows = m.flatten(1)
    view = (-1, *([1] * (m.ndim - 1)))
    low = torch.zeros(len(m), device=m.device, dtype=m.dtype)
    high = rows.max(1).values.clamp_min(0.0)
    for _ in range(_BISECTION_STEPS):
        tau = (low + high) / 2
        over = (rows - tau[:, None]).clamp(0.0, 1.0).sum(1) > budget
        low = torch.where(over, tau, low)
        high = torch.where(over, high, tau)
    within = clipped.flatten(1).sum(1) <= budget
    projected = (m - high.view(view)).clamp(0.0, 1.0)
    return torch.where(within.view(view), clipped, projected)


def stamp_patch(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """The patch family of trigger searches, x' = (1 - m) x + m p, broadcast: a (.., 1, H, W)
    mask in [0, 1] blends the pattern (.., C, H, W) into the images there."""
    return (1 - mask) * x + mask * pattern


def _square_masks(h: int, w: int, side: int, stride: int, device: torch.device) -> torch.Tensor:
    """(P, 1, h, w) masks of a side x side square at every grid place (the last row and column
    of places flush with the border)."""

    def starts(size: int) -> torch.Tensor:
        last = size - side
        return torch.unique(torch.cat([torch.arange(0, last + 1, stride), torch.tensor([last])]))

    rows, cols = starts(h).to(device), starts(w).to(device)
    i, j = torch.arange(h, device=device), torch.arange(w, device=device)
    in_rows = (i >= rows[:, None]) & (i < rows[:, None] + side)  # (R, h)
    in_cols = (j >= cols[:, None]) & (j < cols[:, None] + side)  # (C, w)
    squares = in_rows[:, None, :, None] & in_cols[None, :, None, :]  # (R, C, h, w)
    return squares.flatten(0, 1)[:, None].float()


class UniversalPerturbation:
    """The trigger stand-in: universal perturbations (one for a whole batch), kept between
    batches so the search goes on where it stopped (the warm start).

    Several searches run side by side (R candidates, batched), because the search is not convex
    and one search can settle on a weak spot of the model while the backdoor sits elsewhere:

    - targeted (`targets` given; Neural Cleanse's per-class search): candidate r maximizes the
      mean log-probability of class targets[r] over the batch's samples of other classes, and
      the candidate that sends most of them to its target is the stand-in. This looks for what
      a backdoor is, one perturbation that sends every input to one class, rather than for
      whatever hurts most (on an under-trained model that is often a patch that smudges digits).
    - untargeted (`targets` None): `candidates` searches maximize the mean cross-entropy; the
      one with the highest is the stand-in.

    Where patch searches start (`starts`): "uniform", the mask spread evenly over the image and
    a random pattern (the search goes where the gradient leads: it found the CNN's backdoor,
    which answers to white blobs in many places); "scan", a white or black square of the
    budget's area at the grid place that serves the candidate best (needed for a ViT, see
    `_scan`); "both" (default), every target (or half the untargeted candidates) once from each.
    Linf searches start uniformly in the eps ball.

    `ascend(model, x, y, steps)` takes `steps` ascent steps on every candidate and picks the
    stand-in; `apply(x)` is T_u(x) with it.
    """

    def __init__(
        self,
        threat: Threat,
        area: float,
        eps: float,
        alpha: float,
        candidates: int = 1,
        targets: Sequence[int] | None = None,
        starts: Starts = "both",
    ) -> None:
        self.threat, self.area, self.eps, self.alpha = threat, area, eps, alpha
        self.starts = starts
        if targets is None:
            self.targets = None
            self.candidates = candidates
        else:  # "both": every target twice, the first half to start from the scan
            copies = 2 if starts == "both" and threat == "patch" else 1
            self.targets = torch.as_tensor(list(targets) * copies)
            self.candidates = len(self.targets)
        self.mask: torch.Tensor | None = None  # (R, 1, H, W), patch only
        self.pattern: torch.Tensor | None = None  # (R, C, H, W): the pattern, or Linf's delta
        self.best = 0

    @property
    def scanned(self) -> int:
        """How many candidates (the first ones) start from the scan."""
        if self.threat != "patch" or self.starts == "uniform":
            return 0
        return self.candidates if self.starts == "scan" else (self.candidates + 1) // 2

    def _start(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        shape = (self.candidates, *x.shape[1:])
        if self.pattern is not None and self.pattern.shape == shape:
            self.pattern = self.pattern.to(x.device)
            self.mask = self.mask.to(x.device) if self.mask is not None else None
            return
        # A fresh start (first batch, or a new image size); random draws from the global RNG,
        # which the loop seeds and checkpoints.
        if self.threat == "linf":
            self.pattern = ((torch.rand(shape) * 2 - 1) * self.eps).to(x.device)
            return
        h, w = x.shape[-2:]
        self.pattern = torch.rand(shape).to(x.device)
        self.mask = torch.full((self.candidates, 1, h, w), self.area, device=x.device)
        if self.scanned:
            masks, fills = self._scan(model, x, y)
            self.mask[: self.scanned] = project_capped_simplex(masks, self.area * h * w)
            self.pattern[: self.scanned] = fills.view(-1, 1, 1, 1)

    @torch.no_grad()
    def _scan(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Starts for the scanned candidates, as (masks (n, 1, H, W), fill values (n,)): a white
        or black square of the budget's area at the place (on a grid of half-square steps) that
        serves each candidate best on the batch's first images.

        Gradient steps alone only refine a trigger they start near: a ViT reads a patch token
        through a linear map of its exact pixels, so a white square three pixels off the
        trigger does not switch its backdoor on, and its gradient does not lead there (measured
        on a VPT-backdoored vit-scratch: 0.92 success from the trigger's place, 0.26 from three
        pixels off or from a uniform start).
        """
        n = self.scanned
        x, y = x[:_SCAN_IMAGES].float(), y[:_SCAN_IMAGES]
        h, w = x.shape[-2:]
        side = max(1, min(h, w, round(math.sqrt(self.area * h * w))))
        squares = _square_masks(h, w, side, stride=max(1, side // 2), device=x.device)
        values = torch.tensor([1.0, 0.0], device=x.device)  # white, black
        masks = squares.repeat(len(values), 1, 1, 1)  # (S, 1, H, W): every place, each value
        fills = values.repeat_interleave(len(squares))  # (S,)
        per_chunk = max(1, _SCAN_CHUNK // len(x))
        log_p = torch.cat([
            model(stamp_patch(x, m[:, None], v.view(-1, 1, 1, 1, 1)).flatten(0, 1))
            .float().log_softmax(1).view(len(m), len(x), -1)
            for m, v in zip(masks.split(per_chunk), fills.split(per_chunk), strict=True)
        ])  # fmt: skip
        if self.targets is None:  # the strongest starts by cross-entropy
            nll = -log_p.gather(2, y.view(1, -1, 1).expand(len(log_p), -1, 1))[..., 0].mean(1)
            best = nll.topk(min(n, len(nll))).indices
            best = best.repeat(n // len(best) + 1)[:n]
        else:  # for each target, the start that sends the other classes' samples there best
            targets = self.targets[:n].to(x.device)
            others = (y[None] != targets[:, None]).float()  # (n, B)
            target_log_p = log_p[:, :, targets]  # (S, B, n)
            score = (target_log_p * others.T[None]).sum(1) / others.sum(1).clamp_min(1)
            best = score.argmax(0)  # (n,)
        return masks[best], fills[best]

    def _apply_all(self, x: torch.Tensor) -> torch.Tensor:
        """(R, B, C, H, W): every candidate on every image."""
        assert self.pattern is not None, "ascend() first"
        pattern = self.pattern[:, None]
        if self.threat == "patch":
            assert self.mask is not None
            return stamp_patch(x, self.mask[:, None], pattern)
        return (x + pattern).clamp(0.0, 1.0)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """T_u(x) with the stand-in picked by the last search."""
        return self._apply_all(x)[self.best]

    def ascend(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"ascend needs steps >= 1, got {steps}")
        self._start(model, x, y)
        x = x.detach().float()
        r, b = self.candidates, len(x)
        with frozen_parameters(model), torch.enable_grad():
            for _ in range(steps):
                tensors = [self.pattern] + ([self.mask] if self.threat == "patch" else [])
                for t in tensors:
                    t.requires_grad_(True)
                logits = model(self._apply_all(x).flatten(0, 1)).float().view(r, b, -1)
                objective, strength = self._objective(logits, y)
                grads = torch.autograd.grad(objective.sum(), tensors)
                with torch.no_grad():
                    self._step(grads)
        self.pattern = self.pattern.detach()
        self.mask = self.mask.detach() if self.mask is not None else None
        # Ranked on the logits before the last step: one forward fewer, and a step rarely
        # reorders candidates.
        self.best = int(strength.argmax())

    def _objective(
        self, logits: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per candidate (R,): the objective to ascend, and the strength the stand-in is picked
        by (targeted: the share of other-class samples sent to the target, then the objective;
        untargeted: the cross-entropy)."""
        r, b, k = logits.shape
        if self.targets is None:
            loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(r), reduction="none")
            loss = loss.view(r, b).mean(1)
            return loss, loss.detach()
        targets = self.targets.to(y.device)
        if int(targets.max()) >= k:
            raise ConfigError(f"target class {int(targets.max())} but the model has {k} outputs")
        log_p = logits.log_softmax(2).gather(2, targets.view(r, 1, 1).expand(r, b, 1))[..., 0]
        others = (y[None] != targets[:, None]).float()  # (R, B): samples not of the target
        count = others.sum(1).clamp_min(1)
        objective = (log_p * others).sum(1) / count
        hits = (logits.detach().argmax(2) == targets[:, None]).float() * others
        success = hits.sum(1) / count
        # Success first (steps of 1/count); the target's probability only breaks ties.
        return objective, success + 1e-3 * objective.detach().exp()

    def _step(self, grads: tuple[torch.Tensor, ...]) -> None:
        assert self.pattern is not None
        if self.threat == "linf":
            delta = self.pattern + self.alpha * self.eps * grads[0].sign()
            self.pattern = delta.clamp(-self.eps, self.eps)
            return
        assert self.mask is not None
        self.pattern = (self.pattern + self.alpha * grads[0].sign()).clamp(0.0, 1.0)
        # Normalized (not signed) steps for the mask: under an L1 budget, moving every pixel by
        # the same amount wastes it; the pixels with the largest gradient should move most.
        g = grads[1]
        g = g / g.flatten(1).abs().max(1).values.clamp_min(1e-12).view(-1, 1, 1, 1)
        budget = self.area * self.mask[0, 0].numel()
        self.mask = project_capped_simplex(self.mask + self.alpha * g, budget)


class PromptDefenseTask:
    """One step of the defense: the inner search on the bare prompted model, then
    CE(f_P(x), y) + lam * CE(f_P(T_u(x)), y) through the step's model; returns the clean logits.
    With lam = 0 it is plain prompt tuning on clean data (the search is skipped).
    """

    def __init__(self, perturbation: UniversalPerturbation, steps: int, lam: float) -> None:
        self.perturbation, self.steps, self.lam = perturbation, steps, lam

    def loss(
        self, model: nn.Module, batch: Batch, raw_model: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not is_defended(raw_model):
            raise TypeError(f"the prompt defense trains a prompted_input, got {type(raw_model)}")
        if self.lam == 0:
            logits = model(batch.x)
            return F.cross_entropy(logits.float(), batch.y), logits
        self.perturbation.ascend(raw_model, batch.x, batch.y, self.steps)
        x_adv = self.perturbation.apply(batch.x).detach()
        # One forward for both halves: the frozen model runs in eval mode, so batching them
        # together changes nothing (no batch statistics).
        logits, logits_adv = model(torch.cat([batch.x, x_adv])).float().chunk(2)
        loss = F.cross_entropy(logits, batch.y)
        robust = F.cross_entropy(logits_adv, batch.y)
        return loss + self.lam * robust, logits


@REPAIRERS.register("prompt", repairs_pixel_prompts=True, needs_image_text=False)
class PromptDefense:
    """Repairer `prompt`: a defensive pixel prompt trained against universal perturbations.

    Options (all validated):
      threat: "patch" (mask + pattern, area-bounded) or "linf" (eps-bounded).
      targeted: one search per class, the stand-in is the one that flips most inputs to its
        class (Neural Cleanse); False: `candidates` searches maximizing the cross-entropy.
      starts: where patch searches start: "uniform", "scan" or "both" (each target from both;
        see UniversalPerturbation).
      steps: inner ascent steps per batch (warm-started, so one suffices).
      area: the patch mask's budget, a fraction of the image. eps: the Linf budget.
      alpha: inner step size (pixel range for patch; a fraction of eps for linf).
      lam: weight of the perturbed term.
      bound: |P| <= bound. size: the prompt's stored resolution (None: the model's declared
        input size, else 224). frame: the prompt only on a border this many pixels wide.
      lr: the prompt's learning rate (None: the recipe's train.lr).
      token_prompts: also train a VPT-adapted model's prompt tokens.
    """

    name = "prompt"
    trains = TRAINS_PREPARED  # its own prompt (and token prompts): what `prepare` made trainable

    def __init__(
        self,
        threat: Threat = "patch",
        targeted: bool = True,
        starts: Starts = "both",
        steps: int = 1,
        candidates: int = 4,
        area: float = 0.03,
        eps: float = 0.1,
        alpha: float = 0.2,
        lam: float = 1.0,
        bound: float = 1.0,
        size: int | None = None,
        frame: int | None = None,
        lr: float | None = None,
        token_prompts: bool = False,
    ) -> None:
        if threat not in ("patch", "linf"):
            raise ConfigError(f"defense.options.threat must be 'patch' or 'linf', got {threat!r}")
        if starts not in ("both", "scan", "uniform"):
            raise ConfigError(
                f"defense.options.starts must be 'both', 'scan' or 'uniform', got {starts!r}"
            )
        checks = {
            "steps": (steps >= 1, "must be >= 1"),
            "candidates": (candidates >= 1, "must be >= 1"),
            "area": (0 < area < 1, "must be in (0, 1): a fraction of the image"),
            "eps": (0 < eps <= 1, "must be in (0, 1]: pixels are in [0, 1]"),
            "alpha": (alpha > 0, "must be > 0"),
            "lam": (lam >= 0, "must be >= 0"),
            "bound": (0 < bound <= 1, "must be in (0, 1]: pixels are in [0, 1]"),
            "size": (size is None or size >= 1, "must be >= 1 (or null)"),
            "frame": (frame is None or frame >= 1, "must be >= 1 (or null)"),
            "lr": (lr is None or lr > 0, "must be > 0 (or null)"),
        }
        values = locals()
        for key, (ok, what) in checks.items():
            if not ok:
                raise ConfigError(f"defense.options.{key} {what}, got {values[key]}")
        self.threat, self.targeted, self.starts = threat, targeted, starts
        self.steps, self.candidates = steps, candidates
        self.area, self.eps, self.alpha, self.lam = area, eps, alpha, lam
        self.bound, self.size, self.frame = bound, size, frame
        self.lr, self.token_prompts = lr, token_prompts

    def prepare(self, model: nn.Module) -> PixelPrompted:
        """Freeze `model` and wrap it with a zero prompt (deterministic; also used on reload)."""
        if is_defended(model):
            raise ConfigError("the model already has a defensive prompt; prepare a fresh model")
        size = self.size or model_input_size(model)
        prompted = prompted_input(model, size, self.bound, self.frame)  # freezes `model`
        if self.token_prompts:
            from vptlab.prompts import prompt_parameters  # the prompts package imports timm

            tokens = prompt_parameters(model)
            if not tokens:
                raise ConfigError(
                    "defense.options.token_prompts needs a VPT-adapted model; this one has no "
                    "prompt tokens"
                )
            for param in tokens:
                param.requires_grad_(True)
            prompted.train(prompted.training)  # the token prompts' modules follow the mode
        return prompted

    def perturbation(self, num_classes: int) -> UniversalPerturbation:
        """The inner search: targeted, one per class, or `candidates` untargeted."""
        targets = range(num_classes) if self.targeted else None
        return UniversalPerturbation(
            self.threat, self.area, self.eps, self.alpha, self.candidates, targets, self.starts
        )

    def recipe(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """The defense's recipe with the prompt's own `lr`, when the options give one."""
        if self.lr is None:
            return cfg
        return cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": self.lr})})

    def task(self, model: nn.Module, clean: DataSplits, cfg: ExperimentConfig) -> PromptDefenseTask:
        """The training step: the search, then the clean and the perturbed cross-entropy."""
        return PromptDefenseTask(self.perturbation(clean.num_classes), self.steps, self.lam)
