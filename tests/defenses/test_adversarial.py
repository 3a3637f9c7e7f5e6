"""Adversarial training tasks: their update rules, their effect, the probe, and exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from vptlab.attacks import PGD
from vptlab.config import AttackConfig, ExperimentConfig, build_config
from vptlab.data.loaders import Batch, to_rgb
from vptlab.defenses.adversarial import (
    BEST_ROBUST_FILE,
    FGSMRSTraining,
    PGDTraining,
    TradesTraining,
    create_objective,
    robust_summary,
)
from vptlab.engine import runner
from vptlab.engine.build import build_experiment
from vptlab.errors import ConfigError
from vptlab.models import create_model
from vptlab.prompts import adapt


def digits_config(tmp_path: Path, *overrides: str) -> ExperimentConfig:
    base = {
        "name": "digits",
        "seed": 0,
        "device": "cpu",
        "data": {"name": "digits", "batch_size": 64, "num_workers": 0},
        "model": {"name": "simplenet"},
        "train": {"epochs": 3, "lr": 3e-3, "weight_decay": 0.01, "warmup_epochs": 0.5},
        "output": {"dir": str(tmp_path), "tensorboard": False, "progress": False},
    }
    return build_config(base, list(overrides))


def _batch(n: int = 16, size: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    return Batch(x, torch.randint(0, 10, (n,), generator=g), torch.arange(n))


BUDGET = AttackConfig(eps=0.1, steps=3)
OBJECTIVES = {
    "pgd": lambda: PGDTraining(BUDGET),
    "fgsm_rs": lambda: FGSMRSTraining(BUDGET),
    "trades": lambda: TradesTraining(BUDGET, beta=6.0),
}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_loss_is_finite_and_trains_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = adapt(create_model("simplenet", num_classes=10, img_size=8), "full").train()
    loss, logits = OBJECTIVES[name]().loss(model, _batch(), model)
    assert torch.isfinite(loss) and logits.shape == (16, 10)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_prompt_mode_trains_prompts_and_head_only(name: str) -> None:
    torch.manual_seed(0)
    net = create_model("vit-scratch", num_classes=10, img_size=8, patch_size=4, embed_dim=16,
                       depth=2, num_heads=2)  # fmt: skip
    model = adapt(net, "prompt").train()
    frozen = {k: v.clone() for k, v in model.state_dict().items()
              if k in dict(model.named_parameters()) and not dict(model.named_parameters())[k]
              .requires_grad}  # fmt: skip
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.clone() for p in trainable]
    opt = torch.optim.SGD(trainable, lr=0.1)
    task = OBJECTIVES[name]()
    for step in range(3):
        loss, _ = task.loss(model, _batch(seed=step), model)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert frozen and all(p.grad is None for p in model.parameters() if not p.requires_grad)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # bit-identical backbone
    assert all(torch.equal(dict(model.named_buffers())[k], v) for k, v in buffers.items())
    assert any(not torch.equal(p, b) for p, b in zip(trainable, before, strict=True))


class ConstantGradient(nn.Module):
    """Logits (s, -s) with s = sum(x): with label 0... 1, the loss grows with every pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.flatten(1).sum(1, keepdim=True)
        return torch.cat([s, -s], dim=1)


def test_fgsm_rs_steps_1_25_eps_from_a_start_in_the_ball() -> None:
    eps = 0.1
    task = FGSMRSTraining(AttackConfig(name="fgsm", eps=eps))
    x = torch.full((4, 3, 8, 8), 0.5)  # no clamping to [0,1] can interfere
    batch = Batch(x, torch.ones(4, dtype=torch.long), torch.arange(4))
    model = ConstantGradient()
    seen: list[torch.Tensor] = []
    task_loss = task.loss
    torch.manual_seed(3)
    start = (torch.rand(x.shape) * 2 - 1) * eps  # what the random start draws (global RNG)
    torch.manual_seed(3)

    def spy(m: nn.Module, xs: torch.Tensor) -> torch.Tensor:
        seen.append(xs)
        return ConstantGradient()(xs)

    task_loss(lambda xs: spy(model, xs), batch, model)
    delta = seen[0] - x
    assert torch.allclose(delta, (start + 1.25 * eps).clamp(-eps, eps))
    assert start.abs().max() <= eps and delta.abs().max() <= eps + 1e-7
    assert delta.min() >= 0.25 * eps - 1e-7 and (delta < eps - 1e-6).any()


