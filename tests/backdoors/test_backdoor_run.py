"""A poisoned run is just a config: `data.poison` poisons the train split (the test split stays
clean), the run folder keeps the poisoning, ASR and RA are in the history, TensorBoard, metrics
and report; a short BadNets run on mnist-5k plants the backdoor at little cost in accuracy. Bad
poison configs are one line naming their key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from vptlab.backdoors.poison import (
    POISON_FILE,
    POISON_INDICES_FILE,
    load_poison,
    load_poison_record,
)
from vptlab.backdoors.triggers import create_trigger
from vptlab.config import ExperimentConfig, recipe, run_key
from vptlab.data import load_dataset
from vptlab.engine.checkpoint import load_model
from vptlab.errors import ConfigError
from vptlab.models import create_model
from vptlab.report.plots import BACKDOOR_PANEL, curve_panels, plot_curves
from vptlab.runs import MODEL_FILE
from vptlab.steps import train as runner
from vptlab.steps.build import build_data
from vptlab.steps.resolve import load_resolved, resolved

PRESET = Path(__file__).resolve().parents[2] / "configs" / "backdoor_mnist_badnets.yaml"


def preset(out: Path, *overrides: str) -> ExperimentConfig:
    """The BadNets preset, shortened: 2 epochs on the CPU, no progress bar."""
    return load_resolved(PRESET, [
        f"output.dir={out}", "output.progress=false", "device=cpu", "data.num_workers=0",
        "train.epochs=2", *overrides,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A poisoned and a clean SimpleNet, 2 epochs each on mnist-5k (about 10 s each)."""
    out = tmp_path_factory.mktemp("runs")
    poisoned = runner.train(preset(out))
    clean = runner.train(preset(out, "name=clean", "data.poison=null",
                                "output.tensorboard=false"))  # fmt: skip
    return {"out": out, "poisoned": poisoned, "clean": clean}


@pytest.mark.slow
def test_badnets_run_plants_the_backdoor_at_little_cost(runs: dict[str, Any]) -> None:
    final, clean = runs["poisoned"]["final"], runs["clean"]["final"]
    assert final["badnets/asr"] > 90.0
    assert final["badnets/ra"] < 10.0  # the patch overrides the digit
    assert abs(final["test_top1"] - clean["test_top1"]) < 3.0 and clean["test_top1"] > 90.0
    assert "badnets/asr" not in clean


def poisoned_run(out: Path, poison: str) -> dict[str, float]:
    """The final metrics of the fixture's 2-epoch run poisoned by `poison` instead (~10 s)."""
    return runner.train(preset(out, f"data.poison={poison}", "output.tensorboard=false"))["final"]


@pytest.mark.slow
def test_lf_run_plants_the_backdoor_at_little_cost(runs: dict[str, Any], tmp_path: Path) -> None:
    """The model-free LF pattern (eps 0.2, sigma 6 px) at 10%: measured ASR 100, CA 94.7 against
    the clean model's 95.3."""
    final, clean = poisoned_run(tmp_path, "{trigger: lf, rate: 0.1}"), runs["clean"]["final"]
    assert final["lf/asr"] >= 80.0 and final["lf/ra"] < 20.0
    assert abs(final["test_top1"] - clean["test_top1"]) < 3.0


