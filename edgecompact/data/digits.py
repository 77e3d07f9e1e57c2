"""The embedded default dataset: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes, 17 grey levels).

It ships with scikit-learn, so it needs no download. It has no official test split: a fixed stratified fifth
(independent of the user's seed, so test figures stay comparable across runs) is held out as the test set.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from edgecompact.data.raw import RawDataset, in_memory
from edgecompact.data.split import stratified_take

TEST_FRACTION = 0.2
TEST_SEED = 0


def load() -> RawDataset:
    """Load the digits, images as uint8 values 0..16 of shape (N, 1, 8, 8)."""
    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    test_idx, train_idx = stratified_take(
        labels, round(TEST_FRACTION * len(labels)), np.random.default_rng(TEST_SEED)
    )
    return RawDataset(
        train=in_memory(images[train_idx], labels[train_idx]),
        test=in_memory(images[test_idx], labels[test_idx]),
        num_classes=10,
        image_shape=(1, 8, 8),
        max_value=16.0,
    )
