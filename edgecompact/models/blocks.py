"""Depth pruning support shared by the zoo's residual blocks.

A residual block computes `relu(branch(x) + shortcut(x))`. When every channel inside the branch is removed,
the branch's output no longer depends on `x`: it is its last BatchNorm applied to zeros, a per-channel constant.
`drop_branch` replaces the branch by that constant (`ChannelBias`), so a block whose inner channel group has width
0 becomes `relu(shortcut(x) + c)`: the block's convolutions disappear from the graph (depth pruning, as in SSL's
layer removal and MorphNet's dead-block removal). A block opts in by defining `BRANCH` (its branch's attribute
names), `TAIL_BN` (the branch's last BatchNorm) and calling `branch_output` in its forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def resnet_head(model: nn.Module, channels: int, num_classes: int) -> None:
    """Pool, flatten and classify (`avgpool`, `flatten`, `fc`), then He-initialise every conv (fan-out, ReLU): the
    end of the zoo's ResNets."""
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.flatten = nn.Flatten()
    model.fc = nn.Linear(channels, num_classes)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class ChannelBias(nn.Module):
    """Adds a learnable per-channel constant: what a removed residual branch leaves behind."""

    def __init__(self, bias: Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone().reshape(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias


class DroppableResidual(nn.Module):
    """Mixin for residual blocks whose branch can be removed; see the module docstring."""

    BRANCH: tuple[str, ...] = ()
    TAIL_BN: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.branch_bias: ChannelBias | None = None

    @property
    def dropped(self) -> bool:
        return self.branch_bias is not None

    def branch(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def add_branch(self, x: Tensor, residual: Tensor) -> Tensor:
        """`branch(x) + residual`, or `residual + c` once the branch is dropped."""
        if self.branch_bias is not None:
            return self.branch_bias(residual)
        return self.branch(x) + residual

    @torch.no_grad()
    def drop_branch(self) -> None:
        """Replace the branch by its (eval-mode) output on a zero input, a per-channel constant."""
        if self.dropped:
            return
        bn = getattr(self, self.TAIL_BN)
        assert isinstance(bn, nn.BatchNorm2d)
        const = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
        for name in self.BRANCH:
            delattr(self, name)
        self.branch_bias = ChannelBias(const)
