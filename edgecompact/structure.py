"""Channel structure of a CNN: coupled channel groups, ArchSpec, masking and slimming.

Groups are found once by tracing (torch-pruning's DependencyGraph, which follows residual adds, concats and
depthwise convs); every search method scores or sizes these groups and never re-derives them. `slim` is the one
place that physically removes channels. Nothing here trains or scores channels.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from edgecompact.errors import BudgetError, ConfigError
from edgecompact.storage import write_text_atomic

_PARAM_TYPES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)


@dataclass
class Layer:
    """One parametrized layer of the baseline, in forward order."""

    name: str
    op: str  # "conv2d" | "linear" | "batchnorm"
    kernel: tuple[int, int]
    stride: tuple[int, int]
    depthwise: bool
    groups: int
    bias: bool
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    in_parts: list[str | int]  # concatenated input channel sources: a group name or a fixed channel count
    out_group: str | None  # None: fixed output channels (the classifier)
    out_channels: int
    # per in_part, input features per channel (> 1 when a linear layer reads a flattened C x H x W map)
    in_multiplier: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.in_multiplier:
            self.in_multiplier = [1] * len(self.in_parts)


@dataclass
class Structure:
    """The searchable structure of a baseline: group widths and every layer's channel sources."""

    model_name: str
    input_shape: tuple[int, int, int]
    groups: dict[str, int]
    layers: list[Layer]
    # depth pruning: group -> residual block it lies inside; these groups may take width 0 (the block's branch
    # is then removed). Empty unless `analyze(..., drop_blocks=True)`.
    droppable: dict[str, str] = field(default_factory=dict)

    def channels(self, widths: dict[str, int]) -> list[tuple[Layer, int, int]]:
        """(layer, c_in, c_out) of every layer when each group has the given width."""
        out = []
        for layer in self.layers:
            c_in = sum(
                (widths[p] if isinstance(p, str) else p) * m for p, m in zip(layer.in_parts, layer.in_multiplier)
            )
            c_out = widths[layer.out_group] if layer.out_group is not None else layer.out_channels
            out.append((layer, c_in, c_out))
        return out

    def baseline_widths(self) -> dict[str, int]:
        return dict(self.groups)

    def to_dict(self) -> dict:
        return {"model_name": self.model_name, "input_shape": list(self.input_shape), "groups": self.groups,
                "layers": [asdict(layer) for layer in self.layers], "droppable": self.droppable}

    @classmethod
    def from_dict(cls, d: dict) -> Structure:
        layers = []
        for raw in d["layers"]:
            raw = dict(raw)
            for key in ("kernel", "stride", "in_hw", "out_hw"):
                raw[key] = tuple(raw[key])
            layers.append(Layer(**raw))
        return cls(d["model_name"], tuple(d["input_shape"]), dict(d["groups"]), layers, dict(d.get("droppable", {})))

    def blocks(self) -> dict[str, list[str]]:
        """Droppable residual block -> the groups inside it."""
        out: dict[str, list[str]] = {}
        for g, block in self.droppable.items():
            out.setdefault(block, []).append(g)
        return out

    def min_width(self, group: str) -> int:
        """0 for a group whose block may be removed, else 1."""
        return 0 if group in self.droppable else 1

    def apply_drops(self, widths: dict[str, int]) -> dict[str, int]:
        """`widths` with every group of a block set to 0 once any group of that block is 0 (the block is gone)."""
        out = dict(widths)
        for groups in self.blocks().values():
            if any(out[g] == 0 for g in groups):
                for g in groups:
                    out[g] = 0
        return out

    def dropped_blocks(self, widths: dict[str, int]) -> list[str]:
        return [b for b, groups in self.blocks().items() if all(widths[g] == 0 for g in groups)]


@dataclass
class ArchSpec:
    """A compact architecture: a width per group of `model`, plus which baseline channels were kept."""

    model: str
    widths: dict[str, int]
    keep: dict[str, list[int]] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "arch.json") -> ArchSpec:
        try:
            d = json.loads(text)
            return cls(model=str(d["model"]), widths={k: int(v) for k, v in d["widths"].items()},
                       keep=None if d.get("keep") is None else {k: [int(i) for i in v] for k, v in d["keep"].items()})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{source}: not a valid ArchSpec ({type(e).__name__}: {e})") from None

    def save(self, path: Path) -> None:
        write_text_atomic(Path(path), self.to_json())

    @classmethod
    def load(cls, path: Path) -> ArchSpec:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: file not found")
        return cls.from_json(path.read_text(), str(path))


