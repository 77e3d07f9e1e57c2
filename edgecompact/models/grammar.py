"""Blocks users bring (concat into depthwise, add after concat, channel shuffle, grouped convs, nested concats,
squeeze-excite, ghost modules, flatten heads) and random small CNNs drawn from a grammar of them.

They exercise the channel structure (edgecompact.structure) in tests and tools/bench_structure.py, and are the
parts the zoo's small ShuffleNetV2 (shufflenet.py), GhostNet (ghostnet.py), MobileNetV2-SE (mobilenet.py) and
DenseNet (densenet.py) are built from. Plain modules: nothing here trains, prunes or counts.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor, nn


def conv_bn(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1,
            act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(c_out)]
    if act:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ConcatDepthwise(nn.Module):
    """Two convs concatenated, then a depthwise conv over the concat (a GhostNet / Inception-lite pattern)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        half = c_out // 2
        self.a, self.b = conv_bn(c_in, half), conv_bn(c_in, c_out - half, 3)
        self.dw = conv_bn(c_out, c_out, 3, stride, groups=c_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.dw(torch.cat([self.a(x), self.b(x)], 1))


class AddAfterConcat(nn.Module):
    """cat(a(x), b(x)) + c(x): the add ties c's output channels to both parts of the concat."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        half = c_out // 2
        self.a = conv_bn(c_in, half, 3, stride, act=False)
        self.b = conv_bn(c_in, c_out - half, 1, stride, act=False)
        self.c = conv_bn(c_in, c_out, 1, stride, act=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(torch.cat([self.a(x), self.b(x)], 1) + self.c(x))


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit. Stride 1: split in halves, one half through the branch, concat, channel shuffle.
    Stride 2 (or a width change): both halves are branches of the whole input."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.split = stride == 1 and c_in == c_out
        half = c_out // 2
        c_branch = half if self.split else c_in
        self.branch = nn.Sequential(conv_bn(c_branch, half), conv_bn(half, half, 3, stride, groups=half, act=False),
                                    conv_bn(half, half))
        self.side = None if self.split else nn.Sequential(
            conv_bn(c_in, c_in, 3, stride, groups=c_in, act=False), conv_bn(c_in, c_out - half))

    def forward(self, x: Tensor) -> Tensor:
        if self.split:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat([x1, self.branch(x2)], 1)
        else:
            out = torch.cat([self.side(x), self.branch(x)], 1)
        return channel_shuffle(out, 2)


class GroupedConv(nn.Module):
    """1x1 conv, a grouped (not depthwise) 3x3 conv, 1x1 conv: a ResNeXt / ShuffleNetV1 pattern."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 2) -> None:
        super().__init__()
        mid = max(groups * 2, c_out // groups * groups)
        self.reduce = conv_bn(c_in, mid)
        self.grouped = conv_bn(mid, mid, 3, stride, groups=groups)
        self.expand = conv_bn(mid, c_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.expand(self.grouped(self.reduce(x)))


class DenseBlock(nn.Module):
    """DenseNet block: each layer (BN-ReLU-conv pre-activation) reads the concat of everything before it."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, growth: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(c_in + i * growth), nn.ReLU(), nn.Conv2d(c_in + i * growth, growth, 3,
                                                                                     padding=1, bias=False))
            for i in range(layers))
        c = c_in + layers * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c_out, 1, bias=False),
                                        nn.AvgPool2d(stride) if stride > 1 else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return self.transition(x)


class InceptionNested(nn.Module):
    """Inception-style branches whose concat is nested: cat(1x1, cat(3x3, pool-projection))."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        q = max(1, c_out // 4)
        self.b1 = conv_bn(c_in, c_out - 3 * q, 1, stride)
        self.b3 = nn.Sequential(conv_bn(c_in, q), conv_bn(q, 2 * q, 3, stride))
        self.pool = nn.MaxPool2d(3, stride, 1)
        self.proj = conv_bn(c_in, q)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b1(x), torch.cat([self.b3(x), self.proj(self.pool(x))], 1)], 1)


class SqueezeExcite(nn.Module):
    """Squeeze-excite: pooled features, two 1x1 convs (or linears), a sigmoid gate multiplying the map."""

    def __init__(self, channels: int, reduction: int = 4, linear: bool = False) -> None:
        super().__init__()
        hidden = max(2, channels // reduction)
        self.linear = linear
        if linear:
            self.fc1, self.fc2 = nn.Linear(channels, hidden), nn.Linear(hidden, channels)
        else:
            self.fc1, self.fc2 = nn.Conv2d(channels, hidden, 1), nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3), keepdim=not self.linear)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        return x * (s.view(s.shape[0], -1, 1, 1) if self.linear else s)


class InvertedResidualSE(nn.Module):
    """MobileNetV2 inverted residual (1x1 expand, depthwise, SE, 1x1 project; residual when shapes allow)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, expansion: int = 3, linear_se: bool = False) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.expand = conv_bn(c_in, hidden)
        self.dw = conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.se = SqueezeExcite(hidden, linear=linear_se)
        self.project = conv_bn(hidden, c_out, act=False)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class GhostModule(nn.Module):
    """GhostNet's ghost module: a primary conv, a cheap depthwise conv of it, both concatenated (then cut to size)."""

    def __init__(self, c_in: int, c_out: int, act: bool = True) -> None:
        super().__init__()
        self.c_out = c_out
        primary = (c_out + 1) // 2
        self.primary = conv_bn(c_in, primary, act=act)
        self.cheap = conv_bn(primary, primary, 3, groups=primary, act=act)

    def forward(self, x: Tensor) -> Tensor:
        y = self.primary(x)
        return torch.cat([y, self.cheap(y)], 1)[:, :self.c_out]


