"""Downsampled ImageNet 64x64 (Chrabaszcz et al. 2017) in its npz layout: train_data_batch_<k>.npz and val_data.npz.

Each file holds `data` (N x 12288 uint8, channel-planar RGB), `labels` (1..1000) and, in train batches, `mean`
(ignored: normalization is computed from the train split). Files are opened with allow_pickle=False. Images are
read batch by batch and only at the requested indices, so a `limit` subset never holds the whole set in memory.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np

from edgecompact.data.raw import RawDataset, RawSplit
from edgecompact.errors import DataError

NUM_CLASSES = 1000
_IMAGE_SHAPE = (3, 64, 64)
_ROW = 3 * 64 * 64
_TRAIN_BATCH = re.compile(r"train_data_batch_(\d+)\.npz")


def _array(path: Path, key: str) -> np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: a single .npy array, not an npz archive of 'data' and 'labels'")
        with loaded as npz:
            if key not in npz.files:
                raise DataError(f"{path}: has no '{key}' array (arrays: {', '.join(npz.files) or 'none'})")
            return npz[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable npz file ({e})") from None


def _labels(path: Path) -> np.ndarray:
    labels = _array(path, "labels")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'labels' must be a 1-D integer array, found {labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 1 or labels.max() > NUM_CLASSES):
        raise DataError(f"{path}: 'labels' outside 1..{NUM_CLASSES}")
    return labels.astype(np.int64) - 1


def _images(path: Path, count: int) -> np.ndarray:
    data = _array(path, "data")
    if data.dtype != np.uint8 or data.shape != (count, _ROW):
        raise DataError(
            f"{path}: 'data' must be uint8 {count} x {_ROW} to match its labels, found {data.dtype} {data.shape}"
        )
    return data.reshape(count, *_IMAGE_SHAPE)


def _split(files: list[Path]) -> RawSplit:
    labels = [_labels(f) for f in files]
    bounds = np.cumsum([0] + [len(x) for x in labels])

    def read(indices: np.ndarray) -> np.ndarray:
        out = np.empty((len(indices), *_IMAGE_SHAPE), np.uint8)
        for file, start, stop in zip(files, bounds[:-1], bounds[1:]):
            inside = (indices >= start) & (indices < stop)
            if inside.any():
                out[inside] = _images(file, int(stop - start))[indices[inside] - start]
        return out

    return RawSplit(labels=np.concatenate(labels), read=read)


def load(directory: Path) -> RawDataset:
    """Load every train_data_batch_<k>.npz (at least one; the full set has 10) and val_data.npz as the test set."""
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory")
    batches = sorted(
        (int(m.group(1)), directory / m.group(0))
        for m in map(_TRAIN_BATCH.fullmatch, (p.name for p in directory.iterdir()))
        if m
    )
    if not batches:
        raise DataError(f"{directory}: has no train_data_batch_<k>.npz files")
    val = directory / "val_data.npz"
    if not val.is_file():
        raise DataError(f"{val}: missing")
    train = _split([path for _, path in batches])
    if len(train.labels) == 0:
        raise DataError(f"{batches[0][1]}: holds no images")
    return RawDataset(train=train, test=_split([val]), num_classes=NUM_CLASSES, image_shape=_IMAGE_SHAPE)
