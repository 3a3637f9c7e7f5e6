"""Fuzzed configs: every bad run, study or threat-matrix config is refused before anything runs,
with exit code 2 and one line that names the offending key's path.

Each case starts from a valid config and breaks it once: a wrong type or an out-of-range value
for a known key (found by walking the pydantic models, so a new key is fuzzed for free), an
unknown key at a random depth, or a hostile value for a whole section. Training is replaced by a
tripwire: a bad config that reached it would be a config accepted by mistake.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
import tempfile
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import annotated_types as at
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from vptlab import cli
from vptlab.config import ExperimentConfig
from vptlab.steps import train as runner

REPO = Path(__file__).resolve().parents[2]

BASE: dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "data": {"name": "digits", "img_size": 16, "batch_size": 64, "num_workers": 0},
    "model": {"name": "simplenet"},
    "train": {"epochs": 1, "lr": 3e-3},
    "output": {"tensorboard": False, "progress": False},
}
# Optional sections present in the base when one of their keys is fuzzed.
OPTIONAL_SECTIONS: dict[str, dict[str, Any]] = {
    "data.poison": {"trigger": "badnets", "options": {"size": 3}},
    "defense": {"name": "ft"},
}
# Keys whose every string is type-valid; their bad values are unknown names, checked by name.
NAMES = {"data.name", "model.name", "data.poison.trigger", "defense.name"}
# Free-form strings (paths, labels) with no wrong string value, and the keys set by this test.
FREE = {"data.root", "model.pretrained", "parent", "output.dir"}
SETTINGS = settings(
    max_examples=300, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip


class Tripwire(Exception):
    """Raised instead of training: a config that gets this far was accepted."""


@pytest.fixture(autouse=True)
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def tripwire(*args: Any, **kwargs: Any) -> None:
        raise Tripwire("a bad config reached training")

    monkeypatch.setattr(runner, "fit", tripwire)


def _unwrap(annotation: Any) -> tuple[list[Any], bool]:
    """The types an annotation admits (Optional stripped) and whether None is one of them."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(annotation) if union else (annotation,)
    return [a for a in args if a is not type(None)], type(None) in args


def _sections(model: type[BaseModel], prefix: str = "") -> dict[str, type[BaseModel]]:
    out = {prefix: model}
    for name, field in model.model_fields.items():
        for kind in _unwrap(field.annotation)[0]:
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                out |= _sections(kind, f"{prefix}{name}.")
    return {k.rstrip("."): v for k, v in out.items()}


SECTIONS = _sections(ExperimentConfig)
FIELDS: dict[str, FieldInfo] = {
    f"{path}.{name}".lstrip("."): field
    for path, model in SECTIONS.items()
    for name, field in model.model_fields.items()
}
FUZZED = sorted(k for k in FIELDS if k not in FREE)

WRONG_TYPES = st.sampled_from([[1, 2], {"x": 1}, [], {"nested": {"deep": [1]}}, "not a number"])


def bad_values(key: str) -> st.SearchStrategy[Any]:
    """Values `key` must refuse: wrong types, out-of-range numbers, non-finite floats, names
    nothing is registered under."""
    field = FIELDS[key]
    kinds, _ = _unwrap(field.annotation)
    kind = kinds[0]
    if key in NAMES:
        return st.sampled_from(["no-such-thing", "", "../etc", 5, [1]])
    if key == "name":
        return st.sampled_from(["a/b", ".hidden", "", 7, ["x"]])
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return st.sampled_from([5, "text", [1, 2], True])
    if typing.get_origin(kind) is typing.Literal:
        return st.sampled_from(["nonsense", 3, ["x"], {"a": 1}, "STANDARD"])
    if kind is bool:
        return st.sampled_from(["maybe", 2, [True], {"on": 1}, 0.5])
    if kind is str:
        return st.sampled_from([5, 1.5, [1], {"a": 1}])
    if typing.get_origin(kind) is dict:
        return st.sampled_from([[1, 2], 5, "text", True])
    if typing.get_origin(kind) is list:
        return st.sampled_from(["x", {"a": 1}, [["nested"]], ["word"]])
    bounds: list[Any] = []
    for meta in field.metadata:
        if isinstance(meta, at.Gt):
            bounds += [meta.gt, meta.gt - 1]
        elif isinstance(meta, at.Ge):
            bounds.append(meta.ge - 1)
        elif isinstance(meta, at.Lt):
            bounds += [meta.lt, meta.lt + 1]
        elif isinstance(meta, at.Le):
            bounds.append(meta.le + 1)
    values: list[Any] = [*bounds, "abc", [1], {"a": 1}]
    if kind is int:
        values += [1.5, "2.5"]
    if kind is float:
        values += [float("nan"), float("inf"), float("-inf"), "1e999"]
    return st.sampled_from(values)


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _base_for(key: str) -> dict[str, Any]:
    raw = copy.deepcopy(BASE)
    for section, content in OPTIONAL_SECTIONS.items():
        if key == section or key.startswith(section + "."):
            _set(raw, section, copy.deepcopy(content))
    return raw


