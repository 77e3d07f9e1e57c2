"""Target TOML files: every shipped target loads and builds a TVM target; bad files name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgecompact.errors import ConfigError
from edgecompact.targets import TARGETS_DIR, Target, get_target, list_targets, load_target_file

GOOD = """\
name = "{name}"
description = "a test board"
tvm_target = {{ kind = "llvm", mtriple = "aarch64-linux-gnu" }}
cross_compiler = "aarch64-linux-gnu-gcc"
rpc_key = "board"
peak_gflops = 10.0
peak_gbps = 2.0

[constraints]
channel_multiple = 4
precision = "fp16"
"""


def _write(tmp_path: Path, text: str, name: str = "board") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text.format(name=name) if "{name}" in text else text)
    return path


def test_shipped_targets_load_and_build_tvm_targets():
    from edgecompact.deploy.tvm import tvm_target

    names = list_targets()
    assert {"host", "rpi4", "mali-g52"} <= set(names)
    for name in names:
        target = get_target(name)
        assert target.name == name and target.peak_gflops > 0 and target.peak_gbps > 0
        tgt = tvm_target(target)  # TVM itself accepts the tag or dict
        assert tgt.kind.name in ("llvm", "opencl")
        if target.cross_compiler:
            assert (tgt.host or tgt).attrs["mtriple"].startswith("aarch64")


def test_good_file_fields_are_read(tmp_path):
    target = load_target_file(_write(tmp_path, GOOD))
    assert (target.channel_multiple, target.precision, target.rpc_key) == (4, "fp16", "board")
    assert target.tvm_target == {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}
    assert get_target(str(tmp_path / "board.toml")) == target
    assert target.runtime == "tvm"  # the default when the key is absent
    ort = load_target_file(_write(tmp_path, GOOD.replace("[constraints]", 'runtime = "onnxruntime"\n[constraints]')))
    assert ort.runtime == "onnxruntime" and ort.to_dict()["runtime"] == "onnxruntime"
    assert Target(**ort.to_dict()) == ort  # deploy manifests rebuild targets from to_dict
    assert get_target("host").runtime == "onnxruntime"


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda t: "flops_per_watt = 3\n" + t, "flops_per_watt"),
        (lambda t: t.replace('rpc_key = "board"', 'rpc_key = "board"\nrpc_keys = "x"'), "rpc_keys"),
        (lambda t: t + "bits = 8\n", "constraints.bits"),
    ],
)
def test_unknown_key_names_file_and_key(tmp_path, edit, key):
    path = _write(tmp_path, edit(GOOD))
    with pytest.raises(ConfigError, match=rf"board\.toml: unknown key '{key}'"):
        load_target_file(path)


@pytest.mark.parametrize("key", ["description", "tvm_target", "peak_gbps"])
def test_missing_key_names_file_and_key(tmp_path, key):
    text = "\n".join(line for line in GOOD.splitlines() if not line.startswith(f"{key} ="))
    with pytest.raises(ConfigError, match=rf"board\.toml: missing key '{key}'"):
        load_target_file(_write(tmp_path, text))


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("peak_gflops = 10.0", 'peak_gflops = "fast"', "peak_gflops"),
        ('rpc_key = "board"', "rpc_key = 3", "rpc_key"),
        ("peak_gbps = 2.0", "peak_gbps = true", "peak_gbps"),
        ("channel_multiple = 4", "channel_multiple = 2.5", "constraints.channel_multiple"),
        ('precision = "fp16"', 'precision = "bf16"', "constraints.precision"),
        ('rpc_key = "board"', 'rpc_key = "board"\nruntime = "tflite"', "runtime"),
        ('rpc_key = "board"', 'rpc_key = "board"\nruntime = 1', "runtime"),
        ("peak_gbps = 2.0", "peak_gbps = 0", "peak_gbps"),
    ],
)
def test_bad_value_names_file_and_key(tmp_path, old, new, key):
    with pytest.raises(ConfigError, match=rf"board\.toml: key '{key}'"):
        load_target_file(_write(tmp_path, GOOD.replace(old, new)))


def test_malformed_toml_and_name_mismatch_and_unknown_target(tmp_path):
    with pytest.raises(ConfigError, match=r"board\.toml: malformed TOML"):
        load_target_file(_write(tmp_path, "name = [unclosed"))
    with pytest.raises(ConfigError, match=r"other\.toml: key 'name' is 'board'"):
        load_target_file(_write(tmp_path, GOOD.format(name="board"), name="other"))
    with pytest.raises(ConfigError, match=r"unknown target 'nope' \(known: .*host"):
        get_target("nope")
    assert TARGETS_DIR.is_dir()
