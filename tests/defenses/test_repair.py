"""Backdoor repairers (ft, fp, nad): the clean subset, the config checks, the registry contract, and
each defense run through the loop on one backdoored SimpleNet (see conftest.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from vptlab.config import recipe, run_key
from vptlab.data.base import DataSplits, TensorSplit
from vptlab.data.captions import CaptionSplit
from vptlab.defenses import repair as repair_module
from vptlab.defenses.features import LayerOutputs
from vptlab.defenses.fine_pruning import (
    FinePruning,
    mean_activations,
    pruning_mask,
    pruning_site,
)
from vptlab.defenses.nad import (
    DEFAULT_BETAS,
    AttentionDistillation,
    attention_map,
    default_layers,
    layer_betas,
)
from vptlab.defenses.repair import (
    REPAIRERS,
    Repairer,
    clean_splits,
    clean_subset,
    create_repairer,
    pixel_prompt_refusal,
    pixel_repairers,
    repair,
)
from vptlab.engine.checkpoint import load_model
from vptlab.errors import ConfigError, DataError
from vptlab.models import build_classifier, create_model
from vptlab.runs import METRICS_FILE, MODEL_FILE
from vptlab.steps.build import build_experiment
from vptlab.steps.resolve import resolved
from vptlab.steps.train import load_run

# Minimum ASR drop (points) a short repair must reach and clean accuracy (%) it must keep.
ASR_DROP = 30.0
MIN_CA = 80.0


def run_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / METRICS_FILE).read_text())


def run_repair(
    backdoored: Any,
    tmp_path: Path,
    name: str,
    train: dict[str, Any],
    options: dict[str, Any] | None = None,
) -> tuple[nn.Module, Path, dict[str, Any]]:
    """Run defense `name` on a copy of the backdoored model with 5% clean data; returns the
    repaired model, its run folder and its metrics (with the seconds it took)."""
    defense = {"name": name, "clean_fraction": 0.05, "options": options or {}}
    cfg = backdoored.config(tmp_path, name, train=train, defense=defense)
    clean = clean_splits(backdoored.data, cfg.defense.clean_fraction, cfg.seed)
    repairer = create_repairer(name, **cfg.defense.options)
    run_dir = tmp_path / name
    start = time.perf_counter()
    model = repair(repairer, backdoored.copy(), clean, cfg, run_dir, backdoored.evaluators())
    metrics = run_metrics(run_dir) | {"seconds": time.perf_counter() - start}
    after = metrics["final"]
    print(f"{name}: CA {backdoored.ca:.1f} -> {after['test_top1']:.1f}, ASR {backdoored.asr:.1f} "
          f"-> {after['badnets/asr']:.1f} in {metrics['seconds']:.1f} s")  # fmt: skip
    return model, run_dir, metrics


def assert_repaired(backdoored: Any, metrics: dict[str, Any]) -> None:
    after = metrics["final"]
    assert after["badnets/asr"] < backdoored.asr - ASR_DROP
    assert after["test_top1"] > MIN_CA  # not bought by breaking the classifier


# --- the backdoored model and the clean subset --------------------------------------------------


def test_backdoored_fixture_has_high_asr_and_accuracy(backdoored: Any) -> None:
    print(f"backdoored SimpleNet: CA {backdoored.ca:.1f}, ASR {backdoored.asr:.1f}, "
          f"{backdoored.seconds:.1f} s")  # fmt: skip
    assert backdoored.asr > 90.0
    assert backdoored.ca > 85.0


@pytest.mark.parametrize("fraction", [0.05, 0.013, 0.37, 1.0])
def test_clean_subset_is_seeded_stratified_and_exact(backdoored: Any, fraction: float) -> None:
    train = backdoored.data.train
    sub = clean_subset(train, fraction, seed=3)
    assert isinstance(sub, TensorSplit)
    assert len(sub) == round(fraction * len(train))
    counts = torch.bincount(train.y, minlength=10).double()
    assert (torch.bincount(sub.y, minlength=10) - fraction * counts).abs().max() < 1.0
    again = clean_subset(train, fraction, seed=3)
    assert torch.equal(again.x, sub.x) and torch.equal(again.y, sub.y)
    if fraction < 1:
        assert not torch.equal(clean_subset(train, fraction, seed=4).x, sub.x)
    else:
        assert torch.equal(sub.x, train.x)


class LabelledDataset(Dataset):
    """A Dataset that only knows its labels, as the folder readers' `targets`."""

    def __init__(self, labels: list[int]) -> None:
        self.targets = labels

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Any:
        raise AssertionError("a clean subset must not load images")


