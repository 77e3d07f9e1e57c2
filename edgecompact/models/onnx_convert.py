"""The built-in ONNX converter: a CNN classifier's ONNX graph as a torch.fx GraphModule of real torch layers.

It is the only conversion path, not a fallback behind onnx2torch: a run directory is reloaded by converting the same
file again, so its layer names must not depend on which packages are installed, and onnx2torch cannot even be
imported beside this torch (it imports torchvision). Conv, BatchNormalization, Gemm and MatMul(+Add) with constant
weights become nn.Conv2d / nn.BatchNorm2d / nn.Linear that structure.analyze can slim; every other supported
operator is a parameter-free module or function. Nothing here checks the result against onnxruntime
(onnx_import does).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import fx, nn

from edgecompact.errors import ConfigError


def _hard_sigmoid(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return torch.clamp(x * alpha + beta, 0.0, 1.0)


@dataclass
class _Build:
    """The graph under construction: ONNX value name -> fx node (activations) or array (constants). Every fx node is
    also run once on one example image as it is added, which gives the shapes that later operators need."""

    path: Path
    opset: int
    consumers: dict[str, list[onnx.NodeProto]]
    outputs: set[str]
    graph: fx.Graph = field(default_factory=fx.Graph)
    root: nn.Module = field(default_factory=nn.Module)
    values: dict[str, fx.Node] = field(default_factory=dict)
    examples: dict[fx.Node, torch.Tensor] = field(default_factory=dict)
    consts: dict[str, np.ndarray] = field(default_factory=dict)
    fused: set[int] = field(default_factory=set)  # ids of nodes already emitted as part of an earlier one

    def fail(self, node: onnx.NodeProto, why: str) -> ConfigError:
        return ConfigError(f"--model {self.path}: {node.op_type} (node '{node.name}') {why}")

    def x(self, node: onnx.NodeProto, i: int = 0) -> fx.Node:
        """Input `i` of `node` as an activation."""
        name = node.input[i]
        if name in self.consts:
            raise self.fail(node, f"takes the constant '{name}' where the built-in converter expects an activation")
        if name not in self.values:
            raise self.fail(node, f"reads '{name}', which no supported node produces")
        return self.values[name]

    def const(self, node: onnx.NodeProto, i: int, what: str, required: bool = True) -> np.ndarray | None:
        """Input `i` of `node` as a constant (None when the optional input is absent)."""
        name = node.input[i] if i < len(node.input) else ""
        if name in self.consts:
            return self.consts[name]
        if name or required:
            raise self.fail(node, f"has a {what} that is not a constant, which the built-in converter needs")
        return None

    def shape(self, node: onnx.NodeProto, i: int = 0) -> list[int]:
        """Shape of activation input `i` of `node` for the example image (batch 1)."""
        return list(self.examples[self.x(node, i)].shape)

    def emit(self, node: onnx.NodeProto, op: str, target, args: tuple, kwargs: dict | None = None) -> fx.Node:
        out = self.graph.create_node(op, target, args, kwargs or {})
        fn = self.root.get_submodule(target) if op == "call_module" else target
        example = self.examples.__getitem__
        try:
            with torch.no_grad():
                self.examples[out] = fn(*fx.node.map_arg(args, example), **fx.node.map_arg(kwargs or {}, example))
        except (RuntimeError, ValueError, TypeError) as e:  # e.g. pads wider than a pooling window
            text = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise self.fail(node, f"cannot run on its input ({text})") from None
        return out

    def module(self, node: onnx.NodeProto, module: nn.Module, *args: fx.Node) -> None:
        name = _unique(_layer_name(node), self.root)
        self.root.add_module(name, module)
        self.values[node.output[0]] = self.emit(node, "call_module", name, args)

    def call(self, node: onnx.NodeProto, fn: Callable, *args, **kwargs) -> None:
        self.values[node.output[0]] = self.emit(node, "call_function", fn, args, kwargs)


def convert_onnx(proto: onnx.ModelProto, path: Path, input_shape: tuple[int, int, int]) -> fx.GraphModule:
    """`proto` (one N x C x H x W image input, one output) as a GraphModule in eval mode, built for images of
    `input_shape` (C, H, W); an operator or attribute the converter does not support is a ConfigError naming it
    and its node."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    b = _Build(Path(path), opset, {}, {o.name for o in proto.graph.output})
    graph = proto.graph
    b.consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        for name in node.input:
            b.consumers.setdefault(name, []).append(node)
    (image,) = [i for i in graph.input if i.name not in b.consts]
    b.values[image.name] = b.graph.placeholder("x")
    b.examples[b.values[image.name]] = torch.zeros(1, *input_shape)
    for node in graph.node:
        if id(node) in b.fused:
            continue
        if all(not i or i in b.consts for i in node.input):
            _fold(b, node)
        elif node.domain not in ("", "ai.onnx") or node.op_type not in _HANDLERS:
            raise ConfigError(f"--model {b.path}: operator '{node.op_type}' (node '{node.name}') is not supported by "
                              f"the built-in converter; supported: {', '.join(SUPPORTED)} (and any operator on "
                              "constants only)")
        else:
            _HANDLERS[node.op_type](b, node)
    out = graph.output[0].name
    if out not in b.values:
        raise ConfigError(f"--model {b.path}: the output '{out}' does not depend on the input")
    b.graph.output(b.values[out])
    return fx.GraphModule(b.root, b.graph, class_name="OnnxModel").eval()


