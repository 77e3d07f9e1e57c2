"""Datasets as normalized float32 NCHW TensorDatasets with a seeded train/val split.

`load_dataset("digits")` needs nothing (scikit-learn ships it); the others read the files the dataset's authors
publish, from a path the user gives: MNIST-format IDX, CIFAR-10/100 python pickles (through a restricted
unpickler), Downsampled ImageNet 64x64 npz, or a folder of PNG/JPEG images per class. Nothing is downloaded; only
decoded image folders are cached on disk (data/folder.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from edgecompact.data import cifar, digits, folder, idx, imagenet64
from edgecompact.data.raw import RawDataset
from edgecompact.data.split import stratified_take
from edgecompact.errors import ConfigError, DataError

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DIGITS_INPUT_SIZE = 32
_CHUNK = 8192  # images converted at a time, so peak memory stays near the size of the result


def _fashion_mnist(path: Path | None, _input_size: int | None) -> RawDataset:
    if path is None:
        if not FASHION_MNIST_DEBIAN_DIR.is_dir():
            raise DataError(
                f"fashion-mnist: {FASHION_MNIST_DEBIAN_DIR} not found; install it with "
                "`apt-get install dataset-fashion-mnist`, or give fashion-mnist:PATH"
            )
        path = FASHION_MNIST_DEBIAN_DIR
    return idx.load(path)


# A reader takes (path or None, the requested input size or None); only the image folder reader uses the size,
# since it decodes files of any size straight to it.
Reader = Callable[[Path | None, int | None], RawDataset]


def _needs_path(name: str, what: str, reader: Callable[[Path], RawDataset]) -> Reader:
    def read(path: Path | None, _input_size: int | None) -> RawDataset:
        if path is None:
            raise ConfigError(f"dataset '{name}' needs a path: {name}:PATH, PATH being {what}")
        return reader(path)

    return read


def _digits(path: Path | None, _input_size: int | None) -> RawDataset:
    if path is not None:
        raise ConfigError(f"dataset 'digits' takes no path (it ships with scikit-learn), got digits:{path}")
    return digits.load()


def _folder(path: Path | None, input_size: int | None) -> RawDataset:
    if path is None:
        raise ConfigError("dataset 'folder' needs a path: folder:DIR, DIR holding train/<class>/*.png|jpg "
                          "(+ val/, test/)")
    return folder.load(path, input_size)


_READERS: dict[str, Reader] = {
    "digits": _digits,
    "mnist": _needs_path("mnist", "a directory of IDX files (train-images-idx3-ubyte[.gz]...)", idx.load),
    "fashion-mnist": _fashion_mnist,
    "cifar10": _needs_path(
        "cifar10", "the cifar-10-batches-py directory", lambda p: cifar.load(p, "cifar10")
    ),
    "cifar100": _needs_path(
        "cifar100", "the cifar-100-python directory", lambda p: cifar.load(p, "cifar100")
    ),
    "imagenet64": _needs_path(
        "imagenet64", "a directory of train_data_batch_<k>.npz and val_data.npz", imagenet64.load
    ),
    "folder": _folder,
}


@dataclass
class DataSplits:
    """A dataset ready for training. `mean`/`std` are the per-channel statistics the images were normalized
    with (computed on `train`), needed to feed raw images to a deployed model. `notes`: what the reader decided
    or found (a held-out test split, converted images, empty classes), for the report."""

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset | None
    num_classes: int
    in_channels: int
    input_size: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    notes: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()  # class names in label order, when the dataset has them (image folders)

    @property
    def report_split(self) -> TensorDataset:
        """The split reported numbers come from: test, else validation (never used for a choice)."""
        return self.test if self.test is not None else self.val


def dataset_names() -> list[str]:
    """The dataset names `load_dataset` accepts (before the optional `:PATH`)."""
    return list(_READERS)


def _parse(spec: str) -> tuple[str, Path | None]:
    name, sep, path = spec.partition(":")
    if name not in _READERS:
        raise ConfigError(f"unknown dataset '{name}' in '{spec}'; known: {', '.join(_READERS)}")
    if sep and not path:
        raise ConfigError(f"dataset '{spec}' has an empty path after ':'")
    return name, Path(path).expanduser() if path else None


def _check_arguments(input_size: int | None, val_fraction: float, limit: int | None) -> None:
    if input_size is not None and input_size < 1:
        raise ConfigError(f"input_size must be a positive number of pixels, got {input_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of training images, got {limit}")


def _to_float(images: np.ndarray, max_value: float, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (N, C, size, size) in [0, 1], resized bilinearly (antialiased when shrinking)."""
    out = torch.empty((len(images), images.shape[1], size, size), dtype=torch.float32)
    for start in range(0, len(images), _CHUNK):
        chunk = torch.from_numpy(images[start : start + _CHUNK]).float().div_(max_value)
        if chunk.shape[-2:] != (size, size):
            chunk = F.interpolate(
                chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
        out[start : start + len(chunk)] = chunk
    return out


def load_dataset(
    spec: str,
    input_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
) -> DataSplits:
    """Load `spec` (`digits`, `mnist:PATH`, `fashion-mnist[:PATH]`, `cifar10:PATH`, `cifar100:PATH`,
    `imagenet64:PATH`, `folder:DIR`) as normalized float32 NCHW tensors with int64 labels.

    input_size: side of the square images returned (default: the dataset's own, 32 for digits).
    val_fraction: share of the training images held out as `val`, stratified by class and seeded by `seed`
    (unless the dataset ships a validation split: an image folder's val/, then used whole).
    limit: use at most this many of the training images (train + val), a seeded stratified subset; the test
    set is always complete. Normalization uses the per-channel mean and std of the resulting `train` split.
    """
    name, path = _parse(spec)
    _check_arguments(input_size, val_fraction, limit)
    raw = _READERS[name](path, input_size)
    size = input_size or (DIGITS_INPUT_SIZE if name == "digits" else raw.image_shape[-1])

    rng = np.random.default_rng(seed)
    labels = raw.train.labels
    pool = np.arange(len(labels))
    if limit is not None and limit < len(pool):
        pool, _ = stratified_take(labels, limit, rng)
    if raw.val is None:
        val_pos, train_pos = stratified_take(labels[pool], round(val_fraction * len(pool)), rng)
        train_idx, val_idx = pool[train_pos], pool[val_pos]
    else:
        train_idx, val_idx = pool, np.arange(0)
    if len(train_idx) == 0:
        raise ConfigError(f"limit={limit} with val_fraction={val_fraction} leaves no training images")

    images = _to_float(raw.train.read(np.concatenate([train_idx, val_idx])), raw.max_value, size)
    all_labels = torch.from_numpy(labels[np.concatenate([train_idx, val_idx])])
    if raw.val is not None:
        images = torch.cat([images, _to_float(raw.val.read(np.arange(len(raw.val.labels))), raw.max_value, size)])
        all_labels = torch.cat([all_labels, torch.from_numpy(raw.val.labels)])
    mean = images[: len(train_idx)].mean(dim=(0, 2, 3))
    # A constant channel (blank images) has std 0: leave it centred rather than dividing by zero.
    std = images[: len(train_idx)].std(dim=(0, 2, 3), correction=0).clamp_min(1e-8)

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))

    images = normalize(images)
    test = None
    if raw.test is not None:
        test_x = normalize(_to_float(raw.test.read(np.arange(len(raw.test.labels))), raw.max_value, size))
        test = TensorDataset(test_x, torch.from_numpy(raw.test.labels))
    return DataSplits(
        name=name,
        train=TensorDataset(images[: len(train_idx)], all_labels[: len(train_idx)]),
        val=TensorDataset(images[len(train_idx) :], all_labels[len(train_idx) :]),
        test=test,
        num_classes=raw.num_classes,
        in_channels=raw.image_shape[0],
        input_size=size,
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
        notes=raw.notes,
        classes=raw.classes,
    )
