"""Adversarial robustness of a finished run: the evaluation suite under a list of attacks, written
into the run's own folder (`robustness.json`, a "Robustness" section of `report.md`, robust
accuracy vs eps plots, an example grid) and optionally the adversarial images as safetensors."""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors.torch import save_file
from torch import nn

from vptlab.attacks import ATTACKS, Attack, create_attack
from vptlab.config import (
    AttackConfig,
    AttackSuiteConfig,
    ChecksConfig,
    ExperimentConfig,
    load_yaml,
)
from vptlab.data.base import DataSplits
from vptlab.engine.loop import amp_dtype_for
from vptlab.errors import ConfigError, format_validation_error
from vptlab.metrics.accuracy import Predictions
from vptlab.metrics.sanity import run_checks
from vptlab.metrics.suite import CLEAN, Threat, as_threats, suite_metrics, suite_predictions
from vptlab.report.plots import plot_adversarial_grid, plot_robust_accuracy
from vptlab.report.tables import ATTACK_COLUMNS, markdown_table, unreliable_notes
from vptlab.runs import MODEL_FILE, atomic_write, atomic_write_text, folder_lock
from vptlab.steps.train import load_run

ROBUSTNESS_FILE = "robustness.json"
GRID_FILE = "adversarial_examples.png"
SECTION = "Robustness"
# The CLI flag behind each AttackConfig field, so a bad value names what the user typed.
FLAGS = {
    "name": "--attack", "norm": "--norm", "eps": "--eps", "alpha": "--alpha", "steps": "--steps",
    "restarts": "--restarts", "targeted": "--targeted", "random_start": "--attack",
}  # fmt: skip
# The CLI flags that set an entry of `options`, by the option they set.
OPTION_FLAGS = {"version": "--version", "n_queries": "--queries"}


def configs_from_flags(
    attack: str,
    norm: str,
    eps: str | None,
    steps: int,
    alpha: float | None = None,
    restarts: int = 1,
    targeted: bool = False,
    options: dict[str, Any] | None = None,
) -> list[AttackConfig]:
    """One AttackConfig per eps of a comma-separated list; errors name the flag. `options` are
    the attack's other keyword options (from `--version`, `--queries`)."""
    if attack not in ATTACKS:
        raise ConfigError(f"--attack: unknown attack {attack!r}; choose from: "
                          f"{', '.join(ATTACKS.names())}")  # fmt: skip
    options = options or {}
    takes = accepted_options(attack) or set()
    for key in options:
        if key not in takes:
            raise ConfigError(f"{OPTION_FLAGS.get(key, key)}: attack {attack!r} takes no {key}")
    if not eps:
        raise ConfigError("--eps is needed (e.g. --eps 0.1,0.2,0.3), or give --config FILE")
    try:
        budgets = [float(part) for part in eps.split(",")]
    except ValueError:
        raise ConfigError(f"--eps: expected numbers separated by commas, got {eps!r}") from None
    configs = []
    for value in budgets:
        raw = dict(name=attack, norm=norm, eps=value, steps=steps, alpha=alpha,
                   restarts=restarts, targeted=targeted, options=options)  # fmt: skip
        try:
            configs.append(AttackConfig.model_validate(raw))
        except ValidationError as err:
            loc = err.errors()[0]["loc"]
            flag = FLAGS.get(str(loc[0]), str(loc[0])) if loc else "--eps"
            raise ConfigError(f"{flag}: {format_validation_error(err).split(': ', 1)[1]}") from None
    return configs


def load_attack_file(path: str | Path) -> list[AttackConfig]:
    """The `attacks:` list of an attack YAML, validated (each attack's options against its
    class too, before any run is loaded); errors name the key's path."""
    try:
        configs = AttackSuiteConfig.model_validate(load_yaml(path)).attacks
    except ValidationError as err:
        raise ConfigError(f"{path}: {format_validation_error(err)}") from None
    for i, cfg in enumerate(configs):
        try:
            build_attack(cfg, where=f"attacks.{i}")
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    return configs


def accepted_options(name: str) -> set[str] | None:
    """The keyword options attack `name` takes (None for an attack no longer registered)."""
    return set(inspect.signature(ATTACKS.get(name)).parameters) if name in ATTACKS else None


