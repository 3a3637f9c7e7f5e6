"""Adversarial training tasks: their update rules, the mode and precision of their inner attacks,
their effect, the probe on its held-out train slice, overfitting flags, and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from vptlab.attacks import FGSM, PGD
from vptlab.config import AttackConfig, ExperimentConfig, TrainConfig
from vptlab.data.base import TensorSplit, hold_out
from vptlab.data.loaders import Batch, to_rgb
from vptlab.defenses import adversarial
from vptlab.defenses.adversarial import (
    BEST_ROBUST_FILE,
    PROBE_EPS_KEY,
    PROBE_FGSM_KEY,
    PROBE_KEY,
    SELECTED_ON,
    FGSMRSTraining,
    PGDTraining,
    RobustProbe,
    TradesTraining,
    probe_size,
    robust_summary,
)
from vptlab.engine.distributed import DistInfo
from vptlab.engine.evaluators import EvalContext
from vptlab.engine.tasks import OBJECTIVES, Task, create_objective
from vptlab.errors import ConfigError
from vptlab.models import create_model
from vptlab.prompts import adapt
from vptlab.steps import train as runner
from vptlab.steps.build import build_data, build_evaluators, build_experiment
from vptlab.steps.resolve import resolved


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
    return resolved(base, list(overrides))


def _batch(n: int = 16, size: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    return Batch(x, torch.randint(0, 10, (n,), generator=g), torch.arange(n))


BUDGET = AttackConfig(eps=0.1, steps=3)
# Every registered adversarial objective, built from the registry: a new one is tested here too.
ADVERSARIAL = OBJECTIVES.names(adversarial=True)


def _objective(name: str) -> Task:
    train = TrainConfig(objective=name, attack=BUDGET, trades_beta=6.0)
    return OBJECTIVES.create(name, train=train, model=None, data=None)


def test_the_paper_objectives_are_registered_as_adversarial() -> None:
    assert {"pgd", "fgsm_rs", "trades"} <= set(ADVERSARIAL)
    assert OBJECTIVES.names(adversarial=False) == ["abl", "clip", "standard"]
    assert isinstance(_objective("trades"), TradesTraining)


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_loss_is_finite_and_trains_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = adapt(create_model("simplenet", num_classes=10, img_size=8), "full").train()
    loss, logits = _objective(name).loss(model, _batch(), model)
    assert torch.isfinite(loss) and logits.shape == (16, 10)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ADVERSARIAL)
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
    task = _objective(name)
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
    """Logits (s, -s) with s = sum(x): with label 1, the loss grows with every pixel."""

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


def test_fgsm_rs_clips_its_start_to_the_image_before_the_step() -> None:
    # Black images and a loss that grows with brightness: every pixel's step goes up by 1.25 eps
    # from a start clipped to [0, eps], so every pixel ends at eps exactly. Unclipped starts below
    # -0.25 eps (about 37% of pixels) would end short of it.
    eps = 0.1
    x, y = torch.zeros(16, 3, 8, 8), torch.ones(16, dtype=torch.long)
    x_adv = FGSM(eps=eps, alpha=1.25 * eps, random_start=True, seed=0)(ConstantGradient(), x, y)
    assert torch.equal(x_adv, torch.full_like(x, eps))
    seen: list[torch.Tensor] = []

    def spy(xs: torch.Tensor) -> torch.Tensor:
        seen.append(xs)
        return ConstantGradient()(xs)

    torch.manual_seed(0)
    FGSMRSTraining(AttackConfig(name="fgsm", eps=eps)).loss(spy, Batch(x, y, torch.arange(16)),
                                                           ConstantGradient())  # fmt: skip
    assert torch.equal(seen[0], torch.full_like(x, eps))


class ModeRecorder(nn.Module):
    """A BatchNorm net that records, per forward, whether it ran in train mode and in which
    dtype its linear layer computed (bf16 under an active autocast)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(3)
        self.head = nn.Linear(3 * 8 * 8, 10)
        self.calls: list[tuple[bool, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.norm(x).flatten(1))
        self.calls.append((self.training, logits.dtype))
        return logits


def test_trades_maximizes_the_kl_in_eval_mode_and_fp32() -> None:
    torch.manual_seed(0)
    model = ModeRecorder().train()
    model.head.eval()  # a mixed-mode model (a frozen part in eval): kept as it is, per module
    stats = {k: v.clone() for k, v in model.named_buffers()}
    task, batch = TradesTraining(BUDGET, beta=6.0), _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loop's bf16 autocast
        x_adv = task.maximize_kl(model, batch.x, 0.1, 0.05)
        inner = list(model.calls)
        assert len(inner) == BUDGET.steps + 1  # the clean target, then one forward per step
        assert all(not training and dtype == torch.float32 for training, dtype in inner)
        assert not torch.equal(x_adv, batch.x)
        assert model.training and model.norm.training and not model.head.training
        assert all(torch.equal(v, stats[k]) for k, v in model.named_buffers())
        model.calls.clear()
        task.loss(model, batch, model)  # the step's own forwards: train mode, under autocast
    assert model.calls[-2:] == [(True, torch.bfloat16)] * 2
    assert int(model.norm.num_batches_tracked) == 2


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


@pytest.mark.slow
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
    assert [row[PROBE_EPS_KEY] for row in metrics["history"]] == [0.1] * 3
    run = tmp_path / "digits"
    assert (run / BEST_ROBUST_FILE).is_file()
    best = metrics["best_robust"]
    assert best["probe"] == max(probes) and probes[best["epoch"] - 1] == max(probes)
    assert best["selected"] == SELECTED_ON == "best on the held-out train slice"
    assert load_file(str(run / BEST_ROBUST_FILE)).keys() == load_file(
        str(run / "model.safetensors")).keys()  # fmt: skip
    assert "best on the held-out train slice" in (run / "report.md").read_text()
    assert "best_top1" not in metrics
    # Reloading the run rebuilds the same split: the probe's samples are still out of training.
    _, _, reloaded = runner.load_run(run, device="cpu")
    built = build_data(cfg)
    assert torch.equal(reloaded.probe.x, built.probe.x) and len(reloaded.probe) == 128
    assert len(reloaded.train) == len(built.train)


def test_probe_slice_is_held_out_of_the_train_split(tmp_path: Path) -> None:
    split = TensorSplit(torch.arange(50.0).view(50, 1, 1, 1), torch.arange(50) % 10)
    rest, held = hold_out(split, 8, seed=3)
    ids = torch.cat([rest.x.flatten(), held.x.flatten()]).long()
    assert len(held) == 8 and len(rest) == 42 and sorted(ids.tolist()) == list(range(50))
    assert torch.equal(rest.x.flatten(), rest.x.flatten().sort().values)  # the split's order
    assert torch.equal(hold_out(split, 8, seed=3)[1].x, held.x)
    assert not torch.equal(hold_out(split, 8, seed=4)[1].x, held.x)

    plain = build_data(digits_config(tmp_path, "train.robust_probe=0"))
    cfg = digits_config(tmp_path, "train.objective=pgd", "train.robust_probe=64")
    data = build_data(cfg)
    assert len(data.probe) == 64 and len(data.train) == len(plain.train) - 64
    assert torch.equal(data.test.x, plain.test.x)
    rest, held = hold_out(plain.train, 64, cfg.seed)  # the same cut, from the same seed
    assert torch.equal(data.train.x, rest.x) and torch.equal(data.probe.x, held.x)
    evaluators = build_evaluators(cfg, data, tmp_path, create_objective(cfg.train))
    probe = next(e for e in evaluators if isinstance(e, RobustProbe))
    assert probe.split is data.probe


def test_probe_slice_is_cut_before_poisoning(tmp_path: Path) -> None:
    opts = ("train.objective=pgd", "train.robust_probe=64", "data.poison.trigger=badnets",
            "data.poison.rate=0.1", "data.poison.target=0")  # fmt: skip
    data = build_data(digits_config(tmp_path, *opts))
    clean = build_data(digits_config(tmp_path, "train.objective=pgd", "train.robust_probe=64"))
    record = data.train.poison
    assert record.num_samples == len(data.train) == len(clean.train)
    assert torch.equal(data.train.clean.x, clean.train.x)  # poisoned after the cut
    assert torch.equal(data.probe.x, clean.probe.x) and torch.equal(data.probe.y, clean.probe.y)


def test_a_probe_larger_than_the_train_split_names_its_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^train\.robust_probe: 5000 held-out samples"):
        build_data(digits_config(tmp_path, "train.objective=pgd", "train.robust_probe=5000"))


def test_probe_runs_pgd10_at_the_eps_it_is_given_and_keeps_module_modes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attacks: list[tuple[float, int, bool, int | None, bool]] = []

    class SpyPGD(PGD):
        def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            attacks.append((self.eps, self.steps, self.amp, self.seed, model.training))
            return super().perturb(model, x, y)

    monkeypatch.setattr(adversarial, "PGD", SpyPGD)
    torch.manual_seed(0)
    model = adapt(create_model("simplenet", num_classes=10, img_size=8), "full").train()
    frozen = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    frozen.eval()
    split = TensorSplit(torch.rand(32, 3, 8, 8), torch.randint(0, 10, (32,)))
    ctx = EvalContext(digits_config(tmp_path), torch.device("cpu"), None, DistInfo())
    eps = [0.0]
    probe = RobustProbe(split, AttackConfig(eps=0.3), eps=lambda: eps[0])
    assert probe(model, ctx)[PROBE_EPS_KEY] == 0.0 and not attacks  # nothing to attack yet
    eps[0] = 0.15
    assert probe(model, ctx)[PROBE_EPS_KEY] == 0.15
    assert attacks == [(0.15, 10, False, 0, False)]  # PGD-10, fp32, seeded, eval mode
    assert model.training and not frozen.training  # each module's own mode, restored


def test_standard_runs_have_no_probe_unless_asked(tmp_path: Path) -> None:
    assert probe_size(digits_config(tmp_path).train) == 0
    assert probe_size(digits_config(tmp_path, "train.objective=trades").train) == 256


def _probes(values: list[float], eps: list[float] | None = None) -> list[dict]:
    eps = eps or [0.1] * len(values)
    return [{"epoch": e, PROBE_KEY: p, PROBE_EPS_KEY: r}
            for e, (p, r) in enumerate(zip(values, eps, strict=True), 1)]  # fmt: skip


def test_catastrophic_overfitting_is_a_fall_of_more_than_20_points_from_the_best() -> None:
    summary = robust_summary(_probes([10, 35, 40, 30, 15]), eps=0.1, kept_best=True)
    assert summary["catastrophic_overfitting"] == {"epoch": 5, "probe": 15.0, "best": 40.0,
                                                   "sign": "fall"}  # fmt: skip
    assert summary["best_robust"]["epoch"] == 3
    assert summary["best_robust"]["selected"] == "best on the held-out train slice"
    assert summary["robust_probe"]["on"] == "held-out train slice"
    assert "catastrophic_overfitting" not in robust_summary(_probes([10, 35, 40, 30, 25]), eps=0.1)
    # A fall of exactly 20 points is not more than 20; a low best can still collapse.
    assert "catastrophic_overfitting" not in robust_summary(_probes([40, 20]), eps=0.1)
    assert robust_summary(_probes([22, 1]), eps=0.1)["catastrophic_overfitting"]["epoch"] == 2


def test_overfitting_and_best_compare_probes_at_the_full_eps_only() -> None:
    # An eps ramp: probes at small eps score high; the fall at the ramp's end is not a collapse,
    # and the kept best is a full-eps epoch.
    history = _probes([90, 70, 30, 35, 28], eps=[0.025, 0.05, 0.1, 0.1, 0.1])
    summary = robust_summary(history, eps=0.1, kept_best=True)
    assert "catastrophic_overfitting" not in summary
    assert summary["robust_probe"]["best"] == 35.0 and summary["best_robust"]["epoch"] == 4
    assert summary["robust_probe"]["final"] == 28.0
    ramp_only = robust_summary(history[:2], eps=0.1, kept_best=True)
    assert ramp_only["robust_probe"]["best"] is None and "best_robust" not in ramp_only


def test_overfitting_is_also_fgsm_robust_but_pgd_broken() -> None:
    """A collapse during the ramp never shows as a fall at the full eps (the README's FGSM-RS
    run: probe 28% at eps 0.24, then 3-7% at 0.3); the FGSM-vs-PGD gap on the slice shows it."""
    history = _probes([68, 28, 3, 7, 5], eps=[0.12, 0.24, 0.3, 0.3, 0.3])
    for row, fgsm in zip(history, [70, 40, 85, 90, 88], strict=True):
        row[PROBE_FGSM_KEY] = fgsm
    co = robust_summary(history, eps=0.3)["catastrophic_overfitting"]
    assert co == {"epoch": 3, "probe": 3.0, "best": 3.0, "sign": "fgsm_gap", "fgsm": 85.0}
    assert "FGSM leaves 85.0% but PGD-10 3.0%" in runner.overfitting_line(
        {"catastrophic_overfitting": co})
    # PGD-AT's healthy shape: FGSM a few points above PGD, no flag.
    for row, fgsm in zip(history, [72, 35, 10, 12, 9], strict=True):
        row[PROBE_FGSM_KEY] = fgsm
    assert "catastrophic_overfitting" not in robust_summary(history, eps=0.3)


def test_a_flagged_run_warns_and_records_the_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    flag = {"epoch": 1, "probe": 5.0, "best": 40.0}
    summary = {"robust_probe": {"on": "held-out train slice", "eps": 0.1, "final": 5.0,
                                "final_eps": 0.1, "best": 40.0, "best_epoch": 1},
               "catastrophic_overfitting": flag}  # fmt: skip
    monkeypatch.setattr(runner, "robust_summary", lambda *a, **k: dict(summary))
    runner.train(digits_config(tmp_path, "train.epochs=1"))
    err = capsys.readouterr().err
    assert "vptlab: warning: run 'digits': catastrophic overfitting at epoch 1" in err
    run = tmp_path / "digits"
    assert json.loads((run / "metrics.json").read_text())["catastrophic_overfitting"] == flag
    report = (run / "report.md").read_text()
    assert "**Catastrophic overfitting** at epoch 1" in report
    assert "| epoch 1 (40.0 -> 5.0) |" in report


def _strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in history]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["fgsm_rs", "trades"])
def test_resume_of_an_adversarial_run_is_exact(tmp_path: Path, objective: str) -> None:
    opts = (f"train.objective={objective}", "train.attack.eps=0.1", "train.attack.steps=2",
            "train.eps_ramp_epochs=1.5", "train.robust_probe=64", "train.keep_best_robust=true",
            "model.options.drop_rate=0.3")  # fmt: skip
    full = runner.train(digits_config(tmp_path / "a", *opts))
    # The probe follows the ramp (eps reached at each epoch's end); the best is a full-eps epoch.
    assert [row[PROBE_EPS_KEY] for row in full["history"]] == pytest.approx([0.1 / 1.5, 0.1, 0.1])
    assert full["best_robust"]["epoch"] in (2, 3)
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
    from vptlab.steps.study import StudyConfig, deep_merge

    root = Path(__file__).resolve().parents[2] / "configs"
    study = StudyConfig.model_validate(load_yaml(root / f"{preset}.yaml"))
    objectives = {resolved(deep_merge(study.base, spec)).train.objective
                  for spec in study.runs.values()}  # fmt: skip
    assert "standard" in objectives and "pgd" in objectives
    assert study.attacks and all(a.steps == 20 for a in study.attacks)


def test_miniplaces_pgd_is_the_adversarial_twin() -> None:
    from vptlab.steps.resolve import load_resolved

    root = Path(__file__).resolve().parents[2] / "configs"
    plain = load_resolved(root / "miniplaces.yaml")
    pgd = load_resolved(root / "miniplaces_pgd.yaml")
    assert pgd.train.objective == "pgd" and plain.train.objective == "standard"
    assert pgd.data == plain.data and pgd.model == plain.model
