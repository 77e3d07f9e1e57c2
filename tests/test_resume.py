"""Kill -9 a real training or search process, re-run the same command, and check it resumes without redoing work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _start(*args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "edgecompact.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 600) -> None:
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, f"process ended before the kill point: {proc.stderr.read()[-2000:]}"
        assert time.time() - t0 < timeout, "kill point never reached"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _history(path: Path) -> list[dict]:
    return torch.load(path, weights_only=True)["history"]["epochs"]


@pytest.mark.slow
def test_training_killed_after_an_epoch_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "train"
    args = ["train", "--model", "resnet20", "--data", "digits", "--input-size", "16", "--epochs", "3",
            "--batch-size", "64", "--out", str(out)]
    ckpt = out / "checkpoint.pt"
    proc = _start(*args)
    _kill_when(proc, lambda: ckpt.is_file())
    before = _history(ckpt)
    assert 1 <= len(before) < 3
    r = subprocess.run([sys.executable, "-m", "edgecompact.cli", *args], check=False, cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    after = _history(ckpt)
    assert [e["epoch"] for e in after] == [0, 1, 2]
    assert after[: len(before)] == before  # finished epochs were kept, not redone
    assert (out / "result.json").is_file()


@pytest.mark.slow
def test_search_killed_during_finetuning_resumes_without_retraining_the_baseline(tmp_path):
    out = tmp_path / "run"
    args = ["search", "--model", "resnet20", "--data", "digits", "--input-size", "16", "--method", "uniform",
            "--budget", "0.5x", "--epochs", "1", "--search-epochs", "0", "--finetune-epochs", "3", "--batch-size", "64",
            "--no-deploy",
            "--out", str(out)]
    ft = out / "finetune.pt"
    proc = _start(*args)
    _kill_when(proc, lambda: ft.is_file())
    baseline_mtime = (out / "baseline.pt").stat().st_mtime_ns
    before = _history(ft)
    r = subprocess.run([sys.executable, "-m", "edgecompact.cli", *args], check=False, cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "training the baseline" not in r.stderr
    assert (out / "baseline.pt").stat().st_mtime_ns == baseline_mtime
    after = _history(ft)
    assert [e["epoch"] for e in after] == [0, 1, 2]
    assert after[: len(before)] == before
    assert (out / "report.json").is_file()