class GhostBottleneck(nn.Module):
    """GhostNet bottleneck: ghost expand, (depthwise stride 2), SE, ghost project, plus a shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, expansion: int = 2, se: bool = True) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.ghost1 = GhostModule(c_in, hidden)
        self.dw = conv_bn(hidden, hidden, 3, stride, groups=hidden, act=False) if stride > 1 else nn.Identity()
        self.se = SqueezeExcite(hidden) if se else nn.Identity()
        self.ghost2 = GhostModule(hidden, c_out, act=False)
        if stride == 1 and c_in == c_out:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(conv_bn(c_in, c_in, 3, stride, groups=c_in, act=False),
                                          conv_bn(c_in, c_out, act=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.ghost2(self.se(self.dw(self.ghost1(x)))) + self.shortcut(x)


class Residual(nn.Module):
    """A plain residual pair of 3x3 convs (the trunk ties across blocks through the add)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(c_in, c_out, 3, stride), conv_bn(c_out, c_out, 3, act=False))
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else conv_bn(c_in, c_out, 1, stride, act=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class PoolHead(nn.Module):
    """Global pooling, then a linear classifier; or a 1x1 conv on the pooled map, flatten, linear."""

    def __init__(self, c_in: int, num_classes: int, conv: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, 2 * c_in, 1) if conv else None
        self.fc = nn.Linear(2 * c_in if conv else c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        if self.conv is not None:
            x = torch.relu(self.conv(x))
        return self.fc(x.flatten(1))


class FlattenHead(nn.Module):
    """Flatten the C x H x W map into a hidden linear (and a 1x1 conv on the flattened vector), then classify."""

    def __init__(self, c_in: int, hw: int, num_classes: int, hidden: int = 16, conv: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c_in * hw * hw, hidden)
        self.conv = nn.Conv2d(hidden, hidden, 1) if conv else None
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.fc1(x.flatten(1)))
        if self.conv is not None:
            x = torch.relu(self.conv(x.view(x.shape[0], -1, 1, 1))).flatten(1)
        return self.fc2(x)


class StagedNet(nn.Module):
    """stem -> blocks -> 1x1 conv to `last_channels` -> global pool -> linear: the frame of the zoo's small nets."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], c_in: int, num_classes: int,
                 last_channels: int = 256) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.Sequential(*blocks)
        self.last = conv_bn(c_in, last_channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(last_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.avgpool(self.last(self.blocks(self.stem(x))))))


BLOCKS = ("concat_dw", "add_after_concat", "shuffle", "grouped", "dense", "inception", "se", "ghost", "residual")


def make_block(kind: str, c_in: int, c_out: int, stride: int, rng: random.Random) -> nn.Module:
    if kind == "concat_dw":
        return ConcatDepthwise(c_in, c_out, stride)
    if kind == "add_after_concat":
        return AddAfterConcat(c_in, c_out, stride)
    if kind == "shuffle":
        return ShuffleUnit(c_in, c_out, stride)
    if kind == "grouped":
        return GroupedConv(c_in, c_out, stride, groups=rng.choice((2, 4)))
    if kind == "dense":
        return DenseBlock(c_in, c_out, stride, growth=rng.choice((2, 4)), layers=rng.choice((1, 2)))
    if kind == "inception":
        return InceptionNested(c_in, c_out, stride)
    if kind == "se":
        return InvertedResidualSE(c_in, c_out, stride, expansion=rng.choice((2, 3)), linear_se=rng.random() < 0.5)
    if kind == "ghost":
        return GhostBottleneck(c_in, c_out, stride, se=rng.random() < 0.5)
    if kind == "residual":
        return Residual(c_in, c_out, stride)
    raise ValueError(f"unknown block kind {kind!r}")


class GrammarNet(nn.Module):
    def __init__(self, stem: nn.Module, blocks: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.stem, self.blocks, self.head = stem, nn.Sequential(*blocks), head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


def random_net(seed: int, in_channels: int = 3, input_size: int = 8, num_classes: int = 5,
               kinds: tuple[str, ...] = BLOCKS) -> tuple[GrammarNet, list[str]]:
    """A random net: stem conv, 2-4 blocks of the grammar (widths multiples of 4, one stride 2), a head.

    Returns the net and the kinds of its blocks and head, in order.
    """
    rng = random.Random(seed)
    width = rng.choice((8, 12, 16))
    stem = conv_bn(in_channels, width, 3)
    blocks, drawn = [], []
    n = rng.randint(2, 4)
    down = rng.randrange(n)
    for i in range(n):
        kind = rng.choice(kinds)
        c_out = width if rng.random() < 0.5 else rng.choice((8, 12, 16, 20))
        stride = 2 if i == down else 1
        blocks.append(make_block(kind, width, c_out, stride, rng))
        drawn.append(kind)
        width = c_out
    head_kind = rng.choice(("pool", "pool_conv", "flatten", "flatten_conv"))
    if head_kind.startswith("pool"):
        head: nn.Module = PoolHead(width, num_classes, conv=head_kind == "pool_conv")
    else:
        probe = nn.Sequential(stem, *blocks).eval()
        with torch.no_grad():
            hw = probe(torch.zeros(1, in_channels, input_size, input_size)).shape[-1]
        head = FlattenHead(width, hw, num_classes, conv=head_kind == "flatten_conv")
    drawn.append(head_kind)
    return GrammarNet(stem, blocks, head), drawn
