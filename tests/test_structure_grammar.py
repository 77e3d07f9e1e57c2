"""Any CNN a user brings: every block of the grammar (models/grammar.py) is analyzed and slimmed exactly.

Each net is checked at a random keep: slim equals mask, counted FLOPs equal torch's FlopCounterMode, params match,
the slimmed net exports to ONNX and runs the same under onnxruntime, and the coupled channels agree with
torch-pruning's DependencyGraph. tools/bench_structure.py runs the same checks on a longer sweep.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from edgecompact.errors import ConfigError
from edgecompact.models.grammar import (
    BLOCKS,
    GrammarNet,
    PoolHead,
    ShuffleUnit,
    StagedNet,
    conv_bn,
    make_block,
    random_net,
)
from edgecompact.structure import analyze
from edgecompact.structure_check import check_net

# torch-pruning couples fewer channels here: it does not tie a grouped conv's groups, keeps one path of a conv
# written into both halves of a concat (a ghost module), and lets a split or channel shuffle change width
COARSER_THAN_TORCH_PRUNING = {"grouped", "shuffle", "ghost"}
GRAMMAR_SEEDS = range(20)


def _passes(result: dict) -> bool:
    return all(v for k, v in result.items() if isinstance(v, bool)) and result["torch_pruning"] != "differs"


@pytest.mark.parametrize("kind", BLOCKS)
def test_every_block_kind_slims_exactly_and_agrees_with_torch_pruning(kind):
    rng = random.Random(0)
    net = GrammarNet(conv_bn(3, 8, 3), [make_block(kind, 8, 8, 2, rng), make_block(kind, 8, 12, 1, rng)],
                     PoolHead(12, 5))
    result = check_net(net, (3, 8, 8))
    assert _passes(result), result
    assert result["torch_pruning"] == ("coarser" if kind in COARSER_THAN_TORCH_PRUNING else "same")


def test_concat_feeding_a_depthwise_conv_splits_it_into_the_concat_groups():
    rng = random.Random(0)
    net = GrammarNet(conv_bn(3, 8, 3), [make_block("concat_dw", 8, 8, 1, rng)], PoolHead(8, 5))
    st = analyze(net, (3, 8, 8))
    dw = {layer.name: layer for layer in st.layers}["blocks.0.dw.0"]
    assert dw.out_parts == dw.in_parts == ["blocks.0.a.0", "blocks.0.b.0"]


def test_channels_through_a_split_and_shuffle_keep_their_width_and_the_branch_is_searched():
    rng = random.Random(0)
    net = GrammarNet(conv_bn(3, 8, 3), [make_block("shuffle", 8, 8, 1, rng)], PoolHead(8, 5))
    st = analyze(net, (3, 8, 8))
    assert st.groups == {"blocks.0.branch.0.0": 4}  # the stem's channels pass the chunk and shuffle: fixed


@pytest.mark.parametrize("units", [3, 4, 8])
def test_channel_split_units_in_a_row_are_analyzed_and_agree_with_torch_pruning(units):
    """ShuffleNetV2 stages: torch-pruning 1.6.1 divides by zero behind three split units in a row and its index sets
    grow without end behind four, unless its splits get their traced sizes and channel shuffles are not mapped as
    flattens (structure.dependency_graph)."""
    net = StagedNet(conv_bn(3, 16, 3), [ShuffleUnit(16, 24, 2), *(ShuffleUnit(24, 24) for _ in range(units))], 24, 5)
    result = check_net(net, (3, 8, 8))
    assert _passes(result), result
    assert result["torch_pruning"] == "coarser"  # the channels passing split and shuffle are kept fixed here
    # the stem, the head's 1x1 conv and each unit's inner branch width (the stride-2 unit's too): nothing else moves
    assert result["groups"] == 3 + units


def test_grouped_conv_is_pruned_in_whole_groups():
    net = GrammarNet(conv_bn(3, 8, 3), [make_block("grouped", 8, 8, 1, random.Random(0))], PoolHead(8, 5))
    st = analyze(net, (3, 8, 8))
    grouped = {layer.name: layer for layer in st.layers}["blocks.0.grouped.0"]
    assert st.groups[grouped.out_parts[0]] == grouped.groups
    assert grouped.out_multiplier == [grouped.out_channels // grouped.groups]


@pytest.mark.parametrize("seed", GRAMMAR_SEEDS)
def test_random_net_of_the_grammar_is_analyzed_and_slimmed_exactly(seed):
    net, kinds = random_net(seed)
    result = check_net(net, (3, 8, 8), seed)
    assert _passes(result), (kinds, result)


def test_a_shared_module_is_refused_in_one_line_naming_it():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 3, 3, padding=1), nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.conv(self.conv(x)).mean((2, 3)))

    with pytest.raises(ConfigError, match="module 'conv' is called 2 times") as err:
        analyze(Shared(), (3, 8, 8), "shared")
    assert "\n" not in str(err.value)


def test_analysis_does_not_change_torch_default_grad_mode():
    analyze(random_net(0)[0], (3, 8, 8))
    assert torch.is_grad_enabled()