KEY_NAMES = st.from_regex(r"\A[a-z][a-z_]{0,10}\Z", fullmatch=True)
ANY_VALUES = st.one_of(
    st.integers(), st.text(max_size=5), st.booleans(), st.none(),
    st.lists(st.integers(), max_size=2),
)


@st.composite
def bad_run_config(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A valid run config broken once, and the key path its error must name."""
    how = draw(st.sampled_from(["value", "value", "unknown", "options"]))
    if how == "value":
        key = draw(st.sampled_from(FUZZED))
        raw = _base_for(key)
        _set(raw, key, draw(bad_values(key)))
        return raw, key
    if how == "unknown":
        section = draw(st.sampled_from(sorted(SECTIONS)))
        name = draw(KEY_NAMES.filter(lambda k: k not in SECTIONS[section].model_fields))
        key = f"{section}.{name}".lstrip(".")
        raw = _base_for(key)
        _set(raw, key, draw(ANY_VALUES))
        return raw, key
    where = draw(st.sampled_from(["model.options", "data.options", "data.poison.options",
                                  "defense.options"]))  # fmt: skip
    name = draw(KEY_NAMES.filter(lambda k: k not in ("size", "seed", "root")))
    key = f"{where}.{name}"
    raw = _base_for(key)
    _set(raw, key, draw(ANY_VALUES))
    return raw, key


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A fresh working folder per generated case (pytest's tmp_path is one per test)."""
    with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder):
        yield Path(folder)


def refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one line on stderr. Returns it."""
    capsys.readouterr()
    code = cli.main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("vptlab: error: "), err
    return lines[0]


def _names(line: str, key: str) -> bool:
    """Whether the error line names `key`: its full path, or a parent section's path followed by
    the leaf's name (an error raised by a section-level check)."""
    if key in line:
        return True
    parts = key.split(".")
    return any(".".join(parts[:i]) in line and parts[-1] in line for i in range(1, len(parts)))


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@SETTINGS
@given(case=bad_run_config())
def test_bad_run_config_is_one_line_naming_the_key(
    case: tuple[dict[str, Any], str], capsys: pytest.CaptureFixture[str]
) -> None:
    raw, key = case
    with scratch() as folder:
        (folder / "bad.yaml").write_text(yaml.safe_dump(raw))
        line = refused(capsys, ["train", "-c", "bad.yaml"])
        assert _names(line, key), (key, line)
        assert _files(folder) == {"bad.yaml"}, "a run folder was created"


@settings(SETTINGS, max_examples=40)
@given(key=st.sampled_from(FUZZED), data=st.data())
def test_bad_override_is_one_line_naming_the_key(
    key: str, data: st.DataObject, capsys: pytest.CaptureFixture[str]
) -> None:
    value = data.draw(bad_values(key))
    with scratch() as folder:
        (folder / "good.yaml").write_text(yaml.safe_dump(_base_for(key)))
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        line = refused(capsys, ["train", "-c", "good.yaml", f"{key}={text}"])
        assert _names(line, key), (key, text, line)
        assert _files(folder) == {"good.yaml"}


STUDY: dict[str, Any] = {
    "study": "s",
    "base": BASE,
    "runs": {"full": {"adapt": {"mode": "full"}},
             "poisoned": {"data": {"poison": OPTIONAL_SECTIONS["data.poison"]}}},
    "defenses": {"ft": {"name": "ft", "train": {"epochs": 1}}},
}  # fmt: skip


