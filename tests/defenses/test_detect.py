"""Backdoor detection: AUROC and precision/recall on hand-made cases; on a BadNets run, every
registered detector separates poisoned from clean better than chance (STRIP triggered from clean
test digits, spectral signatures the poisoned training digits far above the poison rate, Neural
Cleanse the target class); `vptlab detect` records them in detection.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vptlab.cli import main
from vptlab.defenses import neural_cleanse
from vptlab.defenses.detectors import (
    DETECTORS,
    ActivationClustering,
    Strip,
    spectral_flags,
    spectral_scores,
    strip_scores,
    superimpose,
)
from vptlab.defenses.neural_cleanse import SearchOptions
from vptlab.errors import ConfigError
from vptlab.steps.detect import auroc, model_detection, precision_recall

# Neural Cleanse's search as tests/defenses/test_neural_cleanse.py sizes it (CHEAP there).
NC_TEST_SEARCH = {"steps": 60, "batches": 1, "batch_size": 8, "lr": 0.3, "init_cost": 0.01,
                  "reset_cost_to_zero": False}  # fmt: skip


def test_auroc_on_hand_made_scores() -> None:
    assert auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5  # ties count half
    # 2 of the 4 pairs ordered right, one tied: (2 + 0.5) / 4
    assert auroc(torch.tensor([2.0, 5.0]), torch.tensor([2.0, 6.0])) == pytest.approx(0.375)


def test_model_detection_over_clean_and_backdoored_models() -> None:
    verdicts = [
        {"poisoned": True, "anomaly_index": 3.6, "backdoored": True},
        {"poisoned": True, "anomaly_index": 1.5, "backdoored": False},
        {"poisoned": False, "anomaly_index": 1.2, "backdoored": False},
        {"poisoned": False, "anomaly_index": 2.4, "backdoored": True},
        {"poisoned": None, "anomaly_index": 9.0},  # not a study model: left out
    ]
    judged = model_detection(verdicts, "anomaly_index")
    assert judged is not None
    assert judged["auroc"] == 0.75  # 3.6 beats both clean models, 1.5 only one of them
    assert (judged["backdoored_models"], judged["clean_models"]) == (2, 2)
    assert (judged["tpr"], judged["fpr"]) == (50.0, 50.0)
    assert model_detection(verdicts[:2], "anomaly_index") is None  # no clean model


def test_precision_recall_on_hand_made_flags() -> None:
    out = precision_recall(torch.tensor([1, 2, 3, 4]), torch.tensor([2, 4, 9]))
    assert out["precision"] == 50.0 and out["recall"] == pytest.approx(200 / 3)


class _Recorder(torch.nn.Module):
    """A model that keeps every batch it is shown and predicts from the mean pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([[0.0, 4.0, 8.0]]))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return x.flatten(1).mean(1, keepdim=True) * self.w


def test_strip_adds_the_overlay_and_saturates_as_the_papers_code() -> None:
    g = torch.Generator().manual_seed(0)
    x, pool = torch.rand(5, 3, 4, 4, generator=g), torch.rand(7, 3, 4, 4, generator=g)
    assert torch.equal(superimpose(x, pool[:5]), (x + pool[:5]).clamp(0, 1))
    assert torch.allclose(superimpose(x, pool[:5], "blend", 0.3), 0.3 * x + 0.7 * pool[:5])
    model = _Recorder()
    scores = strip_scores(model, x, pool, overlays=3, seed=1)
    assert scores.shape == (5,) and len(model.seen) == 3
    # Every input the model saw is an input plus one pool image, clipped to [0, 1].
    for seen in model.seen:
        for i in range(5):
            assert any(torch.allclose(seen[i], (x[i] + c).clamp(0, 1)) for c in pool)
    assert (torch.cat(model.seen) == 1).any()  # sums above 1 saturate
    blend = Strip(pool, overlays=3, superimpose="blend", alpha=0.5, seed=1)
    assert not torch.equal(blend(_Recorder(), x), scores)


