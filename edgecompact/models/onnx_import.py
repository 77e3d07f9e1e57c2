"""A user's ONNX model as an `nn.Module`: converted by the built-in converter (onnx_convert), then verified
against onnxruntime.

The converted module must reproduce onnxruntime's outputs on random inputs (one at a time and as a batch) before
anything else uses it; a file or a graph that cannot give that is refused in one line. Nothing here trains or slims.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgecompact.errors import ConfigError, DeployError
from edgecompact.models.onnx_convert import convert_onnx

TOLERANCE = 1e-4  # max |onnxruntime - torch|, times the largest |output| when that exceeds 1 (as deploy checks)
CHECK_INPUTS = 3  # random inputs the conversion is verified on


def load_onnx_model(path: Path, num_classes: int | None = None, in_channels: int = 3,
                    input_size: int | None = None) -> nn.Module:
    """The ONNX classifier at `path` (one N x C x H x W float input, one N x classes output) as an `nn.Module`
    with its trained weights, in eval mode. `input_size` None takes the graph's own fixed size."""
    path = Path(path)
    proto = _load(path)
    name, dims = _image_input(proto, path)
    n, c, h, w = dims
    if n not in (None, 1):
        raise ConfigError(f"--model {path}: input {dims} has a fixed batch of {n}; export it with batch 1 or a "
                          "dynamic batch axis")
    if c is not None and c != in_channels:
        raise ConfigError(f"--model {path}: takes {c}-channel images, the data has {in_channels}")
    if input_size is None:
        if h is None or h != w:
            raise ConfigError(f"--model {path}: input {dims} has no fixed square size; pass --input-size")
        input_size = h
    if (h, w) != (None, None) and (h, w) != (input_size, input_size):
        raise ConfigError(f"--model {path}: takes {h}x{w} images, not {input_size}x{input_size}; pass --input-size {h}")
    module = convert_onnx(proto, path, (in_channels, input_size, input_size))
    out_classes = _verify(module, path, name, dims[0], (in_channels, input_size, input_size))
    if num_classes is not None and out_classes != num_classes:
        raise ConfigError(f"--model {path}: outputs {out_classes} classes, the data has {num_classes}")
    return module


def onnx_input_size(path: Path) -> int | None:
    """The fixed square image size the ONNX model at `path` takes, or None when its H and W are not fixed."""
    h, w = _image_input(_load(Path(path)), Path(path))[1][2:]
    return h if h is not None and h == w else None


def _image_input(proto, path: Path) -> tuple[str, list[int | None]]:
    """(name, [N, C, H, W]) of the graph's one image input; None for a dynamic dimension."""
    weights = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in weights]
    if len(inputs) != 1 or len(proto.graph.output) != 1:
        raise ConfigError(f"--model {path}: expected one input and one output, found {len(inputs)} and "
                          f"{len(proto.graph.output)}")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise ConfigError(f"--model {path}: input '{inputs[0].name}' has shape {dims}, expected N x C x H x W")
    return inputs[0].name, dims


def _load(path: Path):
    from edgecompact.deploy.onnx import load_onnx

    try:
        return load_onnx(path)
    except DeployError as e:  # missing, truncated or invalid: the same one line, as the --model argument's
        raise ConfigError(f"--model {e}") from None


@torch.no_grad()
def _verify(module: nn.Module, path: Path, input_name: str, batch: int | None, shape: tuple[int, int, int]) -> int:
    """Check the converted module against onnxruntime on random inputs; returns the number of outputs (classes)."""
    from edgecompact.deploy.onnx import session

    sess = session(path)
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(CHECK_INPUTS, *shape, generator=gen)
    want = np.concatenate([sess.run(None, {input_name: xs[i:i + 1].numpy()})[0] for i in range(len(xs))]) \
        if batch == 1 else sess.run(None, {input_name: xs.numpy()})[0]
    try:
        got = torch.cat([module(xs[i:i + 1]) for i in range(len(xs))]).numpy()
        batched = module(xs).numpy()
    except Exception as e:  # noqa: BLE001 - the converted graph fails on a batch (e.g. a reshape fixed to batch 1)
        raise ConfigError(f"--model {path}: the converted model fails on a batch of {len(xs)} images "
                          f"({type(e).__name__}: {_first_line(e)}); export it with a dynamic batch axis") from None
    if want.ndim != 2 or got.shape != want.shape or batched.shape != want.shape:
        raise ConfigError(f"--model {path}: output shape {list(want.shape)} for {len(xs)} images (onnxruntime), "
                          f"{list(batched.shape)} converted; expected {len(xs)} x classes")
    allowed = TOLERANCE * max(1.0, float(np.abs(want).max()))
    diff = max(float(np.abs(got - want).max()), float(np.abs(batched - want).max()))
    if not diff <= allowed:
        raise ConfigError(f"--model {path}: the converted model differs from onnxruntime by {diff:.3g} "
                          f"(> {allowed:.3g}) on random inputs")
    return int(want.shape[1])


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:160]
