"""A user's own inputs from the command line: image folders (--data folder:DIR), trained weights (--weights),
ONNX models (--model X.onnx), and the compact model coming out as compact.safetensors + arch.json + a loader."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from edgecompact.data import folder, load_dataset
from edgecompact.errors import ConfigError, DataError
from edgecompact.models import load_model, load_weights

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("bottom", "middle", "top")

TINY_NET = """
from torch import nn

def make(num_classes=10, in_channels=3):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
"""


def write_folder(root: Path, splits: dict[str, int], grey: float = 0.0, size: tuple[int, int] = (20, 18),
                 seed: int = 0) -> Path:
    """PNG images per class whose bright band (bottom, middle or top third) is the label; a `grey` share of the
    files is saved in mode L, the rest RGB. `splits`: images per class in each split directory."""
    rng = np.random.default_rng(seed)
    for split, per_class in splits.items():
        for label, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                w, h = size
                a = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
                rows = slice((2 - label) * h // 3, (3 - label) * h // 3)
                a[rows] = rng.integers(180, 256, a[rows].shape, dtype=np.uint8)
                img = Image.fromarray(a)
                if rng.random() < grey:
                    img = img.convert("L")
                img.save(d / f"{split}_{i}.png")
    return root


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECOMPACT_CACHE", str(tmp_path / "cache"))


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "edgecompact.cli", *args], check=False, capture_output=True,
                          text=True, cwd=cwd, timeout=300, env=env)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    progress = re.compile(r"^(scanning|decoding) \S+: +\d+%")  # the image folder's progress bars
    lines = [line for line in r.stderr.strip().splitlines() if line.strip() and not progress.match(line)]
    assert len(lines) == 1, r.stderr
    return lines[0]


# ---------------------------------------------------------------- image folders


def test_folder_reads_class_directories_with_the_majority_mode_and_the_val_split_whole(tmp_path: Path) -> None:
    d = write_folder(tmp_path / "ds", {"train": 10, "val": 4, "test": 5}, grey=0.2)
    data = load_dataset(f"folder:{d}", input_size=12)
    assert (data.num_classes, data.in_channels, data.input_size) == (3, 3, 12)
    assert data.train.tensors[0].shape == (30, 3, 12, 12)
    assert len(data.val.tensors[1]) == 12 and len(data.test.tensors[1]) == 15  # val/ used whole, not re-split
    assert sorted(np.bincount(data.test.tensors[1].numpy())) == [5, 5, 5]
    assert any("mixed modes" in n and "converted to RGB" in n for n in data.notes)


def test_folder_of_mostly_grey_images_gives_one_channel(tmp_path: Path) -> None:
    d = write_folder(tmp_path / "ds", {"train": 8, "test": 2}, grey=0.8)
    data = load_dataset(f"folder:{d}", input_size=10)
    assert data.in_channels == 1 and data.train.tensors[0].shape[1:] == (1, 10, 10)
    assert any("are RGB, converted to grey" in n for n in data.notes)


def test_folder_default_size_is_the_most_common_images_shorter_side(tmp_path: Path) -> None:
    d = write_folder(tmp_path / "ds", {"train": 4, "test": 2}, size=(20, 18))
    assert load_dataset(f"folder:{d}").input_size == 18


def test_folder_without_test_holds_out_a_fixed_stratified_fifth_and_says_so(tmp_path: Path) -> None:
    d = write_folder(tmp_path / "ds", {"train": 10})
    a, b = load_dataset(f"folder:{d}", input_size=8, seed=0), load_dataset(f"folder:{d}", input_size=8, seed=3)
    assert np.bincount(a.test.tensors[1].numpy()).tolist() == [2, 2, 2]
    def pixels(s):
        return s.test.tensors[0] * torch.tensor(s.std).view(1, -1, 1, 1) + torch.tensor(s.mean).view(1, -1, 1, 1)

    assert torch.allclose(pixels(a), pixels(b), atol=1e-5)  # the same test images whatever --seed
    assert len(a.train.tensors[1]) + len(a.val.tensors[1]) == 24
    assert any("no test split" in n and "held out as test" in n for n in a.notes)


def test_second_load_reads_the_cache_and_a_changed_file_is_decoded_again(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    d = write_folder(tmp_path / "ds", {"train": 6, "test": 2})
    first = load_dataset(f"folder:{d}", input_size=8)
    assert len(list(folder.cache_dir().glob("*.npz"))) == 1

    def no_decoding(*_a, **_k):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(folder, "_decode", no_decoding)
    again = load_dataset(f"folder:{d}", input_size=8)
    assert torch.equal(first.train.tensors[0], again.train.tensors[0])
    changed = d / "train" / "top" / "train_0.png"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded although cached"):
        load_dataset(f"folder:{d}", input_size=8)


def test_corrupt_image_is_one_line_naming_the_file(tmp_path: Path) -> None:
    d = write_folder(tmp_path / "ds", {"train": 4, "test": 2})
    bad = d / "train" / "middle" / "broken.png"
    good = (d / "train" / "middle" / "train_0.png").read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # a truncated PNG: the header reads, the pixels do not
    with pytest.raises(DataError, match="not a readable image") as e:
        load_dataset(f"folder:{d}", input_size=8)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    line = one_line_error(run_cli("train", "--model", "resnet20", "--data", f"folder:{d}", "--out",
                                  str(tmp_path / "t"), cwd=tmp_path))
    assert str(bad) in line


def test_empty_class_and_ignored_files_are_reported(tmp_path: Path) -> None:
    d = write_folder(tmp_path / "ds", {"train": 4, "test": 2})
    (d / "train" / "zebra").mkdir()
    (d / "train" / "README.txt").write_text("not an image")
    data = load_dataset(f"folder:{d}", input_size=8)
    assert data.num_classes == 4
    assert any("empty class" in n and "zebra" in n for n in data.notes)
    assert any("1 file(s)" in n and "ignored" in n for n in data.notes)


@pytest.mark.parametrize("make, what", [
    (lambda d: None, "no such directory"),
    (lambda d: (d / "images").mkdir(parents=True), "has no train/ directory"),
    (lambda d: (d / "train").mkdir(parents=True), "holds no class directories"),
    (lambda d: write_folder(d, {"train": 2, "test": 1}) and (d / "test" / "unicorn").mkdir(), "unicorn"),
])
def test_bad_folder_layouts_give_one_line(tmp_path: Path, make, what: str) -> None:
    d = tmp_path / "ds"
    make(d)
    with pytest.raises(DataError, match=what):
        load_dataset(f"folder:{d}")


# ---------------------------------------------------------------- weights


@pytest.fixture
def tiny(tmp_path: Path):
    """tiny(num_classes=3) -> the user's network, loaded from tiny.py:make as the command line loads it."""
    (tmp_path / "tiny.py").write_text(TINY_NET)

    def make(num_classes: int = 3) -> nn.Module:
        return load_model(f"{tmp_path / 'tiny.py'}:make", num_classes=num_classes, in_channels=3)

    return make


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_load_from_a_state_dict_or_safetensors(tmp_path: Path, tiny, suffix: str) -> None:
    from safetensors.torch import save_file

    src = tiny()
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save({"model": src.state_dict()}, path)
    else:
        save_file(src.state_dict(), str(path))
    dst = load_weights(tiny(), path)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(src.eval()(x), dst.eval()(x))


