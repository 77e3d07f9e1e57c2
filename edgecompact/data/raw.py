"""The raw form every dataset reader hands over: integer labels and uint8 N x C x H x W images read on demand.

Readers only parse and validate their file format; splitting, resizing and normalization happen once, in
`edgecompact.data.load_dataset`. Images are read by index so a large dataset (ImageNet64) never has to be
held whole in memory when only a subset is wanted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class RawSplit:
    """One split of a dataset: a label per image, and `read(indices)` -> uint8 array (len(indices), C, H, W)."""

    labels: np.ndarray
    read: Callable[[np.ndarray], np.ndarray]


@dataclass
class RawDataset:
    """What a reader returns. `max_value` is the brightest pixel value of the format (255, or 16 for digits).
    `val`: a validation split the dataset ships (else one is split from `train`); `notes`: what the reader
    decided or found that a report should say (a held-out test split, converted images, empty classes)."""

    train: RawSplit
    test: RawSplit | None
    num_classes: int
    image_shape: tuple[int, int, int]
    max_value: float = 255.0
    val: RawSplit | None = None
    notes: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()  # class names in label order, when the dataset has them (image folders)


def in_memory(images: np.ndarray, labels: np.ndarray) -> RawSplit:
    """A RawSplit over arrays already loaded: images (N, C, H, W) uint8, labels (N,) any integer type."""
    return RawSplit(labels=labels.astype(np.int64), read=lambda indices: images[indices])
