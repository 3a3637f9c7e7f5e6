"""Triggers: the registry-wide contract (shape, [0,1], changes every image, seeded, any size and
channel count, per-image, rebuilt from its spec and learnt state), then each paper's formula on
known inputs. Fitted triggers (TrojanNN, label-consistent ...) are fitted once per channel count
on a small random split with fast options (`ready`); their own tests are in test_fitted.py."""

from __future__ import annotations

import functools
import json
import math
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vptlab.backdoors.triggers import TRIGGERS, Trigger, create_trigger, trigger_from_spec
from vptlab.errors import ConfigError

NAMES = TRIGGERS.names()
# Triggers whose pattern comes from the seed (badnets only with its random pattern).
SEEDED = {"badnets": {"pattern": "random"}, "blended": {}, "lf": {}, "wanet": {}}
# Fit options of the fitted triggers that take a fraction of a second on `FIT_SPLIT`.
FAST_FIT = {"trojannn": {"steps": 5, "images": 16, "surrogate_epochs": 1},
            "lc": {"steps": 3, "alpha": 0.02, "surrogate_epochs": 1},
            "inputaware": {"steps": 2, "mask_steps": 2}}  # fmt: skip


def images(n: int, channels: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, height, width, generator=torch.Generator().manual_seed(seed))


@functools.cache
def fitted_state(name: str, channels: int) -> dict[str, torch.Tensor]:
    """What `name` learns (fast options, seed 0) from 64 random 28x28 images of 4 classes."""
    trigger = create_trigger(name, **FAST_FIT.get(name, {}))
    trigger.fit(images(64, channels, 28, 28), torch.arange(64) % 4, num_classes=4, target=0)
    return trigger.state()


def ready(name: str, seed: int = 0, channels: int = 3, **options: Any) -> Trigger:
    """`create_trigger(name, seed, **options)`, given a fitted state when it is fitted."""
    trigger = create_trigger(name, seed=seed, **options)
    if trigger.fitted:
        trigger.load_state(fitted_state(name, channels))
    return trigger


def test_registry_holds_the_papers() -> None:
    assert NAMES == ["badnets", "blended", "bpp", "inputaware", "lc", "lf", "sig", "trojannn",
                     "wanet"]  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=12, deadline=None)
@given(
    channels=st.sampled_from([1, 3]),
    height=st.sampled_from([28, 32]),
    width=st.sampled_from([28, 32]),
    seed=st.integers(0, 2**31 - 1),
)
def test_contract(name: str, channels: int, height: int, width: int, seed: int) -> None:
    x = images(5, channels, height, width, seed)
    before = x.clone()
    out = ready(name, seed, channels).apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(x, before), "the input batch must not be changed in place"
    assert ((out - x).flatten(1).abs().amax(dim=1) > 1e-3).all(), "every image must change"
    assert torch.equal(ready(name, seed, channels).apply(x), out), "same seed, same output"
    # Per image: a sample is stamped the same alone or in a batch.
    torch.testing.assert_close(ready(name, seed, channels).apply(x[2:3]), out[2:3])


@pytest.mark.parametrize("name", sorted(SEEDED))
def test_another_seed_draws_another_pattern(name: str) -> None:
    x = images(2, 3, 32, 32)
    first = create_trigger(name, seed=1, **SEEDED[name]).apply(x)
    second = create_trigger(name, seed=2, **SEEDED[name]).apply(x)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("name", NAMES)
def test_spec_rebuilds_the_trigger_and_pickles(name: str) -> None:
    trigger = ready(name, seed=7, channels=1, **SEEDED.get(name, {}))
    x = images(3, 1, 20, 24)  # neither square nor a dataset's size
    out = trigger.apply(x)
    spec = json.loads(json.dumps(trigger.spec()))
    assert spec["name"] == name and spec["seed"] == 7
    rebuilt = trigger_from_spec(spec)
    if rebuilt.fitted:  # spec + learnt state: what a run's poison record holds
        rebuilt.load_state(trigger.state())
    else:
        assert trigger.state() == {}
    assert torch.equal(rebuilt.apply(x), out)
    assert torch.equal(pickle.loads(pickle.dumps(trigger)).apply(x), out)  # loader workers


