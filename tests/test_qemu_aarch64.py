"""The Raspberry Pi artifact works: its board runner, emulated by qemu-user, matches onnxruntime and torch here.

Skipped only where qemu-aarch64 is missing; the aarch64 Python comes from tools/setup-aarch64-sysroot.sh.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch

from edgecompact.deploy import onnx as eonnx
from edgecompact.deploy.artifact import export_artifact
from edgecompact.deploy.qemu import qemu_python_cmd
from edgecompact.errors import DeployError
from edgecompact.models import create_model
from edgecompact.targets import get_target

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("qemu-aarch64") is None, reason="needs qemu-aarch64 (apt qemu-user)")]
SHAPE = (1, 3, 16, 16)


@pytest.fixture(scope="module")
def resnet20() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20", input_size=SHAPE[-1]).eval()


@pytest.fixture(scope="module")
def rpi4_artifact(resnet20, tmp_path_factory):
    out = tmp_path_factory.mktemp("rpi4")
    export_artifact(resnet20, SHAPE, get_target("rpi4"), out)
    return out


@pytest.fixture(scope="module")
def board_runner() -> list[str]:
    """The emulated `python -m edgecompact.run`; fails (before any export) where the sysroot is missing."""
    try:
        return qemu_python_cmd("-m", "edgecompact.run")
    except DeployError as e:
        pytest.fail(f"qemu-aarch64 is installed but the aarch64 Python is not: {e}")


def _run(cmd: list[str], *args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([*cmd, *args], capture_output=True, text=True, check=False, timeout=600, cwd=cwd)


def test_emulated_board_runner_matches_onnxruntime_and_torch(board_runner, rpi4_artifact, resnet20, tmp_path):
    x = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = _run(board_runner, str(rpi4_artifact), "--input", "x.npy", "--output", "y.npy", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    y = np.load(tmp_path / "y.npy")
    assert np.abs(y - eonnx.run_onnx(rpi4_artifact / "model.onnx", x)).max() <= 1e-4
    with torch.no_grad():
        assert np.abs(y - resnet20(torch.from_numpy(x)).numpy()).max() <= 1e-4


def test_emulated_board_runner_refuses_mismatched_input_shape_with_one_line(board_runner, rpi4_artifact, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), np.float32))
    proc = _run(board_runner, str(rpi4_artifact), "--input", "x.npy", cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "[1, 3, 16, 16]" in lines[0] and "x.npy" in lines[0], proc.stderr
