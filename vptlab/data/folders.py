"""Image datasets kept on disk and streamed: `imagefolder` (class folders) and `miniplaces` (lists).

Both give a Dataset of (3,S,S) float tensors in [0,1] and int labels, loaded with PIL and resized
to `img_size` in the worker processes, so only a batch at a time is in memory.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from vptlab.data.base import DATASETS, DataSplits, require_root
from vptlab.errors import DataError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MINIPLACES_CLASSES = 100
MINIPLACES_LIST_DIRS = (".", "data", "development_kit/data")  # where the release keeps its lists


class ImageFileDataset(Dataset):
    """Images listed as (path, label): RGB, resized to img_size x img_size, float in [0,1]."""

    def __init__(self, samples: Sequence[tuple[Path, int]], img_size: int) -> None:
        if img_size < 1:
            raise ValueError(f"img_size must be >= 1, got {img_size}")
        self.samples = list(samples)
        self.img_size = img_size
        # Labels without opening images: poisoning and class counts need only these.
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return load_image(path, self.img_size), label


def _to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """`image` as 8-bit RGB. 16-bit gray is scaled to 8 bits (PIL's convert would clip it: all
    but the darkest pixels white); 32-bit integer and float pixels have no range to scale from."""
    if image.mode.startswith("I;16"):
        pixels = np.asarray(image).astype(np.float64) / 257.0
        return Image.fromarray(pixels.round().astype(np.uint8), "L").convert("RGB")
    if image.mode in ("I", "F"):
        kind = "32-bit integer" if image.mode == "I" else "floating-point"
        raise DataError(f"cannot read image {path}: its {kind} pixels (mode {image.mode}) have no "
                        "fixed range; save it with 8 or 16 bits per channel")  # fmt: skip
    return image.convert("RGB")


def load_image(path: Path, size: int) -> torch.Tensor:
    """One image file as a (3, size, size) float tensor in [0,1]; gray, palette, CMYK, RGBA and
    16-bit gray images become 8-bit RGB.

    An image of more than PIL's `Image.MAX_IMAGE_PIXELS` (89.5M pixels, ~270 MB decoded) is
    refused, not merely warned about: PIL only raises past twice that, and one such file per
    worker is how a decompression bomb exhausts memory. Raise that limit to read larger images.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image = _to_rgb(image, path)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise DataError(f"refused image {path}: {error}") from None
    except UnidentifiedImageError:  # its message repeats the path
        raise DataError(f"cannot read image {path}: not an image format PIL knows") from None
    except OSError as error:  # missing, unreadable or truncated
        raise DataError(f"cannot read image {path}: {error.strerror or error}") from None
    except Exception as error:  # decoders of corrupt files raise other kinds too
        raise DataError(f"cannot read image {path}: {type(error).__name__}: {error}") from None
    if image.size != (size, size):
        # Pillow's bilinear filter widens with the scale factor, so downscaling is antialiased.
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    return pixels.permute(2, 0, 1).contiguous().float().div_(255.0)


