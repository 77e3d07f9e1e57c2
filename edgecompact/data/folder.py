"""Image folders: DIR/train/<class>/*.png|jpg, plus DIR/val/<class>/ and/or DIR/test/<class>/, read with Pillow.

Images are converted to the mode most files have (RGB or grey) and resized to the input size as they are decoded;
the decoded uint8 arrays are cached, keyed by every file's path, size and mtime and the input size, so a second
run starts in seconds. A file Pillow cannot read is one DataError naming it. Nothing is normalized here.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgecompact.data.raw import RawDataset, in_memory
from edgecompact.data.split import stratified_take
from edgecompact.errors import DataError, StorageError
from edgecompact.storage import cache_root, write_atomic

EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "val", "test")
TEST_FRACTION = 0.2  # without DIR/test: this share of train/, stratified, held out as test
TEST_SEED = 0  # fixed, so every run on a folder is tested on the same images whatever its --seed
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
_CACHE_VERSION = 1
_LAYOUT = "layout: DIR/train/<class>/*.png|jpg, plus DIR/val/<class>/ and/or DIR/test/<class>/"


def cache_dir() -> Path:
    """Where decoded folders are cached: `storage.cache_root()`/folders."""
    return cache_root() / "folders"


def load(directory: Path, input_size: int | None = None) -> RawDataset:
    """Read the image folder `directory`; `input_size` None takes the most common image's shorter side."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory")
    if not (directory / "train").is_dir():
        raise DataError(f"{directory}: has no train/ directory ({_LAYOUT})")
    classes = sorted(d.name for d in (directory / "train").iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{directory / 'train'}: holds no class directories ({_LAYOUT})")
    files: dict[str, list[tuple[Path, int]]] = {}
    ignored = 0
    for split in SPLITS:
        if (directory / split).is_dir():
            files[split], n = _list_split(directory / split, classes)
            ignored += n
    if not files["train"]:
        raise DataError(f"{directory / 'train'}: holds no .png/.jpg images ({_LAYOUT})")
    cache = cache_dir() / f"{_cache_key(directory, files, input_size)}.npz"
    arrays = _read_cache(cache)
    if arrays is None:
        arrays = _decode_folder(directory, files, classes, input_size, ignored)
        _write_cache(cache, arrays)
    notes = [str(n) for n in arrays["notes"]]
    splits = {s: in_memory(arrays[f"{s}_x"], arrays[f"{s}_y"]) for s in files if len(arrays[f"{s}_y"])}
    train = splits["train"]
    test = splits.get("test")
    if test is None:
        labels = train.labels
        test_idx, train_idx = stratified_take(labels, round(TEST_FRACTION * len(labels)),
                                              np.random.default_rng(TEST_SEED))
        x = arrays["train_x"]
        test, train = in_memory(x[test_idx], labels[test_idx]), in_memory(x[train_idx], labels[train_idx])
        notes.append(f"no test split in {directory}: {len(test_idx)} of the {len(labels)} train/ images "
                     f"({TEST_FRACTION:.0%}, stratified, seed {TEST_SEED}) held out as test")
    return RawDataset(train=train, test=test, val=splits.get("val"), num_classes=len(classes),
                      image_shape=tuple(arrays["train_x"].shape[1:]), notes=tuple(notes), classes=tuple(classes))


def _list_split(split_dir: Path, classes: list[str]) -> tuple[list[tuple[Path, int]], int]:
    """([(image file, label)], number of files ignored) of one split, sorted by class then file name."""
    out, ignored = [], 0
    for entry in sorted(split_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            ignored += 1
            continue
        if entry.name not in classes:
            raise DataError(f"{entry}: class '{entry.name}' is not one of the train/ classes")
        for f in sorted(entry.iterdir()):
            if f.name.startswith("."):
                continue
            if f.is_file() and f.suffix.lower() in EXTENSIONS:
                out.append((f, classes.index(entry.name)))
            else:
                ignored += 1
    return out, ignored


def _cache_key(directory: Path, files: dict[str, list[tuple[Path, int]]], input_size: int | None) -> str:
    listing = []
    for split, items in files.items():
        for f, label in items:
            st = f.stat()
            listing.append([split, f.relative_to(directory).as_posix(), label, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"version": _CACHE_VERSION, "dir": str(directory.resolve()), "input_size": input_size,
                       "files": listing})
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _decode_folder(directory: Path, files: dict[str, list[tuple[Path, int]]], classes: list[str],
                   input_size: int | None, ignored: int) -> dict[str, np.ndarray]:
    from PIL import Image

    every = [f for items in files.values() for f, _ in items]
    modes, sizes = Counter(), Counter()
    for f in tqdm(every, desc=f"scanning {directory.name}", unit="img", file=sys.stderr, leave=False):
        # headers only: the majority mode, the default size and unreadable files, before any decoding
        try:
            with Image.open(f) as im:
                modes["L" if im.mode in _GREY_MODES else "RGB"] += 1
                sizes[im.size] += 1
        except Exception as e:  # noqa: BLE001 - any failure to read a header is a bad file, reported in one line
            raise DataError(f"{f}: not a readable image ({_first_line(e)})") from None
    mode = "L" if modes["L"] > modes["RGB"] else "RGB"
    common = sizes.most_common(1)[0][0]
    size = input_size or min(common)
    notes = []
    if len(modes) > 1:
        majority, minority = ("grey", "RGB") if mode == "L" else ("RGB", "grey")
        notes.append(f"mixed modes in {directory}: {len(every) - modes[mode]} of {len(every)} images are "
                     f"{minority}, converted to {majority} like the majority")
    if len(sizes) > 1:
        notes.append(f"{len(sizes)} image sizes in {directory} (most common {common[0]}x{common[1]}); "
                     f"all resized to {size}x{size}")
    counts = Counter(label for _, label in files["train"])
    empty = [c for i, c in enumerate(classes) if not counts[i]]
    if empty:
        notes.append(f"{len(empty)} empty class(es) in {directory / 'train'}: {', '.join(empty[:5])}"
                     f"{', ...' if len(empty) > 5 else ''} (no training images; the label is kept)")
    if ignored:
        notes.append(f"{ignored} file(s) in {directory} that are not .png/.jpg images in a class directory ignored")
    arrays: dict[str, np.ndarray] = {"notes": np.array(notes, dtype=str)}
    with tqdm(total=len(every), desc=f"decoding {directory.name}", unit="img", file=sys.stderr,
              leave=False) as bar:
        for split, items in files.items():
            x = np.empty((len(items), 1 if mode == "L" else 3, size, size), dtype=np.uint8)
            for i, (f, _) in enumerate(items):
                x[i] = _decode(f, mode, size)
                bar.update()
            arrays[f"{split}_x"] = x
            arrays[f"{split}_y"] = np.array([label for _, label in items], dtype=np.int64)
    return arrays


def _decode(path: Path, mode: str, size: int) -> np.ndarray:
    """One image as uint8 (C, size, size); Pillow's resize is antialiased when it shrinks."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
    except Exception as e:  # noqa: BLE001 - truncated data, bad chunks, decompression bombs: a bad file
        raise DataError(f"{path}: not a readable image ({_first_line(e)})") from None
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception:  # noqa: BLE001 - a damaged cache is decoded again, never trusted
        return None


def _write_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomically (temporary file + rename); a cache that cannot be written only costs the next run's decode."""
    try:
        write_atomic(path, lambda f: np.savez(f, **arrays))
    except (OSError, StorageError):
        pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:160]
