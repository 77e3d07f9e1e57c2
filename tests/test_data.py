"""Datasets: every reader on small files written in the real format, the split/limit/normalization contract,
one-line DataErrors for malformed files, and the restricted unpickler refusing code."""

from __future__ import annotations

import builtins
import gzip
import os
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edgecompact import data as data_module
from edgecompact.data import DataSplits, dataset_names, load_dataset
from edgecompact.errors import ConfigError, DataError

torch.set_num_threads(1)

# ---------------------------------------------------------------- writers of the real formats


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    """IDX as published by LeCun et al.: magic 0x0000080<ndim>, big-endian int32 dims, then the uint8 data."""
    blob = (
        struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    )
    if gz:
        path = path.with_name(path.name + ".gz")
        blob = gzip.compress(blob)
    path.write_bytes(blob)
    return path


def indexed_images(n: int, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random uint8 images whose first two pixels spell their index, so any output image names its source."""
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    flat = images.reshape(n, -1)
    flat[:, 0] = np.arange(n) % 256
    flat[:, 1] = np.arange(n) // 256
    return images


def source_index(split: DataSplits, x: torch.Tensor) -> np.ndarray:
    """Undo the normalization and read back the index written by `indexed_images` (channel 0, first pixels)."""
    raw = x[:, 0].reshape(len(x), -1)[:, :2] * split.std[0] + split.mean[0]
    pixels = np.rint(raw.numpy() * 255).astype(np.int64)
    return pixels[:, 0] + 256 * pixels[:, 1]


def write_mnist_dir(directory: Path, gz: bool, n_train: int = 60, n_test: int = 20, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": indexed_images(n_train, (28, 28), rng),
        "train_labels": np.arange(n_train, dtype=np.uint8) % 3,
        "test_images": indexed_images(n_test, (28, 28), rng),
        "test_labels": rng.integers(0, 3, n_test).astype(np.uint8),
    }
    write_idx(directory / "train-images-idx3-ubyte", arrays["train_images"], gz)
    write_idx(directory / "train-labels-idx1-ubyte", arrays["train_labels"], gz)
    write_idx(directory / "t10k-images-idx3-ubyte", arrays["test_images"], gz)
    write_idx(directory / "t10k-labels-idx1-ubyte", arrays["test_labels"], gz)
    return arrays


class Py2Pickler(pickle._Pickler):
    """Writes a pickle the way Python 2's cPickle wrote the real CIFAR files: protocol 2, every string a
    py2 `str` (BINSTRING, read back as bytes), numpy's rebuilder under its numpy-1 name numpy.core.multiarray."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: str | bytes) -> None:
        raw = obj if isinstance(obj, bytes) else obj.encode("latin1")
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj: object, name: str | None = None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def dump_cifar(path: Path, batch: dict, style: str) -> None:
    with path.open("wb") as f:
        if style == "py2":
            Py2Pickler(f, protocol=2).dump(batch)
        else:
            pickle.dump(batch, f, protocol=int(style))


def write_cifar_dir(directory: Path, name: str, per_batch: int = 12, style: str = "py2") -> dict:
    """The python-version layout: cifar-10 data_batch_1..5 + test_batch, cifar-100 train + test."""
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True, exist_ok=True)
    classes, label_key = (10, b"labels") if name == "cifar10" else (100, b"fine_labels")
    files = (
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if name == "cifar10" else ["train", "test"]
    )
    written = {}
    offset = 0
    for file in files:
        n = per_batch * (5 if name == "cifar100" and file == "train" else 1)
        images = indexed_images(offset + n, (3, 32, 32), rng)[offset:]
        labels = rng.integers(0, classes, n).tolist()
        batch = {
            b"batch_label": f"{file} batch".encode(),
            label_key: labels,
            b"data": images.reshape(n, 3072),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        if name == "cifar100":
            batch[b"coarse_labels"] = [c // 5 for c in labels]
        dump_cifar(directory / file, batch, style)
        written[file] = (images, np.array(labels))
        offset = 0 if file.startswith("test") else offset + n
    return written


def write_imagenet64_dir(directory: Path, batch_sizes: tuple[int, ...] = (30, 25), n_val: int = 10) -> dict:
    rng = np.random.default_rng(2)
    directory.mkdir(parents=True, exist_ok=True)
    all_images = indexed_images(sum(batch_sizes), (3, 64, 64), rng)
    all_labels = rng.integers(1, 1001, sum(batch_sizes))
    start = 0
    for k, n in enumerate(batch_sizes, 1):
        rows = all_images[start : start + n].reshape(n, -1)
        np.savez(
            directory / f"train_data_batch_{k}.npz",
            data=rows,
            labels=all_labels[start : start + n].tolist(),
            mean=rows.mean(axis=0),
        )
        start += n
    val_images = indexed_images(n_val, (3, 64, 64), rng)
    val_labels = rng.integers(1, 1001, n_val)
    np.savez(directory / "val_data.npz", data=val_images.reshape(n_val, -1), labels=val_labels.tolist())
    return {"train": (all_images, all_labels), "val": (val_images, val_labels)}


def assert_one_line_naming(error: pytest.ExceptionInfo, path: Path) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message, message


# ---------------------------------------------------------------- IDX (MNIST format)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzipped"])
def test_idx_images_keep_their_labels_through_split_and_normalization(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist_dir(tmp_path, gz)
    d = load_dataset(f"mnist:{tmp_path}", val_fraction=0.25)
    assert (d.num_classes, d.in_channels, d.input_size) == (3, 1, 28)
    assert d.train.tensors[0].shape == (45, 1, 28, 28) and d.val.tensors[0].shape == (15, 1, 28, 28)
    assert d.train.tensors[0].dtype == torch.float32 and d.train.tensors[1].dtype == torch.int64
    train_src, val_src = source_index(d, d.train.tensors[0]), source_index(d, d.val.tensors[0])
    assert sorted(np.concatenate([train_src, val_src])) == list(range(60))
    assert np.array_equal(d.train.tensors[1].numpy(), arrays["train_labels"][train_src])
    assert np.array_equal(d.val.tensors[1].numpy(), arrays["train_labels"][val_src])
    restored = d.train.tensors[0].numpy() * d.std[0] + d.mean[0]
    np.testing.assert_allclose(restored[:, 0], arrays["train_images"][train_src] / 255.0, atol=1e-5)
    assert np.array_equal(source_index(d, d.test.tensors[0]), np.arange(20))
    assert np.array_equal(d.test.tensors[1].numpy(), arrays["test_labels"])


def test_normalization_uses_train_statistics_only(tmp_path: Path) -> None:
    arrays = write_mnist_dir(tmp_path, gz=True)
    d = load_dataset(f"mnist:{tmp_path}", val_fraction=0.25, seed=3)
    train_src = source_index(d, d.train.tensors[0])
    pixels = arrays["train_images"][train_src].astype(np.float64) / 255.0
    assert d.mean[0] == pytest.approx(pixels.mean(), abs=1e-6)
    assert d.std[0] == pytest.approx(pixels.std(), abs=1e-6)
    x = d.train.tensors[0].double()
    assert x.mean().item() == pytest.approx(0.0, abs=1e-5) and x.std(correction=0).item() == pytest.approx(
        1.0, 1e-5
    )
    expected_test = (arrays["test_images"] / 255.0 - d.mean[0]) / d.std[0]
    np.testing.assert_allclose(d.test.tensors[0][:, 0].numpy(), expected_test, atol=1e-4)


def test_split_is_determined_by_seed_and_stratified(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path, gz=False)
    spec = f"mnist:{tmp_path}"
    a, b, c = (load_dataset(spec, val_fraction=0.2, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.val.tensors[0], b.val.tensors[0]) and torch.equal(
        a.train.tensors[1], b.train.tensors[1]
    )
    assert set(source_index(a, a.val.tensors[0])) != set(source_index(c, c.val.tensors[0]))
    assert torch.bincount(a.val.tensors[1]).tolist() == [4, 4, 4]  # 20 of each class, 20% held out


def test_limit_takes_a_seeded_stratified_subset(tmp_path: Path) -> None:
    arrays = write_mnist_dir(tmp_path, gz=False)
    d = load_dataset(f"mnist:{tmp_path}", val_fraction=0.2, limit=30, seed=1)
    assert len(d.train) + len(d.val) == 30 and len(d.val) == 6
    labels = torch.cat([d.train.tensors[1], d.val.tensors[1]])
    assert torch.bincount(labels).tolist() == [10, 10, 10]
    src = source_index(d, torch.cat([d.train.tensors[0], d.val.tensors[0]]))
    assert np.array_equal(labels.numpy(), arrays["train_labels"][src]) and len(set(src)) == 30
    assert len(d.test) == 20  # the test set is never cut
    again = load_dataset(f"mnist:{tmp_path}", val_fraction=0.2, limit=30, seed=1)
    assert torch.equal(d.train.tensors[0], again.train.tensors[0])


def test_input_size_resizes_every_split(tmp_path: Path) -> None:
    write_mnist_dir(tmp_path, gz=True)
    d = load_dataset(f"mnist:{tmp_path}", input_size=32)
    assert d.input_size == 32
    assert (
        d.train.tensors[0].shape[1:]
        == d.val.tensors[0].shape[1:]
        == d.test.tensors[0].shape[1:]
        == (1, 32, 32)
    )


# ---------------------------------------------------------------- CIFAR pickles


@pytest.mark.parametrize("style", ["py2", "4", "5"], ids=["python2-cpickle", "protocol4", "protocol5"])
def test_cifar10_pickles_load_channel_planar_images(tmp_path: Path, style: str) -> None:
    written = write_cifar_dir(tmp_path, "cifar10", style=style)
    d = load_dataset(f"cifar10:{tmp_path}", val_fraction=0.1)
    assert (d.num_classes, d.in_channels, d.input_size, len(d.mean)) == (10, 3, 32, 3)
    assert len(d.train) + len(d.val) == 60 and len(d.test) == 12
    train_images = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_labels = np.concatenate([written[f"data_batch_{i}"][1] for i in range(1, 6)])
    src = source_index(d, d.train.tensors[0])
    assert np.array_equal(d.train.tensors[1].numpy(), train_labels[src])
    std, mean = torch.tensor(d.std).view(1, 3, 1, 1), torch.tensor(d.mean).view(1, 3, 1, 1)
    restored = (d.train.tensors[0] * std + mean).numpy()
    np.testing.assert_allclose(restored, train_images[src] / 255.0, atol=1e-5)
    assert np.array_equal(d.test.tensors[1].numpy(), written["test_batch"][1])


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    written = write_cifar_dir(tmp_path, "cifar100")
    d = load_dataset(f"cifar100:{tmp_path}", val_fraction=0.0)
    assert d.num_classes == 100 and len(d.val) == 0 and len(d.train) == 60
    assert np.array_equal(
        d.train.tensors[1].numpy(), written["train"][1][source_index(d, d.train.tensors[0])]
    )
    assert np.array_equal(d.test.tensors[1].numpy(), written["test"][1])


class SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


class BuiltinsPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload", [SystemPayload, BuiltinsPayload], ids=["os.system", "builtins.exec"])
def test_cifar_pickle_with_code_payload_is_refused_and_never_runs(tmp_path: Path, payload: type) -> None:
    directory = tmp_path / "cifar"
    write_cifar_dir(directory, "cifar10")
    marker = tmp_path / "payload-ran"
    evil = directory / "data_batch_3"
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": payload(marker)}
    with evil.open("wb") as f:
        pickle.dump(batch, f, protocol=2)
    with pytest.raises(DataError, match="refused global") as error:
        load_dataset(f"cifar10:{directory}")
    assert_one_line_naming(error, evil)
    assert not marker.exists()
    # The payload is live: a plain pickle.load runs it. Without this the test above could pass vacuously.
    with evil.open("rb") as f:
        pickle.load(f)
    assert marker.exists()


# ---------------------------------------------------------------- ImageNet 64x64 npz


def test_imagenet64_reads_batches_with_one_based_labels(tmp_path: Path) -> None:
    written = write_imagenet64_dir(tmp_path)
    d = load_dataset(f"imagenet64:{tmp_path}", val_fraction=0.2)
    assert (d.num_classes, d.in_channels, d.input_size) == (1000, 3, 64)
    assert len(d.train) + len(d.val) == 55 and len(d.test) == 10
    images, labels = written["train"]
    src = source_index(d, d.train.tensors[0])
    assert np.array_equal(d.train.tensors[1].numpy(), labels[src] - 1)
    std, mean = torch.tensor(d.std).view(1, 3, 1, 1), torch.tensor(d.mean).view(1, 3, 1, 1)
    np.testing.assert_allclose((d.train.tensors[0] * std + mean).numpy(), images[src] / 255.0, atol=1e-5)
    assert np.array_equal(d.test.tensors[1].numpy(), written["val"][1] - 1)


def test_imagenet64_limit_reads_the_right_images_across_batches(tmp_path: Path) -> None:
    written = write_imagenet64_dir(tmp_path)
    d = load_dataset(f"imagenet64:{tmp_path}", limit=20, val_fraction=0.0, input_size=64, seed=5)
    src = source_index(d, d.train.tensors[0])
    assert len(src) == 20 and len(set(src)) == 20
    assert (src < 30).any() and (src >= 30).any()  # images come from both batch files
    assert np.array_equal(d.train.tensors[1].numpy(), written["train"][1][src] - 1)
    small = load_dataset(f"imagenet64:{tmp_path}", limit=20, input_size=32)
    assert small.train.tensors[0].shape[1:] == (3, 32, 32) and small.test.tensors[0].shape[1:] == (3, 32, 32)


# ---------------------------------------------------------------- digits and the real Fashion-MNIST


def test_digits_loads_ten_classes_at_the_requested_size() -> None:
    d = load_dataset("digits")
    assert (d.num_classes, d.in_channels, d.input_size) == (10, 1, 32)
    assert d.train.tensors[0].shape[1:] == (1, 32, 32)
    assert len(d.train) + len(d.val) + len(d.test) == 1797
    assert set(d.train.tensors[1].tolist()) == set(range(10))
    small = load_dataset("digits", input_size=16, seed=1)
    assert small.train.tensors[0].shape[1:] == (1, 16, 16)
    other_seed = load_dataset("digits", seed=2)
    assert torch.equal(d.test.tensors[1], other_seed.test.tensors[1])  # the held-out test set is fixed
    assert not torch.equal(
        d.val.tensors[0], other_seed.val.tensors[0]
    )  # ...and the val split follows the seed


@pytest.mark.skipif(
    not data_module.FASHION_MNIST_DEBIAN_DIR.is_dir(),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_from_the_debian_package() -> None:
    start = time.perf_counter()
    d = load_dataset("fashion-mnist")
    seconds = time.perf_counter() - start
    assert (len(d.train), len(d.val), len(d.test)) == (54000, 6000, 10000)
    assert (d.num_classes, d.in_channels, d.input_size) == (10, 1, 28)
    labels = torch.cat([d.train.tensors[1], d.val.tensors[1]])
    assert torch.bincount(labels).tolist() == [6000] * 10  # Fashion-MNIST's published class balance
    assert torch.bincount(d.test.tensors[1]).tolist() == [1000] * 10
    # The dataset's widely quoted pixel statistics (train set, /255): mean 0.2860, std 0.3530.
    assert d.mean[0] == pytest.approx(0.2860, abs=2e-3) and d.std[0] == pytest.approx(0.3530, abs=2e-3)
    assert seconds < 15


# ---------------------------------------------------------------- bad input: one line naming the file


def _truncate(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def _idx_truncated(d: Path) -> Path:
    write_mnist_dir(d, gz=False)
    return _truncate(d / "train-images-idx3-ubyte", 5000)


def _idx_header_only(d: Path) -> Path:
    write_mnist_dir(d, gz=False)
    return _truncate(d / "train-labels-idx1-ubyte", 6)


def _idx_trailing_bytes(d: Path) -> Path:
    write_mnist_dir(d, gz=False)
    images = d / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes() + b"\x00" * 10)
    return images


def _gzip_truncated(d: Path) -> Path:
    write_mnist_dir(d, gz=True)
    return _truncate(d / "train-images-idx3-ubyte.gz", 3000)


def _idx_wrong_magic(d: Path) -> Path:
    write_mnist_dir(d, gz=False)
    labels = d / "train-labels-idx1-ubyte"
    labels.write_bytes(struct.pack(">I", 0x00000803) + labels.read_bytes()[4:])
    return labels


def _idx_count_mismatch(d: Path) -> Path:
    write_mnist_dir(d, gz=True)
    write_idx(d / "train-labels-idx1-ubyte", np.zeros(59, np.uint8), gz=True)
    return d / "train-images-idx3-ubyte.gz"


def _idx_missing_labels(d: Path) -> Path:
    write_mnist_dir(d, gz=False)
    (d / "train-labels-idx1-ubyte").unlink()
    return d


def _cifar_truncated(d: Path) -> Path:
    write_cifar_dir(d, "cifar10")
    return _truncate(d / "data_batch_2", 2000)


def _cifar_missing_batch(d: Path) -> Path:
    write_cifar_dir(d, "cifar10")
    (d / "data_batch_4").unlink()
    return d / "data_batch_4"


def _cifar_missing_key(d: Path) -> Path:
    write_cifar_dir(d, "cifar10")
    dump_cifar(d / "test_batch", {b"data": np.zeros((2, 3072), np.uint8)}, "py2")
    return d / "test_batch"


def _cifar_label_count(d: Path) -> Path:
    write_cifar_dir(d, "cifar10")
    dump_cifar(d / "data_batch_1", {b"data": np.zeros((3, 3072), np.uint8), b"labels": [1, 2]}, "py2")
    return d / "data_batch_1"


def _npz_missing_data(d: Path) -> Path:
    write_imagenet64_dir(d)
    np.savez(d / "train_data_batch_2.npz", labels=[1, 2, 3])
    return d / "train_data_batch_2.npz"


def _npz_missing_labels(d: Path) -> Path:
    write_imagenet64_dir(d)
    np.savez(d / "val_data.npz", data=np.zeros((2, 12288), np.uint8))
    return d / "val_data.npz"


def _npz_truncated(d: Path) -> Path:
    write_imagenet64_dir(d)
    return _truncate(d / "train_data_batch_1.npz", 10000)


def _npz_pickled_labels(d: Path) -> Path:
    write_imagenet64_dir(d)
    np.savez(d / "val_data.npz", data=np.zeros((2, 12288), np.uint8), labels=np.array([1, "x"], dtype=object))
    return d / "val_data.npz"


def _npz_wrong_width(d: Path) -> Path:
    write_imagenet64_dir(d)
    np.savez(d / "val_data.npz", data=np.zeros((10, 3072), np.uint8), labels=list(range(1, 11)))
    return d / "val_data.npz"


MALFORMED = {
    "idx-truncated": ("mnist", _idx_truncated, "truncated"),
    "idx-header-only": ("mnist", _idx_header_only, "truncated"),
    "idx-trailing-bytes": ("mnist", _idx_trailing_bytes, "trailing bytes"),
    "gzip-truncated": ("mnist", _gzip_truncated, "gzip"),
    "idx-wrong-magic": ("mnist", _idx_wrong_magic, "wrong magic"),
    "idx-count-mismatch": ("mnist", _idx_count_mismatch, "60 images but"),
    "idx-missing-labels": ("mnist", _idx_missing_labels, "train-labels-idx1-ubyte"),
    "cifar-truncated": ("cifar10", _cifar_truncated, "truncated"),
    "cifar-missing-batch": ("cifar10", _cifar_missing_batch, "missing"),
    "cifar-missing-key": ("cifar10", _cifar_missing_key, "'labels'"),
    "cifar-label-count": ("cifar10", _cifar_label_count, "3 images but 2"),
    "npz-missing-data": ("imagenet64", _npz_missing_data, "'data'"),
    "npz-missing-labels": ("imagenet64", _npz_missing_labels, "'labels'"),
    "npz-truncated": ("imagenet64", _npz_truncated, "npz"),
    "npz-object-array": ("imagenet64", _npz_pickled_labels, "pickle"),
    "npz-wrong-width": ("imagenet64", _npz_wrong_width, "12288"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_file_gives_one_line_naming_it(tmp_path: Path, case: str) -> None:
    name, make, what = MALFORMED[case]
    directory = tmp_path / "ds"
    directory.mkdir()
    bad = make(directory)
    with pytest.raises(DataError, match=what) as error:
        load_dataset(f"{name}:{directory}")
    assert_one_line_naming(error, bad)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "imagenet64"])
def test_missing_directory_is_named(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError, match="no such directory") as error:
        load_dataset(f"{name}:{tmp_path / 'absent'}")
    assert_one_line_naming(error, tmp_path / "absent")


def test_fashion_mnist_without_the_debian_package_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data_module, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "absent")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as error:
        load_dataset("fashion-mnist")
    assert_one_line_naming(error, tmp_path / "absent")


@pytest.mark.parametrize(
    "spec, kwargs, what",
    [
        ("svhn", {}, "unknown dataset 'svhn'"),
        ("mnist", {}, "needs a path"),
        ("cifar10:", {}, "empty path"),
        ("digits:/tmp", {}, "takes no path"),
        ("digits", {"val_fraction": 1.0}, "val_fraction"),
        ("digits", {"limit": 0}, "limit"),
        ("digits", {"input_size": 0}, "input_size"),
        ("digits", {"limit": 1, "val_fraction": 0.9}, "no training images"),
    ],
)
def test_bad_arguments_give_config_errors(spec: str, kwargs: dict, what: str) -> None:
    with pytest.raises(ConfigError, match=what):
        load_dataset(spec, **kwargs)


def test_dataset_names_lists_every_reader() -> None:
    assert dataset_names() == ["digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagenet64", "folder"]