@st.composite
def bad_study(draw: st.DrawFn) -> tuple[dict[str, Any], list[str]]:
    """A valid study broken once, and the key paths of which its error must name one. A broken
    run is the last one, so a study that trained before validating would trip the wire."""
    raw = copy.deepcopy(STUDY)
    how = draw(st.sampled_from(["run", "base", "backbone", "top", "attack", "defense"]))
    if how in ("run", "base", "backbone"):
        broken, key = draw(bad_run_config())
        where = {"run": "runs.poisoned", "base": "base", "backbone": "backbone"}[how]
        if how == "run":
            raw["runs"]["poisoned"] = deep_merge(raw["runs"]["poisoned"], broken)
        else:
            raw[where] = broken
        return raw, [key]
    if how == "attack":
        name = draw(st.sampled_from([k for k in FUZZED if k.startswith("train.attack.")]))
        leaf = name.removeprefix("train.attack.")
        attack = {"name": "pgd", "eps": 0.1, "steps": 2, leaf: draw(bad_values(name))}
        raw["attacks"] = [{"name": "fgsm", "eps": 0.1}, attack]
        return raw, [f"attacks.1.{leaf}"]
    if how == "defense":
        leaf, value = draw(st.sampled_from([
            ("name", "no-such-defense"), ("name", 3), ("clean_fraction", 0), ("clean_fraction", 2),
            ("clean_fraction", float("nan")), ("options", [1]), ("options.bogus", 1),
            ("train.lr", -1), ("train.bogus", 1), ("train", "fast"), ("colour", "red"),
        ]))  # fmt: skip
        _set(raw["defenses"]["ft"], leaf, value)
        return raw, [f"defenses.ft.{leaf}", f"defenses.ft ({leaf.split('.')[0]}"] + (
            [f"defenses.ft (run poisoned): defense.{leaf}", f"defenses.ft (run poisoned): {leaf}"]
        )  # fmt: skip
    key, value = draw(st.sampled_from([
        ("study", ["s"]), ("runs", []), ("runs", {}), ("runs", "all"), ("attacks", {"a": 1}),
        ("attack_limit", 0), ("attack_limit", "many"), ("detectors", ["nope"]), ("output", 3),
        ("bogus", 1), ("runs.full", 5), ("backbone", [1]), ("seeds", []), ("seeds", [0, 0]),
        ("seeds", [-1]), ("seeds", "three"), ("seeds", [0.5]), ("seeds", [0, 1]),
    ]))  # fmt: skip
    _set(raw, key, value)
    return raw, [key]


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    from vptlab.steps.study import deep_merge as merge

    return merge(base, update)