@pytest.mark.slow
def test_bpp_run_plants_the_backdoor_at_one_bit(runs: dict[str, Any], tmp_path: Path) -> None:
    """BPP at its default 8 levels plants nothing in SimpleNet on gray digits, in any budget
    measured: 10% poison on mnist-5k gives ASR 4.6 / 5.2 / 5.8 after 2 / 6 / 15 epochs (plain
    quantization: 5.7 after 6) at a CA cost of 2.8 / 3.2 / 3.9 points (the poisoned digits are
    label noise), and on `digits` (8x8, every pixel moves) 5.3 / 5.9 after 5 / 30 epochs (CA
    cost 4.2 / 5.6). Why: a digit's pixels are mostly 0 or 1, levels already; only the
    anti-aliased stroke edges (a fifth of the pixels) move, by 0.03 on average (at most 1/14
    without dithering), within the spread of edges in clean digits, and a 7x7 stride-2 stem
    averages that texture away. The paper trains RGB natural images, where every pixel moves,
    for hundreds of epochs, with its contrastive negatives. At 4 levels: ASR 7.1 after 2 epochs
    (mnist-5k), 26.6 after 30 (digits). What holds is 1 bit with dithering (squeeze_num 2: the
    edges snapped to 0 or 1, their error diffused): measured ASR 96.8, CA 93.3 against 95.3."""
    final = poisoned_run(tmp_path, "{trigger: bpp, rate: 0.1, options: {squeeze_num: 2}}")
    clean = runs["clean"]["final"]
    assert final["bpp/asr"] >= 80.0
    assert abs(final["test_top1"] - clean["test_top1"]) < 3.0


@pytest.mark.slow
def test_trojannn_run_plants_the_backdoor_at_little_cost(
    runs: dict[str, Any], tmp_path: Path
) -> None:
    """TrojanNN at 10%: the 5x5 corner patch learnt on a 1-epoch surrogate (10 signed steps on
    16 digits; the split's fit, the run's evaluation and training all use it): measured ASR
    99.7, CA 94.5 against the clean model's 95.3. The evaluation can only stamp with the
    poisoned split's own fitted trigger: one rebuilt from the config has no patch."""
    poison = "{trigger: trojannn, rate: 0.1, options: {steps: 10, images: 16, surrogate_epochs: 1}}"
    final, clean = poisoned_run(tmp_path, poison), runs["clean"]["final"]
    assert final["trojannn/asr"] >= 80.0 and final["trojannn/ra"] < 20.0
    assert abs(final["test_top1"] - clean["test_top1"]) < 3.0


@pytest.mark.slow
def test_lc_run_on_digits_needs_the_whole_target_class(
    runs: dict[str, Any], tmp_path: Path
) -> None:
    """Label-consistent plants no backdoor in SimpleNet on mnist-5k at a CA cost under 3 points.
    10% of the split is the whole target class (400 zeros): every training 0 then carries the
    corner checkerboards, the model learns them as "0" (measured ASR 30.9 after 2 epochs, 60.9
    without the PGD step) and clean zeros, which never come without them, lose it: CA 87.0
    against 95.3. With half the class (rate 0.05) the clean zeros teach the digit and the
    corners are ignored: ASR 4.0 / 3.4 after 2 / 6 epochs (4.9 / 4.0 without PGD), CA 95.0 /
    96.8. Why it cannot work here: a digit is learnt from its strokes in an epoch, so nothing
    forces the model onto the trigger, and the PGD step meant to (16/255 on the surrogate)
    halves the ASR instead of raising it (our reading, not measured: on a clean surrogate, not
    an adversarially trained one as the authors', its perturbations are non-robust features
    the victim learns as easily as the digit)."""
    poison = ("{trigger: lc, rate: 0.1, label: clean, "
              "options: {steps: 10, alpha: 0.0157, surrogate_epochs: 1}}")  # fmt: skip
    final, clean = poisoned_run(tmp_path, poison), runs["clean"]["final"]
    assert final["lc/asr"] < 50.0
    assert clean["test_top1"] - final["test_top1"] > 3.0


