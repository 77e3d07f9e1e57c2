"""GhostNet for 32x32 inputs (Han et al. 2020), built from `grammar.GhostBottleneck`: ghost modules (a primary
1x1 conv and a cheap depthwise conv of it, concatenated), squeeze-excite in the later stages, shortcuts."""

from __future__ import annotations

from torch import nn

from edgecompact.models.grammar import GhostBottleneck, StagedNet, conv_bn
from edgecompact.models.registry import register_model

# (output channels, stride, squeeze-excite) per bottleneck; GhostNet's first stages at CIFAR scale
_BLOCKS = ((16, 1, False), (24, 2, False), (24, 1, False), (40, 2, True), (40, 1, True), (80, 2, False),
           (80, 1, True))


@register_model(num_classes=10, input_size=32, dataset="cifar10")
def ghostnet_cifar(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    """Seven ghost bottlenecks (16 to 80 channels, SE in three), stride 1 stem, 1x1 conv to 256, pool, linear."""
    blocks: list[nn.Module] = []
    c_in = 16
    for c_out, stride, se in _BLOCKS:
        blocks.append(GhostBottleneck(c_in, c_out, stride, se=se))
        c_in = c_out
    return StagedNet(conv_bn(in_channels, 16, 3), blocks, c_in, num_classes)
