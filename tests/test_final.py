"""The final training of a found network: inherit, scratch, or the better of both on the validation split."""

from __future__ import annotations

import pytest
import torch

from edgecompact.methods import run_method
from edgecompact.methods.base import reinitialize
from edgecompact.train import TrainConfig, evaluate


@pytest.mark.slow
def test_best_keeps_the_network_with_the_higher_validation_top1(make_context, digits16, tmp_path):
    ctx = make_context("1/3x", final="best", run_dir=tmp_path,
                       scratch=TrainConfig(epochs=2, lr=0.05, batch_size=64, progress=False))
    result = run_method("group-lasso", ctx)
    val = result.metrics["final_val_top1"]
    assert set(val) == {"inherit", "scratch"}
    assert result.metrics["final"] == max(val, key=lambda k: (val[k], k == "inherit"))
    # the delivered model is the chosen one: its validation top-1 is the one recorded for that choice
    assert evaluate(result.model, digits16.val) == pytest.approx(val[result.metrics["final"]], abs=0.01)
    assert result.history[-1] == {"final": result.metrics["final"], "val_top1": val}
    assert (tmp_path / "finetune.pt").is_file() and (tmp_path / "scratch.pt").is_file()  # both ran, resumable


def test_unknown_final_training_is_refused_in_one_line(make_context):
    from edgecompact.errors import ConfigError

    with pytest.raises(ConfigError, match="--final sometimes"):
        run_method("uniform", make_context("1/3x", final="sometimes"))


def test_reinitialize_is_seeded_and_forgets_trained_weights(trained_resnet20):
    import copy

    a = reinitialize(copy.deepcopy(trained_resnet20), seed=3)
    b = reinitialize(copy.deepcopy(trained_resnet20), seed=3)
    for (name, p), q, t in zip(a.state_dict().items(), b.state_dict().values(), trained_resnet20.state_dict().values()):
        assert torch.equal(p, q), name
    conv = a.conv1.weight
    assert not torch.equal(conv, trained_resnet20.conv1.weight)
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert conv.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.35)  # Kaiming normal, fan_out
    bn = a.bn1
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.running_var, torch.ones_like(bn.running_var))
