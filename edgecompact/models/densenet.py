"""DenseNet-BC-style net for 32x32 inputs (Huang et al. 2017), built from `grammar.DenseBlock`: each layer
(BN-ReLU-conv 3x3) reads the concat of everything before it; a BN-ReLU-1x1 transition (and 2x2 average pooling)
closes each block."""

from __future__ import annotations

from torch import Tensor, nn

from edgecompact.models.grammar import DenseBlock
from edgecompact.models.registry import register_model

# (transition output channels, stride) per dense block; growth 12, 4 layers each
_BLOCKS = ((48, 2), (96, 2), (128, 1))


class DenseNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, growth: int = 12, layers: int = 4) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = 2 * growth
        for c_out, stride in _BLOCKS:
            blocks.append(DenseBlock(c_in, c_out, stride, growth=growth, layers=layers))
            c_in = c_out
        self.stem = nn.Conv2d(in_channels, 2 * growth, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.avgpool(self.relu(self.bn(self.blocks(self.stem(x)))))))


@register_model(num_classes=10, input_size=32, dataset="cifar10")
def densenet_cifar(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    """Three dense blocks of 4 layers (growth 12), transitions to 48/96/128 channels."""
    return DenseNet(num_classes, in_channels)
