"""CIFAR-10 and CIFAR-100 in their "python version" layout: pickled dicts of uint8 rows and label lists.

The pickles go through `SafeUnpickler`, which resolves only the globals that rebuild a numpy array (the names
numpy 1 wrote in the real files, and numpy 2's): a pickle naming anything else is refused before any of it runs.
Never call plain `pickle.load` on a dataset file.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
from numpy._core.multiarray import _reconstruct
from numpy._core.numeric import _frombuffer

from edgecompact.data.raw import RawDataset, in_memory
from edgecompact.errors import DataError

# The real CIFAR files (Python 2 cPickle, numpy 1) name the first three; numpy 2 writes the `_core` names, and
# `_frombuffer` for protocol-5 pickles. Each only builds an ndarray or a dtype from plain values.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
}

_IMAGE_SHAPE = (3, 32, 32)
_LAYOUTS = {
    # name: (train files, test file, label key, classes)
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels", 10),
    "cifar100": (["train"], "test", "fine_labels", 100),
}


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds numpy arrays, dicts, lists, numbers and strings."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None


def read_pickle(path: Path) -> Any:
    """Unpickle `path` with `SafeUnpickler`; Python 2 strings come back as bytes, as in the real files."""
    try:
        with path.open("rb") as f:
            # Every error raised inside load() comes from the file's bytes (truncation, a refused global, a
            # malformed array), so all of them are the user's data problem, reported in one line.
            return SafeUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - see comment above
        reason = "truncated" if isinstance(e, EOFError) else f"{type(e).__name__}: {e}"
        raise DataError(f"{path}: not a valid CIFAR pickle ({reason})") from None


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = read_pickle(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    for key in ("data", label_key):
        if key not in batch:
            raise DataError(f"{path}: has no '{key}' entry (keys: {', '.join(map(str, batch))})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} array {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array of N x 3072, found {found}")
    try:
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: '{label_key}' is not a list of integers") from None
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(data)} images but {labels.size} entries in '{label_key}'")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: '{label_key}' outside 0..{num_classes - 1}")
    return data.reshape(-1, *_IMAGE_SHAPE), labels


def load(directory: Path, name: str) -> RawDataset:
    """Load `cifar10` (cifar-10-batches-py) or `cifar100` (cifar-100-python, fine labels) from `directory`."""
    train_files, test_file, label_key, num_classes = _LAYOUTS[name]
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory")
    for file in (*train_files, test_file):
        if not (directory / file).is_file():
            raise DataError(f"{directory / file}: missing (expected the {name} python-version files here)")
    parts = [_read_batch(directory / file, label_key, num_classes) for file in train_files]
    test_images, test_labels = _read_batch(directory / test_file, label_key, num_classes)
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if len(images) == 0:
        raise DataError(f"{directory / train_files[0]}: holds no images")
    return RawDataset(
        train=in_memory(images, labels),
        test=in_memory(test_images, test_labels),
        num_classes=num_classes,
        image_shape=_IMAGE_SHAPE,
    )
