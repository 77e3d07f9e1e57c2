"""Channel structure of a CNN: coupled channel groups, ArchSpec, masking and slimming.

Channels are coupled once by tracing (torch-pruning's DependencyGraph, which follows residual adds, concats, splits,
flattens and depthwise convs, plus whole groups of grouped convs); coupled channels that always appear in the same
order form a group. Every search method scores or sizes these groups and never re-derives them. `slim` is the one
place that physically removes channels. Nothing here trains or scores channels.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import asdict, dataclass, field, replace
from itertools import accumulate, pairwise
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode

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
    out_group: str | None  # the group of all output channels; None when fixed (the classifier) or several parts
    out_channels: int
    # per in_part, input features per channel (> 1 when a linear layer reads a flattened C x H x W map, or a
    # grouped conv reads whole groups of channels)
    in_multiplier: list[int] = field(default_factory=list)
    # concatenated output channel sources, like in_parts (a depthwise conv or a BN after a concat has several)
    out_parts: list[str | int] = field(default_factory=list)
    out_multiplier: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.in_multiplier:
            self.in_multiplier = [1] * len(self.in_parts)
        if not self.out_parts:
            self.out_parts = [self.out_group] if self.out_group is not None else [self.out_channels]
        if not self.out_multiplier:
            self.out_multiplier = [1] * len(self.out_parts)

    @property
    def out_groups(self) -> list[str]:
        """The groups among this layer's output channels (empty when all are fixed)."""
        return [p for p in self.out_parts if isinstance(p, str)]


def part_slices(parts: list[str | int], multipliers: list[int],
                widths: dict[str, int]) -> list[tuple[str, int, int, int]]:
    """(group, first feature, width, features per channel) of each group part of a concatenation at `widths`."""
    out, pos = [], 0
    for part, mult in zip(parts, multipliers):
        width = widths[part] if isinstance(part, str) else part
        if isinstance(part, str):
            out.append((part, pos, width, mult))
        pos += width * mult
    return out


def _count(parts: list[str | int], multipliers: list[int], widths: dict[str, int]) -> int:
    return sum((widths[p] if isinstance(p, str) else p) * m for p, m in zip(parts, multipliers))


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
        return [(layer, _count(layer.in_parts, layer.in_multiplier, widths),
                 _count(layer.out_parts, layer.out_multiplier, widths)) for layer in self.layers]

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
        dg = dependency_graph(model, example)
        order = [m for m in model.modules() if m in shapes]
        groups, layers = _channel_groups(dg, order, names, shapes, fixed)
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
        for part in layer.out_parts + layer.in_parts:
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
        if not isinstance(m, _PARAM_TYPES) and any(True for _ in m.parameters(recurse=False)):
            raise ConfigError(f"model '{model_name}': layer '{names[m]}' ({type(m).__name__}) has parameters "
                              "edgecompact cannot slim")


# Channels passing these traced ops keep their width: the forward code fixes their sizes (a split's sizes, a
# shuffle's view) or reorders them in a way the index mapping does not follow (transpose, permute).
_REORDERING_GRAD_FNS = ("Transpose", "Permute")
_FIXED_OP_TYPES = (tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.UNBIND, tp.ops.OPTYPE.EXPAND, tp.ops.OPTYPE.OUTPUT)


def _fixes_channels(node) -> bool:
    """Whether channels through this traced op must keep their width (see _REORDERING_GRAD_FNS)."""
    if node.type in _FIXED_OP_TYPES:
        return True
    fn = node.grad_fn
    name = type(fn).__name__ if fn is not None else ""
    if node.type == tp.ops.OPTYPE.RESHAPE:
        sizes = getattr(fn, "_saved_self_sym_sizes", getattr(fn, "_saved_self_sizes", None))
        return sizes is not None and len(sizes) not in (2, 4)  # a flatten / unflatten keeps the channel order
    if node.type == tp.ops.OPTYPE.SLICE:
        op = node.module
        sizes = getattr(fn, "_saved_self_sym_sizes", None)
        if sizes is None or op.dim != 1:
            return sizes is None
        return not (op.start in (0, None) and op.step == 1 and op.end >= int(sizes[1]))  # a full slice is a no-op
    return node.type == tp.ops.OPTYPE.ELEMENTWISE and name.startswith(_REORDERING_GRAD_FNS)


