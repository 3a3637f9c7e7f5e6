"""The threat matrix's config and plan: validation errors are one line naming the key; cells are
content-addressed (same config, same folders; a change moves only the cells it touches); nonsense
combinations are skipped with a reason; cells that train the same thing share the training run."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from vptlab.errors import ConfigError
from vptlab.matrix.cells import plan
from vptlab.matrix.config import parse_matrix

BASE = {
    "seed": 0,
    "device": "cpu",
    "data": {"name": "digits", "img_size": 16, "batch_size": 64, "num_workers": 0},
    "train": {"epochs": 1, "lr": 3e-3},
    "output": {"tensorboard": False, "progress": False},
}


def matrix(tmp_path: Path) -> dict[str, Any]:
    return {
        "matrix": "m",
        "output": str(tmp_path / "runs"),
        "base": BASE,
        "models": {"simplenet": {"model": {"name": "simplenet"}}},
        "threats": {
            "clean": {"kind": "clean"},
            "pgd": {"kind": "evasion", "attacks": [{"name": "pgd", "eps": 0.1, "steps": 3}]},
            "badnets": {"kind": "backdoor",
                        "poison": {"trigger": "badnets", "rate": 0.1, "options": {"size": 2}}},
        },  # fmt: skip
        "defenses": {
            "none": {"kind": "none"},
            "pgd-at": {"kind": "adversarial",
                       "train": {"objective": "pgd", "attack": {"eps": 0.1, "steps": 2}}},
            "ft": {"kind": "repair", "name": "ft", "train": {"epochs": 1}},
        },  # fmt: skip
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(bogus={}), "bogus: unknown key"),
        (lambda m: m["threats"]["pgd"]["attacks"][0].update(eps=-0.1), "threats.pgd.attacks.0.eps"),
        (lambda m: m["threats"]["pgd"]["attacks"][0].update(eps=8), "0-255 units"),
        (lambda m: m["threats"]["pgd"]["attacks"][0].update(options={"stepz": 3}),
         "threats.pgd.attacks.0.options.stepz: unknown option; attack 'pgd' takes"),
        (lambda m: m.update(models={}), "models: Dictionary should have at least 1 item"),
        (lambda m: m["threats"]["pgd"].update(attacks=[]), "needs at least one entry in attacks"),
        (lambda m: m["defenses"]["ft"].pop("name"), "repair defense needs name"),
        (lambda m: m["models"].update({"a/b": {}}), "labels name folders"),
    ],
)
def test_bad_matrix_is_one_line_naming_the_key(
    tmp_path: Path, change: Any, message: str
) -> None:
    raw = matrix(tmp_path)
    change(raw)
    with pytest.raises(ConfigError) as err:
        plan(parse_matrix(raw))
    text = str(err.value)
    assert message in text and "\n" not in text


def test_bad_fragment_names_its_cell(tmp_path: Path) -> None:
    raw = matrix(tmp_path)
    raw["models"]["simplenet"]["train"] = {"lr": -1}
    with pytest.raises(ConfigError, match=r"cell simplenet/full/clean/none: train.lr"):
        plan(parse_matrix(raw))


def test_cells_are_content_addressed(tmp_path: Path) -> None:
    raw = matrix(tmp_path)
    first = {c.id: c for c in plan(parse_matrix(raw))}
    again = {c.id: c for c in plan(parse_matrix(copy.deepcopy(raw)))}
    assert {i: c.folder for i, c in first.items()} == {i: c.folder for i, c in again.items()}
    assert len({c.folder for c in first.values() if c.skip is None}) == sum(
        c.skip is None for c in first.values()
    )

    # A new budget touches the evasion cells only; their training is unchanged.
    raw["threats"]["pgd"]["attacks"][0]["eps"] = 0.2
    moved = {c.id: c for c in plan(parse_matrix(raw))}
    changed = {i for i in first if first[i].folder != moved[i].folder}
    assert changed == {"simplenet/full/pgd/none", "simplenet/full/pgd/pgd-at"}
    assert all(first[i].train == moved[i].train for i in changed)

    # A new recipe retrains: every running cell moves, into folders named by the new run key.
    raw["models"]["simplenet"]["train"] = {"epochs": 2}
    retrained = {c.id: c for c in plan(parse_matrix(raw))}
    for cell_id, cell in retrained.items():
        if cell.skip is None:
            assert cell.folder != moved[cell_id].folder
            assert cell.train["name"] != moved[cell_id].train["name"]


def test_skips_and_shared_training(tmp_path: Path) -> None:
    raw = matrix(tmp_path)
    raw["models"]["vit"] = {"model": {"name": "vit-scratch", "options": {
        "patch_size": 4, "embed_dim": 16, "depth": 1, "num_heads": 2}}}  # fmt: skip
    raw["adaptations"] = {"full": {"adapt": {"mode": "full"}},
                          "prompt": {"adapt": {"mode": "prompt"}}}  # fmt: skip
    cells = {c.id: c for c in plan(parse_matrix(raw))}
    assert len(cells) == 2 * 2 * 3 * 3
    # a repair needs a backdoor; adversarial training answers evasion, not a backdoor
    assert "'clean' is clean" in cells["vit/full/clean/ft"].skip
    assert "'badnets' is backdoor" in cells["vit/full/badnets/pgd-at"].skip
    # prompts need a token sequence: the CNN has none, the ViT has
    assert "simplenet has no prompt adapter" in cells["simplenet/prompt/clean/none"].skip
    assert cells["vit/prompt/clean/none"].skip is None
    # clean and PGD evaluation of the standard run share its training; PGD-AT is another run
    clean, pgd = cells["vit/full/clean/none"], cells["vit/full/pgd/none"]
    assert clean.train["name"] == pgd.train["name"] and clean.folder != pgd.folder
    assert cells["vit/full/pgd/pgd-at"].train["name"] != pgd.train["name"]
    assert cells["vit/full/pgd/pgd-at"].train["train"]["objective"] == "pgd"
    poisoned = cells["vit/full/badnets/ft"]
    assert poisoned.train["data"]["poison"]["trigger"] == "badnets"
    assert poisoned.train["name"] == cells["vit/full/badnets/none"].train["name"]
    assert poisoned.defend is not None and poisoned.defend["defense"]["name"] == "ft"


def test_adaptation_backbone_reaches_its_cells(tmp_path: Path) -> None:
    """An adaptation with a cached backbone trains from it; its run key (and folder) follow the
    backbone, and a run that names its own pretrained weights keeps them."""
    raw = matrix(tmp_path)
    raw["adaptations"] = {"full": {"adapt": {"mode": "full"}},
                          "linear": {"adapt": {"mode": "linear"}, "backbone": {"name": "bb"}}}
    backbone = tmp_path / "bb.safetensors"
    cells = {c.id: c for c in plan(parse_matrix(raw), backbones={"linear": backbone})}
    linear, full = cells["simplenet/linear/clean/none"], cells["simplenet/full/clean/none"]
    assert linear.train["model"]["pretrained"] == str(backbone)
    assert full.train["model"]["pretrained"] is False
    other = {c.id: c for c in plan(parse_matrix(raw), backbones={"linear": tmp_path / "b2"})}
    assert other[linear.id].train["name"] != linear.train["name"]
    raw["models"]["simplenet"]["model"]["pretrained"] = str(tmp_path / "own.safetensors")
    own = {c.id: c for c in plan(parse_matrix(raw), backbones={"linear": backbone})}
    assert own[linear.id].train["model"]["pretrained"] == str(tmp_path / "own.safetensors")


def test_pixel_prompt_adaptation_plans_on_any_model(tmp_path: Path) -> None:
    """An adaptation with adapt.mode pixel plans like any other: every threat, PGD-AT as an
    adversarial prompt, ft and prompt repairs of its poisoned run; repairers of the frozen
    backbone's layers (fp) are skipped with their reason, not an error."""
    raw = matrix(tmp_path)
    pixel = {"kind": "padding", "size": 2, "mapping": "frequency", "source_classes": 10}
    raw["adaptations"] = {"pixel": {"adapt": {"mode": "pixel", "pixel": pixel},
                                    "train": {"lr": 5e-2}}}  # fmt: skip
    raw["defenses"]["fp"] = {"kind": "repair", "name": "fp"}
    raw["defenses"]["prompt"] = {"kind": "repair", "name": "prompt"}
    cells = {c.id: c for c in plan(parse_matrix(raw))}
    for threat in ("clean", "pgd", "badnets"):
        cell = cells[f"simplenet/pixel/{threat}/none"]
        assert cell.skip is None and cell.train["adapt"]["mode"] == "pixel"
        assert cell.train["adapt"]["pixel"] == {**pixel, "eps": 1.0}
    adversarial = cells["simplenet/pixel/pgd/pgd-at"]
    assert adversarial.skip is None and adversarial.train["train"]["objective"] == "pgd"
    assert adversarial.train["adapt"]["mode"] == "pixel"
    for name in ("ft", "prompt"):
        repair = cells[f"simplenet/pixel/badnets/{name}"]
        assert repair.skip is None and repair.defend["defense"]["name"] == name
    assert "defense fp works on the backbone's layers" in cells["simplenet/pixel/badnets/fp"].skip
