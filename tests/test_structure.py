"""Channel structure: groups found by tracing, slimmed models equal the channel-masked originals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgecompact.errors import ConfigError
from edgecompact.models import create_model, list_models, model_defaults
from edgecompact.structure import ArchSpec, analyze, mask, round_width, slim
from edgecompact.structure_check import randomize_bn


def _random_keep(groups: dict[str, int], seed: int, frac: float = 0.5) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(seed)
    return {k: sorted(torch.randperm(v, generator=g)[: max(1, int(v * frac))].tolist()) for k, v in groups.items()}


class ConcatDepthwiseNet(nn.Module):
    """Concat, depthwise conv, residual add and a linear reading a flattened C x H x W map."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.a, self.b, self.bb = nn.Conv2d(8, 6, 1), nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.pw = nn.Conv2d(10, 12, 1, bias=False)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.pw2, self.pbn = nn.Conv2d(12, 8, 1), nn.BatchNorm2d(8)
        self.pool, self.relu = nn.MaxPool2d(4), nn.ReLU()
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 12), nn.Linear(12, 5)

    def forward(self, x):
        x = self.relu(self.bn(self.stem(x)))
        y = torch.cat([self.a(x), self.relu(self.bb(self.b(x)))], 1)
        y = self.relu(self.dw(self.relu(self.pw(y))))
        z = self.pool(self.pbn(self.pw2(y)) + x).flatten(1)
        return self.fc2(self.relu(self.fc1(z)))


def test_groups_follow_residual_concat_depthwise_and_flatten():
    st = analyze(ConcatDepthwiseNet(), (3, 16, 16))
    assert st.groups == {"stem": 8, "a": 6, "b": 4, "pw": 12, "fc1": 12}
    layers = {layer.name: layer for layer in st.layers}
    assert layers["pw2"].out_group == "stem"  # tied to the stem through the residual add
    assert layers["pw"].in_parts == ["a", "b"]  # concat order
    assert layers["dw"].depthwise and layers["dw"].in_parts == ["pw"]
    assert layers["fc1"].in_parts == ["stem"] and layers["fc1"].in_multiplier == [16]
    assert layers["fc2"].out_group is None


def test_slim_keeps_outputs_of_kept_channels_on_custom_net():
    model = randomize_bn(ConcatDepthwiseNet())
    st = analyze(model, (3, 16, 16))
    keep = _random_keep(st.groups, 1)
    x = torch.randn(4, 3, 16, 16)
    small = slim(model, st, keep)
    assert torch.allclose(small(x), mask(model, st, keep)(x), atol=1e-5)
    assert small.fc1.in_features == len(keep["stem"]) * 16


def _zoo_setting(name: str) -> tuple[nn.Module, tuple[int, int, int]]:
    d = model_defaults(name)
    size = min(d.input_size, 64)
    model = create_model(name, num_classes=d.num_classes, in_channels=3, input_size=size)
    return model, (3, size, size)


@pytest.mark.parametrize("name", list_models())
def test_slim_matches_masked_original_on_every_zoo_model(name):
    from edgecompact.cost.flops import arch_flops, arch_params, module_flops, module_params

    torch.manual_seed(0)
    model, shape = _zoo_setting(name)
    model = randomize_bn(model)
    st = analyze(model, shape, name)
    keep = _random_keep(st.groups, 2, frac=0.6)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        small = slim(model, st, keep).eval()
        ref = mask(model, st, keep)(x)
        out = small(x)
    scale = ref.abs().max().clamp_min(1.0)
    assert (out - ref).abs().max() / scale < 1e-5
    widths = {g: len(v) for g, v in keep.items()}
    assert module_flops(small, shape) == arch_flops(st, widths)
    assert module_params(small) == arch_params(st, widths)


def test_round_width_respects_multiple_and_bounds():
    assert round_width(13, 8, 64) == 16
    assert round_width(0.1, 8, 64) == 8
    assert round_width(70, 8, 64) == 64
    assert round_width(5, 8, 6) == 6  # a group narrower than the multiple keeps its width
    assert round_width(30, 8, 30) == 24  # never above the largest multiple under the baseline width


def test_archspec_json_roundtrip_and_bad_file(tmp_path):
    a = ArchSpec("resnet20", {"g": 3}, {"g": [0, 2, 5]})
    a.save(tmp_path / "arch.json")
    assert ArchSpec.load(tmp_path / "arch.json") == a
    (tmp_path / "bad.json").write_text("{\"model\": 1")
    with pytest.raises(ConfigError, match="bad.json"):
        ArchSpec.load(tmp_path / "bad.json")


def test_model_that_cannot_take_the_input_size_is_a_config_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(ConfigError, match="cannot take input shape"):
        analyze(model, (3, 16, 16), "tiny")
