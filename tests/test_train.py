"""Training: learning happens, checkpoints resume exactly, DDP equals one process, distillation runs."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgecompact.errors import ConfigError
from edgecompact.train import TrainConfig, evaluate, load_checkpoint, train

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import tiny_setup


def test_training_learns_digits(trained_resnet20, digits16):
    assert evaluate(trained_resnet20, digits16.val) > 80.0  # chance is 10%


def test_evaluate_matches_manual_count():
    model, data, _ = tiny_setup()
    x, y = data.tensors
    with torch.no_grad():
        manual = 100.0 * (model.eval()(x).argmax(1) == y).float().mean().item()
    assert evaluate(model, data, batch_size=7) == pytest.approx(manual)


def test_resume_from_checkpoint_gives_the_same_weights(tmp_path):
    model, data, cfg = tiny_setup()
    cfg.shuffle = True
    straight = copy.deepcopy(model)
    train(straight, data, cfg)
    ckpt = tmp_path / "ckpt.pt"
    train_one_epoch_then_stop(copy.deepcopy(model), data, cfg, ckpt)
    resumed = copy.deepcopy(model)  # a fresh process would rebuild the model, then resume from the checkpoint
    train(resumed, data, cfg, checkpoint=ckpt)
    assert load_checkpoint(ckpt)["epoch"] == cfg.epochs - 1
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def train_one_epoch_then_stop(model, data, cfg, ckpt):
    """Simulate a kill after the first epoch: a run whose loop is interrupted once epoch 0 is saved."""

    class Stop(Exception):
        pass

    calls = {"n": 0}
    steps = len(data) // cfg.batch_size

    def after(_m):
        calls["n"] += 1
        if calls["n"] == steps + 1:  # first step of epoch 1: epoch 0's checkpoint is on disk
            raise Stop

    with pytest.raises(Stop):
        train(model, data, cfg, checkpoint=ckpt, after_step=after)
    assert load_checkpoint(ckpt)["epoch"] == 0


def test_checkpoint_carrying_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    bad = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, bad)
    with pytest.raises(ConfigError, match="evil.pt"):
        load_checkpoint(bad)
    assert not (tmp_path / "pwned").exists()


def test_distillation_runs_and_lowers_loss():
    model, data, cfg = tiny_setup()
    teacher = copy.deepcopy(model)
    train(teacher, data, cfg)
    student = copy.deepcopy(model)
    hist = train(student, data, TrainConfig(**{**cfg.__dict__, "distill_alpha": 0.7, "epochs": 3}), teacher=teacher)
    losses = [e["loss"] for e in hist["epochs"]]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_equals_one_process(tmp_path):
    out = tmp_path / "ddp.pt"
    # the workers run a script from tests/: they import this checkout's package (installed or not)
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(Path(__file__).parent / "ddp_worker.py"), str(out)],
                       check=False, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    model, data, cfg = tiny_setup()
    train(model, data, cfg)
    ddp_state = torch.load(out, weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, ddp_state[k], atol=1e-5), k
