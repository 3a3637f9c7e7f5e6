"""Threats and defenses on pixel prompts (adapt.mode pixel), by config alone: a backdoor planted
through the prompt (BadVisualPrompt: the attacker trains only the prompt and its head on
poisoned data), its repair by fine-tuning the prompt (the backbone bit-identical) and by our
prompt defense in front of it, backbone repairers refused, and adversarial prompt training
(PGD-AT) against PGD. The frozen backbone is a SimpleNet trained on digits once per module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from vptlab.attacks import PGD
from vptlab.backdoors.metrics import BackdoorThreat
from vptlab.backdoors.poison import load_poison
from vptlab.cli import main
from vptlab.config import ExperimentConfig, load_yaml
from vptlab.defenses.repair import create_repairer, pixel_repairers
from vptlab.engine.checkpoint import read_metadata
from vptlab.errors import ConfigError
from vptlab.metrics.suite import evaluate_suite
from vptlab.prompts import PixelPrompted
from vptlab.runs import MODEL_FILE
from vptlab.steps import train as runner
from vptlab.steps.defend import defend, defended_config
from vptlab.steps.resolve import resolved

POISON = {"trigger": "badnets", "options": {"size": 3, "location": "bottom-right"}, "rate": 0.2}
# Every test here stands on the module's trained backbone and prompts.
pytestmark = pytest.mark.slow

PIXEL = {"kind": "full", "eps": 1.0, "mapping": "linear", "source_classes": 10}


def config(out: Path, name: str, **sections: Any) -> ExperimentConfig:
    """A CPU run on scikit-learn's 8x8 digits (1,437 train / 360 test)."""
    raw: dict[str, Any] = {
        "name": name,
        "seed": 0,
        "device": "cpu",
        "data": {"name": "digits", "batch_size": 64, "num_workers": 0},
        "model": {"name": "simplenet"},
        "train": {"epochs": 4, "lr": 3e-3, "weight_decay": 0.0},
        "output": {"dir": str(out), "tensorboard": False, "progress": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return resolved(raw)


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pixel")


@pytest.fixture(scope="module")
def backbone(out: Path) -> Path:
    """A SimpleNet trained on clean digits: the frozen model the prompts are put in front of."""
    runner.train(config(out, "backbone"))
    return out / "backbone" / MODEL_FILE


def pixel_config(out: Path, name: str, backbone: Path, **sections: Any) -> ExperimentConfig:
    """A full pixel prompt with a linear label-mapping head on the frozen backbone."""
    model = {"name": "simplenet", "pretrained": str(backbone)}
    train = {"lr": 5e-2, **sections.pop("train", {})}
    return config(out, name, model=model, adapt={"mode": "pixel", "pixel": PIXEL}, train=train,
                  **sections)  # fmt: skip


@pytest.fixture(scope="module")
def prompts(out: Path, backbone: Path) -> dict[str, Any]:
    """A clean prompt and one trained on 20%-poisoned digits (BadNets 3x3, target 0)."""
    clean = runner.train(pixel_config(out, "clean-prompt", backbone))
    poisoned = runner.train(
        pixel_config(out, "poisoned-prompt", backbone, data={"poison": POISON})
    )
    return {"clean": clean, "poisoned": poisoned, "dir": out / "poisoned-prompt"}


def asr_of(run_dir: Path, trigger_run: Path) -> float:
    """ASR (%) of `run_dir`'s model with the trigger of the poisoned run `trigger_run`."""
    cfg, model, splits = runner.load_run(run_dir, device="cpu")
    _, trigger, poison = load_poison(trigger_run)
    threat = BackdoorThreat(trigger, poison.target, size=tuple(splits.test.x.shape[-2:]),
                            channels=1)  # fmt: skip
    return evaluate_suite(model, splits.test, [threat])[f"{trigger.name}/asr"]


def test_backdoor_is_planted_through_the_prompt(prompts: dict[str, Any], out: Path) -> None:
    backdoor = prompts["poisoned"]["backdoor"]
    clean_asr = asr_of(out / "clean-prompt", prompts["dir"])
    ca = prompts["clean"]["final"]["test_top1"]
    print(f"clean prompt: CA {ca:.1f} ASR {clean_asr:.1f}; poisoned: CA {backdoor['ca']:.1f} "
          f"ASR {backdoor['asr']:.1f}")  # fmt: skip
    assert backdoor["asr"] > clean_asr + 40.0
    assert backdoor["ca"] > 0.5 * ca  # still a working classifier on clean digits
    # Only the prompt and the head trained: the run saved nothing else.
    saved = read_metadata(prompts["dir"] / MODEL_FILE)
    assert saved["trainable_only"] == "True"


def test_fine_tuning_a_pixel_prompt_changes_only_the_prompt_and_lowers_asr(
    prompts: dict[str, Any], backbone: Path
) -> None:
    recipe = ["train.epochs=6", "train.lr=5e-2", "output.progress=false", "device=cpu"]
    metrics = defend(prompts["dir"], {"name": "ft", "clean_fraction": 0.3}, recipe)
    d = metrics["defense"]
    print(f"ft on the prompt: CA {d['ca_before']:.1f} -> {d['ca_after']:.1f}, "
          f"ASR {d['asr_before']:.1f} -> {d['asr_after']:.1f}")  # fmt: skip
    assert d["asr_after"] < d["asr_before"] - 20.0
    defended = prompts["dir"].parent / "poisoned-prompt-ft"
    _, repaired, _ = runner.load_run(defended, device="cpu")
    _, poisoned, _ = runner.load_run(prompts["dir"], device="cpu")
    assert isinstance(repaired, PixelPrompted)
    frozen, own = poisoned.model.state_dict(), repaired.model.state_dict()
    assert frozen.keys() == own.keys()
    assert all(torch.equal(frozen[k], own[k]) for k in frozen)  # the backbone, bit for bit
    assert not torch.equal(poisoned.prompt.delta, repaired.prompt.delta)


def test_backbone_repairers_are_refused_for_a_pixel_prompted_run(
    prompts: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    parent = prompts["dir"]
    cfg = resolved(load_yaml(parent / "config.yaml"))
    assert set(pixel_repairers()) == {"ft", "prompt"}
    for name in ("fp", "nad"):
        with pytest.raises(ConfigError) as error:
            defended_config(parent, cfg, {"name": name})
        text = str(error.value)
        assert text.startswith(f"defense.name: defense {name} works on the backbone's layers")
        assert "ft or prompt" in text and "\n" not in text
    before = sorted(p.name for p in parent.parent.iterdir())
    assert main(["defend", str(parent), "--defense", "fp"]) == 2
    err = capsys.readouterr().err.strip()
    assert "defense.name: defense fp" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in parent.parent.iterdir()) == before  # nothing written


def test_prompt_defense_goes_in_front_of_a_pixel_prompt(prompts: dict[str, Any]) -> None:
    _, model, splits = runner.load_run(prompts["dir"], device="cpu")
    defended = create_repairer("prompt").prepare(model)
    trainable = {k for k, p in defended.named_parameters() if p.requires_grad}
    assert trainable == {"prompt.delta"}  # the attacker's prompt and head stay frozen too
    assert tuple(defended.prompt.delta.shape[-2:]) == (model.prompt.image_size,) * 2
    x = splits.test.x[:4].expand(-1, 3, -1, -1)
    with torch.no_grad():
        assert torch.equal(defended(x), model(x))  # the zero prompt changes nothing


def pgd_accuracy(run_dir: Path, eps: float) -> tuple[float, float]:
    """Top-1 (%) of a run's model under PGD-10 and under uniform noise of the same Linf eps."""
    _, model, splits = runner.load_run(run_dir, device="cpu")
    x, y = splits.test.x.expand(-1, 3, -1, -1), splits.test.y
    x_adv = PGD(eps=eps, steps=10, seed=0)(model, x, y)
    noise = (x + eps * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) - 1))
    with torch.no_grad():
        robust = float((model(x_adv).argmax(1) == y).float().mean()) * 100
        noisy = float((model(noise.clamp(0, 1)).argmax(1) == y).float().mean()) * 100
    return robust, noisy


def test_adversarial_prompt_training_against_pgd(
    prompts: dict[str, Any], out: Path, backbone: Path
) -> None:
    """The clean prompt against a prompt (and head) trained with PGD-AT at the same budget."""
    attack = {"objective": "pgd", "attack": {"eps": 0.1, "steps": 2}, "robust_probe": 0,
              "epochs": 3}  # fmt: skip
    runner.train(pixel_config(out, "pgd-prompt", backbone, train=attack))
    standard, standard_noise = pgd_accuracy(out / "clean-prompt", 0.1)
    robust, _ = pgd_accuracy(out / "pgd-prompt", 0.1)
    print(f"PGD-10 top-1 at eps 0.1: standard prompt {standard:.1f} (noise "
          f"{standard_noise:.1f}), PGD-AT prompt {robust:.1f}")  # fmt: skip
    assert standard < standard_noise - 20.0  # the attack beats noise of the same budget
    assert robust > standard + 10.0
