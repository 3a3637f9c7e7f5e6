"""Adversarial Neuron Pruning (`anp`): the neuron perturbation is the authors' noisy
normalization, pruning follows the mask threshold, and a short search on the backdoored SimpleNet
(conftest.py) prunes a few neurons that carry the backdoor, with no weight trained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vptlab.data.base import TensorSplit
from vptlab.defenses.anp import (
    AdversarialNeuronPruning,
    NeuronPerturbation,
    mask_buffers,
    neuron_sites,
)
from vptlab.defenses.repair import create_repairer
from vptlab.engine.checkpoint import load_model
from vptlab.errors import ConfigError
from vptlab.models import build_classifier, create_model
from vptlab.runs import MODEL_FILE
from vptlab.steps.resolve import resolved
from vptlab.steps.train import load_run

# The repairer tests' run and criteria (this folder is on sys.path, as pytest imports it).
from test_repair import assert_repaired, run_repair  # isort: skip


def test_anp_perturbs_and_masks_as_the_authors_noisy_batchnorm() -> None:
    """With mask m and perturbations (delta, xi) the layer computes BatchNorm with weight
    gamma (m + delta) and bias beta (1 + xi), the authors' NoisyBatchNorm2d; unperturbed, gamma m;
    a LayerNorm's features (a ViT's) likewise along the last dimension."""
    g = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(4).eval()
    bn.weight.data, bn.bias.data = torch.randn(4, generator=g), torch.randn(4, generator=g)
    bn.running_mean, bn.running_var = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5
    mask = torch.rand(4, generator=g)
    noise, noise_bias = torch.randn(4, generator=g), torch.randn(4, generator=g)
    state = {"perturbed": True}
    bn.register_forward_hook(NeuronPerturbation(1, mask, noise, noise_bias, state))
    x = torch.randn(2, 4, 3, 3, generator=g)

    def noisy(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, bn.running_mean, bn.running_var, weight, bias, False, 0.0, bn.eps)

    expected = noisy(bn.weight * (mask + noise), bn.bias * (1 + noise_bias))
    assert torch.allclose(bn(x), expected, atol=1e-5)
    state["perturbed"] = False
    assert torch.allclose(bn(x), noisy(bn.weight * mask, bn.bias), atol=1e-5)
    ln = nn.LayerNorm(4)
    ln.weight.data, ln.bias.data = torch.randn(4, generator=g), torch.randn(4, generator=g)
    ln.register_forward_hook(NeuronPerturbation(-1, mask, noise, noise_bias, {"perturbed": True}))
    tokens = torch.randn(2, 5, 4, generator=g)
    expected = F.layer_norm(tokens, (4,), ln.weight * (mask + noise), ln.bias * (1 + noise_bias))
    assert torch.allclose(ln(tokens), expected, atol=1e-5)


def test_anp_masks_batchnorm_channels_and_vit_layernorm_features() -> None:
    simplenet = create_model("simplenet", num_classes=10, img_size=28)
    sites = neuron_sites(simplenet)
    assert [(s.name, s.dim, s.units) for s in sites] == [
        ("net.features.1", 1, 64), ("net.features.5", 1, 64), ("net.features.8", 1, 192),
    ]  # fmt: skip
    vit = create_model("vit-scratch", num_classes=10, img_size=8, patch_size=4, embed_dim=16,
                       depth=2, num_heads=2)  # fmt: skip
    names = [s.name for s in neuron_sites(vit)]
    assert names == ["net.blocks.0.norm1", "net.blocks.0.norm2", "net.blocks.1.norm1",
                     "net.blocks.1.norm2", "net.norm"]  # fmt: skip
    assert {(s.dim, s.units) for s in neuron_sites(vit)} == {(-1, 16)}
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(ConfigError, match=r"^defense 'anp' cannot prune Sequential: .*has none"):
        create_repairer("anp").prepare(build_classifier(net, (0.5,) * 3, (0.5,) * 3))


class KnownMasks(AdversarialNeuronPruning):
    """ANP whose search returns given masks: the pruning rule alone."""

    def __init__(self, masks: list[torch.Tensor], **options: Any) -> None:
        super().__init__(**options)
        self.masks = masks

    def search(self, model: nn.Module, split: Any, cfg: Any) -> Any:
        return self.masks, {"loss": 0.0, "top1": 100.0}


def test_anp_prunes_exactly_the_neurons_at_or_below_the_threshold(tmp_path: Path) -> None:
    model = create_model("simplenet", num_classes=10, img_size=28)
    g = torch.Generator().manual_seed(0)
    masks = [torch.rand(s.units, generator=g) for s in neuron_sites(model)]
    masks[2][:3] = torch.tensor([0.2, 0.2001, 0.0])  # the threshold itself is pruned
    cfg = resolved({"device": "cpu", "output": {"dir": str(tmp_path)},
                    "data": {"num_workers": 0}})  # fmt: skip
    anp = KnownMasks(masks, threshold=0.2, iterations=1)
    summary = anp.prune(anp.prepare(model), TensorSplit(torch.rand(4, 3, 28, 28),
                                                        torch.arange(4)), cfg)  # fmt: skip
    buffers = list(mask_buffers(model).values())
    for buffer, mask in zip(buffers, masks, strict=True):
        assert torch.equal(buffer, (mask > 0.2).float())
    assert buffers[2][:3].tolist() == [0.0, 1.0, 0.0]
    assert summary["pruned"] == sum(int((m <= 0.2).sum()) for m in masks)
    assert summary["neurons"] == 320 and summary["threshold"] == 0.2
    # A pruned channel's BatchNorm outputs its bias alone (gamma zeroed, as the authors prune).
    bn = model.get_submodule("net.features.8")
    out = bn(torch.randn(2, 192, 3, 3))
    pruned = buffers[2] == 0
    bias = bn.bias[pruned].view(1, -1, 1, 1)
    assert torch.allclose(out[:, pruned], bias.expand_as(out[:, pruned]))


def test_anp_search_budget_defaults_to_the_recipes_epochs() -> None:
    cfg = resolved({"train": {"epochs": 3}, "data": {"batch_size": 64}})
    split = TensorSplit(torch.rand(200, 3, 8, 8), torch.arange(200) % 10)
    assert AdversarialNeuronPruning().budget(split, cfg) == 3 * 4  # ceil(200 / 64) per pass
    assert AdversarialNeuronPruning(iterations=2000).budget(split, cfg) == 2000


def test_anp_prunes_backdoor_neurons_trains_nothing_and_reloads(
    backdoored: Any, tmp_path: Path
) -> None:
    # A short search (the authors run 2,000 iterations at lr 0.2): 30 iterations at lr 1.
    model, run_dir, metrics = run_repair(backdoored, tmp_path, "anp", {"epochs": 1},
                                         {"iterations": 30, "lr": 1.0})  # fmt: skip
    assert_repaired(backdoored, metrics)
    anp = metrics["anp"]
    masks = mask_buffers(model)
    pruned = sum(int((m == 0).sum()) for m in masks.values())
    print(f"anp: pruned {anp['pruned']} of {anp['neurons']} neurons {anp['pruned_by_layer']}")
    assert 0 < anp["pruned"] == pruned <= 0.1 * anp["neurons"]  # a few neurons, not a layer
    assert anp["pruned_by_layer"] == {name: int((m == 0).sum()) for name, m in masks.items()}
    # Pruning alone did it: every weight and BatchNorm statistic is the backdoored model's.
    original = backdoored.model.state_dict()
    for key, value in model.state_dict().items():
        if not key.endswith("anp_mask"):
            assert torch.equal(value, original[key]), key
    # Unpruned, the same weights keep the backdoor: the masks are what removed it.
    for mask in masks.values():
        mask.fill_(1.0)
    assert backdoored.measure(model)[1] > backdoored.asr - 1.0
    # Saved and rebuilt from the run folder (build model -> prepare -> load): the pruned model.
    _, reloaded, _ = load_run(run_dir, device="cpu")
    ca, asr = backdoored.measure(reloaded)
    assert (ca, asr) == pytest.approx((metrics["final"]["test_top1"],
                                       metrics["final"]["badnets/asr"]), abs=1e-3)  # fmt: skip
    with pytest.raises(Exception, match="anp_mask"):  # an unprepared model does not take it
        load_model(create_model("simplenet", num_classes=10, img_size=28), run_dir / MODEL_FILE)
