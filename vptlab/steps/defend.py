"""`vptlab defend`: repair a poisoned run with clean data, into a new run folder that names it.

A defended run is a step on a parent run (shared/DESIGN.md, "Threats and defenses compose through
run folders"). Its `config.yaml` is the parent's config with `parent: <parent folder>`, the
`defense` section and the defense's own training recipe in `train`; its `metrics.json` holds the
`before` and `after` suites (clean top-1/top-5, the trigger's ASR and RA, from the one
`evaluate_suite`), the derived `asr_drop`, `ca_drop` and `der` (backdoors/metrics.py), and the
adaptive attacker's `residual_asr` (defenses/adaptive.py; `adaptive=False` skips it). The
folder also gets `report.md` and `examples.png` (clean and triggered test images, predicted before
and after).

The defender holds `defense.clean_fraction` of the parent's *clean* train split (the poisoned
samples are never in it: the split is rebuilt without `data.poison`) and trains through the one
loop. A finished defended run is reused while its config and its parent's run key hold; an
interrupted one holds nothing finished and is trained again (defenses are short). The parent's
path is not part of the run key (a study folder may move); its run key is, as `parent_key`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vptlab.backdoors.metrics import BackdoorAccuracy, BackdoorThreat, asr_drop, der
from vptlab.backdoors.poison import POISON_FILE, load_poison, stored_channels, stored_size
from vptlab.config import ExperimentConfig, apply_overrides, dump_config, load_yaml, run_key
from vptlab.data.base import DataSplits, TensorSplit, split_labels
from vptlab.data.loaders import resize
from vptlab.engine.checkpoint import load_model
from vptlab.engine.distributed import DistInfo, is_main_process
from vptlab.engine.evaluators import EvalContext, TestAccuracy, ZeroShotAccuracy
from vptlab.engine.loop import amp_dtype_for, resolve_device
from vptlab.errors import ConfigError
from vptlab.metrics.suite import evaluate_suite
from vptlab.report.tables import DEFENSE_NOTE, defense_columns, markdown_table
from vptlab.runs import (
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    atomic_write_text,
    clear_locked_folder,
    folder_lock,
)
from vptlab.steps.build import build_data, build_model, image_size, zero_shot_prompts
from vptlab.steps.resolve import resolved

EXAMPLES_FILE = "examples.png"
# In a poisoned run's folder: the adaptive attacker's search on it, by seed (defenses/adaptive.py).
RESIDUAL_FILE = "residual.json"
# The defense's training recipe unless overridden (`train.epochs=20`): the parent's optimizer,
# learning rate and batch size, no warm-up, a clean objective (`clip` for a contrastively
# pretrained parent), no robustness probe.
DEFENSE_TRAIN: dict[str, Any] = {
    "epochs": 10,
    "warmup_epochs": 0.0,
    "objective": "standard",
    "eps_ramp_epochs": 0.0,
    "robust_probe": 0,
    "keep_best_robust": False,
}


def parent_config(parent: Path) -> ExperimentConfig:
    """The parent run's config; it must be a finished, poisoned run."""
    cfg = finished_config(parent)
    if not is_poisoned(parent, cfg):
        raise ConfigError(
            f"run {parent} was never poisoned (its config has no data.poison): a backdoor "
            "defense has no trigger to repair or measure"
        )
    return cfg


def is_poisoned(run: Path, cfg: ExperimentConfig) -> bool:
    return cfg.data.poison is not None and (run / POISON_FILE).is_file()


def finished_config(parent: Path) -> ExperimentConfig:
    """A run's config; it must be a finished run."""
    if not (parent / CONFIG_FILE).is_file():
        raise ConfigError(f"{parent} is not a run folder: no {CONFIG_FILE} there")
    cfg = resolved(load_yaml(parent / CONFIG_FILE))
    metrics_path = parent / METRICS_FILE
    status = json.loads(metrics_path.read_text()).get("status") if metrics_path.is_file() else None
    if status != "complete":
        raise ConfigError(
            f"run {parent} is not finished (status: {status}); resume it with "
            f"`vptlab train --resume {parent}` before defending it"
        )
    return cfg


