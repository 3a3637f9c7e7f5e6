"""One experiment end to end: config -> data + model -> the loop -> a run folder; and back again."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from torch import nn

from vptlab.backdoors.poison import POISON_FILE, PoisonRecord, load_poison_record, save_poison
from vptlab.config import (
    ExperimentConfig,
    load_yaml,
    outside_run_key,
    parse_override,
)
from vptlab.data.base import DataSplits
from vptlab.defenses.adversarial import OVERFIT_POINTS, robust_summary
from vptlab.engine.checkpoint import load_model
from vptlab.engine.distributed import is_main_process
from vptlab.engine.loop import fit, resolve_device
from vptlab.errors import ConfigError, VptlabError
from vptlab.report.tables import BACKDOOR_COLUMNS, BACKDOOR_NOTE, RUN_COLUMNS, markdown_table
from vptlab.runs import (
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    STATE_FILE,
    atomic_write_text,
    clear_locked_folder,
    folder_lock,
)
from vptlab.steps.build import (
    build_epoch_hooks,
    build_evaluators,
    build_experiment,
    build_task,
)
from vptlab.steps.resolve import resolved


def resumable(key: str) -> bool:
    """Whether `--resume` may change `key`: what the run key leaves out (where and how the run
    executes) and how long it goes on. Anything else would make the resumed run another
    experiment than the one its checkpoint belongs to."""
    return key == "train.epochs" or (key != "name" and outside_run_key(key))


def run_dir_of(cfg: ExperimentConfig) -> Path:
    return Path(cfg.output.dir) / cfg.name


def train(
    cfg: ExperimentConfig,
    *,
    force: bool = False,
    stop_after_epochs: int | None = None,
) -> dict[str, Any]:
    """Train a fresh run into `output.dir/name`; an existing run is kept unless `force`."""
    run_dir = run_dir_of(cfg)
    with folder_lock(run_dir, "train"):
        if (run_dir / STATE_FILE).exists():
            if not force:
                raise ConfigError(
                    f"run folder {run_dir} already holds a run; resume it with --resume "
                    f"{run_dir}, pick another name=..., or pass --force to overwrite"
                )
            if is_main_process():
                clear_locked_folder(run_dir)
        data, model = build_experiment(cfg)
        return _fit_run(cfg, data, model, run_dir, stop_after_epochs=stop_after_epochs)


def _fit_run(
    cfg: ExperimentConfig, data: DataSplits, model: nn.Module, run_dir: Path, **kwargs: Any
) -> dict[str, Any]:
    """`fit` with the config's objective and evaluators; the probe's summary (its best epoch on
    the held-out train slice, catastrophic overfitting) is added to metrics.json and the run
    report, and a run that overfit catastrophically says so on stderr. A poisoned train split's
    record (indices, trigger) is saved in the run folder first, and its final CA, ASR and RA go
    into metrics.json (`backdoor`) and the report."""
    task = build_task(cfg, data, model)
    evaluators = build_evaluators(cfg, data, run_dir, task)
    poison: PoisonRecord | None = getattr(data.train, "poison", None)
    if poison is not None and is_main_process():
        save_poison(run_dir, poison)
    metrics = fit(
        model, data, cfg, run_dir, task=task, evaluators=evaluators,
        epoch_hooks=build_epoch_hooks(cfg, data), **kwargs,
    )  # fmt: skip
    extra = robust_summary(metrics.get("history", []), eps=cfg.train.attack.eps,
                           kept_best=cfg.train.keep_best_robust)  # fmt: skip
    if poison is not None:
        extra["backdoor"] = backdoor_summary(poison, metrics.get("final", {}))
    metrics.update(extra)
    if is_main_process():
        if extra:
            atomic_write_text(run_dir / METRICS_FILE, json.dumps(metrics, indent=2))
        write_run_report(run_dir, metrics)
        if "catastrophic_overfitting" in metrics:
            print(f"vptlab: warning: run '{cfg.name}': {overfitting_line(metrics)}",
                  file=sys.stderr)  # fmt: skip
    return metrics


def overfitting_line(metrics: dict[str, Any]) -> str:
    """One sentence on a run's catastrophic overfitting (its metrics.json must record one)."""
    co = metrics["catastrophic_overfitting"]
    if co.get("sign") == "fgsm_gap":
        return (
            f"catastrophic overfitting at epoch {co['epoch']}: on the held-out train slice FGSM "
            f"leaves {co['fgsm']:.1f}% but PGD-10 {co['probe']:.1f}%"
        )
    return (
        f"catastrophic overfitting at epoch {co['epoch']}: the robust probe (held-out train "
        f"slice) fell to {co['probe']:.1f}% from its best {co['best']:.1f}%"
    )


def backdoor_summary(poison: PoisonRecord, final: dict[str, Any]) -> dict[str, Any]:
    """The poisoning and its final clean accuracy, ASR and RA (%), for metrics.json."""
    cfg, name = poison.config, poison.trigger.name
    return {
        "trigger": name,
        "rate": cfg.rate,
        "target": cfg.target,
        "mode": cfg.mode,
        "label": cfg.label,
        **poison.counts(),
        "ca": final.get("test_top1"),
        "asr": final.get(f"{name}/asr"),
        "ra": final.get(f"{name}/ra"),
    }


def check_resume_overrides(overrides: list[str]) -> None:
    """Refuse overrides that would change a resumed run's results, naming the key."""
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        if not resumable(key):
            raise ConfigError(
                f"{key} cannot change when resuming (only train.epochs and keys that do not "
                "change results, such as device and output.*, can); start a new run instead"
            )


