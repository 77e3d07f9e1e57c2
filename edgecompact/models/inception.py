"""InceptionV3 (Szegedy et al. 2016; module layout and widths as in torchvision, no auxiliary head).

For 64x64 input (ImageNet64) the stem downsamples 4x less: Conv2d_1a has stride 1, the stem's 3x3 convs pad
by 1 and the second max-pool is dropped, so the Inception blocks run at 31/15/7 (35/17/8 for 299x299). Of the
stem adaptations tried this one comes closest to the paper's 7,515.7 MFLOPs. Branches join with torch.cat
and every conv is Conv-BN-ReLU (nn.ReLU modules), so torch-pruning traces it. No training or pruning logic.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from edgecompact.errors import ConfigError
from edgecompact.models.registry import register_model

# The smallest input the 64x64 variant's strides and unpadded convs accept (75 for the 299x299 original).
MIN_SIZE_64 = 15


class BasicConv2d(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False),
                         nn.BatchNorm2d(c_out, eps=0.001), nn.ReLU())


class _Branches(nn.Module):
    """Runs every branch on the same input and concatenates their outputs along channels."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([branch(x) for branch in self.children()], 1)


class InceptionA(_Branches):
    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5 = nn.Sequential(BasicConv2d(c_in, 48, 1), BasicConv2d(48, 64, 5, padding=2))
        self.branch3x3dbl = nn.Sequential(BasicConv2d(c_in, 64, 1), BasicConv2d(64, 96, 3, padding=1),
                                          BasicConv2d(96, 96, 3, padding=1))
        self.branch_pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), BasicConv2d(c_in, pool_features, 1))


class InceptionB(_Branches):
    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl = nn.Sequential(BasicConv2d(c_in, 64, 1), BasicConv2d(64, 96, 3, padding=1),
                                          BasicConv2d(96, 96, 3, stride=2))
        self.branch_pool = nn.MaxPool2d(3, 2)


class InceptionC(_Branches):
    def __init__(self, c_in: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7 = nn.Sequential(BasicConv2d(c_in, c7, 1), BasicConv2d(c7, c7, (1, 7), padding=(0, 3)),
                                       BasicConv2d(c7, 192, (7, 1), padding=(3, 0)))
        self.branch7x7dbl = nn.Sequential(
            BasicConv2d(c_in, c7, 1), BasicConv2d(c7, c7, (7, 1), padding=(3, 0)),
            BasicConv2d(c7, c7, (1, 7), padding=(0, 3)), BasicConv2d(c7, c7, (7, 1), padding=(3, 0)),
            BasicConv2d(c7, 192, (1, 7), padding=(0, 3)))
        self.branch_pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), BasicConv2d(c_in, 192, 1))


class InceptionD(_Branches):
    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = nn.Sequential(BasicConv2d(c_in, 192, 1), BasicConv2d(192, 320, 3, stride=2))
        self.branch7x7x3 = nn.Sequential(
            BasicConv2d(c_in, 192, 1), BasicConv2d(192, 192, (1, 7), padding=(0, 3)),
            BasicConv2d(192, 192, (7, 1), padding=(3, 0)), BasicConv2d(192, 192, 3, stride=2))
        self.branch_pool = nn.MaxPool2d(3, 2)


class _Split(_Branches):
    """1x3 and 3x1 convs side by side on one input (InceptionE's expanded filter bank)."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.conv_1x3 = BasicConv2d(c_in, 384, (1, 3), padding=(0, 1))
        self.conv_3x1 = BasicConv2d(c_in, 384, (3, 1), padding=(1, 0))


class InceptionE(_Branches):
    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3 = nn.Sequential(BasicConv2d(c_in, 384, 1), _Split(384))
        self.branch3x3dbl = nn.Sequential(BasicConv2d(c_in, 448, 1), BasicConv2d(448, 384, 3, padding=1),
                                          _Split(384))
        self.branch_pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), BasicConv2d(c_in, 192, 1))


class InceptionV3(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, small_input: bool) -> None:
        super().__init__()
        pad = 1 if small_input else 0
        self.Conv2d_1a_3x3 = BasicConv2d(in_channels, 32, 3, stride=1 if small_input else 2, padding=pad)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, padding=pad)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.maxpool1 = nn.MaxPool2d(3, 2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, padding=pad)
        self.maxpool2: nn.Module = nn.Identity() if small_input else nn.MaxPool2d(3, 2)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for m in self.children():
            x = m(x)
        return x


def _check_size(input_size: int, minimum: int, name: str) -> None:
    if input_size < minimum:
        raise ConfigError(f"input_size {input_size} too small for {name} (at least {minimum})")


@register_model(num_classes=1000, input_size=64, dataset="imagenet64")
def inception_v3_imagenet64(num_classes: int = 1000, in_channels: int = 3, input_size: int = 64) -> nn.Module:
    """InceptionV3 for 64x64 input: stride-1 first conv, padded stem convs, no second max-pool."""
    _check_size(input_size, MIN_SIZE_64, "inception_v3_imagenet64")
    return InceptionV3(num_classes, in_channels, small_input=True)