def _output_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """Conv/linear layers whose output is the model's output (their output channels are fixed)."""
    outputs: dict[int, nn.Module] = {}
    order: list[nn.Module] = []

    def hook(mod, _inp, out):
        outputs[id(out)] = mod
        order.append(mod)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        y = model(example)
    finally:
        for h in handles:
            h.remove()
    if id(y) in outputs:
        return [outputs[id(y)]]
    return order[-1:]


def analyze(model: nn.Module, input_shape: tuple[int, int, int], model_name: str = "model",
            drop_blocks: bool = False) -> Structure:
    """Trace `model` on one input of `input_shape` (C, H, W) and return its channel groups and layers.

    With `drop_blocks`, groups lying wholly inside a residual block that can drop its branch (models/blocks.py)
    are marked droppable: the search may then give them width 0 and remove the block's convolutions.
    """
    input_shape = tuple(int(s) for s in input_shape)
    example = torch.randn(1, *input_shape)
    was_training = model.training
    model.eval()
    try:
        names = {m: n for n, m in model.named_modules()}
        shapes: dict[nn.Module, tuple[tuple, tuple]] = {}
        calls: dict[nn.Module, int] = {}

        def hook(mod, inp, out):
            calls[mod] = calls.get(mod, 0) + 1
            shapes[mod] = (tuple(inp[0].shape), tuple(out.shape))

        handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _PARAM_TYPES)]
        try:
            with torch.no_grad():
                model(example)
        except RuntimeError as e:
            raise ConfigError(f"model '{model_name}' cannot take input shape {list(input_shape)}: "
                              f"{str(e).splitlines()[0]}") from None
        finally:
            for h in handles:
                h.remove()
        for m, n in calls.items():
            if n > 1:
                raise ConfigError(f"model '{model_name}': module '{names[m]}' is called {n} times per forward; "
                                  "shared layers are not supported")
        _check_supported(model, names, model_name)
        fixed = _output_layers(model, example)
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
        order = [m for m in model.modules() if m in shapes]
        names_to_mod = {n: m for m, n in names.items()}
        rank = {m: i for i, m in enumerate(order)}
        groups: dict[str, int] = {}
        out_group: dict[nn.Module, str] = {}
        in_slices: dict[nn.Module, list[tuple[int, int, str]]] = {}  # (first idx, count, group)
        for group in dg.get_all_groups(ignored_layers=fixed, root_module_types=(nn.Conv2d, nn.Linear)):
            outs, ins = [], []
            for item in group.items:
                mod, fn = item.dep.target.module, item.dep.handler
                idxs = sorted(int(i) for i in item.idxs)
                if mod not in shapes:
                    continue
                if dg.is_out_channel_pruning_fn(fn):
                    outs.append((mod, idxs))
                else:
                    ins.append((mod, idxs))
            params = [m for m, _ in outs if not isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d))]
            root = min(params or [m for m, _ in outs], key=lambda m: rank[m])
            name = names[root]
            width = len(next(i for m, i in outs if m is root))
            partial = [m for m, i in outs if len(i) != width]
            if partial:
                raise ConfigError(f"model '{model_name}': layer '{names[partial[0]]}' feeds a concat that is "
                                  "coupled again (depthwise conv or residual add after a concat): not supported")
            groups[name] = width
            for mod, _ in outs:
                out_group[mod] = name
            for mod, idxs in ins:
                if _is_depthwise(mod):
                    continue
                if idxs != list(range(idxs[0], idxs[0] + len(idxs))) or len(idxs) % width:
                    raise ConfigError(f"model '{model_name}': layer '{names[mod]}' reads group '{name}' through a "
                                      "channel permutation edgecompact cannot slim")
                in_slices.setdefault(mod, []).append((idxs[0], len(idxs), name))
        groups = dict(sorted(groups.items(), key=lambda kv: rank[names_to_mod[kv[0]]]))
        layers = [_make_layer(m, names[m], shapes[m], out_group.get(m), in_slices.get(m, []), groups) for m in order]
    finally:
        model.train(was_training)
    structure = Structure(model_name=model_name, input_shape=input_shape, groups=groups, layers=layers)
    if drop_blocks:
        structure.droppable = droppable_groups(model, structure)
    return structure