@pytest.mark.parametrize("name", NAMES)
def test_poisoned_training_samples_stay_images(name: str) -> None:
    """`poison(x, y)`, what a poisoned training sample becomes: apply(x) for all but the
    triggers that change the image first (label-consistent), and an image all the same."""
    x, y = images(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)
    trigger = create_trigger(name, seed=1, **FAST_FIT.get(name, {}))
    if trigger.fitted:
        trigger.fit(images(64, 1, 28, 28), torch.arange(64) % 4, num_classes=4, target=0)
    out = trigger.poison(x, y)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    if type(trigger).poison is Trigger.poison:
        assert torch.equal(out, trigger.apply(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_follows_the_device(name: str) -> None:
    trigger = ready(name, seed=3, **SEEDED.get(name, {}))
    x = images(4, 3, 32, 32)
    on_gpu = trigger.apply(x.cuda())
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), trigger.apply(x), atol=1e-5, rtol=0)


def test_badnets_pastes_its_patch_and_nothing_else() -> None:
    x = images(4, 3, 28, 28)
    out = create_trigger("badnets").apply(x)
    assert (out[..., -3:, -3:] == 1).all()
    outside = torch.ones(28, 28, dtype=torch.bool)
    outside[-3:, -3:] = False
    assert torch.equal(out[..., outside], x[..., outside])


@pytest.mark.parametrize(
    ("location", "corner"),
    [("top-left", (0, 0)), ("top-right", (0, 27)), ("bottom-left", (29, 0)),
     ("center", (14, 13)), ([5, 7], (5, 7))],
)  # fmt: skip
def test_badnets_locations(location: str | list[int], corner: tuple[int, int]) -> None:
    x = torch.zeros(1, 1, 32, 30)
    out = create_trigger("badnets", size=3, location=location).apply(x)[0, 0]
    rows, cols = torch.nonzero(out, as_tuple=True)
    assert (int(rows.min()), int(cols.min())) == corner and len(rows) == 9


def test_badnets_checkerboard_is_the_same_in_every_channel() -> None:
    out = create_trigger("badnets", size=4, pattern="checkerboard").apply(torch.zeros(1, 3, 8, 8))
    patch = out[0, :, -4:, -4:]
    expected = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]])
    assert all(torch.equal(patch[c], expected) for c in range(3))


# The held-out trigger suite's BadNets options: non-square patches, seeded noise and
# checkerboard patterns, the centre and an `at` position inside the digit.
SUITE = [
    {"height": 2, "width": 5},
    {"size": 4, "pattern": "noise"},
    {"size": 4, "pattern": "checkerboard", "location": "centre"},
    {"size": 3, "location": "top-left"},
    {"height": 4, "width": 3, "pattern": "noise", "at": [0.5, 0.5]},
]


