"""The command line: one-line errors for user mistakes, and the search command end to end on digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "edgecompact.cli", *args], check=False, capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout, env=env)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("args,needles", [
    (["flops", "resnet999"], ["unknown model", "resnet999"]),
    (["flops", "nofile.py:make"], ["nofile.py"]),
    (["search", "--model", "resnet20", "--method", "magic", "--no-deploy"], ["--method", "magic"]),
    (["search", "--model", "resnet20", "--method", "uniform", "--target", "toaster", "--no-deploy"],
     ["unknown target", "toaster"]),
    (["search", "--model", "resnet20", "--method", "uniform", "--budget", "2x", "--no-deploy"], ["--budget"]),
    (["search", "--model", "resnet20", "--method", "uniform", "--budget", "0x", "--no-deploy"], ["--budget"]),
    (["train", "--model", "resnet20", "--data", "cifar10:/no/such/dir", "--out", "/tmp/x"], ["/no/such/dir"]),
    (["train", "--model", "resnet20", "--data", "imagenet1k:/x", "--out", "/tmp/x"], ["imagenet1k"]),
    (["report", "/no/such/run"], ["/no/such/run"]),
    (["search", "--model", "resnet20", "--method", "uniform", "--no-deploy", "--out", "/proc/edgecompact-run"],
     ["--out", "/proc/edgecompact-run"]),
    (["train", "--model", "resnet20", "--out", "/proc/edgecompact-train"], ["--out", "/proc/edgecompact-train"]),
    (["search", "--model", "resnet20", "--method", "uniform", "--budget", "0.01x", "--channel-multiple", "16",
      "--no-deploy", "--out", "/tmp/edgecompact-unreachable"], ["unreachable"]),
    (["export", "/tmp", "--target", "host"], ["not a run directory"]),
    (["search", "--model", "resnet20", "--method", "uniform", "--target", "rpi4", "--rpc", "nonsense"],
     ["--rpc", "nonsense"]),
    (["flops", "inception_v3_imagenet64", "--input-size", "8"], ["too small", "inception_v3_imagenet64"]),
    (["search", "--model", "resnet20", "--method", "uniform", "--distill", "1.5", "--no-deploy"], ["--distill 1.5"]),
])
def test_user_mistakes_get_one_line_and_nonzero_exit(args, needles):
    assert_one_line_error(run_cli(*args), *needles)


def test_unknown_metric_is_rejected_by_argparse():
    r = run_cli("search", "--model", "resnet20", "--method", "uniform", "--metric", "joules")
    assert r.returncode == 2 and "joules" in r.stderr and "Traceback" not in r.stderr


def test_flops_of_a_user_model_file(tmp_path):
    f = tmp_path / "mynet.py"
    f.write_text("from torch import nn\n"
                 "def make(num_classes=10):\n"
                 "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),\n"
                 "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))\n")
    r = run_cli("flops", f"{f}:make", "--input-size", "16", "--groups")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["mflops"] == pytest.approx(2 * (3 * 9 * 8 * 16 * 16 + 8 * 10) / 1e6, abs=1e-3)
    assert out["groups"] == {"0": 8}


@pytest.mark.slow
def test_search_on_digits_writes_a_run_directory_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "run"
    args = ["search", "--model", "resnet20", "--data", "digits", "--input-size", "16", "--method", "uniform",
            "--budget", "0.5x", "--epochs", "2", "--search-epochs", "1", "--finetune-epochs", "1",
            "--no-deploy", "--out", str(out)]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("config.json", "arch.json", "compact.pt", "structure.json", "report.json", "report.md"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    names = [rec["name"] for rec in report["results"]]
    assert names == ["baseline", "uniform"]
    rec = report["results"][1]
    assert abs(rec["budget"]["error_pct"]) <= 2.0
    assert rec["mflops"] == pytest.approx(0.5 * report["results"][0]["mflops"], rel=0.021)
    # the same command again resumes (nothing retrained) and a different one is refused without --force
    r2 = run_cli(*args)
    assert r2.returncode == 0 and "already finished" in r2.stderr
    other = [a if a != "0.5x" else "0.4x" for a in args]
    r3 = run_cli(*other)
    assert_one_line_error(r3, "--out", "--force")
    assert json.loads((out / "config.json").read_text())["budget"] == "0.5x"  # nothing was touched
    r4 = run_cli(*other, "--force")
    assert r4.returncode == 0, r4.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["budget"] == "0.4x"