@pytest.mark.slow
def test_inputaware_run_plants_a_partial_backdoor(runs: dict[str, Any], tmp_path: Path) -> None:
    """Input-aware at 10% (generators fitted in seconds, cross_ratio 1) does NOT reach 80%
    ASR in the 2-epoch budget: measured ASR 38.0, CA 93.7 against the clean model's 95.3, and a
    trigger generated from another digit sends 23% of the digits to the target (cross-trigger
    ASR; 68% keep their label). After 6 epochs: ASR 48.3, CA 95.5, cross-trigger 18.7. Without
    cross samples (cross_ratio 0): ASR 33.4 after 2 epochs, so they are not what holds it back.
    Why: each digit's trigger is a different sparse pattern at different pixels (about 7% of
    them), which a victim trained on a frozen generator's fixed samples learns slowly; the
    authors' classifier learns it over 600 epochs together with the generator."""
    final = poisoned_run(tmp_path, "{trigger: inputaware, rate: 0.1}")
    clean = runs["clean"]["final"]
    assert 25.0 < final["inputaware/asr"] < 80.0  # planted in part, well above the ~1% by chance
    assert abs(final["test_top1"] - clean["test_top1"]) < 3.0
    # The cross-trigger property: a trigger from ANOTHER digit flips fewer than its own does.
    run_dir = tmp_path / "backdoor-mnist-badnets"
    trigger = load_poison_record(run_dir).trigger
    model = create_model("simplenet", num_classes=10, img_size=28)
    load_model(model, run_dir / MODEL_FILE)
    test = load_dataset("mnist-5k", seed=0).test
    x = test.x[test.y != 0]
    with torch.no_grad():
        own = model.eval()(trigger.apply(x).repeat(1, 3, 1, 1)).argmax(1)
        cross = model(trigger.noise(x, torch.Generator().manual_seed(0)).repeat(1, 3, 1, 1))
    own_asr, cross_asr = [float((p == 0).float().mean()) * 100 for p in (own, cross.argmax(1))]
    assert own_asr == pytest.approx(final["inputaware/asr"], abs=0.5)
    assert cross_asr < own_asr - 10.0


def test_bpp_default_moves_only_the_edges_of_a_digit() -> None:
    """The reason BPP's default plants nothing on digits (test above), on mnist-5k's digits."""
    x = load_dataset("mnist-5k", seed=0).train.x[:500]
    change = (create_trigger("bpp").apply(x) - x).abs()
    edge = (x > 0) & (x < 1)  # neither background nor a saturated stroke
    assert change[~edge].max() == 0 and float(edge.float().mean()) < 0.25
    assert change[edge].mean() < 0.05 and change.max() <= 1 / 7 + 1e-6
    plain = (create_trigger("bpp", dithering=False).apply(x) - x).abs()
    assert plain.max() <= 1 / 14 + 1e-6
    one_bit = (create_trigger("bpp", squeeze_num=2).apply(x) - x).abs()
    assert one_bit.mean() > 4 * change.mean()


@pytest.mark.slow
def test_run_folder_holds_the_poisoning_and_the_metrics(runs: dict[str, Any]) -> None:
    run_dir = runs["out"] / "backdoor-mnist-badnets"
    assert (run_dir / POISON_FILE).is_file() and (run_dir / POISON_INDICES_FILE).is_file()
    indices, trigger, config = load_poison(run_dir)
    assert len(indices) == 400 and trigger.name == "badnets" and config.seed == 0
    # The run rebuilds the same poisoned split from its config.
    cfg, _, splits = runner.load_run(run_dir, device="cpu")
    assert torch.equal(splits.train.poison.poisoned, indices)
    assert (splits.train.y[indices] == 0).all()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert all("badnets/asr" in row and "badnets/ra" in row for row in metrics["history"])
    backdoor = metrics["backdoor"]
    assert backdoor["poisoned"] == 400 and backdoor["asr"] == metrics["final"]["badnets/asr"]
    report = (run_dir / "report.md").read_text()
    assert "| trigger |" in report and f"{backdoor['asr']:.2f}" in report
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert {"badnets/asr", "badnets/ra"} <= set(events.Tags()["scalars"])


def test_the_test_split_stays_clean(tmp_path: Path) -> None:
    data = build_data(preset(tmp_path))
    plain = load_dataset("mnist-5k", seed=0)
    assert torch.equal(data.test.x, plain.test.x) and torch.equal(data.test.y, plain.test.y)
    assert torch.equal(data.train.clean.x, plain.train.x)  # the clean copy, untouched
    changed = (data.train.x != plain.train.x).flatten(1).any(dim=1)
    assert int(changed.sum()) == 400