class _TracedShapes(TorchFunctionMode):
    """Records the widths of every channel concat's inputs and every channel split's outputs of a forward, and
    each reshape's (input dims, output dims), keyed by the op's grad_fn."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict = {}
        self.split_sizes: dict = {}
        self.reshapes: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in ("cat", "concat", "concatenate") and getattr(out, "grad_fn", None):
            tensors = args[0] if args else kwargs["tensors"]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if out.dim() > 1 and dim % out.dim() == 1:
                self.sizes[out.grad_fn] = [int(t.shape[1]) for t in tensors]
        elif name in _SPLIT_FNS and isinstance(out, tuple) and out and getattr(out[0], "grad_fn", None):
            dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
            if out[0].dim() > 1 and dim % out[0].dim() == 1:
                self.split_sizes[out[0].grad_fn] = [int(t.shape[1]) for t in out]
        elif name in ("view", "reshape", "flatten", "unflatten") and getattr(out, "grad_fn", None):
            self.reshapes[out.grad_fn] = (args[0].dim(), out.dim())
        return out


_SPLIT_FNS = ("chunk", "split", "tensor_split", "split_with_sizes")


def _map_split(node, sizes: list[int]) -> None:
    """Give torch-pruning's split node the traced output widths, its consumers in output order (torch-pruning maps
    the i-th consumer it found to the i-th output). Its own inference reads sizes from grad_fn attributes that
    torch 2.x no longer saves, and guesses wrong behind several splits in a row (ShuffleNetV2 units)."""
    order = {}
    for out in node.outputs:
        nrs = [nr for fn, nr in getattr(out.grad_fn, "next_functions", ()) if fn is node.grad_fn]
        order[out] = nrs[0] if len(nrs) == 1 else None
    nrs = sorted(nr for nr in order.values() if nr is not None)
    if len(nrs) != len(node.outputs) or nrs != list(range(len(sizes))):
        return  # an unused output or a consumer reading two outputs: left to torch-pruning
    node.outputs.sort(key=lambda out: order[out])
    node.module.split_sizes, node.module.offsets = list(sizes), [0, *accumulate(sizes)]


@contextlib.contextmanager
def _reshape_mapping_guard(reshapes: dict):
    """torch-pruning 1.6.1 maps every reshape's channels as a flatten (channel i to features i*s..i*s+s-1), from
    widths it infers on both sides. Between two feature maps (a channel shuffle's view to 5-D and back) that is
    wrong: behind three channel-split (ShuffleNetV2) units in a row it infers 0 channels and divides by it, behind
    four its index sets grow without end. Here only reshapes to or from a flat (<= 2-D) tensor get that mapping;
    `reshapes` holds the traced (input dims, output dims) of each reshape, by grad_fn. The channel shuffle itself
    is handled as a reordering (`_is_reordering`), not by torch-pruning."""
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_reshape_index_mapping

    def guarded(graph, node):
        dims = reshapes.get(node.grad_fn)
        if dims is not None and min(dims) > 2:
            return
        original(graph, node)

    index_mapping.update_reshape_index_mapping = guarded
    try:
        yield
    finally:
        index_mapping.update_reshape_index_mapping = original


class _DependencyGraph(tp.DependencyGraph):
    """torch-pruning's graph, re-mapping its indices (as it does on every group query) under the reshape guard."""

    def __init__(self, reshapes: dict) -> None:
        super().__init__()
        self.reshapes = reshapes

    def get_pruning_group(self, *args, **kwargs):
        with _reshape_mapping_guard(self.reshapes):
            return super().get_pruning_group(*args, **kwargs)


def dependency_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's DependencyGraph of `model`, with every channel concat mapped by its traced input widths.

    torch-pruning (1.6.1) infers a concat's input widths through the graph and skips the concat when that fails (an
    input from a reshape such as a channel shuffle) or when the concat's output reaches a flatten; its inputs are then
    coupled channel by channel as if they were added.
    """
    from torch_pruning.dependency.index_mapping import _ConcatIndexMapping, update_index_mapping

    recorder = _TracedShapes()
    with torch.enable_grad(), recorder, _reshape_mapping_guard(recorder.reshapes):
        try:
            dg = _DependencyGraph(recorder.reshapes)
            dg.build_dependency(model, example_inputs=example, verbose=False)
        except (ZeroDivisionError, IndexError, KeyError) as e:  # its shape inference, not the user's model
            raise ConfigError(
                f"torch-pruning could not trace this model's channel dependencies ({type(e).__name__}: {e})"
            ) from None
        for node in dg.module2node.values():
            if node.type == tp.ops.OPTYPE.SPLIT and node.grad_fn in recorder.split_sizes:
                _map_split(node, recorder.split_sizes[node.grad_fn])
        update_index_mapping(dg)
    for node in dg.module2node.values():
        chs = recorder.sizes.get(node.grad_fn) if node.type == tp.ops.OPTYPE.CONCAT else None
        if chs is None or len(chs) != len(node.inputs):
            continue
        offsets = [0, *accumulate(chs)]
        node.module.concat_sizes, node.module.offsets = chs, offsets
        used: list = []  # as torch-pruning's update_concat_index_mapping (one input may come twice)
        for i, in_node in enumerate(node.inputs):
            for deps, target, reverse in ((node.dependencies, in_node, True), (in_node.dependencies, node, False)):
                dep = next(d for d in deps if d.target == target and not any(d is u for u in used))
                dep.index_mapping[1] = _ConcatIndexMapping(offset=offsets[i:i + 2], reverse=reverse)
                used.append(dep)
    return dg


def _coupled_channels(dg: tp.DependencyGraph, order: list[nn.Module]) -> tuple[dict, set]:
    """Union-find parents over channel elements (node, "out" | "in", index), and the elements of fixing ops.

    Walks every dependency from each conv/linear's output channels like torch-pruning's `get_pruning_group`, one
    channel at a time, and couples every (index, root index) pair it meets instead of merging them by index: a
    channel reached on two paths (a conv written into both halves of a concat) then couples both root channels.
    """
    from torch_pruning._helpers import _HybridIndex
    from torch_pruning.dependency.dependency import Dependency
    from torch_pruning.pruner import function

    parent: dict = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a, b):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[rb] = ra

    fixing: set = set()
    seen: set = set()
    for m in order:
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        node = dg.module2node[m]
        n = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        if all((node, "out", i) in parent for i in range(n)):
            continue  # every output channel already met from an earlier root
        fn = dg.get_pruner_of_module(m).prune_out_channels
        if _is_depthwise(m):
            fn = function.prune_depthwise_conv_out_channels
        root = Dependency(fn, fn, source=node, target=node)
        stack = [(root, [_HybridIndex(i, i)]) for i in range(n)]  # one channel at a time: linear in the graph
        while stack:
            dep, idxs = stack.pop()
            target, handler = dep.target, dep.handler
            kind = "out" if dg.is_out_channel_pruning_fn(handler) else "in"
            fixes = not isinstance(target.module, _PARAM_TYPES) and _fixes_channels(target)
            for i in idxs:
                union((node, "out", i.root_idx), (target, kind, i.idx))
                if fixes:
                    fixing.add((target, kind, i.idx))
            if fixes:  # its channels keep their width; what lies beyond is reached from its own roots or stays fixed
                continue
            for new_dep in target.dependencies:
                if not new_dep.is_triggered_by(handler):
                    continue
                new = idxs
                for mapping in new_dep.index_mapping:
                    if mapping is not None:
                        new = mapping(new)
                # indices met again with other roots: couple those roots here and walk on only once
                key = (id(new_dep), tuple(i.idx for i in new))
                if new and key in seen:
                    new_kind = "out" if dg.is_out_channel_pruning_fn(new_dep.handler) else "in"
                    for i in new:
                        union((node, "out", i.root_idx), (new_dep.target, new_kind, i.idx))
                elif new:
                    seen.add(key)
                    stack.append((new_dep, new))
    for m in order:  # a grouped conv is pruned in whole groups: each group's inputs and outputs go together
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            node, per_in, per_out = dg.module2node[m], m.in_channels // m.groups, m.out_channels // m.groups
            for g in range(m.groups):
                head = (node, "out", g * per_out)
                for j in range(g * per_out, (g + 1) * per_out):
                    union(head, (node, "out", j))
                for i in range(g * per_in, (g + 1) * per_in):
                    union(head, (node, "in", i))
    return {x: find(x) for x in list(parent)}, fixing


def _runs(seq: list) -> list[tuple[object, int]]:
    """Consecutive equal entries of `seq` as (entry, count)."""
    out: list[tuple[object, int]] = []
    for c in seq:
        if out and out[-1][0] == c:
            out[-1] = (c, out[-1][1] + 1)
        else:
            out.append((c, 1))
    return out


def _chains(seqs: list[list]) -> list[list]:
    """Coupled channels (classes) chained into groups: c2 follows c1 in a group when, in every sequence, c1 is
    always followed by c2 and c2 always preceded by c1, both repeated equally often (a flatten's multiplier)."""
    succ: dict = {}
    pred: dict = {}
    for seq in seqs:
        runs = [(None, 0)] + _runs(seq) + [(None, 0)]
        for (a, ma), (b, mb) in pairwise(runs):
            if a is not None:
                succ.setdefault(a, set()).add((b, ma == mb))
            if b is not None:
                pred.setdefault(b, set()).add((a, ma == mb))
    link = {}
    for a, nexts in succ.items():
        if len(nexts) == 1:
            b, same = next(iter(nexts))
            if b is not None and same and pred[b] == {(a, True)}:
                link[a] = b
    linked = set(link.values())
    chains = []
    for head in pred:
        if head in linked:
            continue
        chain = [head]
        while chain[-1] in link:
            chain.append(link[chain[-1]])
        chains.append(chain)
    return chains


def _parts(seq: list, where: dict, widths: dict[str, int]) -> tuple[list[str | int], list[int]]:
    """A channel sequence as concatenated parts: a group (with features per channel) or a fixed channel count."""
    parts: list[str | int] = []
    mults: list[int] = []
    runs, i = _runs(seq), 0
    while i < len(runs):
        c, m = runs[i]
        if c not in where:
            if parts and isinstance(parts[-1], int):
                parts[-1] += m
            else:
                parts.append(m)
                mults.append(1)
            i += 1
            continue
        g, pos = where[c]
        if pos != 0:
            raise RuntimeError(f"channel sequence enters group {g} at position {pos}")
        parts.append(g)
        mults.append(m)
        i += widths[g]
    return parts, mults


def _channel_groups(dg: tp.DependencyGraph, order: list[nn.Module], names: dict[nn.Module, str],
                    shapes: dict, fixed: list[nn.Module]) -> tuple[dict[str, int], list[Layer]]:
    """Groups (name -> width) and layers, from the coupled channels of the traced graph."""
    cls, fixing = _coupled_channels(dg, order)
    nodes = {m: dg.module2node[m] for m in order}
    frozen = {cls[e] for e in fixing}
    for m in fixed:
        frozen |= {cls.get((nodes[m], "out", i)) for i in range(shapes[m][1][1])}

    def seq(m: nn.Module, kind: str, n: int) -> list:
        out = [cls.get((nodes[m], kind, i)) for i in range(n)]
        return [None if c in frozen else c for c in out]

    def coupled_in(m: nn.Module) -> bool:  # BN and depthwise convs: inputs are their outputs
        return isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) or _is_depthwise(m)

    outs = {m: seq(m, "out", int(shapes[m][1][1])) for m in order}
    ins = {m: outs[m] if coupled_in(m) else seq(m, "in", int(shapes[m][0][1])) for m in order}
    chains = _chains([outs[m] for m in order] + [ins[m] for m in order if not coupled_in(m)])
    rank = {m: i for i, m in enumerate(order)}
    named = []
    for chain in chains:
        writers = [m for m in order if chain[0] in outs[m]]
        writer = min(writers, key=lambda m: (isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)),
                                             len(set(outs[m])) != len(chain), rank[m]))
        named.append((rank[writer], writer, outs[writer].index(chain[0]), chain))
    groups: dict[str, int] = {}
    where: dict = {}
    for _, writer, start, chain in sorted(named, key=lambda t: (t[0], t[2])):
        name = names[writer] if names[writer] not in groups and start == 0 else f"{names[writer]}:{start}"
        groups[name] = len(chain)
        where.update({c: (name, i) for i, c in enumerate(chain)})
    layers = []
    for m in order:
        in_parts, in_mult = _parts(ins[m], where, groups)
        out_parts, out_mult = _parts(outs[m], where, groups)
        layers.append(_make_layer(m, names[m], shapes[m], in_parts, in_mult, out_parts, out_mult))
    return groups, layers