def _layer_name(node: onnx.NodeProto) -> str:
    """A module name from the node's: torch.onnx's '/layer1/layer1.0/conv1/Conv' becomes 'layer1_0_conv1'."""
    parts = [p for p in node.name.split("/") if p]
    if len(parts) > 1 and re.fullmatch(rf"{node.op_type}(_\d+)?", parts[-1]):
        parts.pop()
    parts = [p for i, p in enumerate(parts) if i + 1 == len(parts) or not parts[i + 1].startswith(p + ".")]
    name = re.sub(r"\W+", "_", "_".join(parts)).strip("_") or node.op_type.lower()
    return f"n_{name}" if name[0].isdigit() else name


def _unique(name: str, root: nn.Module) -> str:
    """`name`, suffixed when a layer or a GraphModule attribute (forward, graph, code...) already has it."""
    taken = set(root._modules) | set(dir(fx.GraphModule))
    out, i = name, 0
    while out in taken:
        i += 1
        out = f"{name}_{i}"
    return out


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: (v.decode() if isinstance(v := helper.get_attribute_value(a), bytes) else v)
            for a in node.attribute}


def _fold(b: _Build, node: onnx.NodeProto) -> None:
    """Evaluate a node whose inputs are all constants (Constant, weight reshapes, shape arithmetic) with onnx's
    reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    feeds = {i: b.consts[i] for i in node.input if i}
    inputs = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for k, v in feeds.items()]
    outputs = [helper.make_value_info(o, onnx.TypeProto()) for o in node.output if o]
    model = helper.make_model(helper.make_graph([node], "fold", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", b.opset)])
    try:
        results = ReferenceEvaluator(model).run(None, feeds)
    except Exception as e:  # noqa: BLE001 - the evaluator's own error types
        raise b.fail(node, f"cannot be evaluated on its constant inputs ({type(e).__name__})") from None
    b.consts.update((o, np.asarray(r)) for o, r in zip([o for o in node.output if o], results))


def _shape(b: _Build, node: onnx.NodeProto) -> None:
    """Shape of an activation, folded to the example's (batch 1). Only a Reshape can read it here, and a Reshape is
    only ever converted to a flatten that keeps whatever batch axis comes."""
    a = _attrs(node)
    b.consts[node.output[0]] = np.array(b.shape(node), dtype=np.int64)[a.get("start", 0):a.get("end")]


# ---------------------------------------------------------------- layers with weights


def _pads(b: _Build, node: onnx.NodeProto, a: dict, kernel: list[int], strides: list[int],
          dilations: list[int]) -> list[int]:
    """ONNX pads [top, left, bottom, right], resolving auto_pad SAME_* from the input size."""
    mode = a.get("auto_pad", "NOTSET")
    if mode == "NOTSET":
        return list(a.get("pads", [0, 0, 0, 0]))
    if mode == "VALID":
        return [0, 0, 0, 0]
    hw = b.shape(node)[2:]
    begin, end = [], []
    for size, k, s, d in zip(hw, kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        first = total // 2 if mode == "SAME_UPPER" else total - total // 2
        begin.append(first)
        end.append(total - first)
    return begin + end


def _padded(b: _Build, node: onnx.NodeProto, x: fx.Node, pads: list[int],
            value: float = 0.0) -> tuple[fx.Node, tuple[int, int]]:
    """(input, the layer's own symmetric padding): asymmetric pads become an F.pad in front of the layer."""
    top, left, bottom, right = pads
    if (top, left) == (bottom, right):
        return x, (top, left)
    return b.emit(node, "call_function", F.pad, (x, (left, right, top, bottom)), {"value": value}), (0, 0)


def _conv(b: _Build, node: onnx.NodeProto) -> None:
    w = b.const(node, 1, "weight")
    bias = b.const(node, 2, "bias", required=False)
    if w.ndim != 4:
        raise b.fail(node, f"has a {w.ndim}-D weight; the built-in converter supports 2-D convolutions only")
    a = _attrs(node)
    kernel, groups = list(w.shape[2:]), a.get("group", 1)
    strides, dilations = list(a.get("strides", [1, 1])), list(a.get("dilations", [1, 1]))
    x, padding = _padded(b, node, b.x(node), _pads(b, node, a, kernel, strides, dilations))
    conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(kernel), tuple(strides), padding, tuple(dilations),
                     groups, bias=bias is not None)
    conv.weight.data = _tensor(w)
    if bias is not None:
        conv.bias.data = _tensor(bias)
    b.module(node, conv, x)


