"""TensorLoader / StreamLoader: seeded and resumable order, batch augmentation, RGB output."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from vptlab.data import (
    BatchAugment,
    StreamLoader,
    TensorLoader,
    TensorSplit,
    load_dataset,
    make_loader,
    resize,
    subset,
    to_rgb,
)
from vptlab.errors import DataError


def numbered_split(n: int = 10, channels: int = 1, size: int = 6) -> TensorSplit:
    """Image i is filled with i/n and labelled i, so a batch tells which samples it holds."""
    x = (torch.arange(n, dtype=torch.float32) / n).view(n, 1, 1, 1)
    return TensorSplit(x.expand(n, channels, size, size).clone(), torch.arange(n))


class NumberedDataset(Dataset):
    def __init__(self, n: int = 10) -> None:
        self.split = numbered_split(n, channels=3)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.split.x[i], int(self.split.y[i])


def labels_of(loader) -> list[list[int]]:
    return [b.y.tolist() for b in loader]


def test_every_sample_once_per_epoch_and_batch_count() -> None:
    loader = TensorLoader(numbered_split(10), batch_size=4, shuffle=True, seed=0)
    batches = labels_of(loader)
    assert len(loader) == 3 and [len(b) for b in batches] == [4, 4, 2]
    assert sorted(sum(batches, [])) == list(range(10))
    dropped = TensorLoader(numbered_split(10), batch_size=4, shuffle=True, drop_last=True)
    assert len(dropped) == 2 and [len(b) for b in labels_of(dropped)] == [4, 4]


def test_order_depends_only_on_seed_and_epoch() -> None:
    def order(seed: int, epoch: int) -> list[list[int]]:
        loader = TensorLoader(numbered_split(20), batch_size=5, shuffle=True, seed=seed)
        loader.set_epoch(epoch)
        return labels_of(loader)

    assert order(0, 3) == order(0, 3)
    assert order(0, 3) != order(0, 4) and order(0, 3) != order(1, 3)
    loader = TensorLoader(numbered_split(20), batch_size=5, shuffle=True, seed=0)
    assert labels_of(loader) == order(0, 0) and labels_of(loader) == order(0, 1)  # auto-advance
    unshuffled = TensorLoader(numbered_split(20), batch_size=5)
    assert sum(labels_of(unshuffled), []) == list(range(20))


def test_resume_mid_epoch_gives_the_same_batches() -> None:
    split = numbered_split(12, size=8)
    loader = TensorLoader(
        split, 3, shuffle=True, seed=5, augment=BatchAugment(crop_pad=2, flip=True)
    )
    loader.set_epoch(2)
    full = list(loader)
    loader.set_epoch(2, start_batch=2)
    resumed = list(loader)
    assert len(resumed) == 2
    for (x_full, y_full, _), (x_res, y_res, _) in zip(full[2:], resumed, strict=True):
        assert torch.equal(y_full, y_res) and torch.equal(x_full, x_res)


def test_output_is_three_channel_view_of_gray() -> None:
    x, y, _ = next(iter(TensorLoader(numbered_split(4), batch_size=4)))
    assert x.shape == (4, 3, 6, 6) and y.dtype == torch.int64
    assert x.stride(1) == 0  # expanded, not copied
    gray = torch.rand(2, 1, 5, 5)
    assert to_rgb(gray).shape == (2, 3, 5, 5) and to_rgb(gray).data_ptr() == gray.data_ptr()
    rgb = torch.rand(2, 3, 5, 5)
    assert to_rgb(rgb) is rgb
    with pytest.raises(ValueError, match="1 or 3 channels"):
        to_rgb(torch.rand(2, 2, 5, 5))


def test_random_crop_moves_content_within_pad() -> None:
    n, size, pad = 64, 9, 2
    x = torch.zeros(n, 1, size, size)
    x[:, :, 4, 4] = 1.0  # one bright pixel in the centre
    split = TensorSplit(x, torch.zeros(n, dtype=torch.long))
    loader = TensorLoader(split, n, shuffle=True, augment=BatchAugment(crop_pad=pad))
    out = next(iter(loader)).x
    assert out.shape == (n, 3, size, size) and 0.0 <= out.min() and out.max() <= 1.0
    positions = out[:, 0].flatten(1).argmax(1)
    rows, cols = positions // size, positions % size
    assert out[:, 0].flatten(1).sum(1).eq(1).all()  # the pixel stays inside (pad < 4)
    assert (rows - 4).abs().max() <= pad and (cols - 4).abs().max() <= pad
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) > 10  # it really moves


def test_flip_is_off_by_default_and_mirrors_when_on() -> None:
    x = torch.zeros(32, 1, 4, 4)
    x[:, :, :, 0] = 1.0  # left column lit
    split = TensorSplit(x, torch.zeros(32, dtype=torch.long))
    plain = next(iter(make_loader(split, 32, train=True))).x
    assert torch.equal(plain, to_rgb(x))
    flipped = next(iter(make_loader(split, 32, train=True, flip=True))).x
    right = flipped[:, 0, :, 3].sum(1) == 4
    assert right.any() and (~right).any()
    assert torch.equal(flipped[right][:, 0], x[right][:, 0].flip(-1))


def test_eval_loader_neither_shuffles_nor_augments() -> None:
    split = numbered_split(10)
    loader = make_loader(split, 4, train=False, crop_pad=2, flip=True)
    assert isinstance(loader, TensorLoader) and loader.augment is None
    x, y, _ = next(iter(loader))
    assert y.tolist() == [0, 1, 2, 3] and torch.equal(x, to_rgb(split.x[:4]))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_loader_matches_tensor_loader(num_workers: int) -> None:
    dataset = NumberedDataset(10)
    stream = make_loader(dataset, 4, train=True, seed=3, crop_pad=1, num_workers=num_workers)
    tensor = make_loader(dataset.split, 4, train=True, seed=3, crop_pad=1)
    assert isinstance(stream, StreamLoader) and len(stream) == 3
    for loader in (stream, tensor):
        loader.set_epoch(1)
    for (xs, ys, _), (xt, yt, _) in zip(stream, tensor, strict=True):
        assert xs.shape[1] == 3 and ys.dtype == torch.int64
        assert torch.equal(ys, yt) and torch.equal(xs, xt)
    stream.set_epoch(1, start_batch=2)
    tensor.set_epoch(1)
    assert labels_of(stream) == labels_of(tensor)[2:]


def test_loader_resizes_batches_to_img_size() -> None:
    loader = make_loader(numbered_split(6, size=7), 4, train=True, crop_pad=1, img_size=12)
    x = next(iter(loader)).x
    assert x.shape == (4, 3, 12, 12) and 0.0 <= x.min() and x.max() <= 1.0


def test_resize_whole_split_in_chunks() -> None:
    x = torch.rand(5, 1, 8, 8)
    out = resize(x, 16, chunk_size=2)
    assert out.shape == (5, 1, 16, 16) and 0.0 <= out.min() and out.max() <= 1.0
    assert torch.allclose(out, resize(x, (16, 16), chunk_size=100))
    assert resize(x, 8) is x
    assert resize(x, (4, 6)).shape == (5, 1, 4, 6)


def test_subset_is_seeded() -> None:
    split = numbered_split(10)
    a, b = subset(split, 4, seed=0), subset(split, 4, seed=0)
    assert len(a) == 4 and torch.equal(a.y, b.y)
    assert subset(split, None, seed=0) is split and subset(split, 50, seed=0) is split
    assert len(subset(NumberedDataset(10), 3, seed=1)) == 3


class BrokenAt(NumberedDataset):
    """Sample `broken` raises the one-line DataError a reader raises for a bad file."""

    def __init__(self, broken: int) -> None:
        super().__init__(10)
        self.broken = broken

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i == self.broken:
            raise DataError(f"cannot read image img_{i}.png: image file is truncated")
        return super().__getitem__(i)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_data_error_in_a_worker_reaches_the_user_as_its_one_line(num_workers: int) -> None:
    """torch re-raises it as 'Caught DataError in DataLoader worker process 0. Original ...'."""
    loader = make_loader(BrokenAt(9), 4, train=False, num_workers=num_workers)
    with pytest.raises(DataError) as caught:
        list(loader)
    assert str(caught.value) == "cannot read image img_9.png: image file is truncated"


def test_imagefolder_with_a_truncated_image_through_workers(fakes, tmp_path) -> None:
    for name, color in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        fakes.write_image(tmp_path / "train" / "cat" / name, color, size=(64, 64))
    fakes.write_image(tmp_path / "val" / "cat" / "c.png", (0, 255, 0))
    broken = tmp_path / "train" / "cat" / "b.png"
    broken.write_bytes(broken.read_bytes()[:60])
    data = load_dataset("imagefolder", root=str(tmp_path), img_size=8)
    with pytest.raises(DataError, match=rf"^cannot read image {broken}: [^\n]*truncated[^\n]*$"):
        list(make_loader(data.train, 2, train=False, num_workers=1))