def droppable_groups(model: nn.Module, structure: Structure) -> dict[str, str]:
    """Group -> name of the droppable residual block that produces and consumes it, and nothing outside it."""
    blocks = [n for n, m in model.named_modules() if callable(getattr(m, "drop_branch", None)) and n]
    touching: dict[str, set[str]] = {g: set() for g in structure.groups}
    for layer in structure.layers:
        if layer.out_group is not None:
            touching[layer.out_group].add(layer.name)
        for part in layer.in_parts:
            if isinstance(part, str):
                touching[part].add(layer.name)
    out = {}
    for g, names in touching.items():
        inside = [b for b in blocks if names and all(n.startswith(b + ".") for n in names)]
        if inside:
            out[g] = max(inside, key=len)
    return out


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _check_supported(model: nn.Module, names: dict, model_name: str) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1 and not _is_depthwise(m):
            raise ConfigError(f"model '{model_name}': grouped conv '{names[m]}' (groups={m.groups}) is not supported")
        if not isinstance(m, _PARAM_TYPES) and any(True for _ in m.parameters(recurse=False)):
            raise ConfigError(f"model '{model_name}': layer '{names[m]}' ({type(m).__name__}) has parameters "
                              "edgecompact cannot slim")


def _hw(shape: tuple) -> tuple[int, int]:
    return (int(shape[2]), int(shape[3])) if len(shape) == 4 else (1, 1)


