"""FLOPs and params: our counts against torch's own FlopCounterMode, from modules and from widths alone."""

import random

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgecompact.cost.flops import arch_flops, arch_params, module_flops, module_params
from edgecompact.errors import ConfigError
from edgecompact.models import create_model, list_models, model_defaults
from edgecompact.structure import analyze, keep_from_scores, slim

torch.set_num_threads(1)

_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _zoo(name):
    d = model_defaults(name)
    return create_model(name).eval(), (d.in_channels, d.input_size, d.input_size)


def _torch_conv_linear_flops(model, shape):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(1, *shape))
    counts = counter.get_flop_counts()["Global"]
    ops = {str(op).split(".")[1] for op in counts}
    assert ops <= {"convolution", "addmm", "mm"}, ops  # nothing else in these nets carries FLOPs
    return sum(counts.values())


def _learned_values(model):
    """Params read from the state dict (a different route than .parameters()): everything but BN statistics."""
    return sum(v.numel() for k, v in model.state_dict().items() if not k.endswith(_BN_BUFFERS))


@pytest.mark.parametrize("name", list_models())
def test_module_counts_equal_flop_counter_and_state_dict(name):
    model, shape = _zoo(name)
    assert module_flops(model, shape) == _torch_conv_linear_flops(model, shape)
    assert module_params(model) == _learned_values(model)


@pytest.mark.parametrize("name", list_models())
def test_arch_counts_at_baseline_widths_equal_module_counts(name):
    model, shape = _zoo(name)
    structure = analyze(model, shape, name)
    assert arch_flops(structure, structure.groups) == module_flops(model, shape)
    assert arch_params(structure, structure.groups) == module_params(model)


@pytest.mark.parametrize("name,size", [("resnet20", 32), ("mobilenet_v2_cifar", 32),
                                       ("inception_v3_imagenet64", 32)])
def test_arch_counts_at_random_widths_equal_the_slimmed_model(name, size):
    model = create_model(name, num_classes=10, input_size=size).eval()
    shape = (3, size, size)
    structure = analyze(model, shape, name)
    rng = random.Random(0)
    widths = {g: rng.randint(1, w) for g, w in structure.groups.items()}
    small = slim(model, structure, keep_from_scores(structure, widths))
    assert arch_flops(structure, widths) == _torch_conv_linear_flops(small, shape) == module_flops(small, shape)
    assert arch_params(structure, widths) == module_params(small)
    assert arch_flops(structure, widths) < module_flops(model, shape)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        x = self.conv(self.conv(x))
        return self.fc(x.mean((2, 3)))


def test_a_layer_called_twice_counts_twice_and_training_mode_is_restored():
    model = _Shared().train()
    assert module_flops(model, (3, 8, 8)) == _torch_conv_linear_flops(model, (3, 8, 8))
    assert model.training
    assert module_params(model) == 3 * 3 * 9 + 3 + 3 * 2 + 2


def test_transposed_conv_is_refused_by_name():
    model = nn.Sequential(nn.ConvTranspose2d(3, 3, 2))
    with pytest.raises(ConfigError, match="'0'.*ConvTranspose2d"):
        module_flops(model, (3, 4, 4))