def _batch_norm(b: _Build, node: onnx.NodeProto) -> None:
    a = _attrs(node)
    if a.get("training_mode", 0):
        raise b.fail(node, "is in training mode; export the model in eval mode")
    scale, shift, mean, var = (b.const(node, i, what) for i, what in
                               enumerate(("scale", "bias", "mean", "variance"), start=1))
    kind = nn.BatchNorm1d if len(b.shape(node)) in (2, 3) else nn.BatchNorm2d
    bn = kind(len(scale), eps=a.get("epsilon", 1e-5))
    for t, value in ((bn.weight, scale), (bn.bias, shift), (bn.running_mean, mean), (bn.running_var, var)):
        t.data = _tensor(value)
    b.module(node, bn.eval(), b.x(node))


def _linear(b: _Build, node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray | None, x: fx.Node) -> None:
    """nn.Linear computing x @ weight.T + bias; `weight` is (out, in)."""
    fc = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    fc.weight.data = _tensor(weight)
    if bias is not None:
        fc.bias.data = _tensor(bias)
    b.module(node, fc, x)


def _vector(b: _Build, node: onnx.NodeProto, c: np.ndarray, n: int) -> np.ndarray:
    if c.size == 1:
        return np.full(n, c.reshape(-1)[0], dtype=np.float32)
    if c.size != n or c.shape[-1] != n:
        raise b.fail(node, f"adds a constant of shape {list(c.shape)}, not one value per output ({n})")
    return c.reshape(n)


def _gemm(b: _Build, node: onnx.NodeProto) -> None:
    a = _attrs(node)
    if a.get("transA", 0):
        raise b.fail(node, "has transA=1, which the built-in converter does not support")
    w = b.const(node, 1, "weight")
    w = w if a.get("transB", 0) else w.T  # (out, in)
    c = b.const(node, 2, "bias", required=False)
    bias = None if c is None else _vector(b, node, c, w.shape[0]) * np.float32(a.get("beta", 1.0))
    _linear(b, node, w * np.float32(a.get("alpha", 1.0)), bias, b.x(node))  # times 1.0 stays exact


def _matmul(b: _Build, node: onnx.NodeProto) -> None:
    """MatMul by a constant (in, out) matrix, fused with the Add of a constant bias when that is its one reader."""
    w = b.const(node, 1, "right-hand matrix")
    if w.ndim != 2:
        raise b.fail(node, f"multiplies by a {w.ndim}-D constant; only a 2-D weight is supported")
    x, bias = b.x(node), None
    readers = b.consumers.get(node.output[0], [])
    add = readers[0] if len(readers) == 1 and readers[0].op_type == "Add" else None
    if add is not None and node.output[0] not in b.outputs:
        other = next(i for i in add.input if i != node.output[0])
        c = b.consts.get(other)
        if c is not None and (c.size == 1 or (c.size == w.shape[1] and c.shape[-1] == w.shape[1])):
            bias = _vector(b, add, c, w.shape[1])
            b.fused.add(id(add))
    _linear(b, node, w.T, bias, x)
    if bias is not None:
        b.values[add.output[0]] = b.values[node.output[0]]


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))