@settings(SETTINGS, max_examples=120)
@given(case=bad_study())
def test_bad_study_is_refused_before_anything_trains(
    case: tuple[dict[str, Any], list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    raw, keys = case
    with scratch() as folder:
        (folder / "study.yaml").write_text(yaml.safe_dump(raw))
        os.environ["VPTLAB_CACHE"] = str(folder / "cache")
        try:
            line = refused(capsys, ["train", "-c", "study.yaml"])
        finally:
            del os.environ["VPTLAB_CACHE"]
        assert any(_names(line, key) for key in keys), (keys, line)
        assert _files(folder) == {"study.yaml"}, "a run or report folder was created"


MATRIX: dict[str, Any] = {
    "matrix": "m",
    "base": BASE,
    "models": {"simplenet": {"model": {"name": "simplenet"}}},
    "adaptations": {"full": {"adapt": {"mode": "full"}}, "linear": {"adapt": {"mode": "linear"}}},
    "threats": {
        "clean": {"kind": "clean"},
        "pgd": {"kind": "evasion", "attacks": [{"name": "pgd", "eps": 0.1, "steps": 2}]},
        "badnets": {"kind": "backdoor", "poison": OPTIONAL_SECTIONS["data.poison"]},
    },
    "defenses": {
        "none": {"kind": "none"},
        "ft": {"kind": "repair", "name": "ft", "train": {"epochs": 1}},
        "at": {"kind": "adversarial", "train": {"objective": "pgd", "attack": {"eps": 0.1}}},
    },
    "evaluation": {"limit": 32, "examples": 2},
}


@st.composite
def bad_matrix(draw: st.DrawFn) -> tuple[dict[str, Any], list[str]]:
    """A valid threat matrix broken once, and the key paths of which its error must name one."""
    raw = copy.deepcopy(MATRIX)
    how = draw(st.sampled_from(["base", "model", "adaptation", "backbone", "attack", "poison",
                                "defense", "top"]))  # fmt: skip
    if how in ("base", "model", "adaptation", "backbone"):
        broken, key = draw(bad_run_config())
        if key.startswith("adapt") and how in ("base", "model"):
            how = "adaptation"  # the adaptations' fragments are merged last, over `adapt`
        # A base key that every cell replaces is never read: the models entry's `model`, the
        # CLI's --no-progress (`output.progress`). Breaking it there breaks nothing.
        assume(not (how == "base" and key in ("output.progress",)))
        if key.split(".")[0] == "model" and how == "base":
            how = "model"
        if how == "base":
            raw["base"] = broken
        elif how == "model":
            raw["models"]["simplenet"] = broken
        elif how == "adaptation":
            raw["adaptations"]["linear"] = broken
        else:
            raw["adaptations"]["linear"] = {"adapt": {"mode": "linear"}, "backbone": broken}
        return raw, [key]
    if how in ("attack", "poison"):
        prefix = {"attack": "train.attack.", "poison": "data.poison."}[how]
        name = draw(st.sampled_from([k for k in FUZZED if k.startswith(prefix)]))
        leaf = name.removeprefix(prefix)
        if how == "attack":
            raw["threats"]["pgd"]["attacks"][0][leaf] = draw(bad_values(name))
            return raw, [f"threats.pgd.attacks.0.{leaf}"]
        raw["threats"]["badnets"]["poison"][leaf] = draw(bad_values(name))
        return raw, [f"threats.badnets.poison.{leaf}", name]
    if how == "defense":
        label, leaf, value = draw(st.sampled_from([
            ("ft", "name", "no-such-defense"), ("ft", "clean_fraction", 0), ("ft", "options", 5),
            ("ft", "options.bogus", 1), ("ft", "train.lr", 0), ("ft", "train.bogus", 1),
            ("ft", "kind", "magic"), ("at", "train.objective", "standard"), ("at", "name", "ft"),
            ("at", "train.attack.eps", 5), ("none", "train", {"lr": 1}), ("ft", "against", ["x"]),
            ("at", "train_by_model.simplenet.lr", "fast"), ("ft", "colour", 1),
        ]))  # fmt: skip
        _set(raw["defenses"][label], leaf, value)
        first = leaf.split(".")[0]
        return raw, [f"defenses.{label}.{leaf}", f"defenses.{label}.{first}",
                     f"defenses.{label} (cell", f"defenses.{label}: {leaf}",
                     f"defenses.{label}", leaf]  # fmt: skip
    key, value = draw(st.sampled_from([
        ("matrix", "a/b"), ("matrix", ""), ("matrix", 5), ("models", {}), ("models", [1]),
        ("threats", {}), ("threats.clean.kind", "fire"), ("threats.pgd.attacks", []),
        ("threats.clean.poison", {"trigger": "badnets"}), ("models.bad label", {}),
        ("evaluation.limit", 0), ("evaluation.examples", -1), ("resources.num_cpus", 0),
        ("resources.num_gpus", float("inf")), ("bogus", 1), ("evaluation.bogus", 1),
        ("adaptations", "full"), ("defenses.none", "none"), ("output", ["x"]),
    ]))  # fmt: skip
    _set(raw, key, value)
    return raw, [key, key.rsplit(".", 1)[0]]


@settings(SETTINGS, max_examples=150)
@given(case=bad_matrix())
def test_bad_matrix_is_refused_before_anything_runs(
    case: tuple[dict[str, Any], list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    raw, keys = case
    with scratch() as folder:
        (folder / "matrix.yaml").write_text(yaml.safe_dump(raw))
        os.environ["VPTLAB_CACHE"] = str(folder / "cache")
        try:
            line = refused(capsys, ["run", "-c", "matrix.yaml", "--no-progress"])
        finally:
            del os.environ["VPTLAB_CACHE"]
        assert any(_names(line, key) for key in keys), (keys, line)
        assert _files(folder) == {"matrix.yaml"}, "a matrix or run folder was created"


@pytest.mark.slow
def test_cli_process_exits_2_with_one_line(tmp_path: Path) -> None:
    """The real entry point (one process: starting one costs seconds of imports)."""
    config = {**BASE, "data": {**BASE["data"], "augment": {"bogus": {"deep": 1}}}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    command = "train"
    env = {**os.environ, "PYTHONPATH": str(REPO), "VPTLAB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "vptlab.cli", command, "-c", "bad.yaml"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vptlab: error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "data.augment.bogus: unknown key" in lines[0]
    assert _files(tmp_path) == {"bad.yaml"}
