"""ResNet-50 (He et al. 2016, bottleneck blocks, stride in the 3x3 conv as in torchvision) for ImageNet 64x64.

Adapted to 64x64 input by dropping the stem's max-pool: the 7x7 stride-2 stem leaves 32x32 maps and the four
stages run at 32/16/8/4. Among the usual adaptations this one comes closest to the paper's count (2,629 MFLOPs).
Plain modules only: no training or pruning logic (blocks can drop their branch: models/blocks.py).
"""

from __future__ import annotations

from torch import Tensor, nn

from edgecompact.models.blocks import DroppableResidual, resnet_head
from edgecompact.models.registry import register_model


class Bottleneck(DroppableResidual):
    expansion = 4
    BRANCH = ("conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "conv3", "bn3")
    TAIL_BN = "bn3"

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu3 = nn.ReLU()

    def branch(self, x: Tensor) -> Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)))
        return self.bn3(self.conv3(y))

    def forward(self, x: Tensor) -> Tensor:
        return self.relu3(self.add_branch(x, self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, blocks: tuple[int, ...], num_classes: int, in_channels: int, stem_maxpool: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1) if stem_maxpool else nn.Identity()
        stages, c_in = [], 64
        for i, n in enumerate(blocks):
            width = 64 * 2**i
            layer = []
            for b in range(n):
                layer.append(Bottleneck(c_in, width, 2 if i > 0 and b == 0 else 1))
                c_in = width * Bottleneck.expansion
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        resnet_head(self, c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


@register_model(num_classes=1000, input_size=64, dataset="imagenet64")
def resnet50_imagenet64(num_classes: int = 1000, in_channels: int = 3, input_size: int = 64) -> nn.Module:
    """ResNet-50 for 64x64 input: no stem max-pool (`ResNet(..., stem_maxpool=True)` is the 224x224 original)."""
    return ResNet((3, 4, 6, 3), num_classes, in_channels, stem_maxpool=False)

