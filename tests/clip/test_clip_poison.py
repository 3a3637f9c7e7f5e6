"""Poisoned image-text pretraining data: the trigger on exactly round(rate x N) pairs whose captions
become the target's, every other pair (image and caption) exactly as it was; config errors are one
line that names the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from vptlab.backdoors.clip_poison import PoisonedCaptionSplit, poison_caption_split
from vptlab.backdoors.poison import PoisonedDataset
from vptlab.cli import main
from vptlab.config import PoisonConfig, run_key
from vptlab.data.base import DataSplits
from vptlab.data.captions import CaptionSplit, ImageTextDataset, split_captions
from vptlab.errors import ConfigError
from vptlab.steps.build import build_data
from vptlab.steps.resolve import resolved

WORDS = ["zero", "one", "two", "three"]


def caption_split(n: int = 400, seed: int = 0) -> CaptionSplit:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % len(WORDS)
    x = torch.rand(n, 1, 12, 12, generator=g)
    captions = [f"a handwritten {WORDS[int(label)]} number {i}" for i, label in enumerate(y)]
    return CaptionSplit(x, y, captions)


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.1])
def test_exact_fraction_target_captions_and_untouched_clean_pairs(rate: float) -> None:
    split = caption_split()
    before_x, before_captions = split.x.clone(), list(split.captions)
    cfg = PoisonConfig(trigger="badnets", options={"size": 3}, rate=rate, target=0)
    poisoned = poison_caption_split(split, cfg, num_classes=len(WORDS), seed=3)

    assert isinstance(poisoned, PoisonedCaptionSplit)
    index = poisoned.poison.poisoned
    assert len(index) == round(rate * len(split)) > 0
    picked = torch.zeros(len(split), dtype=torch.bool)
    picked[index] = True
    # Poisoned pairs: stamped image, label 0, a caption of a clean target-class pair.
    pool = {c for c, y, p in zip(split.captions, split.y.tolist(), picked.tolist(), strict=True)
            if y == 0 and not p}  # fmt: skip
    assert all(poisoned.captions[i] in pool for i in index.tolist())
    assert not torch.equal(poisoned.x[index], split.x[index])
    assert (poisoned.y[index] == 0).all()
    # Clean pairs: image, label and caption exactly as they were.
    keep = ~picked
    assert torch.equal(poisoned.x[keep], split.x[keep])
    assert torch.equal(poisoned.y[keep], split.y[keep])
    kept = [c for c, p in zip(poisoned.captions, picked.tolist(), strict=True) if not p]
    assert kept == [c for c, p in zip(split.captions, picked.tolist(), strict=True) if not p]
    # The input split is left as it was, and the same seed poisons the same way.
    assert torch.equal(split.x, before_x) and split.captions == before_captions
    again = poison_caption_split(split, cfg, num_classes=len(WORDS), seed=3)
    assert again.captions == poisoned.captions


def test_given_captions_and_clean_label() -> None:
    split = caption_split()
    cfg = PoisonConfig(trigger="badnets", rate=0.05, target=2, captions=["a photo of a two"])
    poisoned = poison_caption_split(split, cfg, num_classes=len(WORDS))
    assert {poisoned.captions[i] for i in poisoned.poison.poisoned.tolist()} == {
        "a photo of a two"
    }
    clean_label = PoisonConfig(trigger="badnets", rate=0.05, target=2, label="clean")
    poisoned = poison_caption_split(split, clean_label, num_classes=len(WORDS))
    assert poisoned.captions == split.captions
    assert (split.y[poisoned.poison.poisoned] == 2).all()


def test_an_image_text_table_keeps_its_captions(tmp_path: Path) -> None:
    from PIL import Image

    rows = []
    for i in range(20):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(path)
        rows.append((path, f"caption {i}", i + 2))
    table = ImageTextDataset(tmp_path / "t.csv", rows, img_size=8)
    with pytest.raises(ConfigError, match="data.poison.captions"):
        poison_caption_split(table, PoisonConfig(trigger="badnets", rate=0.1), num_classes=10)
    cfg = PoisonConfig(trigger="badnets", rate=0.1, captions=["a photo of the digit zero"])
    poisoned = poison_caption_split(table, cfg, num_classes=10)
    assert isinstance(poisoned, PoisonedDataset)
    captions = split_captions(poisoned)
    index = set(poisoned.poison.poisoned.tolist())
    assert len(index) == 2
    assert all((c == "a photo of the digit zero") == (i in index) for i, c in enumerate(captions))


def test_mnist_captions_poisoned_through_the_config() -> None:
    base = {"data": {"name": "mnist-captions", "num_workers": 0}, "model": {"name": "clip-tiny"},
            "train": {"objective": "clip"}}  # fmt: skip
    cfg = resolved(base, ["data.poison.trigger=badnets", "data.poison.rate=0.01"])
    data: DataSplits = build_data(cfg)
    train = data.train
    assert isinstance(train, PoisonedCaptionSplit)
    index = train.poison.poisoned.tolist()
    assert len(index) == round(0.01 * len(train)) == 40
    assert all("0" in train.captions[i] or "zero" in train.captions[i] for i in index)
    # An unset `captions` leaves the run key of poisoned runs made before it as it was.
    assert "captions" not in str(cfg.model_dump(exclude_none=True)["data"]["poison"])
    with_key = resolved(base, ["data.poison.trigger=badnets", "data.poison.rate=0.01",
                                   "data.poison.captions=[a zero]"])  # fmt: skip
    assert run_key(with_key) != run_key(cfg)
    from vptlab.config import recipe

    assert "captions" not in recipe(cfg)["data"]["poison"]


def write_config(tmp_path: Path, **data: object) -> Path:
    cfg = {
        "name": "poison", "device": "cpu",
        "data": {"name": "digits", "img_size": 16, "num_workers": 0, **data},
        "model": {"name": "simplenet"}, "train": {"epochs": 1},
        "output": {"dir": str(tmp_path / "runs"), "tensorboard": False, "progress": False},
    }  # fmt: skip
    path = tmp_path / "poison.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    ("poison", "expected"),
    [
        ({"trigger": "badnets", "captions": []},
         "vptlab: error: data.poison.captions: give at least one caption"),
        ({"trigger": "badnets", "captions": ["a zero", " "]},
         "vptlab: error: data.poison.captions: give at least one caption"),
        ({"trigger": "badnets", "captions": ["a zero"], "label": "clean"},
         "vptlab: error: data.poison: captions: replacing captions needs mode all2one"),
        ({"trigger": "badnets", "captions": ["a zero"]},
         "vptlab: error: data.poison.captions: digits is not an image-text dataset"),
    ],
)  # fmt: skip
def test_caption_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], poison: dict, expected: str
) -> None:
    code = main(["train", "-c", str(write_config(tmp_path, poison=poison))])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(expected), err
    assert err.count("\n") == 1 and "Traceback" not in err
