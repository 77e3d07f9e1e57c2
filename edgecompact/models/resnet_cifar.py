"""CIFAR-style ResNets (He et al. 2016, sec. 4.2): 3x3 stem, three stages of 16/32/64 basic blocks, 6n+2 layers.

ResNet-20/32/56/110 and the paper's CIFAR-100 "ResNet-50" (n = 8: a 6n+2 basic-block net, the only CIFAR
ResNet-50 reading whose counts come close to the paper's). Where a stage changes width, the shortcut is a
projection conv + BN (option B) rather than option A's zero padding, which torch-pruning cannot trace; the
`shortcut="conv3x3"` variant uses a 3x3 projection. Plain modules only: no training or
pruning logic (blocks can drop their branch: models/blocks.py).
"""

from __future__ import annotations

from torch import Tensor, nn

from edgecompact.errors import ConfigError
from edgecompact.models.blocks import DroppableResidual, resnet_head
from edgecompact.models.registry import register_model

SHORTCUTS = ("conv1x1", "conv3x3")


class BasicBlock(DroppableResidual):
    BRANCH = ("conv1", "bn1", "relu1", "conv2", "bn2")
    TAIL_BN = "bn2"

    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            k = 1 if shortcut == "conv1x1" else 3
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out))
        self.relu2 = nn.ReLU()

    def branch(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))

    def forward(self, x: Tensor) -> Tensor:
        return self.relu2(self.add_branch(x, self.shortcut(x)))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_channels: int, shortcut: str = "conv1x1",
                 widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if shortcut not in SHORTCUTS:
            raise ConfigError(f"shortcut '{shortcut}' unknown (known: {', '.join(SHORTCUTS)})")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages, c_in = [], widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(c_in, w, 2 if i > 0 and b == 0 else 1, shortcut))
                c_in = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        resnet_head(self, c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


# input_size is part of every factory's interface; global pooling makes these nets size-agnostic.
@register_model(num_classes=10, input_size=32, dataset="cifar10")
def resnet20(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, shortcut: str = "conv1x1") -> nn.Module:
    return CifarResNet(20, num_classes, in_channels, shortcut)


@register_model(num_classes=10, input_size=32, dataset="cifar10")
def resnet32(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, shortcut: str = "conv1x1") -> nn.Module:
    return CifarResNet(32, num_classes, in_channels, shortcut)


@register_model(num_classes=10, input_size=32, dataset="cifar10")
def resnet56(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, shortcut: str = "conv1x1") -> nn.Module:
    return CifarResNet(56, num_classes, in_channels, shortcut)


@register_model(num_classes=10, input_size=32, dataset="cifar10")
def resnet110(num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
              shortcut: str = "conv1x1") -> nn.Module:
    return CifarResNet(110, num_classes, in_channels, shortcut)


@register_model(num_classes=100, input_size=32, dataset="cifar100")
def resnet50_cifar(num_classes: int = 100, in_channels: int = 3, input_size: int = 32,
                   shortcut: str = "conv1x1") -> nn.Module:
    """The paper's CIFAR-100 "ResNet-50": 6n+2 basic blocks with n = 8 (0.76 M params, 223 MFLOPs)."""
    return CifarResNet(50, num_classes, in_channels, shortcut)
