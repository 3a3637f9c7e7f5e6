"""NaN and inf injected mid-training (into the loss, or into one batch's pixels, once): the run
stops with one line saying so, metrics.json records `diverged` with that message, the last good
checkpoint loads (`vptlab eval`) with finite weights, and `--resume` from it, the fault gone,
ends exactly as the uninterrupted run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from vptlab import cli
from vptlab.data.loaders import Batch
from vptlab.engine.checkpoint import load_state
from vptlab.engine.tasks import ClassificationTask

from .helpers import TINY, Reference, check_complete, ok, one_error, read_metrics, tiny_config

STEP = 25  # the faulty step: epoch 2, its second batch; the guard sees it at the step-30 checkpoint


def _nan_pixel(batch: Batch) -> Batch:
    x = batch.x.clone()
    x[0, 0, 0, 0] = float("nan")
    return batch._replace(x=x)


# Each fault: (what it does to the batch, the factor it puts on the loss).
FAULTS: dict[str, tuple[Callable[[Batch], Batch], float]] = {
    "nan-loss": (lambda batch: batch, float("nan")),
    "inf-loss": (lambda batch: batch, float("inf")),
    "nan-pixel": (_nan_pixel, 1.0),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_injected_nan_stops_the_run_and_it_resumes_from_the_last_good_checkpoint(
    fault: str, reference: Reference, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    corrupt, factor = FAULTS[fault]
    real_loss, calls = ClassificationTask.loss, []

    def faulty(
        task: ClassificationTask, model: nn.Module, batch: Batch, raw_model: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(batch)
        if len(calls) != STEP:
            return real_loss(task, model, batch, raw_model)
        loss, logits = real_loss(task, model, corrupt(batch), raw_model)
        return loss * factor, logits

    monkeypatch.setattr(ClassificationTask, "loss", faulty)
    run = tmp_path / TINY["name"]
    line = one_error(capsys, ["train", "-c", str(tiny_config(tmp_path))])
    monkeypatch.undo()
    # Seen at the step-30 checkpoint: by then the weights, and so the loss, are NaN for every fault.
    assert line == ("vptlab: error: loss became nan in epoch 2 (step 30); the last good "
                    "checkpoint is kept: resume it if the cause has passed, or start a new run "
                    "with a lower train.lr or a train.grad_clip (neither can change on resume)")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["error"] == line.removeprefix(
        "vptlab: error: ")
    assert metrics["epochs_done"] == 1  # the epoch that went bad is not in it
    assert load_state(run / "state.pt")["step"] == 23  # the last good checkpoint: epoch 1's end
    assert all(torch.isfinite(t).all() for t in load_file(str(run / "model.safetensors")).values())
    check_complete(run)
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] > 50  # it loads, and it is a trained model
    ok(capsys, ["train", "--resume", str(run)])
    assert read_metrics(run) == reference.metrics
    check_complete(run)
