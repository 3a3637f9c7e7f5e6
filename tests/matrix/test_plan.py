"""The threat matrix's config and plan: validation errors are one line naming the key; cells are
content-addressed (same config, same folders; a change moves only the cells it touches); nonsense
combinations are skipped with a reason; cells that train the same thing share the training run."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

from vptlab.errors import ConfigError
from vptlab.matrix.cells import plan
from vptlab.matrix.config import parse_matrix
from vptlab.matrix.run import distinct_steps

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


def seeded(tmp_path: Path, seeds: Any = (0, 1)) -> dict[str, Any]:
    """The matrix over `seeds`: the base's own seed goes, the axis sets it."""
    raw = matrix(tmp_path)
    raw["base"] = {k: v for k, v in BASE.items() if k != "seed"}
    raw["seeds"] = list(seeds)
    return raw


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(seeds=[]), "seeds: List should have at least 1 item"),
        (lambda m: m.update(seeds=[0, 1, 0]), "seeds: seeds must be distinct"),
        (lambda m: m.update(seeds=[-1]), "seeds.0: Input should be greater than or equal to 0"),
        (lambda m: m.update(seeds=[1.5]), "seeds.0: Input should be a valid integer"),
        (lambda m: m.update(seeds=["1"]), "seeds.0: Input should be a valid integer"),
        (lambda m: m["base"].update(seed=3), "base.seed: the matrix's seeds axis sets"),
        (lambda m: m["models"]["simplenet"].update(seed=3),
         "models.simplenet.seed: the matrix's seeds axis sets"),
        (lambda m: m.update(adaptations={"full": {"adapt": {"mode": "full"}, "seed": 3}}),
         "adaptations.full.seed: the matrix's seeds axis sets"),
    ],
)
def test_bad_seeds_are_one_line_naming_the_key(tmp_path: Path, change: Any, message: str) -> None:
    raw = seeded(tmp_path)
    change(raw)
    with pytest.raises(ConfigError) as err:
        plan(parse_matrix(raw))
    text = str(err.value)
    assert message in text and "\n" not in text


def test_seed_override_is_refused_beside_the_axis(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^seed: the matrix's seeds axis sets each run's seed"):
        plan(parse_matrix(seeded(tmp_path)), ["seed=3"])
    assert plan(parse_matrix(matrix(tmp_path)), ["seed=3"])[0].train["seed"] == 3


def test_without_seeds_names_are_as_before(tmp_path: Path) -> None:
    """No seeds axis: four-level ids, folders and training runs named by their keys alone, no
    `seed` in the plan's entries, and a base seed used as it is."""
    for cell in plan(parse_matrix(matrix(tmp_path))):
        assert cell.seed is None and "seed" not in cell.summary()
        assert cell.id == "/".join((cell.model, cell.adaptation, cell.threat, cell.defense))
        if cell.skip is None:
            labels = "-".join((cell.model, cell.adaptation, cell.threat, cell.defense))
            assert Path(cell.folder).name == f"{labels}-{cell.key}"
            assert re.fullmatch(r"simplenet-full(-badnets)?(-pgd-at)?-[0-9a-f]{12}",
                                cell.train["name"])  # fmt: skip
            assert cell.train["seed"] == 0


def test_seeds_plan_every_cell_once_per_seed(tmp_path: Path) -> None:
    plain = plan(parse_matrix(matrix(tmp_path)))
    cells = plan(parse_matrix(seeded(tmp_path, (0, 7))))
    assert len(cells) == 2 * len(plain)
    assert [c.id for c in cells[:2]] == ["simplenet/full/clean/none/s0",
                                         "simplenet/full/clean/none/s7"]  # fmt: skip
    assert {c.id.rsplit("/", 1)[0] for c in cells} == {c.id for c in plain}
    running = [c for c in cells if c.skip is None]
    assert len({c.folder for c in running}) == len(running)
    for cell in running:
        assert cell.train["seed"] == cell.seed and cell.summary()["seed"] == cell.seed
        assert cell.folder.endswith(f"-s{cell.seed}") and cell.id.endswith(f"/s{cell.seed}")
        assert cell.train["name"].endswith(f"-s{cell.seed}")
    # a run's seeds share its stem (the key of its recipe without the seed), and each seed's run
    # is still shared by the cells that train the same thing
    by_id = {c.id: c for c in cells}
    clean, pgd = by_id["simplenet/full/clean/none/s7"], by_id["simplenet/full/pgd/none/s7"]
    assert clean.train["name"] == pgd.train["name"]
    assert clean.train["name"].removesuffix("-s7") == (
        by_id["simplenet/full/clean/none/s0"].train["name"].removesuffix("-s0"))
    repaired = by_id["simplenet/full/badnets/ft/s7"]
    assert repaired.defend is not None and repaired.defend["name"].startswith(
        repaired.train["name"])
    assert {len({c.train["name"] for c in running if c.seed == s}) for s in (0, 7)} == {3}
    # an executor gets one task per (training run, seed) and per (cell, seed)
    assert len(distinct_steps(cells)) == 2 * len(distinct_steps(plain)) == 6
    assert len({c.id for c in running}) == 2 * sum(c.skip is None for c in plain)
