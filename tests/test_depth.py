"""Depth pruning: a residual block whose inner groups keep no channel is removed, and everything agrees on it."""

from __future__ import annotations

import onnx
import pytest
import torch

from edgecompact.budget import fit_to_budget, min_widths
from edgecompact.cost.flops import arch_flops, arch_params
from edgecompact.cost.latency import LatencyTable
from edgecompact.cost.roofline import roofline_table
from edgecompact.deploy.onnx import export_onnx
from edgecompact.errors import ConfigError
from edgecompact.models import create_model
from edgecompact.structure import analyze, check_widths, keep_from_scores, mask, slim, widths_of
from edgecompact.structure_check import randomize_bn as _randomize_bn
from edgecompact.structure_check import torch_flops
from edgecompact.targets import get_target

CASES = [("resnet20", (3, 16, 16)), ("resnet50_imagenet64", (3, 32, 32))]


def _drop(structure, widths: dict[str, int], blocks: list[str]) -> dict[str, int]:
    out = dict(widths)
    for b in blocks:
        for g in structure.blocks()[b]:
            out[g] = 0
    return out


@pytest.mark.parametrize(("name", "shape"), CASES)
def test_removed_blocks_match_the_masked_model_flops_and_params(name, shape):
    torch.manual_seed(0)
    model = _randomize_bn(create_model(name, input_size=shape[1]))
    structure = analyze(model, shape, name, drop_blocks=True)
    blocks = list(structure.blocks())
    assert blocks and all(b.count(".") == 1 for b in blocks)  # layerN.i: the residual blocks, nothing else
    widths = _drop(structure, {g: max(1, n // 2) for g, n in structure.groups.items()}, blocks[::2])
    check_widths(structure, widths)
    keep = keep_from_scores(structure, widths)
    slimmed, masked = slim(model, structure, keep).eval(), mask(model, structure, keep).eval()
    x = torch.randn(3, *shape)
    with torch.no_grad():
        assert torch.allclose(slimmed(x), masked(x), atol=1e-5)
    assert all(not hasattr(dict(slimmed.named_modules())[b], "conv1") for b in blocks[::2])
    assert arch_flops(structure, widths) == torch_flops(slimmed, shape)
    assert arch_params(structure, widths) == sum(p.numel() for p in slimmed.parameters())


def test_a_removed_block_leaves_no_conv_in_the_onnx_graph(tmp_path):
    model = _randomize_bn(create_model("resnet20", input_size=16))
    structure = analyze(model, (3, 16, 16), "resnet20", drop_blocks=True)
    widths = _drop(structure, structure.baseline_widths(), ["layer1.1", "layer3.2"])
    slimmed = slim(model, structure, keep_from_scores(structure, widths))
    export_onnx(slimmed, (1, 3, 16, 16), tmp_path / "m.onnx")  # checks onnxruntime against torch itself
    convs = sum(n.op_type == "Conv" for n in onnx.load(tmp_path / "m.onnx").graph.node)
    assert convs == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) - 4


def test_slimming_a_network_with_a_removed_block_again_matches_the_mask():
    """GenSynth compacts progressively: the constant a removed branch left must follow later slimming."""
    model = _randomize_bn(create_model("resnet20", input_size=16), seed=1)
    structure = analyze(model, (3, 16, 16), "resnet20", drop_blocks=True)
    first = keep_from_scores(structure, _drop(structure, structure.baseline_widths(), ["layer2.1"]))
    once = slim(model, structure, first)
    current = analyze(model, (3, 16, 16), "resnet20", drop_blocks=True)
    current.groups = widths_of(first)
    g = torch.Generator().manual_seed(0)
    rel = {k: sorted(torch.randperm(len(v), generator=g)[: (len(v) + 1) // 2].tolist()) for k, v in first.items()}
    twice = slim(once, current, rel).eval()
    total = {k: [first[k][i] for i in rel[k]] for k in first}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(twice(x), mask(model, structure, total).eval()(x), atol=1e-5)


def test_widths_zero_only_where_a_block_can_go():
    model = create_model("resnet50_imagenet64", input_size=32)
    plain = analyze(model, (3, 32, 32), "r50")
    deep = analyze(model, (3, 32, 32), "r50", drop_blocks=True)
    assert not plain.droppable
    block, inner = next(iter(deep.blocks().items()))
    assert len(inner) == 2  # a bottleneck's 1x1 and 3x3 groups
    with pytest.raises(ConfigError, match="outside"):
        check_widths(plain, dict(plain.groups, **{inner[0]: 0}))
    with pytest.raises(ConfigError, match="must all be 0"):
        check_widths(deep, dict(deep.groups, **{inner[0]: 0}))
    with pytest.raises(ConfigError, match="outside"):
        check_widths(deep, dict(deep.groups, conv1=0))  # the stem feeds every block of stage 1
    check_widths(deep, _drop(deep, deep.groups, [block]))
    assert min(min_widths(plain).values()) >= 1 and min(min_widths(deep).values()) == 0


def test_fit_to_budget_removes_the_block_whose_channels_score_lowest():
    model = create_model("resnet20", input_size=16)
    structure = analyze(model, (3, 16, 16), "resnet20", drop_blocks=True)
    g = torch.Generator().manual_seed(0)
    scores = {k: torch.rand(n, generator=g) + 1.0 for k, n in structure.groups.items()}
    scores["layer2.1.conv1"] = torch.rand(32, generator=g) * 0.1  # this block is useless
    full = arch_flops(structure, structure.baseline_widths())
    def cost(w: dict[str, int]) -> float:
        return arch_flops(structure, w)

    keep = fit_to_budget(structure, scores, cost, 0.8 * full, 0.02, multiple=8)
    widths = widths_of(keep)
    assert structure.dropped_blocks(widths) == ["layer2.1"]
    assert abs(cost(widths) / (0.8 * full) - 1) <= 0.02
    check_widths(structure, widths, channel_multiple=8)
    plain = analyze(model, (3, 16, 16), "resnet20")
    assert min(widths_of(fit_to_budget(plain, scores, lambda w: arch_flops(plain, w), 0.8 * full, 0.02, 8))
               .values()) >= 8


def test_a_removed_block_costs_no_predicted_latency():
    model = create_model("resnet20", input_size=16)
    structure = analyze(model, (3, 16, 16), "resnet20", drop_blocks=True)
    table: LatencyTable = roofline_table(structure, get_target("host"))
    widths = structure.baseline_widths()
    dropped = _drop(structure, widths, ["layer1.0"])
    saved = table.predict(structure, widths, corrected=False) - table.predict(structure, dropped, corrected=False)
    convs = [la for la in structure.layers if la.name in ("layer1.0.conv1", "layer1.0.conv2")]
    want = sum(table.layer_ms(la, c_in, c_out) for la, c_in, c_out in structure.channels(widths) if la in convs)
    assert saved == pytest.approx(want, rel=1e-9) and want > 0
