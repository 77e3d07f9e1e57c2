"""MobileNetV2 (Sandler et al. 2018): inverted residual blocks with depthwise 3x3 convs, width multiplier 1.0.

For 32x32 input (CIFAR) the first conv and the second stage use stride 1 instead of 2, so the last stage runs at
4x4 (as in the common CIFAR ports); `small_input=False` is the 224x224 original. A depthwise conv's
channels are tied to its input, which is what exercises that case of the channel structure. No training logic.
"""

from __future__ import annotations

from torch import Tensor, nn

from edgecompact.models.grammar import InvertedResidualSE, conv_bn
from edgecompact.models.registry import register_model

# (expansion t, output channels c, repeats n, first stride s) per stage, from the paper's Table 2.
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(c_out)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        layers = [_conv_bn(c_in, hidden, 1)] if expansion != 1 else []
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, c_out, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, small_input: bool, last_channels: int = 1280) -> None:
        super().__init__()
        stem_stride = 1 if small_input else 2
        blocks: list[nn.Module] = [_conv_bn(in_channels, 32, 3, stem_stride)]
        c_in = 32
        for i, (t, c, n, s) in enumerate(_STAGES):
            for b in range(n):
                stride = s if b == 0 and not (small_input and i == 1) else 1
                blocks.append(InvertedResidual(c_in, c, stride, t))
                c_in = c
        blocks.append(_conv_bn(c_in, last_channels, 1))
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(last_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.flatten(self.avgpool(self.features(x)))))


@register_model(num_classes=10, input_size=32, dataset="cifar10")
def mobilenet_v2_cifar(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    """MobileNetV2 for 32x32 input (stride 1 in the first conv and the second stage)."""
    return MobileNetV2(num_classes, in_channels, small_input=True)



class MobileNetV2SE(nn.Module):
    """A small MobileNetV2 with squeeze-excite in every inverted residual (as MobileNetV3 adds it), from
    `grammar.InvertedResidualSE`: 1x1 expand, depthwise 3x3, SE gate, 1x1 project."""

    # (output channels, stride) per block, expansion 3
    BLOCKS = ((16, 1), (24, 2), (24, 1), (32, 2), (32, 1), (64, 2), (64, 1))

    def __init__(self, num_classes: int, in_channels: int, last_channels: int = 256) -> None:
        super().__init__()
        blocks: list[nn.Module] = [conv_bn(in_channels, 16, 3)]
        c_in = 16
        for c_out, stride in self.BLOCKS:
            blocks.append(InvertedResidualSE(c_in, c_out, stride))
            c_in = c_out
        blocks.append(conv_bn(c_in, last_channels))
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(last_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.avgpool(self.features(x))))


@register_model(num_classes=10, input_size=32, dataset="cifar10")
def mobilenet_v2_se_cifar(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> nn.Module:
    """Seven SE inverted residuals (16 to 64 channels), stride 1 stem."""
    return MobileNetV2SE(num_classes, in_channels)