# ---------------------------------------------------------------- parameter-free operators


def _activation(make: Callable[[dict], nn.Module]) -> Callable[[_Build, onnx.NodeProto], None]:
    return lambda b, node: b.module(node, make(_attrs(node)), b.x(node))


def _clip(b: _Build, node: onnx.NodeProto) -> None:
    if b.opset < 11:
        a = _attrs(node)
        lo, hi = a.get("min", -math.inf), a.get("max", math.inf)
    else:
        bounds = [b.const(node, i, what, required=False) for i, what in ((1, "min"), (2, "max"))]
        lo, hi = (float(v.reshape(-1)[0]) if v is not None else default
                  for v, default in zip(bounds, (-math.inf, math.inf)))
    if (lo, hi) == (0.0, 6.0):
        b.module(node, nn.ReLU6(), b.x(node))
    elif (lo, hi) == (0.0, math.inf):
        b.module(node, nn.ReLU(), b.x(node))
    elif math.isfinite(lo) and math.isfinite(hi):
        b.module(node, nn.Hardtanh(lo, hi), b.x(node))
    else:
        b.call(node, torch.clamp, b.x(node), min=lo if math.isfinite(lo) else None,
               max=hi if math.isfinite(hi) else None)


def _hard_sigmoid_node(b: _Build, node: onnx.NodeProto) -> None:
    a = _attrs(node)
    alpha, beta = a.get("alpha", 0.2), a.get("beta", 0.5)
    if math.isclose(alpha, 1 / 6, rel_tol=1e-6) and beta == 0.5:
        b.module(node, nn.Hardsigmoid(), b.x(node))
    else:
        b.call(node, _hard_sigmoid, b.x(node), alpha, beta)


def _binary(fn: Callable) -> Callable[[_Build, onnx.NodeProto], None]:
    """Elementwise op of two activations (residual add, SE gate) or of an activation and a scalar constant."""

    def emit(b: _Build, node: onnx.NodeProto) -> None:
        args = []
        for i, name in enumerate(node.input):
            c = b.consts.get(name)
            if c is None:
                args.append(b.x(node, i))
            elif c.size == 1:
                args.append(float(c.reshape(-1)[0]))
            else:
                raise b.fail(node, f"has a constant operand of shape {list(c.shape)}; the built-in converter "
                                   "supports activations and scalar constants only")
        b.call(node, fn, *args)

    return emit


def _pool(kind: str) -> Callable[[_Build, onnx.NodeProto], None]:
    def emit(b: _Build, node: onnx.NodeProto) -> None:
        if len(node.output) > 1 and node.output[1]:
            raise b.fail(node, "returns indices, which the built-in converter does not support")
        a = _attrs(node)
        kernel = list(a["kernel_shape"])
        if len(kernel) != 2:
            raise b.fail(node, f"pools over {len(kernel)} axes; the built-in converter supports 2-D pooling only")
        strides, dilations = list(a.get("strides", [1, 1])), list(a.get("dilations", [1, 1]))
        pads = _pads(b, node, a, kernel, strides, dilations)
        ceil = bool(a.get("ceil_mode", 0))
        if kind == "max":
            x, padding = _padded(b, node, b.x(node), pads, -math.inf)
            pool = nn.MaxPool2d(tuple(kernel), tuple(strides), padding, tuple(dilations), ceil_mode=ceil)
        else:
            include = bool(a.get("count_include_pad", 0))
            if dilations != [1, 1] or (not include and pads[:2] != pads[2:]):
                raise b.fail(node, "has dilations or asymmetric pads that exclude the padding from the average; "
                                   "not supported by the built-in converter")
            x, padding = _padded(b, node, b.x(node), pads)
            pool = nn.AvgPool2d(tuple(kernel), tuple(strides), padding, ceil, count_include_pad=include)
        b.module(node, pool, x)

    return emit


def _axis(b: _Build, node: onnx.NodeProto, axis: int) -> int:
    return axis + len(b.shape(node)) if axis < 0 else axis


def _concat(b: _Build, node: onnx.NodeProto) -> None:
    b.call(node, torch.cat, [b.x(node, i) for i in range(len(node.input))], dim=_attrs(node)["axis"])