def _hw(shape: tuple) -> tuple[int, int]:
    return (int(shape[2]), int(shape[3])) if len(shape) == 4 else (1, 1)


def _make_layer(m: nn.Module, name: str, shapes: tuple, in_parts: list[str | int], in_mult: list[int],
                out_parts: list[str | int], out_mult: list[int]) -> Layer:
    in_shape, out_shape = shapes
    if isinstance(m, nn.Conv2d):
        op, kernel, stride, c_out = "conv2d", m.kernel_size, m.stride, m.out_channels
    elif isinstance(m, nn.Linear):
        op, kernel, stride, c_out = "linear", (1, 1), (1, 1), m.out_features
    else:
        op, kernel, stride, c_out = "batchnorm", (1, 1), (1, 1), m.num_features
    single = len(out_parts) == 1 and isinstance(out_parts[0], str) and out_mult == [1]
    return Layer(name=name, op=op, kernel=tuple(kernel), stride=tuple(stride), depthwise=_is_depthwise(m),
                 groups=getattr(m, "groups", 1), bias=getattr(m, "bias", None) is not None,
                 in_hw=_hw(in_shape), out_hw=_hw(out_shape), in_parts=in_parts,
                 out_group=out_parts[0] if single else None, out_channels=c_out, in_multiplier=in_mult,
                 out_parts=out_parts, out_multiplier=out_mult)


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