def _make_layer(m: nn.Module, name: str, shapes: tuple, out_group: str | None,
                slices: list[tuple[int, int, str]], widths: dict[str, int]) -> Layer:
    in_shape, out_shape = shapes
    if isinstance(m, nn.Conv2d):
        op, kernel, stride, c_in, c_out = "conv2d", m.kernel_size, m.stride, m.in_channels, m.out_channels
    elif isinstance(m, nn.Linear):
        op, kernel, stride, c_in, c_out = "linear", (1, 1), (1, 1), m.in_features, m.out_features
    else:
        op, kernel, stride, c_in, c_out = "batchnorm", (1, 1), (1, 1), m.num_features, m.num_features
    depthwise = _is_depthwise(m)
    if op == "batchnorm" or depthwise:
        in_parts: list[str | int] = [out_group] if out_group else [c_in]
        multipliers = [1]
    else:
        in_parts, multipliers, pos = [], [], 0
        for first, count, group in sorted(slices):
            if first > pos:
                in_parts.append(first - pos)
                multipliers.append(1)
            in_parts.append(group)
            multipliers.append(count // widths[group])
            pos = first + count
        if pos < c_in:
            in_parts.append(c_in - pos)
            multipliers.append(1)
    return Layer(name=name, op=op, kernel=tuple(kernel), stride=tuple(stride), depthwise=depthwise,
                 groups=getattr(m, "groups", 1), bias=getattr(m, "bias", None) is not None,
                 in_hw=_hw(in_shape), out_hw=_hw(out_shape), in_parts=in_parts,
                 out_group=out_group if op != "batchnorm" or out_group else None,
                 out_channels=c_out, in_multiplier=multipliers)


def round_width(width: float, multiple: int, maximum: int) -> int:
    """Round a width to a multiple of `multiple` (at least one multiple), never above the baseline width.

    A group narrower than `multiple` keeps its full width: it cannot be made a multiple by removing channels.
    """
    if maximum <= multiple:
        return maximum
    return max(multiple, min(round(width / multiple) * multiple, maximum // multiple * multiple))


def check_widths(structure: Structure, widths: dict[str, int], channel_multiple: int = 1) -> None:
    """Raise BudgetError when widths are missing, out of range, or break the channel multiple."""
    for g, full in structure.groups.items():
        if g not in widths:
            raise ConfigError(f"architecture has no width for group '{g}'")
        w, lo = widths[g], structure.min_width(g)
        if not lo <= w <= full:
            raise ConfigError(f"group '{g}': width {w} outside [{lo}, {full}]")
        if channel_multiple > 1 and full > channel_multiple and w % channel_multiple:
            raise BudgetError(f"group '{g}': width {w} is not a multiple of {channel_multiple}")
    for block, groups in structure.blocks().items():
        if 0 < sum(widths[g] == 0 for g in groups) < len(groups):
            raise ConfigError(f"block '{block}': groups {', '.join(groups)} must all be 0 (block removed) or none")


def keep_from_scores(structure: Structure, widths: dict[str, int],
                     scores: dict[str, torch.Tensor] | None = None) -> dict[str, list[int]]:
    """The `widths[g]` highest-scoring channels of each group (the first ones when no scores are given)."""
    keep = {}
    for g, full in structure.groups.items():
        w = widths[g]
        if scores is None or g not in scores:
            keep[g] = list(range(w))
        else:
            s = scores[g].detach().float().flatten()
            if s.numel() != full:
                raise ValueError(f"scores for group {g}: {s.numel()} values, expected {full}")
            keep[g] = sorted(torch.argsort(s, descending=True, stable=True)[:w].tolist())
    return keep


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def _removed_branch_bias(mods: dict[str, nn.Module], layer: Layer) -> nn.Module | None:
    """For a layer of a residual branch that was already removed: the ChannelBias left in place of the branch's
    last BatchNorm when `layer` is that BatchNorm, else None (the layer is simply gone)."""
    block, _, attr = layer.name.rpartition(".")
    owner = mods.get(block)
    if getattr(owner, "dropped", False) and attr == owner.TAIL_BN:
        return owner.branch_bias
    return None


def _input_index(layer: Layer, structure: Structure, keep: dict[str, list[int]]) -> torch.Tensor:
    """Indices of the baseline input features of `layer` that survive when each group keeps `keep[g]`."""
    idx, pos = [], 0
    for part, mult in zip(layer.in_parts, layer.in_multiplier):
        if isinstance(part, str):
            for c in keep[part]:
                idx.extend(range(pos + c * mult, pos + (c + 1) * mult))
            pos += structure.groups[part] * mult
        else:
            idx.extend(range(pos, pos + part * mult))
            pos += part * mult
    return torch.tensor(idx, dtype=torch.long)


def channel_masks(structure: Structure, keep: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """A 0/1 float mask per group, 1 where the channel is kept."""
    masks = {}
    for g, full in structure.groups.items():
        m = torch.zeros(full)
        m[torch.tensor(keep[g], dtype=torch.long)] = 1.0
        masks[g] = m
    return masks


@torch.no_grad()
def mask(model: nn.Module, structure: Structure, keep: dict[str, list[int]]) -> nn.Module:
    """A copy of `model` whose removed channels are zeroed (the reference that `slim` must reproduce exactly)."""
    model = copy.deepcopy(model)
    apply_masks(model, structure, channel_masks(structure, keep))
    return model


@torch.no_grad()
def apply_masks(model: nn.Module, structure: Structure, masks: dict[str, torch.Tensor]) -> None:
    """Zero the channels whose mask is 0 in place: every writer's output rows (weight and bias) per group."""
    mods = _modules(model)
    for layer in structure.layers:
        if layer.out_group is None or bool(masks[layer.out_group].all()):
            continue
        mk = masks[layer.out_group]
        if layer.name not in mods:  # in a branch removed earlier
            if (cb := _removed_branch_bias(mods, layer)) is not None:
                cb.bias.mul_(mk.view(1, -1, 1, 1).to(cb.bias.dtype))
            continue
        m = mods[layer.name]
        shape = (-1,) + (1,) * (m.weight.dim() - 1)
        m.weight.mul_(mk.view(shape).to(m.weight.dtype))
        if getattr(m, "bias", None) is not None:
            m.bias.mul_(mk.to(m.bias.dtype))


@torch.no_grad()
def slim(model: nn.Module, structure: Structure, keep: dict[str, list[int]]) -> nn.Module:
    """A physically smaller copy of `model` keeping channels `keep[g]` of each group, with inherited weights.

    A residual block all of whose inner groups keep no channel loses its branch (`drop_branch`): its
    convolutions are removed and the branch's constant output is kept as a per-channel bias.
    """
    droppable = droppable_groups(model, structure)  # from the model: a run's structure may not have marked them
    blocks = replace(structure, droppable=droppable).blocks()
    for g, full in structure.groups.items():
        k = keep.get(g)
        if k is None or (not k and g not in droppable):
            raise ConfigError(f"architecture keeps no channel of group '{g}'")
        if k and (len(set(k)) != len(k) or min(k) < 0 or max(k) >= full):
            raise ConfigError(f"group '{g}': kept channel indices must be distinct and in [0, {full})")
    dropped = [b for b, gs in blocks.items() if not all(keep[g] for g in gs)]
    for b in dropped:
        if any(keep[g] for g in blocks[b]):
            raise ConfigError(f"block '{b}': groups {', '.join(blocks[b])} must all keep no channel or all keep some")
    gone = {g for b in dropped for g in blocks[b]}
    model = copy.deepcopy(model)
    mods = _modules(model)
    for layer in structure.layers:
        if layer.out_group in gone or (layer.in_parts and all(p in gone for p in layer.in_parts)):
            continue  # inside a removed branch
        out_idx = (torch.tensor(sorted(keep[layer.out_group]), dtype=torch.long)
                   if layer.out_group is not None else None)
        if layer.name not in mods:  # in a branch removed earlier: only its constant remains
            if (cb := _removed_branch_bias(mods, layer)) is not None and out_idx is not None:
                cb.bias = nn.Parameter(cb.bias.data[:, out_idx].clone())
            continue
        m = mods[layer.name]
        if layer.op == "batchnorm":
            if out_idx is None:
                continue
            for attr in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(m, attr)
                if t is not None:
                    getattr(m, attr).data = t.data[out_idx].clone()
            m.num_features = len(out_idx)
            continue
        w = m.weight.data
        if out_idx is not None:
            w = w[out_idx]
            if m.bias is not None:
                m.bias.data = m.bias.data[out_idx].clone()
        if layer.depthwise:
            m.in_channels = m.out_channels = m.groups = len(out_idx)
        else:
            in_idx = _input_index(layer, structure, {g: sorted(v) for g, v in keep.items()})
            w = w[:, in_idx]
            if layer.op == "conv2d":
                m.in_channels, m.out_channels = len(in_idx), w.shape[0]
            else:
                m.in_features, m.out_features = len(in_idx), w.shape[0]
        m.weight = nn.Parameter(w.clone())
        if m.bias is not None:
            m.bias = nn.Parameter(m.bias.data.clone())
    for b in dropped:
        mods[b].drop_branch()
    return model


def widths_of(keep: dict[str, list[int]]) -> dict[str, int]:
    return {g: len(v) for g, v in keep.items()}


# per-layer tensors shaped like (weight, bias or None), keyed by layer name: the input of channel_sums
LayerValues = dict[str, tuple[torch.Tensor, torch.Tensor | None]]

def channel_sums(structure: Structure, values: LayerValues) -> dict[str, torch.Tensor]:
    """Sum an elementwise quantity over every slice each channel owns, per group.

    `values[layer_name] = (like_weight, like_bias or None)`: tensors shaped like the layer's weight and bias (for a
    BN: gamma and beta). Writers contribute their output rows (and bias), readers their input columns; layers
    missing from `values` are skipped.
    """
    out = {g: torch.zeros(w) for g, w in structure.groups.items()}
    for layer in structure.layers:
        if layer.name not in values:
            continue
        w, b = values[layer.name]
        if layer.out_group is not None:
            g = layer.out_group
            out[g] = out[g] + (w.flatten(1).sum(1) if w.dim() > 1 else w)
            if b is not None:
                out[g] = out[g] + b
        if layer.op == "batchnorm" or layer.depthwise:
            continue
        pos = 0
        for part, mult in zip(layer.in_parts, layer.in_multiplier):
            width = structure.groups[part] if isinstance(part, str) else part
            if isinstance(part, str):
                cols = w[:, pos:pos + width * mult]
                out[part] = out[part] + cols.reshape(cols.shape[0], width, mult, -1).sum((0, 2, 3))
            pos += width * mult
    return out