def resume(run_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Continue an interrupted run from its last checkpoint, to the same result as one go.

    A folder killed before its first checkpoint (only its config.yaml) starts from the beginning.
    """
    run_dir = Path(run_dir)
    overrides = overrides or []
    check_resume_overrides(overrides)
    if not (run_dir / CONFIG_FILE).is_file():
        raise VptlabError(f"nothing to resume in {run_dir}: no {CONFIG_FILE} there")
    with folder_lock(run_dir, "train --resume"):
        cfg = resolved(load_yaml(run_dir / CONFIG_FILE), overrides)
        data, model = build_experiment(cfg, saved_poison(run_dir))
        return _fit_run(cfg, data, model, run_dir, resume=(run_dir / STATE_FILE).is_file())


def saved_poison(run_dir: Path) -> PoisonRecord | None:
    """The run folder's poison record, if it holds one: a reload then takes a fitted trigger's
    poisoned samples as they were trained."""
    return load_poison_record(run_dir) if (run_dir / POISON_FILE).is_file() else None


def load_run(
    run_dir: str | Path, device: str = "auto", data: str | None = None, root: str | None = None
) -> tuple[ExperimentConfig, nn.Module, DataSplits]:
    """Rebuild a run's model with its trained weights, and its data (or another dataset)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise VptlabError(f"{run_dir} is not a run folder: no {CONFIG_FILE} there")
    overrides = [f"device={device}"]
    if data is not None:
        overrides += [f"data.name={data}", "data.options={}"]
    if root is not None:
        overrides.append(f"data.root={root}")
    cfg = resolved(load_yaml(run_dir / CONFIG_FILE), overrides)
    backbone = cfg.model.pretrained
    if isinstance(backbone, str) and not Path(backbone).is_file():
        raise VptlabError(
            f"run {run_dir} was trained on backbone {backbone}, which is missing; "
            "restore that file or train the run again"
        )
    splits, model = build_experiment(cfg, saved_poison(run_dir) if data is None else None)
    load_model(model, run_dir / MODEL_FILE)
    return cfg, model.to(resolve_device(cfg.device)).eval(), splits


def probe_sentence(probe: dict[str, Any]) -> str:
    """The run report's line on the robust probe (metrics.json's `robust_probe`)."""
    eps, final_eps = probe.get("eps"), probe.get("final_eps")
    at_eps = f" at eps {eps:g}" if eps is not None else ""
    text = (
        f"Robust probe (PGD-10{at_eps} on samples held out of the train split, never trained "
        f"on): final {probe['final']:.1f}%"
    )
    if final_eps is not None and eps is not None and final_eps != eps:
        text += f" (at the eps ramp's {final_eps:g})"
    if probe.get("best") is None:
        return text + "; no epoch was probed at the full eps yet."
    return text + f", best {probe['best']:.1f}% at epoch {probe['best_epoch']}."


def abl_sentence(abl: dict[str, Any]) -> str:
    """One sentence on ABL's isolation (objective abl, metrics.json's `abl`): how many samples
    it isolated after its LGA epochs and, where the split was poisoned, how many of them were."""
    text = (f"ABL isolated {abl['isolated']} train samples (the lowest-loss "
            f"{100 * abl['isolation_ratio']:g}%) after {abl['isolation_epochs']} LGA epochs and "
            f"unlearned them in {abl['unlearning_steps']} steps")  # fmt: skip
    if "isolated_poisoned" in abl:
        text += (f"; {abl['isolated_poisoned']} of them were poisoned (precision "
                 f"{abl['precision']:.1f}%, recall {abl['recall']:.1f}%; the defense never "
                 "read the poisoned indices)")  # fmt: skip
    return text + "."


def write_run_report(run_dir: Path, metrics: dict[str, Any]) -> None:
    status = f"Status: {metrics.get('status')}, {metrics.get('epochs_done', 0)} epochs done."
    table = markdown_table(RUN_COLUMNS, [metrics])
    text = f"# Run `{metrics['name']}`\n\n{status}\n\n{table}\n"
    if "backdoor" in metrics:
        text += f"\n## Backdoor\n\n{markdown_table(BACKDOOR_COLUMNS, [metrics])}\n\n"
        text += f"{BACKDOOR_NOTE}\n"
    if "robust_probe" in metrics:
        text += f"\n{probe_sentence(metrics['robust_probe'])}\n"
    if "abl" in metrics and "isolated" in metrics["abl"]:
        text += f"\n{abl_sentence(metrics['abl'])}\n"
    if "best_robust" in metrics:
        text += (
            f"\nThe weights of epoch {metrics['best_robust']['epoch']} (best on the held-out "
            f"train slice) are kept in `{metrics['best_robust']['file']}`; load them over the "
            "run's model with `load_model(model, path)` after `load_run` to evaluate them.\n"
        )
    if "catastrophic_overfitting" in metrics:
        co = metrics["catastrophic_overfitting"]
        if co.get("sign") == "fgsm_gap":
            text += (
                f"\n**Catastrophic overfitting** at epoch {co['epoch']}: on the held-out train "
                f"slice, at the full eps, FGSM leaves {co['fgsm']:.1f}% but PGD-10 "
                f"{co['probe']:.1f}% (more than {OVERFIT_POINTS:g} points apart).\n"
            )
        else:
            text += (
                f"\n**Catastrophic overfitting** at epoch {co['epoch']}: the robust probe fell to "
                f"{co['probe']:.1f}% from its best {co['best']:.1f}% (more than "
                f"{OVERFIT_POINTS:g} points, at the full eps, on the held-out train slice).\n"
            )
    atomic_write_text(run_dir / "report.md", text)