def _index(parts: list[str | int], multipliers: list[int], structure: Structure,
           keep: dict[str, list[int]]) -> torch.Tensor:
    """Indices of the baseline features of a concatenation of `parts` that survive when group g keeps `keep[g]`."""
    idx, pos = [], 0
    for part, mult in zip(parts, multipliers):
        if isinstance(part, str):
            for c in keep[part]:
                idx.extend(range(pos + c * mult, pos + (c + 1) * mult))
            pos += structure.groups[part] * mult
        else:
            idx.extend(range(pos, pos + part * mult))
            pos += part * mult
    return torch.tensor(idx, dtype=torch.long)


def _part_mask(parts: list[str | int], multipliers: list[int], masks: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([masks[p].repeat_interleave(m) if isinstance(p, str) else torch.ones(p * m)
                      for p, m in zip(parts, multipliers)])


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
        if not layer.out_groups:
            continue
        mk = _part_mask(layer.out_parts, layer.out_multiplier, masks)
        if bool(mk.all()):
            continue
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
    keep = {g: sorted(v) for g, v in keep.items()}
    for layer in structure.layers:
        outs = layer.out_groups
        if (outs and all(g in gone for g in outs)) or (layer.in_parts and all(p in gone for p in layer.in_parts)):
            continue  # inside a removed branch
        out_idx = _index(layer.out_parts, layer.out_multiplier, structure, keep) if outs else None
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
        n_in = len(_index(layer.in_parts, layer.in_multiplier, structure, keep))
        if layer.groups > 1:  # depthwise or grouped: whole groups go, each keeps its own input slice
            m.groups = layer.groups * w.shape[0] // layer.out_channels
        else:
            w = w[:, _index(layer.in_parts, layer.in_multiplier, structure, keep)]
        if layer.op == "conv2d":
            m.in_channels, m.out_channels = n_in, w.shape[0]
        else:
            m.in_features, m.out_features = n_in, w.shape[0]
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
        rows = w.flatten(1).sum(1) if w.dim() > 1 else w
        if b is not None:
            rows = rows + b
        for g, pos, width, mult in part_slices(layer.out_parts, layer.out_multiplier, structure.groups):
            out[g] = out[g] + rows[pos:pos + width * mult].reshape(width, mult).sum(1)
        if layer.op == "batchnorm" or layer.groups > 1:  # a grouped conv's columns are its groups' own inputs
            continue
        for g, pos, width, mult in part_slices(layer.in_parts, layer.in_multiplier, structure.groups):
            cols = w[:, pos:pos + width * mult]
            out[g] = out[g] + cols.reshape(cols.shape[0], width, mult, -1).sum((0, 2, 3))
    return out