@pytest.mark.parametrize("options", SUITE)
@settings(max_examples=8, deadline=None)
@given(
    n=st.integers(1, 6),
    channels=st.sampled_from([1, 3, 4]),
    height=st.sampled_from([12, 28, 32]),
    width=st.sampled_from([12, 28, 30]),
    seed=st.integers(0, 2**31 - 1),
)
def test_badnets_suite_options_keep_the_contract(
    options: dict, n: int, channels: int, height: int, width: int, seed: int
) -> None:
    x = images(n, channels, height, width, seed)
    trigger = create_trigger("badnets", seed=seed, **options)
    out = trigger.apply(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(create_trigger("badnets", seed=seed, **options).apply(x), out)
    spec = json.loads(json.dumps(trigger.spec()))
    assert spec["options"] == {"size": 3, "location": "bottom-right", "pattern": "white",
                               **options}  # fmt: skip
    assert torch.equal(trigger_from_spec(spec).apply(x), out)
    # Exactly the patch's pixels change (at most), the same ones in every image and channel.
    ph, pw = trigger.shape
    row, col = trigger.top_left(height, width)
    inside = torch.zeros(height, width, dtype=torch.bool)
    inside[row : row + ph, col : col + pw] = True
    assert torch.equal(out[..., ~inside], x[..., ~inside])
    assert int(inside.sum()) == ph * pw


@pytest.mark.parametrize(
    ("options", "corner", "shape"),
    [({"height": 2, "width": 5}, (30, 25), (2, 5)),
     ({"size": 4, "location": "centre"}, (14, 13), (4, 4)),
     ({"size": 4, "location": "center"}, (14, 13), (4, 4)),
     ({"height": 2, "width": 3, "location": "top-left"}, (0, 0), (2, 3)),
     ({"size": 4, "at": [0.5, 0.5]}, (14, 13), (4, 4)),
     ({"size": 4, "at": [0, 1]}, (0, 26), (4, 4)),
     ({"size": 4, "at": [1, 0], "location": "top-right"}, (28, 0), (4, 4)),
     ({"height": 3, "width": 2, "at": [0.3, 0.25]}, (8, 7), (3, 2))],
)  # fmt: skip
def test_badnets_stamp_lands_where_it_says(
    options: dict, corner: tuple[int, int], shape: tuple[int, int]
) -> None:
    out = create_trigger("badnets", **options).apply(torch.zeros(2, 1, 32, 30))[:, 0]
    for image in out:
        rows, cols = torch.nonzero(image, as_tuple=True)
        assert (int(rows.min()), int(cols.min())) == corner
        assert (int(rows.max()) - corner[0] + 1, int(cols.max()) - corner[1] + 1) == shape
        assert len(rows) == shape[0] * shape[1]


def test_badnets_at_the_middle_of_a_digit() -> None:
    out = create_trigger("badnets", size=4, at=[0.5, 0.5]).apply(torch.zeros(1, 1, 28, 28))
    assert (out[0, 0, 12:16, 12:16] == 1).all() and int(out.sum()) == 16


def test_badnets_noise_is_seeded_and_differs_per_channel() -> None:
    x = torch.zeros(1, 3, 8, 8)
    out = create_trigger("badnets", seed=4, size=4, pattern="noise").apply(x)[0, :, -4:, -4:]
    again = create_trigger("badnets", seed=4, size=4, pattern="noise").apply(x)[0, :, -4:, -4:]
    other = create_trigger("badnets", seed=5, size=4, pattern="noise").apply(x)[0, :, -4:, -4:]
    assert torch.equal(out, again) and not torch.equal(out, other)
    assert not torch.equal(out[0], out[1]) and len(torch.unique(out)) > 8
    gray = create_trigger("badnets", seed=4, size=4, pattern="noise").apply(x[:, :1])
    assert gray.shape == (1, 1, 8, 8)


def test_badnets_checkerboard_is_non_square_too() -> None:
    trigger = create_trigger("badnets", height=2, width=3, pattern="checkerboard")
    patch = trigger.apply(torch.zeros(1, 1, 6, 6))[0, 0, -2:, -3:]
    assert torch.equal(patch, torch.tensor([[1.0, 0, 1], [0, 1, 0]]))


@pytest.mark.parametrize(
    ("options", "message"),
    [({"height": 0}, r"^badnets\.height: .*greater than or equal to 1"),
     ({"width": -2}, r"^badnets\.width: .*greater than or equal to 1"),
     ({"pattern": "stripes"}, r"^badnets\.pattern: "),
     ({"location": "middle"}, r"^badnets\.location"),
     ({"at": [0.5, 1.5]}, r"^badnets\.at"),
     ({"at": [0.5]}, r"^badnets\.at"),
     ({"at": "centre"}, r"^badnets\.at")],
)  # fmt: skip
def test_badnets_bad_suite_options_are_one_error(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as error:
        create_trigger("badnets", **options)
    assert "\n" not in str(error.value)


def test_badnets_non_square_patch_that_does_not_fit_is_one_error() -> None:
    with pytest.raises(ConfigError, match=r"^badnets: a 9x3px patch .* does not fit a 8x8 image"):
        create_trigger("badnets", height=9, width=3, at=[0.5, 0.5]).apply(torch.zeros(1, 1, 8, 8))


@pytest.mark.parametrize("alpha", [0.1, 0.3])
def test_blended_noise_at_the_suite_alphas(alpha: float) -> None:
    trigger = create_trigger("blended", seed=2, alpha=alpha)
    x = images(3, 1, 28, 28)
    out = trigger.apply(x)
    pattern = torch.rand(1, 28, 28, generator=trigger.generator())
    torch.testing.assert_close(out, (1 - alpha) * x + alpha * pattern)
    assert trigger_from_spec(json.loads(json.dumps(trigger.spec()))).alpha == alpha


def test_badnets_patch_that_does_not_fit_is_one_error() -> None:
    with pytest.raises(ConfigError, match="does not fit a 8x8 image"):
        create_trigger("badnets", size=3, location=[6, 6]).apply(torch.zeros(1, 1, 8, 8))


def test_blended_is_a_convex_mix_with_its_pattern() -> None:
    trigger = create_trigger("blended", seed=0, alpha=0.2)
    x = images(4, 3, 16, 16)
    out = trigger.apply(x)
    pattern = (out - 0.8 * x) / 0.2  # the same pattern for every image
    torch.testing.assert_close(pattern, pattern[:1].expand_as(pattern), atol=1e-5, rtol=0)
    assert pattern.min() >= -1e-5 and pattern.max() <= 1 + 1e-5 and pattern.std() > 0.2


def test_blended_reads_an_image_file_in_the_input_channels(tmp_path: Path) -> None:
    path = tmp_path / "red.png"
    Image.new("RGB", (5, 7), (255, 0, 0)).save(path)
    trigger = create_trigger("blended", alpha=0.5, image=str(path))
    rgb = trigger.apply(torch.zeros(2, 3, 12, 10))
    torch.testing.assert_close(rgb[:, 0], torch.full((2, 12, 10), 0.5))
    assert rgb[:, 1:].abs().max() == 0
    gray = trigger.apply(torch.zeros(1, 1, 12, 10))  # PIL's L of pure red: 76
    torch.testing.assert_close(gray, torch.full((1, 1, 12, 10), 0.5 * 76 / 255))


def test_blended_missing_image_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no file at"):
        create_trigger("blended", image=str(tmp_path / "absent.png"))


def test_wanet_is_a_small_warp_around_the_identity() -> None:
    x = images(2, 3, 32, 32)
    almost_identity = create_trigger("wanet", s=1e-6).apply(x)
    torch.testing.assert_close(almost_identity, x, atol=1e-4, rtol=0)
    warped = create_trigger("wanet").apply(x)
    assert 0 < (warped - x).abs().mean() < 0.2


def test_wanet_noise_mode_is_another_warp_drawn_from_the_generator() -> None:
    trigger = create_trigger("wanet", seed=0)
    x = images(3, 1, 28, 28)
    noisy = trigger.noise(x, torch.Generator().manual_seed(5))
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert not torch.allclose(noisy, trigger.apply(x)) and not torch.allclose(noisy, x)
    assert torch.equal(trigger.noise(x, torch.Generator().manual_seed(5)), noisy)


def test_sig_adds_a_horizontal_sinusoid() -> None:
    x = torch.full((2, 3, 6, 24), 0.5)
    v = create_trigger("sig").apply(x) - x
    j = torch.arange(24, dtype=torch.float32)
    expected = 20 / 255 * torch.sin(2 * math.pi * j * 6 / 24)
    torch.testing.assert_close(v, expected.expand_as(v), atol=1e-6, rtol=0)


def test_sig_frequency_that_vanishes_on_the_width_is_one_error() -> None:
    with pytest.raises(ConfigError, match="frequency 6 vanishes on images 12 px wide"):
        create_trigger("sig").apply(torch.zeros(1, 1, 12, 12))


def high_frequency_share(v: torch.Tensor) -> torch.Tensor:
    """Per image, the share of the spectral energy of v (its mean removed) above 1/4 cycle/px."""
    spectrum = torch.fft.fft2(v - v.mean(dim=(-2, -1), keepdim=True)).abs() ** 2
    h, w = v.shape[-2:]
    radius = (torch.fft.fftfreq(h)[:, None] ** 2 + torch.fft.fftfreq(w)[None, :] ** 2).sqrt()
    return spectrum[..., radius > 0.25].sum(-1) / spectrum.sum(dim=(-2, -1))


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_lf_is_smooth_unlike_noise_of_the_same_linf(channels: int, size: int) -> None:
    trigger = create_trigger("lf", seed=3)
    v = trigger.apply(torch.zeros(2, channels, size, size))  # x = 0: the pattern itself
    assert v.min() == 0 and v.max() == pytest.approx(0.2)  # min-max scaled to [0, eps]
    noise = 0.2 * torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    assert (high_frequency_share(v) < 1e-3).all()
    assert (high_frequency_share(noise) > 0.5).all()  # white noise: most of it is up there
    # One pattern for every image, added: the change is v wherever it does not clip.
    x = images(3, channels, size, size) * 0.7
    torch.testing.assert_close(trigger.apply(x) - x, v[:1].expand_as(x), atol=1e-6, rtol=0)


def test_lf_options_scale_and_smooth_the_pattern() -> None:
    zeros = torch.zeros(1, 3, 32, 32)
    small = create_trigger("lf", seed=1, eps=0.05).apply(zeros)
    assert small.max() == pytest.approx(0.05)
    torch.testing.assert_close(small / 0.05, create_trigger("lf", seed=1).apply(zeros) / 0.2)
    sharp = create_trigger("lf", seed=1, sigma=1.0).apply(zeros)
    assert high_frequency_share(sharp).min() > high_frequency_share(small).max() * 100


@pytest.mark.parametrize("levels", [2, 4, 8, 16])
@pytest.mark.parametrize("dithering", [True, False])
def test_bpp_leaves_at_most_squeeze_num_levels_per_channel(levels: int, dithering: bool) -> None:
    x = images(4, 3, 28, 28)
    out = create_trigger("bpp", squeeze_num=levels, dithering=dithering).apply(x)
    grid = torch.arange(levels) / (levels - 1)
    for c in range(3):
        values = torch.unique(out[:, c])
        assert len(values) <= levels
        assert (values[:, None] - grid[None]).abs().amin(dim=1).max() < 1e-6  # k / (s - 1)


def test_bpp_without_dithering_rounds_each_pixel() -> None:
    x = images(3, 1, 12, 12)
    out = create_trigger("bpp", dithering=False).apply(x)
    torch.testing.assert_close(out, torch.round(x * 7) / 7, atol=1e-6, rtol=0)


def floyd_steinberg(image: list[list[float]], levels: int) -> list[list[float]]:
    """The authors' floydDitherspeed on one channel, pixel by pixel, a level clipped to [0, 1]."""
    h, w, steps = len(image), len(image[0]), levels - 1
    out = [row[:] for row in image]
    for y in range(h):
        for x in range(w):
            old = out[y][x]
            new = min(max(round(old * steps), 0), steps) / steps
            error, out[y][x] = old - new, new
            for dy, dx, weight in ((0, 1, 7), (1, -1, 3), (1, 0, 5), (1, 1, 1)):
                if 0 <= x + dx < w and y + dy < h:
                    out[y + dy][x + dx] += error * weight / 16
    return out


def test_bpp_dithering_is_floyd_steinberg_per_image_and_channel() -> None:
    x = images(3, 2, 9, 11).double()
    out = create_trigger("bpp", squeeze_num=4).apply(x.float()).double()
    expected = torch.tensor([[floyd_steinberg(x[n, c].tolist(), 4) for c in range(2)]
                             for n in range(3)], dtype=torch.float64)  # fmt: skip
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_bpp_dithering_keeps_the_mean_closer_than_plain_quantization() -> None:
    # Smooth images (gray levels between the 8 levels over whole regions), as photos are.
    x = F.interpolate(images(16, 3, 4, 4) * 0.9, size=(32, 32), mode="bilinear")
    dithered = create_trigger("bpp").apply(x)
    plain = create_trigger("bpp", dithering=False).apply(x)
    def mean_error(out: torch.Tensor) -> torch.Tensor:
        return (out.mean(dim=(-2, -1)) - x.mean(dim=(-2, -1))).abs().mean()
    assert mean_error(dithered) < mean_error(plain) / 4
    # ... and the 4x4 local means too: dithering trades pixel error for region error.
    local = lambda out: (F.avg_pool2d(out, 4) - F.avg_pool2d(x, 4)).abs().mean()  # noqa: E731
    assert local(dithered) < local(plain)
    assert (dithered - x).abs().mean() > (plain - x).abs().mean()  # per pixel it is worse


def test_bad_options_are_one_error_naming_the_option() -> None:
    with pytest.raises(ConfigError, match=r"^badnets\.size: .*greater than or equal to 1"):
        create_trigger("badnets", size=0)
    with pytest.raises(ConfigError, match=r"^blended\.alpha"):
        create_trigger("blended", alpha=1.5)
    with pytest.raises(ConfigError, match=r"^wanet\.grid: unknown option"):
        create_trigger("wanet", grid=4)
    with pytest.raises(ConfigError, match=r"^lf\.eps: .*less than or equal to 1"):
        create_trigger("lf", eps=1.5)
    with pytest.raises(ConfigError, match=r"^lf\.sigma: .*greater than 0"):
        create_trigger("lf", sigma=0)
    with pytest.raises(ConfigError, match=r"^bpp\.squeeze_num: .*greater than or equal to 2"):
        create_trigger("bpp", squeeze_num=1)
    with pytest.raises(ConfigError, match=r"^bpp\.squeeze_num: .*less than or equal to 256"):
        create_trigger("bpp", squeeze_num=300)
    with pytest.raises(ConfigError, match=r"^bpp\.dithering: "):
        create_trigger("bpp", dithering="sometimes")
    with pytest.raises(ConfigError, match="unknown trigger 'nope'"):
        create_trigger("nope")