def defended_config(
    parent: Path,
    parent_cfg: ExperimentConfig,
    defense: dict[str, Any],
    overrides: list[str] | None = None,
    train: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """The defended run's config: the parent's, its defense and recipe (`DEFENSE_TRAIN`, then
    `train`), then `overrides`.

    Default name `<parent name>-<defense>`, beside the parent. Errors (an unknown defense, a clean
    fraction outside (0, 1], a bad option, a defense that cannot repair a pixel-prompted parent)
    name their key, before anything is written.
    """
    from vptlab.defenses.repair import pixel_prompt_refusal

    raw = parent_cfg.model_dump(mode="json")
    # The clean objective: an image-text model pretrained contrastively is repaired with CLIP's
    # loss on clean pairs (a recipe may still name another).
    clean_objective = {"objective": "clip"} if parent_cfg.train.objective == "clip" else {}
    raw["train"] = {**raw["train"], **DEFENSE_TRAIN, **clean_objective, **(train or {})}
    raw["defense"] = defense
    raw["parent"] = str(parent)
    raw = apply_overrides(raw, [f"name={parent_cfg.name}-{defense.get('name')}",
                                f"output.dir={parent.parent}"])  # fmt: skip
    cfg = resolved(raw, overrides or [])
    assert cfg.defense is not None
    refusal = pixel_prompt_refusal(cfg.defense.name) if cfg.adapt.mode == "pixel" else None
    if refusal is not None:
        raise ConfigError(f"defense.name: {refusal}")
    return cfg


def clean_data(cfg: ExperimentConfig) -> DataSplits:
    """The run's dataset as the defender has it: the clean train split (no data.poison)."""
    return build_data(cfg.model_copy(update={"data": cfg.data.model_copy(update={"poison": None})}))


def threat_of(parent: Path, cfg: ExperimentConfig, data: DataSplits) -> BackdoorThreat:
    """The parent's trigger, as training stamped it (at the stored image size)."""
    _, trigger, poison = load_poison(parent)
    return BackdoorThreat(
        trigger, poison.target, poison.mode, num_classes=data.num_classes,
        size=stored_size(data.test), channels=stored_channels(data.test),
    )  # fmt: skip


def suite(model: nn.Module, data: DataSplits, threat: BackdoorThreat, cfg: ExperimentConfig,
          progress: bool) -> dict[str, float]:  # fmt: skip
    """Clean top-1/top-5 and the trigger's ASR / RA on the whole test split."""
    device = next(model.parameters()).device
    out = evaluate_suite(
        model, data.test, [threat], amp_dtype=amp_dtype_for(device, cfg.train.amp),
        progress=progress, batch_size=cfg.data.eval_batch_size, img_size=cfg.data.img_size,
    )  # fmt: skip
    return {k: v for k, v in out.items() if not k.endswith("/loss")}


def summary(before: dict[str, float], after: dict[str, float], name: str) -> dict[str, float]:
    """ASR drop (points), CA drop (points) and DER from the two suites."""
    ca_b, ca_a = before["clean/top1"], after["clean/top1"]
    asr_b, asr_a = before[f"{name}/asr"], after[f"{name}/asr"]
    return {
        "ca_before": ca_b, "ca_after": ca_a, "asr_before": asr_b, "asr_after": asr_a,
        "ra_before": before[f"{name}/ra"], "ra_after": after[f"{name}/ra"],
        "asr_drop": asr_drop(asr_b, asr_a), "ca_drop": ca_b - ca_a,
        "der": der(ca_b, ca_a, asr_b, asr_a),
    }  # fmt: skip


def clean_evaluator(cfg: ExperimentConfig, data: DataSplits) -> TestAccuracy:
    """Clean top-1 per epoch; zero-shot for an image-text model, whose head is rebuilt from its
    text tower first (a contrastive repair trains that tower too)."""
    if cfg.train.objective == "clip":
        return ZeroShotAccuracy(data.test, *zero_shot_prompts(data))
    return TestAccuracy(data.test)


def load_parent_model(parent: Path, cfg: ExperimentConfig, data: DataSplits) -> nn.Module:
    model = build_model(cfg, data.num_classes, image_size(data, cfg))
    load_model(model, parent / MODEL_FILE)
    return model.to(resolve_device(cfg.device)).eval()


def _reusable(run_dir: Path, cfg: ExperimentConfig, parent_key: str) -> dict[str, Any] | None:
    """The finished defended run's metrics when they stand for `cfg` on this parent, else None;
    a finished run whose recipe or parent changed is an error (pass fresh=True to redo it)."""
    path = run_dir / METRICS_FILE
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    if metrics.get("status") != "complete" or "defense" not in metrics:
        return None
    saved = resolved(load_yaml(run_dir / CONFIG_FILE))
    if run_key(saved) == run_key(cfg) and metrics["defense"].get("parent_key") == parent_key:
        return metrics
    raise ConfigError(
        f"defended run {run_dir} is finished but its recipe or its parent changed; pass --fresh "
        "to redo it, or give this defense another name=..."
    )


def defend(
    parent: str | Path,
    defense: dict[str, Any],
    overrides: list[str] | None = None,
    *,
    train: dict[str, Any] | None = None,
    fresh: bool = False,
    adaptive: bool | dict[str, Any] = True,
) -> dict[str, Any]:
    """Repair the poisoned run `parent` with `defense` ({name, clean_fraction, options}) and the
    recipe `train` (over `DEFENSE_TRAIN`); returns the defended run's metrics (see the module
    docstring). `adaptive`: also measure the adaptive attacker's residual ASR (a dict: with
    these options of `residual_asr`, e.g. {steps: 50, scan: false})."""
    parent = Path(parent)
    parent_cfg = parent_config(parent)
    cfg = defended_config(parent, parent_cfg, defense, overrides, train)
    run_dir = Path(cfg.output.dir) / cfg.name
    if run_dir.resolve() == parent.resolve():
        raise ConfigError(f"name: the defended run would overwrite its parent {parent}")
    with folder_lock(run_dir, "defend"):
        return _defend_locked(parent, parent_cfg, cfg, run_dir, fresh, adaptive)


def _defend_locked(parent: Path, parent_cfg: ExperimentConfig, cfg: ExperimentConfig, run_dir: Path,
            fresh: bool, adaptive: bool | dict[str, Any] = True) -> dict[str, Any]:  # fmt: skip
    """`defend` with the defended run's folder locked."""
    from vptlab.defenses.repair import create_repairer, defender_splits, repair

    parent_key = run_key(parent_cfg)
    if not fresh and (reused := _reusable(run_dir, cfg, parent_key)) is not None:
        return reused
    defense = cfg.defense
    assert defense is not None
    data = clean_data(cfg)
    threat = threat_of(parent, cfg, data)
    model = load_parent_model(parent, parent_cfg, data)
    progress = cfg.output.progress
    before = suite(model, data, threat, cfg, progress)
    if is_main_process() and run_dir.exists():
        clear_locked_folder(run_dir)  # unfinished (or --fresh): nothing finished is lost
    # The defender's data: its clean subset, and a validation slice of it when a rule selects
    # the recipe. The test-split evaluators below only draw the run's curves (`repair`).
    val_fraction = defense.select.val_fraction if defense.select else 0.0
    clean = defender_splits(data, defense.clean_fraction, cfg.seed, val_fraction)
    evaluators = [clean_evaluator(cfg, data), BackdoorAccuracy(data.test, threat)]
    selection = None
    if defense.select is None:
        torch.manual_seed(cfg.seed)
        repairer = create_repairer(defense.name, **defense.options)
        repaired = repair(repairer, model, clean, cfg, run_dir, evaluators)  # the one `fit`
    else:
        def fresh_model() -> nn.Module:
            return load_parent_model(parent, parent_cfg, data)

        repaired, selection = select_recipe(fresh_model, cfg, clean, data, run_dir)
    after = suite(repaired, data, threat, cfg, progress)
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    metrics["defense"] = {
        "name": defense.name, "parent": str(parent), "parent_key": parent_key,
        "trigger": threat.name, "clean_samples": len(clean.train),  # type: ignore[arg-type]
        **summary(before, after, threat.name),
    }  # fmt: skip
    if selection is not None:
        metrics["defense"]["selection"] = selection
        metrics["defense"]["clean_samples"] += len(clean.test)  # type: ignore[arg-type]
    metrics["before"], metrics["after"] = before, after
    if adaptive:  # the adaptive attacker's residual ASR, on the defended and the poisoned model
        from vptlab.defenses.adaptive import residual_metrics

        poisoned = load_parent_model(parent, parent_cfg, data)
        # The search on the poisoned model is the same for every defense of it: done once, kept
        # in the parent's folder under the seed and options it ran with.
        options = adaptive if isinstance(adaptive, dict) else {}
        key = json.dumps({"seed": cfg.seed, **options}, sort_keys=True)
        saved_path = parent / RESIDUAL_FILE
        saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
        residual = residual_metrics(poisoned, repaired, data, threat, cfg.seed,
                                    img_size=cfg.data.img_size, before=saved.get(key), **options)
        metrics["defense"].update(residual)  # fmt: skip
        if residual and is_main_process():
            saved[key] = residual["residual_before"]
            atomic_write_text(saved_path, json.dumps(saved, indent=2))
    if is_main_process():
        poisoned = load_parent_model(parent, parent_cfg, data)
        write_examples({"before": poisoned, "after": repaired}, data, threat,
                       run_dir / EXAMPLES_FILE, img_size=cfg.data.img_size)
        atomic_write_text(run_dir / METRICS_FILE, json.dumps(metrics, indent=2))
        write_defense_report(run_dir, metrics)
    return metrics


SELECTION_DIR = "selection"


def select_recipe(
    fresh_model: Callable[[], nn.Module],
    cfg: ExperimentConfig,
    clean: DataSplits,
    data: DataSplits,
    run_dir: Path,
) -> tuple[nn.Module, dict[str, Any]]:
    """The recipe-selection rule (`SelectConfig`, docs/defense_protocol.md): the defense trained
    at lr x scale for each scale, largest first, into `run_dir/selection/lr-<lr>`, until one
    keeps the validation slice's (`clean.test`) top-1 within `max_drop` points (or one sample,
    if that is more) of the undefended model's; that trial's model and metrics become the run's.
    Reads only the defender's data: a trial's curve is its validation top-1; the caller measures
    the test split once, on the chosen model.

    Returns the chosen model and what was tried ({baseline, max_drop, trials, lr}).
    """
    from vptlab.defenses.repair import create_repairer, repair

    defense = cfg.defense
    assert defense is not None and defense.select is not None
    rule = defense.select
    val = validation_evaluator(cfg, clean.test, data)
    baseline = val(fresh_model(), _context(cfg))["val_top1"]
    # One sample is the slice's resolution: on 40 samples a single error costs 2.5 points.
    tolerance = max(rule.max_drop, 100.0 / len(clean.test))  # type: ignore[arg-type]
    trials: list[dict[str, Any]] = []
    chosen: nn.Module | None = None
    for scale in rule.lr_scales:
        trial_cfg = scaled_recipe(cfg, scale)
        trial_dir = run_dir / SELECTION_DIR / f"lr-{trial_cfg.train.lr:g}"
        torch.manual_seed(cfg.seed)
        repairer = create_repairer(defense.name, **trial_cfg.defense.options)  # type: ignore[union-attr]
        chosen = repair(repairer, fresh_model(), clean, trial_cfg, trial_dir, [val])
        top1 = float(json.loads((trial_dir / METRICS_FILE).read_text())["history"][-1]["val_top1"])
        accepted = baseline - top1 <= tolerance + 1e-9
        trials.append({"scale": scale, "lr": trial_cfg.train.lr, "val_top1": top1,
                       "drop": baseline - top1, "accepted": accepted})  # fmt: skip
        if accepted:
            break
    assert chosen is not None
    trial_dir = run_dir / SELECTION_DIR / f"lr-{trials[-1]['lr']:g}"
    if is_main_process():
        for path in trial_dir.iterdir():  # the chosen trial's files are the run's
            if path.is_file() and path.name != CONFIG_FILE:
                shutil.copy2(path, run_dir / path.name)
        atomic_write_text(run_dir / CONFIG_FILE, dump_config(cfg))
    selection = {"baseline_val_top1": baseline, "max_drop": tolerance,
                 "val_samples": len(clean.test), "lr": trials[-1]["lr"],  # type: ignore[arg-type]
                 "accepted": trials[-1]["accepted"], "trials": trials}  # fmt: skip
    return chosen, selection


def scaled_recipe(cfg: ExperimentConfig, scale: float) -> ExperimentConfig:
    """`cfg` with its learning rate (and a repairer's own `lr` option) times `scale`."""
    assert cfg.defense is not None
    train = cfg.train.model_copy(update={"lr": cfg.train.lr * scale})
    options = dict(cfg.defense.options)
    if options.get("lr") is not None:
        options["lr"] = options["lr"] * scale
    defense = cfg.defense.model_copy(update={"options": options})
    return cfg.model_copy(update={"train": train, "defense": defense})


def validation_evaluator(cfg: ExperimentConfig, split: Any, data: DataSplits) -> TestAccuracy:
    """Top-1 on the defender's validation slice as `val_top1` (zero-shot for an image-text
    model trained contrastively)."""
    if cfg.train.objective == "clip":
        return ZeroShotAccuracy(split, *zero_shot_prompts(data), prefix="val")
    return TestAccuracy(split, prefix="val")


def _context(cfg: ExperimentConfig) -> EvalContext:
    device = resolve_device(cfg.device)
    return EvalContext(cfg, device, amp_dtype_for(device, cfg.train.amp), DistInfo())


def write_examples(
    models: dict[str, nn.Module], data: DataSplits, threat: BackdoorThreat, path: Path,
    count: int = 8, title: str = "", img_size: int | None = None,
) -> None:
    """Clean and triggered test images of non-target classes, with the predictions of each model
    (the poisoned one "before", the defended one "after"), resized to `img_size` (the run's
    `data.img_size`) as the loaders resize them."""
    from vptlab.backdoors.poison import non_target_index
    from vptlab.report.plots import plot_backdoor_examples

    test = data.test
    keep = non_target_index(split_labels(test), threat.target, threat.mode)[:count]
    if isinstance(test, TensorSplit):
        x, y = test.x[keep], test.y[keep]
    else:
        items = [test[int(i)] for i in keep]
        x, y = torch.stack([t[0] for t in items]), torch.tensor([int(t[1]) for t in items])
    first = next(iter(models.values()))
    device = next(first.parameters()).device
    x, y = x.to(device), y.to(device)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if img_size is not None:
        x = resize(x, img_size)
    triggered = threat.transform(first, x, y)
    names = data.classes or [str(i) for i in range(data.num_classes)]
    with torch.no_grad():
        preds = {
            label: ([names[int(p)] for p in m(x).argmax(1)],
                    [names[int(p)] for p in m(triggered).argmax(1)])
            for label, m in ((label, m.eval()) for label, m in models.items())
        }  # fmt: skip
    title = title or f"{threat.name}: poisoned (before) vs defended (after)"
    plot_backdoor_examples(x.cpu(), triggered.cpu(), [names[int(t)] for t in y], preds, path,
                           title=title)


def write_defense_report(run_dir: Path, metrics: dict[str, Any]) -> None:
    d = metrics["defense"]
    text = (
        f"# Defended run `{metrics['name']}`\n\n"
        f"Defense `{d['name']}` on the poisoned run `{d['parent']}` (trigger `{d['trigger']}`), "
        f"with {d['clean_samples']:,} clean training samples.\n\n"
        f"{markdown_table(defense_columns([metrics]), [metrics])}\n\n{DEFENSE_NOTE}\n\n"
        f"![clean and triggered examples]({EXAMPLES_FILE})\n"
    )
    atomic_write_text(run_dir / "report.md", text)


def check_fraction(fraction: float | None) -> None:
    if fraction is not None and not 0 < fraction <= 1:
        raise ConfigError(f"--clean-fraction must be in (0, 1], got {fraction:g}")

