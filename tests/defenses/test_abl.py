"""Anti-backdoor learning (`train.objective: abl`): LGA holds a batch's loss near gamma where plain
cross-entropy falls far below it; a training-phase batch whose samples are all isolated moves no
weight (AdamW would on a zero gradient); and on a real BadNets-poisoned mnist-5k run the isolated
1% are mostly poisoned digits and the ABL-trained model's ASR is far below the undefended one's
(conftest.py's `backdoored`, same recipe) at a clean accuracy far above chance."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vptlab.backdoors.poison import poison_data
from vptlab.config import ABLConfig, TrainConfig
from vptlab.data.base import DataSplits, TensorSplit
from vptlab.data.loaders import Batch
from vptlab.defenses.abl import ABLTask, isolation_epochs, lga_loss
from vptlab.engine.loop import fit
from vptlab.engine.tasks import create_objective
from vptlab.errors import ConfigError
from vptlab.models import create_model
from vptlab.steps.train import abl_sentence

from conftest import POISON, Backdoored, repair_config  # isort: skip

GAMMA = 0.5


def _separable(n: int = 64, classes: int = 10, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    x = torch.randn(classes, dim, generator=g)[y] * 3 + 0.3 * torch.randn(n, dim, generator=g)
    return x, y


def _train_linear(objective: Any, steps: int = 300) -> list[float]:
    x, y = _separable()
    torch.manual_seed(0)
    model = nn.Linear(x.shape[1], 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        ce = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        objective(ce).backward()
        optimizer.step()
        losses.append(ce.item())
    return losses


def test_lga_holds_the_batch_loss_near_gamma() -> None:
    plain = _train_linear(lambda ce: ce)
    lga = _train_linear(lambda ce: lga_loss(ce, GAMMA))
    assert plain[-1] < 0.1  # the data are easy: plain cross-entropy falls far below gamma
    late = torch.tensor(lga[-100:])
    assert abs(float(late.mean()) - GAMMA) < 0.1 and float(late.min()) > 0.3
    assert float(lga_loss(torch.tensor(0.2), GAMMA)) == pytest.approx(-0.2)  # ascent below


def _digits_task(isolated: torch.Tensor, n: int = 16) -> tuple[ABLTask, TensorSplit]:
    g = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 10)
    task = ABLTask(ABLConfig(), epochs=3, isolation_epochs=1, split=split)
    task.isolated, task.batch_size = isolated, 8
    task.set_progress(1.5)  # the training phase
    return task, split


def test_training_phase_masks_the_isolated_samples() -> None:
    task, split = _digits_task(torch.tensor([0, 3]))
    torch.manual_seed(0)
    model = create_model("simplenet", num_classes=10, img_size=8).eval()
    x = split.x.expand(-1, 3, -1, -1)
    batch = Batch(x[:8], split.y[:8], torch.arange(8))
    with torch.no_grad():
        loss, logits = task.loss(model, batch, model)
    per_sample = F.cross_entropy(logits, batch.y, reduction="none")
    kept = torch.tensor([1, 2, 4, 5, 6, 7])
    assert float(loss) == pytest.approx(float(per_sample[kept].mean()), rel=1e-5)
    assert float(loss) != pytest.approx(float(per_sample.mean()), rel=1e-3)
    assert not task.skip(batch) and task.skip(batch._replace(index=torch.tensor([0, 3])))


def test_an_all_isolated_batch_moves_no_weight(tmp_path: Path) -> None:
    """Every sample isolated: each step of the training phase is skipped, so AdamW (weight decay
    0.05) leaves every weight as it was; the same optimizer stepping on a zero gradient would
    not, which is why the loop must skip rather than step on a zero loss."""
    n = 16
    task, split = _digits_task(torch.arange(n), n)
    task.before_epoch = lambda *args: None  # keep the hand-made isolated set
    task.isolation_epochs = 0
    data = DataSplits(name="tiny", train=split, test=split, num_classes=10)
    cfg = repair_config(tmp_path, "masked", train={"epochs": 3, "weight_decay": 0.05})
    torch.manual_seed(0)
    model = create_model("simplenet", num_classes=10, img_size=8)
    before = copy.deepcopy(model.state_dict())
    metrics = fit(model, data, cfg, tmp_path / "masked", task=task, evaluators=[],
                  stop_after_epochs=1)  # fmt: skip
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert metrics["history"][0]["train_loss"] == 0.0  # nothing was trained on
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_isolation_epochs_follow_train_epochs() -> None:
    assert isolation_epochs(TrainConfig(epochs=100)) == 20  # BackdoorBench's 20 of 100
    assert isolation_epochs(TrainConfig(epochs=3)) == 1
    with pytest.raises(ConfigError, match="isolation_epochs must be < train.epochs"):
        isolation_epochs(TrainConfig(epochs=3, abl=ABLConfig(isolation_epochs=3)))


# --- A real run: BadNets on mnist-5k -----------------------------------------------------------
# The recipe of conftest.py's backdoored SimpleNet (adamw, lr 3e-3, batch 64), 3 epochs: 2 of LGA
# (after one, mnist-5k's easiest clean digits still sit as low as the poisoned ones), no fine-tuning
# epoch (it costs ~8 s here; its masking is tested above), and the unlearning epoch.
ABL_EPOCHS, ISOLATION_EPOCHS = 3, 2
BASE_RATE = 100.0 * POISON.rate  # isolating at random finds 10% poisoned digits


@pytest.fixture(scope="module")
def abl_run(backdoored: Backdoored, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("abl")
    cfg = repair_config(out, "abl", train={
        "epochs": ABL_EPOCHS, "lr": 3e-3, "objective": "abl",
        "abl": {"isolation_epochs": ISOLATION_EPOCHS},
    })  # fmt: skip
    poisoned = poison_data(backdoored.data, POISON, seed=0)
    torch.manual_seed(0)
    model = create_model("simplenet", num_classes=10, img_size=28)
    task = create_objective(cfg.train, model=model, data=poisoned)
    evaluators = backdoored.evaluators()  # CA and BadNets ASR on the clean test split
    start = time.perf_counter()
    metrics = fit(model, poisoned, cfg, out / "abl", task=task, evaluators=evaluators)
    metrics["seconds"] = time.perf_counter() - start
    print(f"abl: {metrics['abl']} final {metrics['final']} in {metrics['seconds']:.1f} s")
    return metrics


def test_abl_isolates_mostly_poisoned_samples(abl_run: dict[str, Any]) -> None:
    abl = abl_run["abl"]
    assert abl["isolated"] == 40  # 1% of the 4,000 train digits
    assert abl["unlearning_steps"] == 5  # 5 passes of one batch of 40
    assert abl["precision"] > 5 * BASE_RATE, abl
    assert f"{abl['isolated_poisoned']} of them were poisoned" in abl_sentence(abl)  # report.md


def test_abl_removes_the_backdoor_and_keeps_accuracy(
    abl_run: dict[str, Any], backdoored: Backdoored
) -> None:
    final = abl_run["final"]
    assert backdoored.asr > 90
    assert final["badnets/asr"] < backdoored.asr - 60, (final, backdoored.asr)
    assert final["test_top1"] > 60, final  # chance is 10%


def test_a_matrix_crosses_abl_with_every_trigger(tmp_path: Path) -> None:
    """In a matrix ABL is a training-time defense (`kind: training`: its `train:` replaces the
    objective; against backdoor threats by default): one cell per trigger, each training its
    poisoned split with objective abl, and none on the clean threat."""
    from vptlab.matrix.cells import plan
    from vptlab.matrix.config import parse_matrix

    poison = {"rate": 0.1, "options": {}}
    raw = {
        "matrix": "m", "output": str(tmp_path / "runs"),
        "base": {"seed": 0, "device": "cpu", "train": {"epochs": 5},
                 "data": {"name": "digits", "batch_size": 64, "num_workers": 0}},
        "models": {"simplenet": {"model": {"name": "simplenet"}}},
        "threats": {"clean": {"kind": "clean"},
                    **{name: {"kind": "backdoor", "poison": {"trigger": name, **poison}}
                       for name in ("badnets", "blended")}},
        "defenses": {"abl": {"kind": "training", "train": {"objective": "abl"}}},
    }  # fmt: skip
    cells = {c.id: c for c in plan(parse_matrix(raw))}
    for trigger in ("badnets", "blended"):
        cell = cells[f"simplenet/full/{trigger}/abl"]
        assert cell.skip is None and cell.train["train"]["objective"] == "abl"
        assert cell.train["data"]["poison"]["trigger"] == trigger
    assert "answers backdoor threats" in (cells["simplenet/full/clean/abl"].skip or "")
    raw["defenses"] = {"abl": {"kind": "training"}}  # a training defense that changes nothing
    with pytest.raises(ConfigError, match="a training defense changes the training"):
        parse_matrix(raw)


def test_a_resumed_run_keeps_the_isolated_samples(tmp_path: Path) -> None:
    """The isolated set lives in the checkpoint (`task_state`): a run stopped after its
    training-phase epoch and resumed unlearns the same samples to the same weights as an
    uninterrupted one (3 epochs on 512 random 8x8 images, isolation after the first, stopped
    before the last)."""
    g = torch.Generator().manual_seed(0)
    split = TensorSplit(torch.rand(512, 1, 8, 8, generator=g), torch.arange(512) % 10)
    data = poison_data(DataSplits("tiny", split, split, num_classes=10), POISON, seed=0)

    def run(name: str, stop: int | None = None, resume: bool = False) -> dict[str, Any]:
        cfg = repair_config(tmp_path, name, train={"epochs": 3, "lr": 3e-3, "objective": "abl"})
        torch.manual_seed(0)
        model = create_model("simplenet", num_classes=10, img_size=8)
        task = create_objective(cfg.train, model=model, data=data)
        metrics = fit(model, data, cfg, tmp_path / name, task=task, evaluators=[],
                      stop_after_epochs=stop, resume=resume)  # fmt: skip
        return {"state": model.state_dict(), "abl": metrics["abl"]}

    whole = run("whole")
    run("parts", stop=2)
    resumed = run("parts", resume=True)
    assert whole["abl"]["isolated"] == resumed["abl"]["isolated"] > 0
    assert whole["abl"]["unlearning_steps"] == resumed["abl"]["unlearning_steps"] > 0
    assert all(torch.equal(whole["state"][k], v) for k, v in resumed["state"].items())
