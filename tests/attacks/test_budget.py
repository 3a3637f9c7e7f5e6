"""Property-based: whatever the budget, steps and image shape, an attack's output stays within its
eps ball (Linf or per-sample L2, to 1e-6) and in [0,1]."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from vptlab.attacks import create_attack
from vptlab.models import build_classifier

torch.manual_seed(0)
# Untrained is enough: the property holds for any gradient. Global pooling takes any image size.
MODEL = build_classifier(
    nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                  nn.Flatten(), nn.Linear(4, 3)),
    (0.5,) * 3, (0.5,) * 3,
).eval()


@st.composite
def cases(draw):
    norm = draw(st.sampled_from(["linf", "l2"]))
    name = "pgd" if norm == "l2" else draw(st.sampled_from(["fgsm", "pgd"]))
    eps = draw(st.floats(0.0, 1.0 if norm == "linf" else 4.0))
    options = {"eps": eps, "norm": norm, "seed": draw(st.integers(0, 2**16))}
    options["alpha"] = draw(st.floats(1e-3, 2.0))
    options["random_start"] = draw(st.booleans())
    if name == "pgd":
        options["steps"] = draw(st.integers(1, 4))
        options["restarts"] = draw(st.integers(1, 2))
    shape = (draw(st.integers(1, 4)), 3, draw(st.integers(1, 9)), draw(st.integers(1, 9)))
    return name, options, shape, draw(st.integers(0, 2**16))


@settings(max_examples=25, deadline=None)
@given(cases())
def test_stays_in_eps_ball_and_pixel_range(case):
    name, options, shape, data_seed = case
    g = torch.Generator().manual_seed(data_seed)
    x = torch.rand(shape, generator=g)
    x[:, :, 0] = torch.randint(0, 2, x[:, :, 0].shape, generator=g).float()  # pixels at 0 and 1
    y = torch.randint(0, 3, (shape[0],), generator=g)
    x_adv = create_attack(name, **options)(MODEL, x, y)
    delta = x_adv - x
    eps = options["eps"]
    if options["norm"] == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert delta.flatten(1).norm(dim=1).max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