def test_trades_with_beta_zero_is_clean_cross_entropy() -> None:
    torch.manual_seed(0)
    model = adapt(create_model("simplenet", num_classes=10, img_size=8), "full").train()
    batch = _batch()
    loss, logits = TradesTraining(BUDGET, beta=0.0).loss(model, batch, model)
    assert torch.equal(loss, F.cross_entropy(model(batch.x), batch.y))
    robust, _ = TradesTraining(BUDGET, beta=6.0).loss(model, batch, model)
    assert robust > loss


def test_inner_attack_leaves_batchnorm_statistics_to_the_step() -> None:
    torch.manual_seed(0)
    model = adapt(create_model("simplenet", num_classes=10, img_size=8), "full").train()
    stats = {k: v.clone() for k, v in model.named_buffers()}
    task = PGDTraining(BUDGET)
    x_adv = task.perturb(PGD(eps=0.1, steps=3, seed=None), model, _batch())
    assert not torch.equal(x_adv, _batch().x) and model.training
    assert all(torch.equal(v, stats[k]) for k, v in model.named_buffers())
    task.loss(model, _batch(), model)  # the step's own forward does update them, once
    counts = [v.item() for k, v in model.named_buffers() if k.endswith("num_batches_tracked")]
    assert counts and all(c == 1 for c in counts)


def test_eps_ramp_grows_over_the_first_epochs() -> None:
    task = PGDTraining(AttackConfig(eps=0.3), eps_ramp_epochs=2)
    values = []
    for progress in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0):
        task.set_progress(progress)
        values.append(task.current_eps())
    assert values == pytest.approx([0.0, 0.075, 0.15, 0.225, 0.3, 0.3])


def test_eps_ramp_follows_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    used: list[float] = []
    real = PGDTraining.current_eps

    def record(self: PGDTraining) -> float:
        used.append(real(self))
        return used[-1]

    monkeypatch.setattr(PGDTraining, "current_eps", record)
    cfg = digits_config(tmp_path, "train.objective=pgd", "train.attack.steps=1",
                        "train.attack.eps=0.1", "train.eps_ramp_epochs=2",
                        "train.robust_probe=0")  # fmt: skip
    runner.train(cfg)
    steps = len(used) // 3
    assert used[0] == 0.0 and used == sorted(used)
    assert 0.04 < used[steps] < 0.06 and used[2 * steps] == pytest.approx(0.1)


def _pgd_accuracy(run_dir: Path, eps: float) -> float:
    cfg, model, data = runner.load_run(run_dir, device="cpu")
    x, y = to_rgb(data.test.x), data.test.y
    x_adv = PGD(eps=eps, steps=10, seed=0)(model, x, y)
    with torch.no_grad():
        return float((model(x_adv).argmax(1) == y).float().mean())


def test_pgd_training_is_more_robust_than_standard_training(tmp_path: Path) -> None:
    common = ("train.epochs=4", "train.attack.eps=0.1", "train.attack.steps=3")
    runner.train(digits_config(tmp_path / "std", *common))
    adv = runner.train(digits_config(tmp_path / "adv", *common, "train.objective=pgd"))
    standard = _pgd_accuracy(tmp_path / "std" / "digits", 0.1)
    robust = _pgd_accuracy(tmp_path / "adv" / "digits", 0.1)
    assert adv["final"]["test_top1"] > 70.0
    assert robust > standard + 0.2, (standard, robust)


def test_probe_is_in_the_history_and_best_robust_is_kept(tmp_path: Path) -> None:
    cfg = digits_config(tmp_path, "train.objective=fgsm_rs", "train.attack.eps=0.1",
                        "train.keep_best_robust=true", "train.robust_probe=128")  # fmt: skip
    metrics = runner.train(cfg)
    probes = [row["probe_robust_acc"] for row in metrics["history"]]
    assert len(probes) == 3 and all(0.0 <= p <= 100.0 for p in probes)
    run = tmp_path / "digits"
    assert (run / BEST_ROBUST_FILE).is_file()
    best = metrics["best_robust"]
    assert best["probe"] == max(probes) and probes[best["epoch"] - 1] == max(probes)
    assert load_file(str(run / BEST_ROBUST_FILE)).keys() == load_file(
        str(run / "model.safetensors")).keys()  # fmt: skip
    assert "best probe" in (run / "report.md").read_text()


