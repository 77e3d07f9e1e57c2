"""ShuffleNetV2 for 32x32 inputs (Ma et al. 2018), built from `grammar.ShuffleUnit`: channel split, a branch of
1x1 - depthwise 3x3 - 1x1, concat and channel shuffle; stride-2 units branch the whole input."""

from __future__ import annotations

from torch import nn

from edgecompact.models.grammar import ShuffleUnit, StagedNet, conv_bn
from edgecompact.models.registry import register_model

# (output channels, units) per stage: ShuffleNetV2 0.5x (Ma et al. 2018, table 5)
_STAGES = ((48, 4), (96, 8), (192, 4))


@register_model(num_classes=10, input_size=32, dataset="cifar10")
def shufflenet_v2_cifar(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    """ShuffleNetV2 0.5x (48/96/192 channels, 4/8/4 units), stride 1 stem, 1x1 conv to 256, pool, linear."""
    units: list[nn.Module] = []
    c_in = 24
    for i, (c_out, n) in enumerate(_STAGES):
        for u in range(n):
            units.append(ShuffleUnit(c_in, c_out, 2 if u == 0 and i > 0 else 1))
            c_in = c_out
    return StagedNet(conv_bn(in_channels, 24, 3), units, c_in, num_classes)