def _flatten(b: _Build, node: onnx.NodeProto) -> None:
    if _axis(b, node, _attrs(node).get("axis", 1)) != 1:
        raise b.fail(node, "flattens from an axis other than 1; the built-in converter keeps the batch axis")
    b.call(node, torch.flatten, b.x(node), 1)


def _reshape(b: _Build, node: onnx.NodeProto) -> None:
    """Only a flatten to (N, features): converted as one that keeps any batch size and channel count."""
    target = [int(v) for v in b.const(node, 1, "shape").reshape(-1)]
    features = math.prod(b.shape(node)[1:])
    if len(target) != 2 or target[1] not in (-1, features) or target[0] not in (0, -1, 1) or target == [-1, -1]:
        raise b.fail(node, f"reshapes to {target}; the built-in converter supports a flatten to (N, -1) only")
    b.call(node, torch.flatten, b.x(node), 1)


def _reduce_mean(b: _Build, node: onnx.NodeProto) -> None:
    a = _attrs(node)
    axes = a.get("axes") if b.opset < 18 else b.const(node, 1, "axes", required=False)
    axes = sorted(_axis(b, node, int(v)) for v in np.reshape(axes if axes is not None else [], -1))
    if axes != [2, 3]:
        raise b.fail(node, f"averages over axes {axes}; the built-in converter supports the spatial axes [2, 3] only")
    b.call(node, torch.mean, b.x(node), (2, 3), keepdim=bool(a.get("keepdims", 1)))


def _pad(b: _Build, node: onnx.NodeProto) -> None:
    a = _attrs(node)
    if b.opset < 11:
        pads, value = list(a["pads"]), float(a.get("value", 0.0))
    else:
        pads = [int(v) for v in b.const(node, 1, "pads")]
        v = b.const(node, 2, "constant value", required=False)
        value = float(v.reshape(-1)[0]) if v is not None and v.size else 0.0
        axes = b.const(node, 3, "axes", required=False)
        if axes is not None:  # opset 18: pads for the listed axes only
            rank = len(b.shape(node))
            full = [0] * (2 * rank)
            for j, ax in enumerate(int(x) % rank for x in axes):
                full[ax], full[rank + ax] = pads[j], pads[len(axes) + j]
            pads = full
    rank = len(pads) // 2
    if rank != 4 or any(pads[:2]) or any(pads[rank:rank + 2]):
        raise b.fail(node, f"pads {pads}; the built-in converter pads the spatial axes of N x C x H x W only")
    modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}
    mode = a.get("mode", "constant")
    if mode not in modes:
        raise b.fail(node, f"has mode '{mode}', which the built-in converter does not support")
    kwargs = {"mode": modes[mode], **({"value": value} if mode == "constant" else {})}
    b.call(node, F.pad, b.x(node), (pads[3], pads[7], pads[2], pads[6]), **kwargs)


def _identity(b: _Build, node: onnx.NodeProto) -> None:
    b.values[node.output[0]] = b.x(node)


_HANDLERS: dict[str, Callable[[_Build, onnx.NodeProto], None]] = {
    "Conv": _conv, "BatchNormalization": _batch_norm, "Gemm": _gemm, "MatMul": _matmul,
    "Relu": _activation(lambda a: nn.ReLU()), "LeakyRelu": _activation(lambda a: nn.LeakyReLU(a.get("alpha", 0.01))),
    "Sigmoid": _activation(lambda a: nn.Sigmoid()), "HardSwish": _activation(lambda a: nn.Hardswish()),
    "HardSigmoid": _hard_sigmoid_node, "Clip": _clip,
    "Add": _binary(operator.add), "Sub": _binary(operator.sub), "Mul": _binary(operator.mul),
    "Div": _binary(operator.truediv), "Concat": _concat,
    "GlobalAveragePool": _activation(lambda a: nn.AdaptiveAvgPool2d(1)),
    "GlobalMaxPool": _activation(lambda a: nn.AdaptiveMaxPool2d(1)),
    "AveragePool": _pool("avg"), "MaxPool": _pool("max"), "ReduceMean": _reduce_mean,
    "Flatten": _flatten, "Reshape": _reshape, "Pad": _pad, "Identity": _identity, "Dropout": _identity,
    "Shape": _shape,
}
SUPPORTED = tuple(sorted(_HANDLERS))