@pytest.mark.parametrize("change, needle", [
    (lambda sd: sd.pop("0.weight"), "key '0.weight' of the model is missing"),
    (lambda sd: sd.update({"8.weight": torch.zeros(5, 16), "8.bias": torch.zeros(5)}), "key '8.weight' is [5, 16]"),
    (lambda sd: sd.update({"head.weight": torch.zeros(1)}), "key 'head.weight' of the file is not in the model"),
])
def test_weights_that_do_not_fit_name_the_first_key_that_differs(tmp_path: Path, tiny, change, needle: str) -> None:
    sd = tiny().state_dict()
    change(sd)
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    with pytest.raises(ConfigError) as e:
        load_weights(tiny(), path, "tiny.py:make")
    assert needle in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_weights_file_that_is_not_a_checkpoint_is_one_line(tmp_path: Path, tiny) -> None:
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        load_weights(tiny(), bad)
    with pytest.raises(ConfigError, match="checkpoint not found"):
        load_weights(tiny(), tmp_path / "absent.pt")


@pytest.mark.slow
def test_trained_checkpoint_is_searched_without_retraining_and_comes_out_as_safetensors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`edgecompact train` on an image folder, then `search --weights` on its checkpoint: the report's baseline
    top-1 is the checkpoint's own (nothing retrained), and the run holds a loadable compact.safetensors."""
    from safetensors.torch import load_file

    import edgecompact

    d = write_folder(tmp_path / "ds", {"train": 14, "val": 3, "test": 4}, grey=0.1)
    (tmp_path / "tiny.py").write_text(TINY_NET)
    common = ["--model", "tiny.py:make", "--data", f"folder:{d}", "--input-size", "12", "--batch-size", "16"]
    r = run_cli("train", *common, "--epochs", "3", "--out", "ckpt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    own_top1 = json.loads((tmp_path / "ckpt" / "result.json").read_text())["top1"]
    r = run_cli("search", *common, "--weights", "ckpt/checkpoint.pt", "--method", "uniform", "--budget", "0.5x",
                "--epochs", "2", "--search-epochs", "1", "--finetune-epochs", "1", "--no-deploy", "--out", "run",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    base = report["results"][0]
    assert base["name"] == "baseline" and base["top1"] == own_top1
    assert base["given"] == "ckpt/checkpoint.pt" and "val_top1" in base
    assert "baseline given (ckpt/checkpoint.pt, not trained)" in report["protocol"]
    assert "from scratch: 4" in report["protocol"]
    assert not (run / "baseline.pt").exists() and "training the baseline" not in r.stderr
    for name in ("compact.safetensors", "arch.json", "structure.json", "config.json"):
        assert (run / name).is_file(), name
    pre = json.loads((run / "preprocess.json").read_text())
    assert pre["classes"] == list(CLASSES) and pre["input_shape"] == [3, 12, 12] and len(pre["mean"]) == 3
    monkeypatch.chdir(tmp_path)  # config.json names tiny.py as the command did, relative to where it ran
    compact = edgecompact.load_compact(run)
    state = load_file(str(run / "compact.safetensors"))
    assert state.keys() == compact.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in compact.state_dict().items())
    widths = json.loads((run / "arch.json").read_text())["widths"]
    assert compact[0].out_channels == widths["0"] < 8


def test_search_refuses_a_checkpoint_of_another_model_before_creating_the_run(tmp_path: Path, tiny) -> None:
    d = write_folder(tmp_path / "ds", {"train": 4, "test": 2})
    torch.save({"model": tiny(num_classes=5).state_dict()}, tmp_path / "five.pt")
    line = one_line_error(run_cli("search", "--model", "tiny.py:make", "--weights", "five.pt", "--data",
                                  f"folder:{d}", "--input-size", "8", "--method", "uniform", "--no-deploy",
                                  "--out", "run", cwd=tmp_path))
    assert "--weights five.pt" in line and "key '8.weight' is [5, 16] in the file, [3, 16] in the model" in line
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- ONNX models


@pytest.fixture
def zoo_onnx(tmp_path: Path) -> Path:
    from edgecompact.deploy.onnx import export_onnx
    from edgecompact.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=3, in_channels=3, input_size=12).eval()
    path = tmp_path / "resnet20.onnx"
    export_onnx(model, (1, 3, 12, 12), path)
    return path


