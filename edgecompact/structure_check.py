"""Checks that the channel structure of a net is right: slim equals mask, counted FLOPs equal torch's, the slimmed
net exports to ONNX unchanged, and the coupled groups agree with torch-pruning's DependencyGraph.

Used by the structure tests and tools/bench_structure.py on nets drawn from models/grammar.py. Nothing here
changes the structure or searches.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgecompact.cost.flops import arch_flops, arch_params, module_params
from edgecompact.structure import (
    Structure,
    _output_layers,
    analyze,
    dependency_graph,
    mask,
    part_slices,
    slim,
)

_BN = (nn.BatchNorm2d, nn.BatchNorm1d)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine terms (eval mode), so that a wrongly kept channel shows in the output."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, _BN):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def random_keep(structure: Structure, seed: int, frac: float = 0.5) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(seed)
    return {k: sorted(torch.randperm(v, generator=g)[: max(1, int(v * frac))].tolist())
            for k, v in structure.groups.items()}


def torch_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, *input_shape))
    return counter.get_total_flops()


def channel_classes(structure: Structure) -> set[frozenset[tuple[str, int]]]:
    """Coupled channels: per channel of each group, the (layer, output channel) pairs of every conv/linear/BN that
    carry it."""
    out: dict[tuple[str, int], set[tuple[str, int]]] = {}
    for layer in structure.layers:
        for g, pos, width, mult in part_slices(layer.out_parts, layer.out_multiplier, structure.groups):
            for c in range(width):
                out.setdefault((g, c), set()).update((layer.name, pos + c * mult + r) for r in range(mult))
    return {frozenset(v) for v in out.values()}


def torch_pruning_classes(model: nn.Module, input_shape: tuple[int, ...]) -> set[frozenset[tuple[str, int]]]:
    """The same from torch-pruning's groups of the net (classifier ignored): pairs sharing a root index."""
    model.eval()
    names = {m: n for n, m in model.named_modules()}
    example = torch.randn(1, *input_shape)
    fixed = _output_layers(model, example)
    dg = dependency_graph(model, example)  # every concat mapped (torch-pruning 1.6.1 leaves some out)
    out = []
    for group in dg.get_all_groups(ignored_layers=fixed, root_module_types=(nn.Conv2d, nn.Linear)):
        classes: dict[int, set[tuple[str, int]]] = {}
        for item in group.items:
            mod = item.dep.target.module
            if isinstance(mod, (nn.Conv2d, nn.Linear, *_BN)) and dg.is_out_channel_pruning_fn(item.dep.handler):
                for i, r in zip(item.idxs, item.root_idxs):
                    classes.setdefault(int(r), set()).add((names[mod], int(i)))
        out.extend(frozenset(v) for v in classes.values())
    return set(out)


def compare_with_torch_pruning(model: nn.Module, structure: Structure) -> str:
    """"same": every channel is coupled to the same channels as in torch-pruning's groups, and the groups hold as
    many channels; "coarser": each of torch-pruning's coupled sets lies inside one of ours (whole groups of a grouped
    conv, a conv written into both halves of a concat) or is kept fixed (through a split or a channel shuffle, whose
    sizes the forward code fixes); "differs" otherwise."""
    ours = channel_classes(structure)
    theirs = torch_pruning_classes(model, structure.input_shape)
    if ours == theirs:
        return "same"
    owner = {x: i for i, e in enumerate(ours) for x in e}
    if all(len({owner.get(x) for x in e}) == 1 for e in theirs):
        return "coarser"
    return "differs"


def check_net(model: nn.Module, input_shape: tuple[int, ...], seed: int = 0, onnx: bool = True,
              tolerance: float = 1e-5) -> dict:
    """Every check on one net at a random keep: a dict of booleans (and the torch-pruning comparison).

    Raises what `analyze` raises (a ConfigError for an unsupported net).
    """
    model = randomize_bn(model, seed)
    structure = analyze(model, input_shape)
    keep = random_keep(structure, seed + 1)
    widths = {g: len(v) for g, v in keep.items()}
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        small = slim(model, structure, keep).eval()
        ref, out = mask(model, structure, keep)(x), small(x)
    scale = float(ref.abs().max().clamp_min(1.0))
    result = {
        "groups": len(structure.groups),
        "slim_equals_mask": float((out - ref).abs().max()) / scale < tolerance,
        "flops_equal_torch": torch_flops(small, input_shape) == arch_flops(structure, widths),
        "params_equal": module_params(small) == arch_params(structure, widths),
        "torch_pruning": compare_with_torch_pruning(model, structure),
    }
    if onnx:
        from edgecompact.deploy.onnx import export_onnx
        from edgecompact.errors import DeployError

        with tempfile.TemporaryDirectory() as tmp:
            try:
                export_onnx(small, input_shape, Path(tmp) / "small.onnx")
                result["onnx_equals_torch"] = True
            except DeployError:
                result["onnx_equals_torch"] = False
    return result
