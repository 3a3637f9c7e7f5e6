"""Config parsing: overrides, one-line errors with dotted key paths, no evaluation of strings."""

from __future__ import annotations

import pytest

from vptlab.config import dump_config, parse_override, recipe, recipe_changes, run_key
from vptlab.errors import ConfigError
from vptlab.steps.resolve import load_resolved, resolved


def test_overrides_are_typed_and_nested() -> None:
    cfg = resolved(
        {"model": {"name": "vit-scratch"}},
        ["train.lr=0.25", "data.augment.crop_pad=3", "model.options.depth=2"],
    )
    assert cfg.train.lr == 0.25
    assert cfg.data.augment.crop_pad == 3
    assert cfg.model.options == {"depth": 2}


def test_override_values_are_never_evaluated() -> None:
    _, value = parse_override("name=__import__('os').system('false')")
    assert value == "__import__('os').system('false')"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr=-1", "train.lr: Input should be greater than 0, got -1"),
        ("train.lrr=0.1", "train.lrr: unknown key"),
        ("data.augment.flip=maybe", "data.augment.flip: Input should be a valid boolean"),
        (
            "adapt.mode=half",
            "adapt.mode: Input should be 'prompt', 'linear', 'full', 'prompt+full' or 'pixel'",
        ),
        ("train=3", "train: Input should be a valid dictionary"),
        ("seed=-1", "seed: Input should be greater than or equal to 0, got -1"),
        ("name=.hidden", "name: must be a plain folder name"),
        ("model.options.drop_rate=abc", "model.options.drop_rate: Input should be a valid number"),
        ("model.options.conv_layer=fast", "model.options.conv_layer: Input should be 'torch'"),
        ("model.options.dropp=0.1", "model.options.dropp: unknown option; model 'simplenet' takes"),
        ("model.options.img_size=8", "model.options.img_size: not an option here; set it as data"),
        ("data.options.limit=3", "data.options.limit: unknown option; dataset 'mnist-5k' takes"),
        ("epochs", "override 'epochs' must look like key.sub=value"),
    ],
)
def test_bad_values_name_the_key(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolved({}, [override])
    message = str(info.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_yaml_round_trip(tmp_path) -> None:
    cfg = resolved({"name": "x", "train": {"epochs": 3}}, ["adapt.prompt.depth=[0,1]"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_resolved(path) == cfg


def test_missing_config_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_resolved(tmp_path / "nope.yaml")


def test_factory_options_are_checked_against_the_factory() -> None:
    digits = ["data.name=digits"]
    with pytest.raises(ConfigError, match=r"^data\.options\.test_fraction: .*valid number.*'abc'"):
        resolved({}, [*digits, "data.options.test_fraction=abc"])
    cfg = resolved(
        {}, [*digits, "data.options.test_fraction=0.25", "model.options.drop_rate=1"]
    )
    assert cfg.data.options == {"test_fraction": 0.25}
    assert cfg.model.options == {"drop_rate": 1.0}  # as the factory's annotation says
    # timm models take **kwargs: timm judges those, the typed ones are still checked here
    vit = ["model.name=vit-tiny-test"]
    assert resolved({}, [*vit, "model.options.depth=1"]).model.options == {"depth": 1}
    with pytest.raises(ConfigError, match=r"^model\.options\.patch_size: .*valid integer"):
        resolved({}, [*vit, "model.options.patch_size=big"])


def test_run_key_ignores_where_and_how_a_run_is_made() -> None:
    base = resolved({"name": "a", "data": {"name": "digits"}})
    key = run_key(base)
    same = [
        "device=cpu", "name=b", "output.dir=elsewhere", "output.progress=false",
        "output.tensorboard=false", "data.num_workers=0", "data.eval_batch_size=7",
        "train.checkpoint_every_steps=5", "train.compile=true",
    ]
    for override in same:
        assert run_key(resolved({"name": "a", "data": {"name": "digits"}}, [override])) == key
    for override in ["train.lr=0.1", "seed=1", "model.options.drop_rate=0.5", "data.img_size=8"]:
        other = resolved({"name": "a", "data": {"name": "digits"}}, [override])
        assert run_key(other) != key, override
    lr = resolved({"name": "a", "data": {"name": "digits"}}, ["train.lr=0.1", "device=cpu"])
    assert recipe_changes(base, lr) == ["train.lr: 0.001 -> 0.1"]


def test_attack_amp_and_options_at_their_defaults_keep_run_keys() -> None:
    """Added after runs were made: at their defaults (fp32, no options) they are left out of the
    recipe, so earlier runs and cached backbones stay valid; set, they change the key."""
    base = resolved({"name": "a", "data": {"name": "digits"}}, ["train.objective=pgd"])
    assert "amp" not in recipe(base)["train"]["attack"]
    assert "options" not in recipe(base)["train"]["attack"]
    amp = resolved({"name": "a", "data": {"name": "digits"}},
                       ["train.objective=pgd", "train.attack.amp=true"])  # fmt: skip
    assert amp.train.attack.amp is True and run_key(amp) != run_key(base)


def test_training_attacks_take_no_options() -> None:
    with pytest.raises(ConfigError) as info:
        resolved({}, ["train.objective=pgd", "train.attack.options.n_queries=10"])
    message = str(info.value)
    assert "attack.options: the pgd objective takes no attack options" in message
    assert "n_queries" in message and "\n" not in message
    with pytest.raises(ConfigError, match="attack.name square cannot train"):
        resolved({}, ["train.objective=pgd", "train.attack.name=square"])