def test_onnx_model_with_an_unsupported_operator_is_refused_in_one_line(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((3, 3, 1, 1), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="stem"),
         helper.make_node("Einsum", ["c"], ["y"], name="mix", equation="nchw->nc")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [weight])
    path = tmp_path / "einsum.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    d = write_folder(tmp_path / "ds", {"train": 4, "test": 2})
    line = one_line_error(run_cli("search", "--model", str(path), "--data", f"folder:{d}", "--input-size", "12",
                                  "--method", "uniform", "--no-deploy", "--out", "run", cwd=tmp_path))
    assert f"--model {path}: operator 'Einsum' (node 'mix') is not supported by the built-in converter" in line
    assert "supported: Add, AveragePool, BatchNormalization" in line


@pytest.mark.slow
def test_onnx_model_is_converted_verified_and_searched(tmp_path: Path, zoo_onnx: Path) -> None:
    import edgecompact
    from edgecompact.pipeline import SearchSpec, run_search

    d = write_folder(tmp_path / "ds", {"train": 10, "test": 3})
    for kwargs, needle in [({"num_classes": 7}, "outputs 3 classes"), ({"in_channels": 1}, "3-channel"),
                           ({"input_size": 16}, "--input-size 12")]:
        with pytest.raises(ConfigError, match=needle):
            load_model(str(zoo_onnx), **{"num_classes": 3, "in_channels": 3, "input_size": 12, **kwargs})
    spec = SearchSpec(model=str(zoo_onnx), data=f"folder:{d}", method="uniform", budget="0.5x", input_size=12,
                      epochs=1, search_epochs=1, finetune_epochs=1, batch_size=16, final="inherit")
    report = run_search(spec, tmp_path / "run", deploy=False, log=lambda *_: None)
    assert "not trained" in report["protocol"]
    base, found = report["results"]
    assert found["mflops"] == pytest.approx(0.5 * base["mflops"], rel=0.03)
    compact = edgecompact.load_compact(tmp_path / "run")
    assert compact(torch.randn(2, 3, 12, 12)).shape == (2, 3)
