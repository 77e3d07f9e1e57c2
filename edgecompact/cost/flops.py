"""FLOPs and parameter counts: the project's one FLOPs convention, counted from a module or from widths.

Convention: FLOPs = 2 x multiply-accumulates of convolution and linear layers, at batch 1. Bias adds,
BatchNorm, activations, residual adds and pooling count 0 (none of these terms makes the paper's baseline
figures match, see README). This is exactly what `torch.utils.flop_counter.FlopCounterMode` counts for
conv and linear layers, and the tests hold us to it. Params = every learned tensor (conv/linear weights and
biases, BatchNorm affine), not BatchNorm running statistics. Nothing here builds or trains models.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgecompact.errors import ConfigError
from edgecompact.structure import Layer, Structure


def _conv_flops(m: nn.modules.conv._ConvNd, out: torch.Tensor) -> int:
    return 2 * out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)


def module_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass of `model` on one input of `input_shape` (C, H, W), counted by forward hooks.

    Sees conv and linear layers called as modules (each call counts); functional `F.conv2d` / matmul calls
    inside a user's forward are not seen.
    """
    total = 0

    def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Linear):
            total += 2 * out.numel() * m.in_features
        else:
            total += _conv_flops(m, out)

    names = {m: n for n, m in model.named_modules()}
    handles = []
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            raise ConfigError(f"layer '{names[m]}' ({type(m).__name__}): transposed convs are not counted")
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            handles.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def module_params(model: nn.Module) -> int:
    """Number of learned values: every parameter tensor (shared tensors once); buffers are not counted."""
    return sum(p.numel() for p in model.parameters())


def _conv_groups(layer: Layer, c_out: int) -> int:
    """A grouped (or depthwise) conv loses whole groups: its groups shrink with its output channels."""
    return layer.groups * c_out // layer.out_channels if layer.groups > 1 else 1


def layer_flops(layer: Layer, c_in: int, c_out: int) -> int:
    """FLOPs of one structure layer with `c_in` input and `c_out` output channels (a depthwise conv has one
    group per channel; a grouped conv keeps its channels per group)."""
    if layer.op == "conv2d":
        if not c_in or not c_out:  # removed with its residual block
            return 0
        oh, ow = layer.out_hw
        kh, kw = layer.kernel
        return 2 * (c_in // _conv_groups(layer, c_out)) * c_out * kh * kw * oh * ow
    if layer.op == "linear":
        return 2 * c_in * c_out
    if layer.op == "batchnorm":
        return 0
    raise ValueError(f"unknown layer op {layer.op!r} in {layer.name}")


def layer_params(layer: Layer, c_in: int, c_out: int) -> int:
    """Learned values of one structure layer at these widths (BatchNorm: weight and bias when affine)."""
    bias = c_out if layer.bias else 0
    if layer.op == "conv2d":
        if not c_in or not c_out:
            return 0
        kh, kw = layer.kernel
        return (c_in // _conv_groups(layer, c_out)) * c_out * kh * kw + bias
    if layer.op == "linear":
        return c_in * c_out + bias
    if layer.op == "batchnorm":
        return 2 * c_out if layer.bias else 0
    raise ValueError(f"unknown layer op {layer.op!r} in {layer.name}")


def arch_flops(structure: Structure, widths: dict[str, int]) -> int:
    """FLOPs of the architecture `structure` takes at these group widths, without building it."""
    return sum(layer_flops(layer, c_in, c_out) for layer, c_in, c_out in structure.channels(widths))


def arch_params(structure: Structure, widths: dict[str, int]) -> int:
    """Parameters of the architecture `structure` takes at these group widths, without building it.

    A removed residual block keeps one constant per output channel in place of the BatchNorm that followed the
    branch's last conv (now reading no channel)."""
    total, prev_empty = 0, False
    for layer, c_in, c_out in structure.channels(widths):
        if layer.op == "batchnorm" and prev_empty:
            total += c_out
        else:
            total += layer_params(layer, c_in, c_out)
        prev_empty = layer.op == "conv2d" and c_in == 0 and c_out > 0
    return total
