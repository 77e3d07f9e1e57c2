"""MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST...), raw or gzipped, from a directory with the standard names.

Each file is checked against its header: magic number, dimensions and byte count must agree, and images must
match labels in number. It must not guess: a file that does not say what it is gets a DataError.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from edgecompact.data.raw import RawDataset, RawSplit, in_memory
from edgecompact.errors import DataError

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (count, rows, columns)
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (count)
_GZIP_MAGIC = b"\x1f\x8b"


def find(directory: Path, name: str) -> Path | None:
    """`directory/name`, or `directory/name.gz`, whichever exists first; None when neither does."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one IDX file (gzipped or not, told by its content) whose header must carry `magic`."""
    try:
        blob = path.read_bytes()
        if blob[:2] == _GZIP_MAGIC:
            blob = gzip.decompress(blob)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: truncated or corrupt gzip ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(blob) < 4:
        raise DataError(f"{path}: truncated: {len(blob)} bytes, shorter than an IDX header")
    (found,) = struct.unpack(">I", blob[:4])
    if found != magic:
        kind = "image" if magic == IMAGES_MAGIC else "label"
        raise DataError(
            f"{path}: wrong magic number 0x{found:08x}, expected 0x{magic:08x} for an IDX {kind} file"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise DataError(f"{path}: truncated: {len(blob)} bytes, shorter than its {header}-byte header")
    dims = struct.unpack(f">{ndim}I", blob[4:header])
    expected = header + int(np.prod(dims))
    if len(blob) != expected:
        problem = "truncated" if len(blob) < expected else "trailing bytes"
        raise DataError(
            f"{path}: {problem}: its header promises {'x'.join(map(str, dims))} bytes after {header} header "
            f"bytes ({expected} in all), the file has {len(blob)}"
        )
    return np.frombuffer(blob, dtype=np.uint8, offset=header).reshape(dims)


def _read_pair(directory: Path, prefix: str) -> RawSplit | None:
    images_path = find(directory, f"{prefix}-images-idx3-ubyte")
    labels_path = find(directory, f"{prefix}-labels-idx1-ubyte")
    if images_path is None and labels_path is None:
        return None
    if images_path is None or labels_path is None:
        missing = f"{prefix}-{'images-idx3' if images_path is None else 'labels-idx1'}-ubyte[.gz]"
        raise DataError(f"{directory}: has no {missing}")
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise DataError(
            f"{images_path}: {len(images)} images but {labels_path.name} has {len(labels)} labels"
        )
    if len(images) == 0:
        raise DataError(f"{images_path}: holds no images")
    return in_memory(images[:, None], labels)


def load(directory: Path) -> RawDataset:
    """Load train-* (required) and t10k-* (optional) IDX pairs from `directory`."""
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory")
    train = _read_pair(directory, "train")
    if train is None:
        raise DataError(f"{directory}: has no train-images-idx3-ubyte[.gz] / train-labels-idx1-ubyte[.gz]")
    test = _read_pair(directory, "t10k")
    labels = train.labels if test is None else np.concatenate([train.labels, test.labels])
    sample = train.read(np.arange(1))
    return RawDataset(train=train, test=test, num_classes=int(labels.max()) + 1, image_shape=sample.shape[1:])