def _image_files(folder: Path) -> list[Path]:
    """Image files anywhere below `folder`, in a stable order (ImageFolder's walk)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found += [Path(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS)]
    return found


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _scan_classes(folder: Path, class_to_idx: dict[str, int]) -> list[tuple[Path, int]]:
    unknown = [name for name in _class_dirs(folder) if name not in class_to_idx]
    if unknown:
        raise DataError(
            f"imagefolder: {folder} has class folders that train/ lacks: {', '.join(unknown)}"
        )
    return [
        (path, index)
        for name, index in class_to_idx.items()
        if (folder / name).is_dir()
        for path in _image_files(folder / name)
    ]


def _check_no_empty_class(
    folder: Path, samples: list[tuple[Path, int]], classes: list[str]
) -> None:
    """A train/ class folder without images would still count as a class the model must learn."""
    present = {label for _, label in samples}
    empty = [name for index, name in enumerate(classes) if index not in present]
    if empty:
        raise DataError(
            f"imagefolder: class folder {folder / empty[0]} has no images "
            f"({', '.join(IMG_EXTENSIONS)}); remove it or add images"
            + (f" (also empty: {', '.join(empty[1:])})" if len(empty) > 1 else "")
        )


@DATASETS.register("imagefolder")
def load_imagefolder(root: str | None = None, seed: int = 0, img_size: int = 64) -> DataSplits:
    """`root/train/<class>/*.jpg` and `root/val/<class>/...` (or `test/`), classes sorted by name.

    Images are squashed to img_size x img_size (set it to the model's input size); the seed is
    unused because the folders already fix the split.
    """
    expected = "train/ and val/ (or test/) folders of class folders of images"
    base = require_root("imagefolder", root, expected)
    test_dir = next((base / n for n in ("val", "test") if (base / n).is_dir()), None)
    missing = [] if (base / "train").is_dir() else ["train/"]
    missing += [] if test_dir is not None else ["val/ (or test/)"]
    if missing:
        raise DataError(
            f"imagefolder: expected {expected} under {base}; missing {' and '.join(missing)}"
        )
    classes = _class_dirs(base / "train")
    class_to_idx = {name: i for i, name in enumerate(classes)}
    train = _scan_classes(base / "train", class_to_idx)
    test = _scan_classes(test_dir, class_to_idx)
    for folder, samples in ((base / "train", train), (test_dir, test)):
        if not samples:
            raise DataError(
                f"imagefolder: expected class folders of images ({', '.join(IMG_EXTENSIONS)}) "
                f"under {folder}; found none"
            )
    _check_no_empty_class(base / "train", train, classes)
    return DataSplits(
        "imagefolder",
        ImageFileDataset(train, img_size),
        ImageFileDataset(test, img_size),
        num_classes=len(classes),
        classes=classes,
    )


def _find_list_dir(base: Path) -> Path | None:
    for sub in MINIPLACES_LIST_DIRS:
        if all((base / sub / f"{s}.txt").is_file() for s in ("train", "val")):
            return (base / sub).resolve()
    return None


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise DataError(f"miniplaces: cannot read {path}: {reason}") from None


def _label(text: str, num_classes: int) -> int | None:
    """`text` as a class index, or None. ASCII digits only: '²'.isdigit(), but int('²') fails."""
    if not (text.isascii() and text.isdigit()) or int(text) >= num_classes:
        return None
    return int(text)


def _labelled_lines(path: Path, num_classes: int, form: str) -> Iterator[tuple[str, int]]:
    """(text, label) of each `text label` line of a MiniPlaces list file; blank lines skipped,
    a malformed line or a label outside 0..num_classes-1 is one DataError naming its line."""
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        label = _label(parts[1], num_classes) if len(parts) == 2 else None
        if label is None:
            raise DataError(
                f"miniplaces: {path}:{number}: expected '{form}' with a label in "
                f"0..{num_classes - 1}, got {line.strip()!r}"
            )
        yield parts[0], label


def read_list_file(path: Path, images: Path, num_classes: int) -> list[tuple[Path, int]]:
    """`relative/path.jpg label` lines -> (images/relative/path.jpg, label)."""
    samples = [
        (images / text, label)
        for text, label in _labelled_lines(path, num_classes, "relative/path.jpg label")
    ]
    if not samples:
        raise DataError(f"miniplaces: {path} lists no images")
    # Checking every file costs a stat per image; the first one catches a wrong images/ folder,
    # and a later missing file is one DataError naming it when it is loaded.
    if not samples[0][0].is_file():
        raise DataError(
            f"miniplaces: {path.name} lists {samples[0][0].relative_to(images)} but "
            f"{samples[0][0]} does not exist (images belong under {images})"
        )
    return samples


def read_categories(list_dir: Path, train: list[tuple[Path, int]], images: Path) -> list[str]:
    """Class names from categories.txt (`/a/abbey 0`), else from the train paths' folders."""
    names = [str(i) for i in range(MINIPLACES_CLASSES)]
    path = list_dir / "categories.txt"
    if path.is_file():
        for text, label in _labelled_lines(path, MINIPLACES_CLASSES, "/a/abbey 0"):
            # '/b/bakery/shop' -> 'bakery/shop': drop the leading letter folder.
            names[label] = text.strip("/").split("/", 1)[-1]
        return names
    for file, label in train:  # train/a/abbey/00000001.jpg
        folders = file.relative_to(images).parts[2:-1]
        if folders:
            names[label] = "/".join(folders)
    return names


@DATASETS.register("miniplaces")
def load_miniplaces(root: str | None = None, seed: int = 0, img_size: int = 128) -> DataSplits:
    """MiniPlaces (100 scenes, 128x128): `images/train/...`, `images/val/...` and the lists
    `train.txt` / `val.txt` in root, root/data or root/development_kit/data.
    """
    expected = "images/ and train.txt, val.txt ('train/a/abbey/00000001.jpg 0' lines)"
    base = require_root("miniplaces", root, expected)
    list_dir = _find_list_dir(base)
    images = base / "images"
    missing = [] if images.is_dir() else ["images/"]
    missing += [] if list_dir is not None else ["train.txt and val.txt"]
    if missing:
        raise DataError(
            f"miniplaces: expected {expected} under {base} (lists may sit in data/ or "
            f"development_kit/data/); missing {' and '.join(missing)}"
        )
    train = read_list_file(list_dir / "train.txt", images, MINIPLACES_CLASSES)
    test = read_list_file(list_dir / "val.txt", images, MINIPLACES_CLASSES)
    return DataSplits(
        "miniplaces",
        ImageFileDataset(train, img_size),
        ImageFileDataset(test, img_size),
        num_classes=MINIPLACES_CLASSES,
        classes=read_categories(list_dir, train, images),
    )