def test_standard_runs_have_no_probe_unless_asked(tmp_path: Path) -> None:
    assert digits_config(tmp_path).train.probe_size == 0
    assert digits_config(tmp_path, "train.objective=trades").train.probe_size == 256


def test_catastrophic_overfitting_is_flagged() -> None:
    history = [{"epoch": e, "probe_robust_acc": p} for e, p in enumerate([10, 35, 40, 30, 12], 1)]
    summary = robust_summary(history, kept_best=True)
    assert summary["catastrophic_overfitting"] == {"epoch": 5, "probe": 12.0, "best": 40.0}
    assert summary["best_robust"]["epoch"] == 3
    assert "catastrophic_overfitting" not in robust_summary(history[:4])


def _strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in history]


@pytest.mark.parametrize("objective", ["fgsm_rs", "trades"])
def test_resume_of_an_adversarial_run_is_exact(tmp_path: Path, objective: str) -> None:
    opts = (f"train.objective={objective}", "train.attack.eps=0.1", "train.attack.steps=2",
            "train.eps_ramp_epochs=1.5", "train.robust_probe=64", "train.keep_best_robust=true",
            "model.options.drop_rate=0.3")  # fmt: skip
    full = runner.train(digits_config(tmp_path / "a", *opts))
    runner.train(digits_config(tmp_path / "b", *opts), stop_after_epochs=1)
    resumed = runner.resume(tmp_path / "b" / "digits")
    assert _strip(resumed["history"]) == _strip(full["history"])
    a = load_file(str(tmp_path / "a" / "digits" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "digits" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["best_robust"] == full["best_robust"]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.objective=madry", "train.objective"),
        ("train.attack.norm=l3", "train.attack.norm"),
        ("train.attack.eps=8", "train.attack"),
        ("train.trades_beta=-1", "train.trades_beta"),
        ("train.attack.stepz=3", "train.attack.stepz"),
    ],
)
def test_bad_options_name_their_key(tmp_path: Path, override: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        digits_config(tmp_path, "train.objective=pgd", override)
    assert str(err.value).startswith(f"{key}:") and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["train.objective=fgsm_rs", "train.attack.norm=l2"], "attack.norm must be linf"),
        (["train.objective=pgd", "train.attack.eps=0"], "attack.eps must be > 0"),
        (["train.keep_best_robust=true"], "keep_best_robust needs the robust probe"),
        (["train.objective=pgd", "train.eps_ramp_epochs=9"], "eps_ramp_epochs must be <="),
    ],
)
def test_inconsistent_options_are_one_line_errors(
    tmp_path: Path, overrides: list[str], words: str
) -> None:
    with pytest.raises(ConfigError, match=words) as err:
        digits_config(tmp_path, *overrides)
    assert "\n" not in str(err.value)


def test_objective_is_picked_by_config(tmp_path: Path) -> None:
    for name, kind in (("pgd", PGDTraining), ("fgsm_rs", FGSMRSTraining),
                       ("trades", TradesTraining)):  # fmt: skip
        assert isinstance(create_objective(digits_config(tmp_path, f"train.objective={name}")
                                           .train), kind)  # fmt: skip
    data, _ = build_experiment(digits_config(tmp_path))
    assert data.test.x.shape[-1] == 8


ADVERSARIAL_PRESETS = ["adversarial_mnist", "adversarial_vpt", "adversarial_tinyvit"]


@pytest.mark.parametrize("preset", ADVERSARIAL_PRESETS)
def test_adversarial_study_presets_validate(preset: str) -> None:
    from vptlab.config import load_yaml
    from vptlab.report.study import StudyConfig, deep_merge

    root = Path(__file__).resolve().parents[2] / "configs"
    study = StudyConfig.model_validate(load_yaml(root / f"{preset}.yaml"))
    objectives = {build_config(deep_merge(study.base, spec)).train.objective
                  for spec in study.runs.values()}  # fmt: skip
    assert "standard" in objectives and "pgd" in objectives
    assert study.attacks and all(a.steps == 20 for a in study.attacks)


def test_miniplaces_pgd_is_the_adversarial_twin() -> None:
    from vptlab.config import load_config

    root = Path(__file__).resolve().parents[2] / "configs"
    plain, pgd = load_config(root / "miniplaces.yaml"), load_config(root / "miniplaces_pgd.yaml")
    assert pgd.train.objective == "pgd" and plain.train.objective == "standard"
    assert pgd.data == plain.data and pgd.model == plain.model