@pytest.mark.parametrize(
    ("options", "key"),
    [({"overlays": 0}, "overlays"), ({"superimpose": "mix"}, "superimpose"),
     ({"superimpose": "blend", "alpha": 1.0}, "alpha")],
)  # fmt: skip
def test_strip_bad_options_are_one_error_naming_them(options: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^strip {key} must"):
        Strip(torch.rand(2, 3, 4, 4), **options)


def test_spectral_signature_finds_a_shifted_cluster() -> None:
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(200, 16, generator=g), torch.zeros(200, dtype=torch.long)
    feats[:20] += 4.0 * torch.nn.functional.normalize(torch.ones(16), dim=0) * 3
    flags = spectral_flags(spectral_scores(feats, labels), labels, rate=0.1)
    assert len(flags) == 30 and set(range(20)) <= set(flags.tolist())


def test_activation_clustering_flags_the_split_label_only() -> None:
    """Label 0 holds two populations (the last 40 of its 100 shifted far along one direction),
    labels 1-3 one each: "suspect" flags the 40 alone, "smaller" a cluster in every label."""
    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(400, 16, generator=g), torch.arange(400) // 100
    feats[60:100] += 6.0 * torch.nn.functional.normalize(torch.ones(16), dim=0)
    suspect = ActivationClustering(labels, dims=4)
    flags = suspect.flag(activation_scores(suspect, feats))
    assert flags.tolist() == list(range(60, 100))
    assert max(suspect.silhouettes, key=suspect.silhouettes.__getitem__) == 0
    smaller = ActivationClustering(labels, dims=4, analysis="smaller")
    every = smaller.flag(activation_scores(smaller, feats))
    assert set(range(60, 100)) <= set(every.tolist())
    assert set((labels[every]).tolist()) == {0, 1, 2, 3}
    with pytest.raises(ConfigError, match="analysis suspect or smaller"):
        ActivationClustering(labels, analysis="largest")  # type: ignore[arg-type]


def activation_scores(detector: ActivationClustering, feats: torch.Tensor) -> torch.Tensor:
    """`detector`'s scores with `feats` as the model's penultimate features (an identity net)."""
    net = torch.nn.Identity()
    net.forward_intermediates = lambda x, indices=1: (x, [x])  # type: ignore[assignment]
    net.forward_head = lambda x, pre_logits=False: x  # type: ignore[assignment]
    net.register_parameter("p", torch.nn.Parameter(torch.zeros(1)))
    return detector(net, feats)


@pytest.mark.slow
def test_detect_cli_on_a_badnets_run(poisoned_runs: dict[str, Path],
                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    run = poisoned_runs["poisoned"]
    assert main(["detect", str(run), "--detector", "spectral", "--device", "cpu"]) == 0
    assert main(["detect", str(run), "--detector", "strip", "--overlays", "8",
                 "--device", "cpu"]) == 0  # fmt: skip
    saved = json.loads((run / "detection.json").read_text())
    # 10% poisoned: 600 samples flagged at random would have 10% precision and 15% recall. (Half
    # of label 0 is poison here, which squared projections cannot split: the gain is in finding
    # the poisoned label, see spectral_flags.)
    assert saved["spectral"]["recall"] > 50.0 and saved["spectral"]["precision"] > 30.0
    assert saved["strip"]["auroc"] > 0.7
    capsys.readouterr()
    assert main(["detect", str(poisoned_runs["clean"]), "--detector", "strip"]) == 2
    assert "never poisoned" in capsys.readouterr().err
    assert main(["detect", str(run), "--detector", "nope"]) == 2
    assert "--detector" in capsys.readouterr().err


def test_unknown_detector_is_a_config_error_naming_the_choices(
    poisoned_runs: dict[str, Path],
) -> None:
    from vptlab.steps.detect import detect_run

    choices = "ac, nc, spectral, strip"
    with pytest.raises(ConfigError, match=f"unknown detector 'nope'; choose from: {choices}"):
        detect_run(poisoned_runs["poisoned"], "nope")


@pytest.mark.parametrize("name", DETECTORS.names())
def test_every_detector_beats_chance(
    name: str, poisoned_runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Chance: AUROC 0.5 at inference; in training, precision at the poison rate (10%); on the
    # model, the target among the flagged classes first one time in ten.
    from vptlab.steps.detect import detect_run, model_detection

    setting = DETECTORS.meta(name)["setting"]
    if setting == "model":  # Neural Cleanse at the size its own tests search with
        monkeypatch.setattr(neural_cleanse, "DEFAULTS", SearchOptions(**NC_TEST_SEARCH))
    result = detect_run(poisoned_runs["poisoned"], name, device="cpu", overlays=4)
    if setting == "inference":
        assert result["auroc"] > 0.6
    elif setting == "training":
        assert result["precision"] > 2 * 100 * result["poison_rate"]
    else:
        assert setting == "model"
        assert result["flagged"][:1] == [result["target"]] and result["target_flagged"]
        assert result["anomaly_index"] > 2.0 and result["poisoned"]
        # A clean model is a negative of model-level detection: scored, never "poisoned".
        clean = detect_run(poisoned_runs["clean"], name, device="cpu")
        assert clean["poisoned"] is False and clean["target_flagged"] is None
        score = DETECTORS.meta(name)["score"]
        judged = model_detection([result, clean], score)
        # One model of each kind: the AUROC says which scored higher. (At this search size the
        # clean SimpleNet also has an outlying class: NC's false positives, measured in the
        # backdoorbench_fashion study's model-level table.)
        higher = result[score] > clean[score]
        assert judged is not None and judged["auroc"] == (1.0 if higher else 0.0)


def test_the_nc_repair_takes_back_the_detectors_search(
    poisoned_runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neural Cleanse's search runs once per run: the detector keeps it beside the run (in the
    study's folder) and the `nc` repair of that run (the same clean images, options and seed)
    takes it back, though the repair is not told where its parent is."""
    from vptlab.steps.defend import defend
    from vptlab.steps.detect import detect_run

    monkeypatch.setattr(neural_cleanse, "DEFAULTS", SearchOptions(**NC_TEST_SEARCH))
    run = poisoned_runs["poisoned"]
    found = detect_run(run, "nc", device="cpu")
    assert list((run.parent / neural_cleanse.CACHE_FOLDER).glob("*.safetensors"))
    calls: list[int] = []
    real = neural_cleanse.reverse_engineer
    monkeypatch.setattr(neural_cleanse, "reverse_engineer",
                        lambda *a, **k: calls.append(1) or real(*a, **k))  # fmt: skip
    metrics = defend(run, {"name": "nc", "clean_fraction": 0.05}, train={"epochs": 1},
                     adaptive=False, fresh=True)  # fmt: skip
    repaired = metrics["neural_cleanse"]
    assert calls == [] and repaired["reused"] is True
    assert repaired["norms"] == found["norms"] and repaired["flagged"] == found["flagged"]