def attack_options(cfg: AttackConfig, where: str = "attack") -> dict[str, Any]:
    """The keyword options for the class of attack `cfg.name`: the fixed fields it takes (FGSM
    has no steps) plus `cfg.options`, checked against its signature. An unknown option, or one
    that repeats a fixed field, is one ConfigError naming `<where>.options.<key>`."""
    accepted = accepted_options(cfg.name)
    if accepted is None:
        raise ConfigError(f"{where}.name: unknown attack {cfg.name!r}; choose from: "
                          f"{', '.join(ATTACKS.names())}")  # fmt: skip
    fixed = {
        k: v for k, v in cfg.model_dump().items() if k not in ("name", "options") and k in accepted
    }
    repeated = {
        k: f"set it as {where}.{k}" if k in accepted else f"attack {cfg.name!r} takes no {k}"
        for k in AttackConfig.model_fields
        if k != "options"
    }
    extra = ATTACKS.check_options(
        cfg.name, cfg.options, where=f"{where}.options", supplied=repeated
    )
    return fixed | extra


def build_attack(cfg: AttackConfig, where: str = "attack") -> Attack:
    """The attack a config names, built from `attack_options` (nothing in it is dropped)."""
    return create_attack(cfg.name, **attack_options(cfg, where))


def attack_records(
    configs: Sequence[AttackConfig], threats: Sequence[Threat], attacks: Sequence[Attack]
) -> list[dict]:
    """What robustness.json says of each attack: its metric name, its resolved config and the
    flags it raised (AutoAttack's checks: evaluation that may not be reliable; else empty)."""
    return [{"metric": t.name, **c.model_dump(mode="json"), "flags": list(getattr(a, "flags", []))}
            for c, t, a in zip(configs, threats, attacks, strict=True)]  # fmt: skip


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Recording:
    """A threat that keeps the clean and adversarial inputs it saw (the first `keep`, or all)."""

    def __init__(self, threat: Threat, keep: int | None) -> None:
        self.threat, self.name, self.keep = threat, threat.name, keep
        self.clean: list[torch.Tensor] = []
        self.adversarial: list[torch.Tensor] = []
        self.seen = 0

    def transform(self, model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = self.threat.transform(model, x, y)
        take = len(x) if self.keep is None else max(0, min(len(x), self.keep - self.seen))
        if take:
            self.clean.append(x[:take].detach().float().cpu())
            self.adversarial.append(x_adv[:take].detach().float().cpu())
        self.seen += len(x)
        return x_adv

    def metrics(self, preds: Predictions, clean: Predictions) -> dict[str, float]:
        return self.threat.metrics(preds, clean)


def strongest(configs: Sequence[AttackConfig]) -> int:
    """The index of the largest budget in the first attack's family (same attack and norm)."""
    first = configs[0]
    family = [i for i, c in enumerate(configs) if (c.name, c.norm) == (first.name, first.norm)]
    return max(family, key=lambda i: (configs[i].eps, i))


def is_current(
    run_dir: Path,
    configs: Sequence[AttackConfig],
    limit: int | None,
    checks: ChecksConfig | None = None,
) -> bool:
    """Whether the run's robustness.json was made with these attacks, limit, check settings
    (default: the default checks) and weights."""
    path = run_dir / ROBUSTNESS_FILE
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    wanted = [c.model_dump(mode="json") for c in configs]
    had = [{k: v for k, v in a.items() if k not in ("metric", "flags")}
           for a in saved.get("attacks", [])]  # fmt: skip
    return (
        had == wanted
        and saved.get("limit") == limit
        and saved.get("checks", {}).get("settings") == (checks or ChecksConfig()).model_dump()
        and saved.get("model_sha256") == file_sha256(run_dir / MODEL_FILE)
    )


def attack_run(
    run_dir: str | Path,
    configs: Sequence[AttackConfig],
    *,
    device: str = "auto",
    limit: int | None = None,
    examples: int = 8,
    export: str | Path | None = None,
    progress: bool = True,
    batch_size: int | None = None,
    checks: ChecksConfig | None = None,
) -> dict[str, Any]:
    """Evaluate a run folder under `configs` and write the results into that folder only.

    `export` writes the adversarial images of the strongest budget (first attack family) as float32
    in [0,1], with labels, predictions and the attack's config in the metadata. `batch_size`
    defaults to the run's `data.eval_batch_size`. `checks` are the sanity checks' settings
    (default: on, `ChecksConfig()`)."""
    run_dir = Path(run_dir)
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if not configs:
        raise ConfigError("no attacks to evaluate")
    cfg, model, splits = load_run(run_dir, device=device)
    with folder_lock(run_dir, "attack"):
        result = evaluate_attacks(
            cfg, model, splits, configs, run_dir, model_sha256=file_sha256(run_dir / MODEL_FILE),
            limit=limit, examples=examples, export=export, progress=progress,
            batch_size=batch_size, checks=checks,
        )  # fmt: skip
        write_report_section(run_dir, result, result["plots"])
    return result


def evaluate_attacks(
    cfg: ExperimentConfig,
    model: nn.Module,
    splits: DataSplits,
    configs: Sequence[AttackConfig],
    out_dir: Path,
    *,
    model_sha256: str,
    limit: int | None = None,
    examples: int = 8,
    export: str | Path | None = None,
    progress: bool = True,
    batch_size: int | None = None,
    checks: ChecksConfig | None = None,
) -> dict[str, Any]:
    """The suite under `configs` on a loaded run's model, then the sanity checks
    (`vptlab.metrics.sanity`, settings `checks`, default on); writes `robustness.json`, the robust
    accuracy vs eps plots and the example grid into `out_dir` (the run's folder, or a matrix
    cell's), and returns the result.

    robustness.json holds `checks` (settings, check sample size, seconds, and per check what was
    compared, the numbers and whether it passed) and `unreliable`: per attack metric the reasons
    its number is unreliable (an empty list when none)."""
    attacks = [build_attack(c) for c in configs]
    threats = as_threats(attacks)
    top = strongest(configs)
    recorder = _Recording(threats[top], keep=None if export else examples)
    passes: list[Threat] = [recorder if i == top else t for i, t in enumerate(threats)]
    dev = next(model.parameters()).device
    amp_dtype = amp_dtype_for(dev, cfg.train.amp)
    batch_size = batch_size or cfg.data.eval_batch_size
    start = time.perf_counter()
    preds = suite_predictions(
        model, splits.test, passes, amp_dtype=amp_dtype, limit=limit, progress=progress,
        batch_size=batch_size, img_size=cfg.data.img_size,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    metrics = suite_metrics(preds, threats)
    # The check sample is the first N of the evaluated samples (never more than were evaluated).
    settings = checks or ChecksConfig()
    if limit is not None and settings.samples > limit:
        settings = settings.model_copy(update={"samples": limit})
    checked = run_checks(
        model, splits.test, attacks, metrics, settings=settings, predictions=preds,
        amp_dtype=amp_dtype, batch_size=batch_size, img_size=cfg.data.img_size, progress=progress,
    )  # fmt: skip
    unreliable = checked.pop("unreliable")
    records = attack_records(configs, threats, attacks)
    for record in records:  # what the authors' AutoAttack checks said marks the number too
        reasons = unreliable.setdefault(record["metric"], [])
        reasons += [f"AutoAttack's own check: {flag}" for flag in record["flags"]]
    checked["settings"] = (checks or ChecksConfig()).model_dump(mode="json")
    result: dict[str, Any] = {
        "run": cfg.name,
        "dataset": splits.name,
        "split": "test",
        "device": str(dev),
        "model_sha256": model_sha256,
        "attacks": records,
        "limit": limit,
        "samples": len(preds[CLEAN]),
        "seconds": seconds,
        "metrics": metrics,
        "checks": checked,
        "unreliable": unreliable,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    result["plots"] = plot_families(result, out_dir)
    classes = splits.classes or [str(i) for i in range(splits.num_classes)]
    strongest_preds = preds[threats[top].name]
    write_grid(recorder, preds[CLEAN], strongest_preds, classes, examples, out_dir / GRID_FILE)
    result["grid"] = GRID_FILE if examples > 0 and recorder.clean else None
    atomic_write_text(out_dir / ROBUSTNESS_FILE, json.dumps(result, indent=2) + "\n")
    if export is not None:
        export_adversarial(recorder, strongest_preds, configs[top], result, Path(export))
    return result


def attack_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows of a robustness.json: the clean row, then one per attack with its numbers and
    the reasons it is unreliable (`unreliable`, empty when its checks passed)."""
    metrics, reasons = result["metrics"], result.get("unreliable", {})
    # The clean row has no attack settings: blank cells rather than n/a.
    blank = {"norm": "", "steps": "", "restarts": "", "targeted": ""}
    rows: list[dict[str, Any]] = [
        {"metric": CLEAN, **blank, "eps": 0, "acc": metrics["clean/top1"],
         "top5": metrics["clean/top5"]}
    ]  # fmt: skip
    for a in result["attacks"]:
        accepted = accepted_options(a["name"])
        if accepted is not None:  # settings the attack ignores (FGSM's steps) are left blank
            a = {k: (v if k in accepted or k in ("name", "metric") else "") for k, v in a.items()}
        rows.append({**a, "acc": metrics.get(f"{a['metric']}/acc"),
                     "top5": metrics.get(f"{a['metric']}/top5"),
                     "unreliable": reasons.get(a["metric"], [])})  # fmt: skip
    return rows


def families(result: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """Robust top-1 vs eps per attack family (attack, norm, targeted), starting at the clean
    accuracy for eps 0."""
    metrics = result["metrics"]
    lines: dict[str, list[tuple[float, float]]] = {}
    for a in result["attacks"]:
        label = f"{a['name']}-{a['norm']}" + ("-targeted" if a.get("targeted") else "")
        acc = metrics.get(f"{a['metric']}/acc")
        if acc is None:
            continue
        points = lines.setdefault(label, [(0.0, metrics["clean/top1"])])
        points.append((float(a["eps"]), acc))
    return lines


def plot_families(result: dict[str, Any], out_dir: Path) -> list[str]:
    """One robust accuracy vs eps PNG per attack family; returns their file names."""
    names = []
    for label, points in families(result).items():
        name = f"robustness-{label}.png"
        plot_robust_accuracy({label: points}, out_dir / name, title=f"{result['run']}: {label}")
        names.append(name)
    return names


def write_grid(
    recorder: _Recording,
    clean: Predictions,
    adversarial: Predictions,
    classes: list[str],
    count: int,
    path: Path,
) -> None:
    if count < 1 or not recorder.clean:
        return
    x = torch.cat(recorder.clean)[:count]
    x_adv = torch.cat(recorder.adversarial)[:count]
    n = len(x)

    def names(labels: torch.Tensor) -> list[str]:
        return [classes[int(i)] for i in labels[:n]]

    plot_adversarial_grid(
        x, x_adv, names(clean.y), names(clean.pred), names(adversarial.pred), path,
        title=f"{recorder.name}: clean / adversarial / perturbation (amplified)",
    )  # fmt: skip


def section_text(result: dict[str, Any], plots: Sequence[str], grid: bool) -> str:
    lines = [
        f"## {SECTION}",
        "",
        f"{result['samples']} {result['split']} samples of {result['dataset']}, "
        f"{result['seconds']:.1f} s on {result['device']} (`{ROBUSTNESS_FILE}`).",
        "",
        markdown_table(ATTACK_COLUMNS, attack_rows(result)),
        "",
    ]
    notes = unreliable_notes(("", m, r) for m, r in result.get("unreliable", {}).items())
    if notes:
        lines += ["\n".join(f"- {note}" for note in notes), ""]
    lines += [checks_line(result.get("checks")), ""]
    lines += [f"![robust accuracy vs eps]({name})\n" for name in plots]
    if grid:
        lines += [f"![adversarial examples]({GRID_FILE})", ""]
    return "\n".join(lines)


def checks_line(checks: dict[str, Any] | None) -> str:
    """One sentence on the sanity checks behind the table: how many ran and passed, on what."""
    if not checks or not checks["settings"]["enabled"]:
        return "Sanity checks: off (`--no-checks`); these numbers were not checked."
    ran = [c for c in checks["results"] if c["passed"] is not None]
    passed = sum(bool(c["passed"]) for c in ran)
    skipped = sorted({c["check"] for c in checks["results"] if c["passed"] is None})
    text = (f"Sanity checks (monotone in eps; PGD-20 at a budget that grays any image; more steps "
            f"and restarts; gradient-free Square; the last three on the first "
            f"{checks['samples']} samples): {passed} of {len(ran)} passed, "
            f"{checks['seconds']:.1f} s")
    if skipped:
        text += f"; not run: {', '.join(skipped)}"
    return text + "."


def replace_section(text: str, title: str, body: str) -> str:
    """`text` with its `## title` section (up to the next `## ` heading) replaced by `body`, or
    with `body` appended when it has none."""
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    body = body.rstrip("\n") + "\n"
    if pattern.search(text):
        return pattern.sub(lambda _: body + "\n", text, count=1).rstrip("\n") + "\n"
    return text.rstrip("\n") + "\n\n" + body


def write_report_section(run_dir: Path, result: dict[str, Any], plots: Sequence[str]) -> None:
    report = run_dir / "report.md"
    text = report.read_text() if report.is_file() else f"# Run `{result['run']}`\n"
    body = section_text(result, plots, grid=(run_dir / GRID_FILE).is_file())
    atomic_write_text(report, replace_section(text, SECTION, body))


def export_adversarial(
    recorder: _Recording,
    preds: Predictions,
    config: AttackConfig,
    result: dict[str, Any],
    path: Path,
) -> None:
    """Adversarial images as float32 (N,3,H,W) in [0,1] (at the size the model saw), with
    labels, predictions and sample indices; the attack config and run in the metadata."""
    tensors = {
        "adversarial": torch.cat(recorder.adversarial).contiguous(),
        "labels": preds.y.contiguous(),
        "predictions": preds.pred.contiguous(),
        "index": preds.index.contiguous(),
    }
    metadata = {
        "run": result["run"],
        "dataset": result["dataset"],
        "metric": recorder.name,
        "attack": json.dumps(config.model_dump(mode="json")),
        "pixels": "float32 in [0,1]",
        "robust_top1": f"{result['metrics'][f'{recorder.name}/acc']:.4f}",
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
