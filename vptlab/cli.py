"""The `vptlab` command: train, eval, attack, defend, detect, models, run (the main job), report.
Errors print as one line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vptlab.errors import VptlabError

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _device_overrides(args: argparse.Namespace) -> list[str]:
    device = args.device
    if args.gpu is not None:  # the MiniPlaces scripts' spelling: --gpu=-1 means the CPU
        device = "cpu" if args.gpu < 0 else "cuda"
    return [f"device={device}"] if device else []


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    parser.add_argument(
        "--gpu", type=int, default=None, help="-1 for the CPU (same as --device cpu)"
    )


def _poisoned_run_parser(
    sub: Any, verb: str, func: Any, help: str, flag: str, flag_help: str
) -> argparse.ArgumentParser:
    """The parser of a verb on a poisoned run folder (defend, detect), with its required plug-in
    flag (--defense, --detector) and the device flags."""
    p = sub.add_parser(verb, help=help)
    p.add_argument("run_dir", help="a finished run trained with data.poison")
    p.add_argument(flag, required=True, help=flag_help)
    _add_device(p)
    p.set_defaults(func=func)
    return p


def cmd_train(args: argparse.Namespace) -> int:
    from vptlab.config import load_yaml
    from vptlab.steps.resolve import resolved
    from vptlab.steps.study import is_study, run_study
    from vptlab.steps.train import resume, train

    overrides = list(args.overrides) + _device_overrides(args)
    if args.resume:
        metrics = resume(args.resume, overrides)
        print(json.dumps(metrics.get("final", {})))
        return 0
    if not args.config:
        raise VptlabError("train needs -c CONFIG (or --resume RUN_DIR)")
    raw = load_yaml(args.config)
    if is_study(raw):
        report = run_study(raw, overrides, fresh=args.fresh)
        print(f"report: {report}")
        return 0
    metrics = train(resolved(raw, overrides), force=args.force)
    print(json.dumps({"run": metrics["name"], **metrics.get("final", {})}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from vptlab.data.loaders import make_loader
    from vptlab.engine.loop import amp_dtype_for
    from vptlab.metrics.accuracy import evaluate
    from vptlab.models.clip import clip_net, is_clip
    from vptlab.steps.build import zero_shot_prompts
    from vptlab.steps.train import load_run

    device = (_device_overrides(args) or ["device=auto"])[0].split("=", 1)[1]
    cfg, model, splits = load_run(args.run_dir, device=device, data=args.data, root=args.root)
    zero_shot = is_clip(model)
    if zero_shot:  # classify the evaluated dataset's classes through the text tower
        clip_net(model).set_zero_shot_head(*zero_shot_prompts(splits))
    dev = next(model.parameters()).device
    loader = make_loader(
        splits.test, cfg.data.eval_batch_size, train=False, device=dev, seed=cfg.seed,
        num_workers=cfg.data.num_workers, img_size=cfg.data.img_size,
    )
    result = evaluate(model, loader, amp_dtype_for(dev, cfg.train.amp))
    extra = {"zero_shot": True} if zero_shot else {}
    print(json.dumps({"run": str(args.run_dir), "dataset": splits.name, **extra, **result}))
    return 0


ATTACK_FLAG_DEFAULTS = {
    "attack": "pgd", "norm": "linf", "eps": None, "steps": 10, "alpha": None, "restarts": 1,
    "targeted": False, "version": None, "queries": None,
}  # fmt: skip


def cmd_attack(args: argparse.Namespace) -> int:
    from vptlab.config import ChecksConfig
    from vptlab.steps.attack import attack_run, configs_from_flags, load_attack_file

    if args.config:
        given = [k for k in ATTACK_FLAG_DEFAULTS if getattr(args, k) != ATTACK_FLAG_DEFAULTS[k]]
        if given:
            raise VptlabError(
                f"--{given[0]} and --config exclude each other: put it in the attack file"
            )
        configs = load_attack_file(args.config)
    else:
        options = {"version": args.version, "n_queries": args.queries}
        configs = configs_from_flags(
            args.attack, args.norm, args.eps, args.steps, alpha=args.alpha,
            restarts=args.restarts, targeted=args.targeted,
            options={k: v for k, v in options.items() if v is not None},
        )  # fmt: skip
    if args.limit is not None and args.limit < 1:
        raise VptlabError(f"--limit must be >= 1, got {args.limit}")
    if args.check_samples is not None and args.check_samples < 1:
        raise VptlabError(f"--check-samples must be >= 1, got {args.check_samples}")
    checks = ChecksConfig(enabled=not args.no_checks)
    if args.check_samples is not None:
        checks.samples = args.check_samples
    device = (_device_overrides(args) or ["device=auto"])[0].split("=", 1)[1]
    result = attack_run(
        args.run_dir, configs, device=device, limit=args.limit, examples=args.examples,
        export=args.export, progress=not args.no_progress, batch_size=args.batch_size,
        checks=checks,
    )  # fmt: skip
    # Unreliable numbers go to stderr, so stdout stays one JSON line for scripts.
    for metric, reasons in result["unreliable"].items():
        if reasons:
            acc = result["metrics"][f"{metric}/acc"]
            print(f"vptlab: {metric} = {acc:.2f}% is unreliable: {'; '.join(reasons)}",
                  file=sys.stderr)  # fmt: skip
    print(json.dumps({"run": str(args.run_dir), "samples": result["samples"],
                      **result["metrics"]}))  # fmt: skip
    return 0


def cmd_defend(args: argparse.Namespace) -> int:
    from vptlab.steps.defend import check_fraction, defend

    check_fraction(args.clean_fraction)
    defense: dict[str, object] = {"name": args.defense}
    if args.clean_fraction is not None:
        defense["clean_fraction"] = args.clean_fraction
    if args.select:
        defense["select"] = {}  # the rule's defaults (docs/defense_protocol.md)
    overrides = list(args.overrides) + _device_overrides(args)
    metrics = defend(args.run_dir, defense, overrides, fresh=args.fresh,
                     adaptive=not args.no_adaptive)  # fmt: skip
    print(json.dumps({"run": metrics["name"], **metrics["defense"]}))
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from vptlab.steps.detect import detect_run

    if args.overlays < 1:
        raise VptlabError(f"--overlays must be >= 1, got {args.overlays}")
    device = (_device_overrides(args) or ["device=auto"])[0].split("=", 1)[1]
    result = detect_run(args.run_dir, args.detector, device=device, overlays=args.overlays)
    print(json.dumps({"run": str(args.run_dir), "detector": args.detector, **result}))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from vptlab.models import list_models

    print("\n".join(list_models()))
    return 0


def registries() -> dict[str, Any]:
    """Every plug-in registry by the kind `vptlab list` names it (each entry: one file and its
    `@REGISTRY.register(name, **metadata)` line; see the README's "Extending vptlab")."""
    from vptlab.attacks import ATTACKS
    from vptlab.backdoors.triggers import TRIGGERS
    from vptlab.data import DATASETS
    from vptlab.defenses.detectors import DETECTORS
    from vptlab.defenses.repair import REPAIRERS
    from vptlab.engine.tasks import OBJECTIVES
    from vptlab.matrix.executors import EXECUTORS
    from vptlab.models import MODELS
    from vptlab.prompts.pixel import PIXEL_PROMPTS

    return {
        "models": MODELS, "datasets": DATASETS, "attacks": ATTACKS, "triggers": TRIGGERS,
        "objectives": OBJECTIVES, "pixel-prompts": PIXEL_PROMPTS, "defenses": REPAIRERS,
        "detectors": DETECTORS, "executors": EXECUTORS,
    }  # fmt: skip


def cmd_list(args: argparse.Namespace) -> int:
    found = registries()
    kinds = [args.kind] if args.kind else list(found)
    for kind in kinds:
        if kind not in found:
            raise VptlabError(f"list: unknown kind {kind!r}; choose from: {', '.join(found)}")
        registry = found[kind]
        print(f"{kind}:")
        for name in registry.names():
            meta = ", ".join(f"{k}={v}" for k, v in sorted(registry.meta(name).items()))
            print(f"  {name}" + (f"  ({meta})" if meta else ""))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from vptlab.config import load_yaml
    from vptlab.matrix.config import is_matrix
    from vptlab.matrix.run import run_matrix
    from vptlab.steps.study import run_study

    raw = load_yaml(Path(args.config) if args.config else DEMO_CONFIG)
    overrides = list(args.overrides) + _device_overrides(args)
    if is_matrix(raw):
        report = run_matrix(raw, overrides, fresh=args.fresh, executor=args.executor,
                            address=args.ray_address, progress=not args.no_progress)
    elif args.executor != "local" or args.ray_address:
        raise VptlabError("--executor and --ray-address apply to threat matrices (`matrix:`)")
    else:
        report = run_study(raw, overrides, fresh=args.fresh)
    print(f"report: {report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from vptlab.matrix.report import write_matrix_report
    from vptlab.runs import folder_lock

    with folder_lock(args.dir, "report"):
        print(f"report: {write_matrix_report(args.dir)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vptlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one run or a study from a YAML config")
    p.add_argument("-c", "--config", help="YAML preset (configs/...)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    p.add_argument("--force", action="store_true", help="overwrite an existing run folder")
    p.add_argument("--fresh", action="store_true", help="studies: retrain finished runs too")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    _add_device(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run folder's model")
    p.add_argument("run_dir")
    p.add_argument("--data", help="evaluate on another dataset (same classes)")
    p.add_argument("--root", help="folder of that dataset")
    _add_device(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "attack", help="robust accuracy of a run folder under evasion attacks (robustness.json)"
    )
    p.add_argument("run_dir")
    p.add_argument("--attack", help="a registered attack (`vptlab list attacks`): fgsm, pgd, "
                   "square or autoattack (default pgd)")
    p.add_argument("--norm", help="linf or l2 (default linf)")
    p.add_argument("--eps", help="budgets in [0,1] pixel units, comma-separated: 0.1,0.2,0.3")
    p.add_argument("--steps", type=int, help="PGD steps (default 10)")
    p.add_argument("--alpha", type=float, help="step size (default 2.5 eps / steps)")
    p.add_argument("--restarts", type=int, help="PGD random restarts (default 1)")
    p.add_argument("--targeted", action="store_true", help="aim each sample at the next class")
    p.add_argument("--version", help="autoattack: standard (default), plus or rand")
    p.add_argument("--queries", type=int, help="square: queries per restart (default 5000)")
    p.add_argument("--config", metavar="FILE", help="YAML with `attacks:`, a list of attacks")
    p.add_argument("--limit", type=int, default=None, help="the first N test samples only")
    p.add_argument("--examples", type=int, default=8, help="samples in the example grid")
    p.add_argument("--export", metavar="FILE.safetensors",
                   help="write the strongest budget's adversarial images (float32 in [0,1])")
    p.add_argument("--batch-size", type=int, help="default: the run's data.eval_batch_size")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-checks", action="store_true",
                   help="skip the sanity checks (monotone in eps, gray budget, more steps, Square)")
    p.add_argument("--check-samples", type=int, metavar="N",
                   help="the checks attack the first N evaluated samples again (default 100)")
    p.set_defaults(**ATTACK_FLAG_DEFAULTS)
    _add_device(p)
    p.set_defaults(func=cmd_attack)

    p = _poisoned_run_parser(
        sub, "defend", cmd_defend,
        "repair a poisoned run with clean data into a new run folder (parent: it)",
        "--defense", "a registered defense (`vptlab list defenses`): ft, fp, nad, nc or prompt; "
        "for CLIP runs ft, nad, cleanclip or clip-prompt",
    )  # fmt: skip
    p.add_argument("--clean-fraction", type=float, default=None,
                   help="share of the clean train split the defender holds (default 0.05)")
    p.add_argument("--fresh", action="store_true", help="redo a finished defended run")
    p.add_argument("--select", action="store_true",
                   help="choose the learning rate by the protocol's rule on a validation slice of "
                   "the clean data (lr x 1, 0.3, 0.1; docs/defense_protocol.md)")
    p.add_argument("--no-adaptive", action="store_true",
                   help="skip the adaptive attacker's residual ASR (~25 s a search on a CPU)")
    p.add_argument("overrides", nargs="*",
                   help="key.sub=value: the defense's recipe (train.epochs=5, train.lr=0.01), "
                   "its options (defense.options.beta=1000), name=...")

    p = _poisoned_run_parser(
        sub, "detect", cmd_detect,
        "backdoor detection on a poisoned run (detection.json in its folder)",
        "--detector", "a registered detector (`vptlab list detectors`): strip (AUROC, triggered "
        "vs clean test images), spectral or ac (precision / recall of flagged samples) or nc "
        "(Neural Cleanse: anomaly index, flagged classes)",
    )  # fmt: skip
    p.add_argument("--overlays", type=int, default=20, help="STRIP: clean images blended in")

    p = sub.add_parser("models", help="list the registered models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("list", help="the registered plug-ins (models, attacks, triggers, ...)")
    p.add_argument("kind", nargs="?", help="one kind only: models, attacks, defenses ...")
    p.set_defaults(func=cmd_list)

    from vptlab.matrix.executors import EXECUTORS

    p = sub.add_parser(
        "run", help="the main job: a threat matrix or a study preset (default: the mnist-5k demo)"
    )
    p.add_argument("-c", "--config", help=f"matrix or study preset (default {DEMO_CONFIG.name})")
    p.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    p.add_argument("--executor", choices=EXECUTORS.names(), default="local",
                   help="matrix cells in this process, one after another (default), or on Ray")
    p.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides for every run")
    _add_device(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="rebuild a threat matrix's report.md and report.html")
    p.add_argument("dir", help="the matrix folder (runs/<matrix>)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vptlab.engine.distributed import teardown_distributed

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives the positional `overrides` only the words right after the other positionals
    # (`defend RUN --defense ft train.epochs=5` would leave train.epochs=5 over): take any later
    # key=value words as overrides too.
    if extra:
        if not hasattr(args, "overrides") or any(w.startswith("-") or "=" not in w for w in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except VptlabError as err:
        print(f"vptlab: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vptlab: interrupted; resume with `vptlab train --resume RUN_DIR`", file=sys.stderr)
        return 130
    finally:
        teardown_distributed()


if __name__ == "__main__":
    sys.exit(main())