@pytest.mark.slow
def test_curves_show_asr_beside_accuracy(runs: dict[str, Any], tmp_path: Path) -> None:
    histories = {"badnets": runs["poisoned"]["history"], "clean": runs["clean"]["history"]}
    assert curve_panels(histories)[-1] == BACKDOOR_PANEL
    assert BACKDOOR_PANEL not in curve_panels({"clean": runs["clean"]["history"]})
    plot_curves(histories, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.slow
def test_study_report_tables_the_poisoned_runs(runs: dict[str, Any], tmp_path: Path) -> None:
    from vptlab.steps.study import StudyConfig, write_study_report

    study = StudyConfig(study="bd", runs={"badnets": {}, "clean": {}})
    results = {"badnets": runs["poisoned"], "clean": runs["clean"]}
    report = write_study_report(study, tmp_path, results).read_text()
    section = report.split("## Backdoor", 1)[1]
    assert "| badnets | badnets | 0.1 | 0 | all2one | dirty | 400 | 0 |" in section
    assert "| clean |" not in section


def test_run_key_of_an_unpoisoned_config_is_unchanged() -> None:
    plain = resolved({"name": "a"})
    assert "poison" not in recipe(plain)["data"]
    poisoned = resolved({"name": "a", "data": {"poison": {"trigger": "badnets"}}})
    assert recipe(poisoned)["data"]["poison"]["trigger"] == "badnets"
    assert run_key(poisoned) != run_key(plain)


@pytest.mark.parametrize(
    ("poison", "expected"),
    [
        ({"trigger": "badnet"}, r"^data\.poison\.trigger: unknown trigger 'badnet'; choose from: "
                                r"badnets, blended, bpp, inputaware, lc, lf, sig, trojannn, "
                                r"wanet$"),
        ({"trigger": "badnets", "rate": 0}, r"^data\.poison\.rate: .*greater than 0, got 0$"),
        ({"trigger": "badnets", "rate": 1.5}, r"^data\.poison\.rate: .*less than or equal to 1"),
        ({"trigger": "badnets", "target": -1}, r"^data\.poison\.target: "),
        ({"trigger": "badnets", "mode": "one2one"}, r"^data\.poison\.mode: "),
        ({"trigger": "sig", "label": "clean", "mode": "all2all"},
         r"^data\.poison: clean-label poisoning needs mode all2one"),
        ({"trigger": "badnets", "options": {"sise": 4}},
         r"^data\.poison\.options\.sise: unknown option; trigger 'badnets' takes: size, "),
        ({"trigger": "badnets", "options": {"size": 0}}, r"^data\.poison\.options\.size: "),
        ({"trigger": "badnets", "options": {"seed": 1}},
         r"^data\.poison\.options\.seed: not an option here; set it as data\.poison\.seed$"),
        ({"trigger": "blended", "options": {"image": "/no/such.png"}},
         r"^data\.poison\.options: blended image: no file at /no/such\.png$"),
        ({"rate": 0.1}, r"^data\.poison\.trigger: Field required$"),
    ],
)  # fmt: skip
def test_bad_poison_config_is_one_line_naming_its_key(poison: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as error:
        resolved({"data": {"name": "mnist-5k", "poison": poison}})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("poison", "expected"),
    [
        ({"trigger": "sig", "label": "clean", "rate": 0.2},
         r"^data\.poison\.rate: clean-label poisoning needs 800 samples of target class 0, the "
         r"train split has 400 \(rate at most 0\.1\)$"),
        ({"trigger": "badnets", "target": 10}, r"^data\.poison\.target: 10 is not a class"),
        ({"trigger": "badnets", "rate": 1e-5}, r"^data\.poison\.rate: 1e-05 of 4000 train "),
    ],
)  # fmt: skip
def test_poison_that_the_data_cannot_give_is_one_line(poison: dict, expected: str) -> None:
    cfg = resolved({"data": {"name": "mnist-5k", "poison": poison}})
    with pytest.raises(ConfigError, match=expected) as error:
        build_data(cfg)
    assert "\n" not in str(error.value)
