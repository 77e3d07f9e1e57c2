"""GhostNet for 32x32 inputs (Han et al. 2020), built from `grammar.GhostBottleneck`: ghost modules (a primary
1x1 conv and a cheap depthwise conv of it, concatenated), squeeze-excite in the later stages, shortcuts."""

from __future__ import annotations

from torch import Tensor, nn

from edgecompact.models.grammar import GhostBottleneck, conv_bn
from edgecompact.models.registry import register_model

# (output channels, stride, squeeze-excite) per bottleneck; GhostNet's first stages at CIFAR scale
_BLOCKS = ((16, 1, False), (24, 2, False), (24, 1, False), (40, 2, True), (40, 1, True), (80, 2, False),
           (80, 1, True))


class GhostNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, last_channels: int = 256) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = 16
        for c_out, stride, se in _BLOCKS:
            blocks.append(GhostBottleneck(c_in, c_out, stride, se=se))
            c_in = c_out
        self.stem = conv_bn(in_channels, 16, 3)
        self.blocks = nn.Sequential(*blocks)
        self.last = conv_bn(c_in, last_channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(last_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.avgpool(self.last(self.blocks(self.stem(x))))))


@register_model(num_classes=10, input_size=32, dataset="cifar10")
def ghostnet_cifar(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    """Seven ghost bottlenecks (16 to 80 channels, SE in three), stride 1 stem."""
    return GhostNet(num_classes, in_channels)