def test_clean_subset_of_a_dataset_reads_only_its_labels() -> None:
    labels = [0] * 90 + [1] * 10
    sub = clean_subset(LabelledDataset(labels), 0.2, seed=0)
    assert isinstance(sub, Subset) and len(sub) == 20
    assert sorted(labels[i] for i in sub.indices) == [0] * 18 + [1] * 2


def test_clean_subset_errors_name_the_fraction(backdoored: Any) -> None:
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match=r"^defense\.clean_fraction must be in \(0, 1\]"):
            clean_subset(backdoored.data.train, bad, seed=0)
    with pytest.raises(DataError, match="leaves no clean sample"):
        clean_subset(backdoored.data.train, 1e-4, seed=0)


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["defense.name=ft", "defense.options.lr=1"], r"^defense\.options\.lr: unknown option; "
         "defense 'ft' takes: none$"),
        (["defense.name=fp", "defense.options.max_ratio=1.5"],
         r"^defense\.options\.max_ratio: Input should be less than 1, got 1\.5$"),
        (["defense.name=fp", "defense.options.acc_drop=lots"],
         r"^defense\.options\.acc_drop: Input should be a valid number.*'lots'$"),
        (["defense.name=nad", "defense.options.beta=-1"],
         r"^defense\.options\.beta: Input should be greater than or equal to 0, got -1$"),
        (["defense.name=nad", "defense.options.layers=[]"], r"^defense\.options\.layers: "),
        (["defense.name=fp", "defense.clean_fraction=0"],
         r"^defense\.clean_fraction: Input should be greater than 0, got 0$"),
        (["defense.name=ft", "defense.clean_fraction=1.2"],
         r"^defense\.clean_fraction: Input should be less than or equal to 1, got 1\.2$"),
        (["defense.name=pruning"], r"^defense\.name: unknown defense 'pruning'; choose from: "),
        (["defense.clean_fraction=0.1"], r"^defense\.name: Field required$"),
    ],
)  # fmt: skip
def test_defense_config_errors_are_one_line(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as err:
        resolved({}, overrides)
    assert "\n" not in str(err.value)


def test_defense_config_is_validated_and_keyed() -> None:
    nad = ["defense.name=nad", "defense.options.beta=500", "defense.options.layers=[net.x]"]
    cfg = resolved({}, [*nad, "parent=runs/bd"])
    assert cfg.defense is not None
    assert cfg.defense.options == {"beta": 500.0, "layers": ["net.x"]}
    assert cfg.defense.clean_fraction == 0.05
    plain = resolved({})
    assert "defense" not in recipe(plain) and "parent" not in recipe(plain)  # old keys stand
    assert run_key(cfg) != run_key(plain)
    assert run_key(cfg) != run_key(resolved({}, ["defense.name=nad", "parent=runs/bd"]))


# --- the registry contract ----------------------------------------------------------------------


def _model_for(repairer: Repairer) -> torch.nn.Module:
    """A small model the repairer applies to: a tiny CLIP for image-text repairers."""
    if REPAIRERS.meta(repairer.name)["needs_image_text"]:
        return create_model("clip-tiny", num_classes=10, img_size=28, layers=1, text_layers=1,
                            width=32, text_width=32, embed_dim=16)  # fmt: skip
    return create_model("simplenet", num_classes=10, img_size=28)


@pytest.mark.parametrize("name", REPAIRERS.names())
def test_prepare_is_structure_only_and_deterministic(name: str) -> None:
    repairer = create_repairer(name)
    assert isinstance(repairer, Repairer) and repairer.name == name
    x = torch.rand(4, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = _model_for(repairer).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = model(x)
    prepared = repairer.prepare(model)
    state = prepared.state_dict()
    inner = model.state_dict()  # the prompt defense wraps the model: its own tensors, unchanged
    assert all(torch.equal(inner[k], v) for k, v in before.items())  # no weight changed
    assert torch.allclose(prepared(x), out)  # same function until repaired
    if name in ("prompt", "clip-prompt"):  # a second defensive prompt is refused, not stacked
        with pytest.raises(ConfigError, match="already has a defensive prompt"):
            repairer.prepare(prepared)
    else:
        again = repairer.prepare(prepared)  # idempotent: one mask, one hook
        assert again.state_dict().keys() == state.keys()
        assert torch.allclose(again(x), out)
    torch.manual_seed(0)
    other = repairer.prepare(_model_for(repairer))
    assert other.state_dict().keys() == state.keys()


# --- ft -----------------------------------------------------------------------------------------


def test_fine_tuning_lowers_asr(backdoored: Any, tmp_path: Path) -> None:
    model, run_dir, metrics = run_repair(backdoored, tmp_path, "ft", {"epochs": 5, "lr": 5e-3})
    assert_repaired(backdoored, metrics)
    assert metrics["status"] == "complete" and (run_dir / MODEL_FILE).is_file()
    assert all(p.requires_grad for p in model.parameters())


# --- fp -----------------------------------------------------------------------------------------


def test_fine_pruning_prunes_dormant_channels_lowers_asr_and_reloads(
    backdoored: Any, tmp_path: Path
) -> None:
    model, run_dir, metrics = run_repair(backdoored, tmp_path, "fp", {"epochs": 5, "lr": 1e-3})
    assert_repaired(backdoored, metrics)
    pruning = metrics["fine_pruning"]
    mask = pruning_mask(model)
    assert pruning["site"] == "net.features" and pruning["units"] == mask.numel() == 192
    assert 0 < pruning["pruned"] == int((mask == 0).sum()) <= 0.8 * 192
    # The pruned channels are the most dormant ones of the backdoored model on the clean subset.
    cfg = backdoored.config(tmp_path, "probe")
    clean = clean_splits(backdoored.data, 0.05, cfg.seed).train
    activation = mean_activations(FinePruning().prepare(backdoored.copy()), clean, cfg)
    assert activation[mask == 0].max() <= activation[mask == 1].min()
    # It stopped at the last step within the tolerance of 4 points, or at the 80% limit.
    curve = dict((int(k), acc) for k, acc in pruning["curve"])
    assert pruning["clean_top1_before"] - curve[pruning["pruned"]] <= 4.0
    next_steps = [k for k in curve if k > pruning["pruned"]]
    if next_steps:
        assert pruning["clean_top1_before"] - curve[min(next_steps)] > 4.0
    else:
        assert pruning["pruned"] == int(0.8 * 192)
    # Saved and rebuilt from the run folder (build model -> prepare -> load): the same model.
    cfg_loaded, reloaded, _ = load_run(run_dir, device="cpu")
    assert cfg_loaded.defense is not None and cfg_loaded.defense.name == "fp"
    assert torch.equal(pruning_mask(reloaded), mask)
    x = backdoored.data.test.x[:64].expand(-1, 3, -1, -1)
    assert torch.allclose(reloaded(x), model.eval()(x), atol=1e-5)
    with pytest.raises(Exception, match="prune_mask"):  # an unprepared model does not take it
        load_model(create_model("simplenet", num_classes=10, img_size=28), run_dir / MODEL_FILE)


def test_fine_pruning_masks_the_last_mlp_neurons_of_a_vit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("vit-scratch", num_classes=10, img_size=8, patch_size=4, embed_dim=16,
                         depth=2, num_heads=2)  # fmt: skip
    assert pruning_site(model) == ("net.blocks.1.mlp.act", -1, 32)
    split = TensorSplit(torch.rand(40, 3, 8, 8), torch.randint(0, 10, (40,)))
    cfg = resolved({"device": "cpu", "output": {"dir": str(tmp_path)},
                        "data": {"num_workers": 0}})  # fmt: skip
    fp = FinePruning(max_ratio=0.5, acc_drop=100.0)  # any accuracy loss allowed: prune the most
    summary = fp.prune(fp.prepare(model), split, cfg)
    mask = pruning_mask(model)
    assert summary["pruned"] == int((mask == 0).sum()) == 16
    # Measured again, after the mask's hook: the pruned neurons are silent, the others are not.
    after = mean_activations(model, split, cfg)
    assert torch.all(after[mask == 0] == 0) and torch.all(after[mask == 1] > 0)
    # And they were the most dormant ones of the unpruned model.
    mask.fill_(1.0)
    before = mean_activations(model, split, cfg)
    assert before[after == 0].max() <= before[after > 0].min()


def test_fine_pruning_refuses_a_model_it_cannot_prune() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    model = build_classifier(net, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ConfigError, match=r"^defense 'fp' cannot prune Sequential"):
        create_repairer("fp").prepare(model)


# --- nad ----------------------------------------------------------------------------------------


def test_attention_map_is_a_unit_map_of_squared_activations() -> None:
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(2, 5, 3, 4, generator=g)
    a = attention_map(conv)
    assert a.shape == (2, 12)
    assert torch.allclose(a.norm(dim=1), torch.ones(2))
    expected = conv.pow(2).mean(1).flatten(1)
    assert torch.allclose(a, expected / expected.norm(dim=1, keepdim=True))
    tokens = torch.randn(2, 1 + 3 + 4, 6, generator=g)  # class, 3 prompts, 4 patches
    assert torch.allclose(attention_map(tokens, num_patches=4), attention_map(tokens[:, 4:]))


def test_nad_default_layers_and_unknown_layers() -> None:
    simplenet = create_model("simplenet", num_classes=10, img_size=28)
    layers = default_layers(simplenet)
    features = simplenet.net.features
    assert [type(features[int(n.rsplit(".", 1)[1])]) for n in layers] == [nn.ReLU] * 3
    assert layers[-1] == f"net.features.{len(features) - 2}"  # the last conv block, before pooling
    vit = create_model("vit-scratch", num_classes=10, img_size=8, depth=5, embed_dim=16,
                       num_heads=2)  # fmt: skip
    # Block 4's patches are unused (class-token pooling): NAD's three maps are blocks 1 to 3.
    assert default_layers(vit) == ["net.blocks.1", "net.blocks.2", "net.blocks.3"]
    with pytest.raises(ConfigError, match=r"^defense\.options\.layers: .*'net\.nope'"):
        create_repairer("nad", layers=["net.nope"]).prepare(simplenet)


def test_nad_betas_default_to_the_authors_500_1000_1000() -> None:
    simplenet = create_model("simplenet", num_classes=10, img_size=28)
    assert DEFAULT_BETAS == (500.0, 1000.0, 1000.0)
    nad = create_repairer("nad")
    assert nad.betas_of(simplenet) == [500.0, 1000.0, 1000.0]
    # One beta (configs written before per-layer weights) weighs every layer alike.
    assert create_repairer("nad", beta=5000).betas_of(simplenet) == [5000.0] * 3
    assert create_repairer("nad", betas=[1, 2, 3]).betas_of(simplenet) == [1.0, 2.0, 3.0]
    # Fewer layers take the highest default weights.
    assert layer_betas(2) == [1000.0, 1000.0] and layer_betas(1) == [1000.0]
    with pytest.raises(ConfigError, match=r"^defense\.options\.betas: 2 weights for 3 layers"):
        create_repairer("nad", betas=[1, 2]).prepare(simplenet)
    with pytest.raises(ConfigError, match=r"^defense\.options\.betas: give beta .* not both"):
        create_repairer("nad", beta=1, betas=[1, 2, 3]).prepare(simplenet)
    with pytest.raises(ConfigError, match=r"^defense\.options\.betas: the default weights"):
        layer_betas(4)
    g = torch.Generator().manual_seed(0)
    s, t = [torch.rand(2, 4, 3, 3, generator=g) for _ in range(2)]
    task = AttentionDistillation(nn.Identity(), ["a", "b"], beta=[500.0, 1000.0])
    one = AttentionDistillation(nn.Identity(), ["a"], beta=1.0)
    expected = 500 * one.distillation([s], [t]) + 1000 * one.distillation([t], [s])
    assert torch.allclose(task.distillation([s, t], [t, s]), expected)


def test_nad_lowers_asr_and_distills_the_teachers_attention(
    backdoored: Any, tmp_path: Path
) -> None:
    model, run_dir, metrics = run_repair(backdoored, tmp_path, "nad", {"epochs": 5, "lr": 3e-3},
                                     {"teacher_epochs": 2})  # fmt: skip
    assert_repaired(backdoored, metrics)
    teacher_metrics = run_metrics(run_dir / "teacher")
    assert teacher_metrics["epochs_done"] == 2
    # The teacher's curves are clean top-1 on the data its repairer was given, no trigger.
    assert "badnets/asr" not in teacher_metrics["final"]
    print(f"nad teacher: top-1 {teacher_metrics['final']['test_top1']:.1f}")
    # No hook is left behind on the repaired model.
    assert not any(m._forward_hooks for m in model.modules())
    # The student's attention moved to the teacher's: the distillation term fell.
    teacher = load_model(backdoored.copy(), run_dir / "teacher" / MODEL_FILE).eval()
    layers = default_layers(model)
    task = AttentionDistillation(teacher, layers, beta=5000.0)
    x = backdoored.data.test.x[:128].expand(-1, 3, -1, -1)

    def distance(student: nn.Module) -> float:
        with LayerOutputs(student.eval(), layers) as capture, torch.no_grad():
            student(x)
            return float(task.distillation(capture.take(), task.teacher_forward(x)))

    before, after = distance(backdoored.copy()), distance(model)
    task.close()
    print(f"nad distillation term: {before:.3f} -> {after:.3f}")
    assert after < 0.5 * before


def test_clean_splits_keep_the_test_split(backdoored: Any) -> None:
    clean = clean_splits(backdoored.data, 0.05, seed=0)
    assert isinstance(clean, DataSplits) and clean.test is backdoored.data.test
    assert len(clean.train) == 200 and clean.num_classes == 10


# Image-text repairers (cleanclip, clip-prompt) need captions: tests/clip/test_clip_defenses.py
# repairs a poisoned tiny CLIP with each and reloads its run.
IMAGE_ONLY = REPAIRERS.names(needs_image_text=False)


@pytest.mark.parametrize("name", IMAGE_ONLY)
def test_every_repairer_repairs_a_tiny_vit_whose_run_reloads(name: str, tmp_path: Path) -> None:
    raw = {
        "name": name,
        "device": "cpu",
        "data": {"name": "mnist-5k", "batch_size": 50, "num_workers": 0},
        "model": {"name": "vit-scratch",
                  "options": {"patch_size": 7, "embed_dim": 16, "depth": 3, "num_heads": 2}},
        "train": {"epochs": 1, "lr": 1e-3},
        "output": {"dir": str(tmp_path), "tensorboard": False, "progress": False},
    }  # fmt: skip
    data, model = build_experiment(resolved(raw))  # the parent: no defense structure yet
    cfg = resolved({**raw, "defense": {"name": name, "clean_fraction": 0.05}})
    clean = clean_splits(data, cfg.defense.clean_fraction, cfg.seed)
    run_dir = tmp_path / name
    repaired = repair(create_repairer(name), model, clean, cfg, run_dir)
    assert run_metrics(run_dir)["status"] == "complete"
    _, reloaded, _ = load_run(run_dir, device="cpu")
    x = data.test.x[:16].expand(-1, 3, -1, -1)
    assert torch.allclose(reloaded(x), repaired.eval()(x), atol=1e-5)


# --- every repairer is a task of the one loop ---------------------------------------------------


@pytest.mark.parametrize("name", REPAIRERS.names())
def test_registry_metadata_exist_for_every_repairer(name: str) -> None:
    meta = REPAIRERS.meta(name)
    assert isinstance(meta["repairs_pixel_prompts"], bool)
    assert isinstance(meta["needs_image_text"], bool)
    assert (name in pixel_repairers()) == meta["repairs_pixel_prompts"]
    assert (pixel_prompt_refusal(name) is None) == meta["repairs_pixel_prompts"]


@pytest.mark.parametrize("name", REPAIRERS.names())
def test_every_repairer_goes_through_the_one_fit(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`repair` calls `fit` once for the defended run, with the repairer's task; no repairer
    trains its model another way (NAD's teacher is `ft` on a copy, through the same `repair`)."""
    calls: list[tuple[Path, Any]] = []

    def recording_fit(model: nn.Module, data: Any, cfg: Any, run_dir: Any, **kw: Any) -> dict:
        calls.append((Path(run_dir), kw["task"]))
        return {}

    monkeypatch.setattr(repair_module, "fit", recording_fit)
    repairer = create_repairer(name)
    torch.manual_seed(0)
    model = _model_for(repairer)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(20, 3, 28, 28, generator=g), torch.arange(20) % 10
    split = (CaptionSplit(x, y, [f"a photo of {i}" for i in y.tolist()])
             if REPAIRERS.meta(name)["needs_image_text"] else TensorSplit(x, y))  # fmt: skip
    clean = DataSplits("tiny", split, split, 10)
    cfg = resolved({"name": name, "device": "cpu", "data": {"name": "digits", "num_workers": 0},
                    "output": {"dir": str(tmp_path), "tensorboard": False,
                               "progress": False}})  # fmt: skip
    run_dir = tmp_path / name
    repair(repairer, model, clean, cfg, run_dir)
    assert [path for path, _ in calls if path == run_dir] == [run_dir]
    assert all(path == run_dir / "teacher" for path, _ in calls if path != run_dir)
    assert callable(getattr(calls[-1][1], "loss", None))
