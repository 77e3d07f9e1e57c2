"""Per-operator latency of one model in TVM and in onnxruntime, matched operator by operator.

TVM 0.27's Relax VM has no profiler (`VirtualMachine(..., profile=True)` and `vm.profile` are gone from the
0.27 wheel): one instrumented run (`VirtualMachine.set_instrument`) records every compiled-kernel call with
its arguments, then each call is timed alone with the library's C++ `time_evaluator`. onnxruntime's own
profiler (`SessionOptions.enable_profiling`) gives the duration of each of its (fused) nodes in every run.

Operators are matched by what they compute, not by name: kind (conv, dense, pool, ...) + data input shape +
output shape (+ kernel size for convolutions). The n-th occurrence of a key in one runtime is paired with the
n-th in the other, so a different order of independent branches (a projection shortcut run before or after
the block's first conv) does not mis-pair them. Fused epilogues (bias, BN, ReLU, residual add) belong to
the conv they are fused into on both sides.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("conv", "dense", "pool", "layout", "reshape", "elementwise", "other")

# onnxruntime op types (incl. its fused and NCHWc variants) by kind
_ORT_KINDS = {
    "conv": {"Conv", "FusedConv", "NchwcConv", "QLinearConv", "ConvInteger", "ConvTranspose"},
    "dense": {"Gemm", "MatMul", "FusedGemm", "FusedMatMul", "MatMulInteger", "QLinearMatMul"},
    "pool": {"GlobalAveragePool", "AveragePool", "MaxPool", "GlobalMaxPool", "ReduceMean", "NchwcMaxPool",
             "NchwcAveragePool", "NchwcGlobalAveragePool", "NchwcGlobalMaxPool"},
    "layout": {"ReorderInput", "ReorderOutput", "Transpose"},
    "reshape": {"Flatten", "Reshape", "Squeeze", "Unsqueeze"},
    "elementwise": {"Add", "Sum", "Relu", "Mul", "Sub", "Div", "Clip", "Sigmoid", "HardSigmoid", "HardSwish",
                    "BatchNormalization", "Cast", "QuantizeLinear", "DequantizeLinear"},
}
# TVM fused-function name tokens by kind, checked in this order (a fused conv+add+relu is a conv)
_TVM_TOKENS = (
    ("conv", ("conv",)),
    ("dense", ("matmul", "dense")),
    ("pool", ("mean", "pool", "sum")),
    ("layout", ("transpose", "layout")),
    ("reshape", ("reshape", "flatten", "squeeze")),
    ("elementwise", ("add", "relu", "multiply", "subtract", "divide", "clip", "sigmoid", "cast")),
)


@dataclass(frozen=True)
class Op:
    """One operator call: `name` as the runtime spells it, shapes of its data input and output, the kernel
    size (convolutions only) and its median latency in microseconds."""

    name: str
    kind: str
    inputs: tuple[int, ...]
    output: tuple[int, ...]
    kernel: tuple[int, ...] | None = None
    us: float = float("nan")
    fan_in: int | None = None  # a conv's multiply-adds per output value (I/groups x kh x kw), from its weight

    @property
    def flops(self) -> int | None:
        """2 x MACs (the project's convention) of a conv whose weight was seen, else None."""
        if self.fan_in is None or not self.output:
            return None
        n = 1
        for d in self.output:
            n *= d
        return 2 * n * self.fan_in

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.kind, self.inputs, self.output, self.kernel)

    def describe(self) -> str:
        """E.g. `conv 16->32 3x3/2 @32x32`, `dense 64->10`, `pool 64x8x8->64x1x1`."""
        if self.kind == "conv" and len(self.inputs) == 4 and len(self.output) == 4 and self.kernel:
            stride = max(1, self.inputs[2] // max(1, self.output[2]))
            k = "x".join(map(str, self.kernel))
            return (f"conv {self.inputs[1]}->{self.output[1]} {k}" + (f"/{stride}" if stride > 1 else "")
                    + f" @{self.inputs[2]}x{self.inputs[3]}")
        if self.kind == "dense" and self.inputs and self.output:
            return f"dense {self.inputs[-1]}->{self.output[-1]}"
        dims = "x".join(map(str, self.inputs[1:])) + "->" + "x".join(map(str, self.output[1:]))
        return f"{self.kind} {dims}"


def tvm_kind(name: str) -> str:
    """The kind of a TVM kernel from its (fused) function name, e.g. fused_conv2d3_add2_relu1 -> conv."""
    tokens = [re.sub(r"\d+$", "", t) for t in name.lower().split("_")]
    for kind, keys in _TVM_TOKENS:
        if any(k in t for t in tokens for k in keys):
            return kind
    return "other"


def ort_kind(op_type: str) -> str:
    for kind, names in _ORT_KINDS.items():
        if op_type in names:
            return kind
    return "other"


def tvm_op(name: str, arg_shapes: list[tuple[int, ...]], us: float = float("nan")) -> Op:
    """An Op from a TVM kernel call: destination-passing style, so the first argument is the data input,
    the last the output, and a conv's second argument its weight (O, I/groups, kh, kw)."""
    kind = tvm_kind(name)
    kernel = fan_in = None
    plain = not name.endswith("_prepacked")  # a prepacked weight may be 4-D too, in another order
    if kind == "conv" and len(arg_shapes) > 2 and len(arg_shapes[1]) == 4 and plain:
        kernel, fan_in = tuple(arg_shapes[1][2:]), arg_shapes[1][1] * arg_shapes[1][2] * arg_shapes[1][3]
    elif kind == "conv" and len(arg_shapes) > 2 and len(arg_shapes[0]) == len(arg_shapes[-1]) == 4:
        kernel, fan_in = _prepacked_kernel(math.prod(arg_shapes[1]), arg_shapes[0][1], arg_shapes[-1][1])
    return Op(name, kind, tuple(arg_shapes[0]), tuple(arg_shapes[-1]), kernel, us, fan_in)


def _prepacked_kernel(size: int, c_in: int, c_out: int) -> tuple[tuple[int, int] | None, int | None]:
    """(square kernel, fan-in) of a conv whose weight the compile path prepacked (a tiled layout of the same
    O x I/groups x kh x kw values): fan-in = size / O; the kernel is square, dense (I/groups = I) or depthwise
    (I/groups = 1). (None, None) when the size fits neither."""
    if c_out <= 0 or size % c_out:
        return None, None
    fan_in = size // c_out
    for per_group in (c_in, 1):
        k = math.isqrt(fan_in // per_group) if fan_in % per_group == 0 else 0
        if k and k * k * per_group == fan_in:
            return (k, k), fan_in
    return None, None


def ort_op(name: str, op_type: str, input_shapes: list[tuple[int, ...]], output_shapes: list[tuple[int, ...]],
           us: float = float("nan")) -> Op:
    kind = ort_kind(op_type)
    kernel = tuple(input_shapes[1][2:]) if kind == "conv" and len(input_shapes) > 1 and len(input_shapes[1]) == 4 \
        else None
    return Op(name, kind, tuple(input_shapes[0]) if input_shapes else (),
              tuple(output_shapes[0]) if output_shapes else (), kernel, us)


def match_ops(a: list[Op], b: list[Op]) -> list[tuple[Op | None, Op | None]]:
    """Pair the ops of two runtimes by key, n-th occurrence with n-th occurrence; rows in `a`'s order, with
    each op of `b` that has no partner placed right after the row holding its predecessor in `b`."""
    queues: dict[tuple[Any, ...], deque[int]] = defaultdict(deque)
    for j, op in enumerate(b):
        queues[op.key].append(j)
    rows: list[tuple[Op | None, Op | None]] = []
    row_of_b: dict[int, int] = {}
    for op in a:
        j = queues[op.key].popleft() if queues[op.key] else None
        if j is not None:
            row_of_b[j] = len(rows)
        rows.append((op, b[j] if j is not None else None))
    unmatched = [j for j in range(len(b)) if j not in row_of_b]
    # insert from the last so earlier insert positions stay valid
    for j in reversed(unmatched):
        before = [row_of_b[i] for i in range(j) if i in row_of_b]
        rows.insert(max(before) + 1 if before else 0, (None, b[j]))
    return rows


def summarize(rows: list[tuple[Op | None, Op | None]]) -> dict[str, Any]:
    """Totals in us: all ops of each runtime, the matched pairs, and the same split by kind."""
    out: dict[str, Any] = {"tvm_us": 0.0, "ort_us": 0.0, "matched_tvm_us": 0.0, "matched_ort_us": 0.0,
                           "by_kind": {}}
    for t, o in rows:
        kind = (t or o).kind  # type: ignore[union-attr]
        k = out["by_kind"].setdefault(kind, {"tvm_us": 0.0, "ort_us": 0.0, "count": 0})
        k["count"] += 1
        if t is not None:
            out["tvm_us"] += t.us
            k["tvm_us"] += t.us
        if o is not None:
            out["ort_us"] += o.us
            k["ort_us"] += o.us
        if t is not None and o is not None:
            out["matched_tvm_us"] += t.us
            out["matched_ort_us"] += o.us
    return out


# ---- measuring -------------------------------------------------------------------------------------------

def _kernel_module(ex: Any) -> Any:
    mod = ex.mod if hasattr(ex, "mod") else ex
    return mod.imports[0] if len(mod.imports) else mod


def tvm_calls(ex: Any, x: np.ndarray, device: Any = None) -> list[tuple[str, list[Any]]]:
    """The compiled-kernel calls of one run of `main` on `x`, in order: (symbol, argument tensors)."""
    import tvm
    from tvm import relax

    dev = device if device is not None else tvm.cpu()
    lib = _kernel_module(ex)
    vm = relax.VirtualMachine(ex, dev)
    calls: list[tuple[str, list[Any]]] = []

    def instrument(_func: Any, symbol: str, before: bool, _ret: Any, *args: Any) -> int:
        if before and not symbol.startswith("vm.") and lib.implements_function(symbol):
            calls.append((symbol, list(args)))
        return 0  # VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)
    vm["main"](tvm.runtime.tensor(x, dev))
    return calls


class _KernelTimer:
    """The kernel calls of one run of `main`, each with its own C++ timer (`number` calls, after a warm-up)."""

    def __init__(self, ex: Any, x: np.ndarray, number: int, device: Any = None) -> None:
        import tvm

        dev = device if device is not None else tvm.cpu()
        lib = _kernel_module(ex)
        self.calls = tvm_calls(ex, x, dev)
        self.timers = [lib.time_evaluator(symbol, dev, number=number, repeat=1) for symbol, _ in self.calls]
        self.samples: list[list[float]] = [[] for _ in self.calls]

    def one_pass(self) -> None:
        for (_, args), timer, out in zip(self.calls, self.timers, self.samples, strict=True):
            out.append(float(timer(*args).results[0]))

    def ops(self) -> list[Op]:
        return [tvm_op(symbol, [tuple(int(d) for d in a.shape) for a in args], float(np.median(t)) * 1e6)
                for (symbol, args), t in zip(self.calls, self.samples, strict=True)]


def tvm_op_times(ex: Any, x: np.ndarray, *, number: int = 20, repeat: int = 15, device: Any = None) -> list[Op]:
    """Every kernel call of one run, each timed alone: the median (us) of `repeat` means of `number` calls,
    taken in `repeat` passes over all calls, so that a burst of load on a shared machine hits every op alike."""
    timer = _KernelTimer(ex, x, number, device)
    for _ in range(repeat):
        timer.one_pass()
    return timer.ops()


class _OnnxGraph:
    """Logical shapes of the ONNX model onnxruntime was given, to undo its NCHWc channel padding."""

    def __init__(self, model: Any) -> None:
        import onnx

        g = onnx.shape_inference.infer_shapes(model).graph
        self.shapes = {vi.name: tuple(int(d.dim_value) for d in vi.type.tensor_type.shape.dim)
                       for vi in [*g.input, *g.value_info, *g.output]}
        self.shapes.update({t.name: tuple(int(d) for d in t.dims) for t in g.initializer})
        self.producer = {out: n for n in g.node for out in n.output}
        self.by_name = {n.name: n for n in g.node}

    def resolve(self, name: str, op_type: str) -> Any:
        """The original node an onnxruntime node stands for. A fused node is named after an output of the
        original graph (`<tensor>_nchwc`: the conv's own output, or that of the ReLU/Add fused into it); from
        there walk up through the fused elementwise ops to the node of the same kind."""
        base = name.removesuffix("_nchwc")
        node = self.by_name.get(base) or self.producer.get(base)
        kind = ort_kind(op_type)
        frontier = [node] if node is not None else []
        while frontier:
            node = frontier.pop(0)
            if ort_kind(node.op_type) == kind:
                return node
            if ort_kind(node.op_type) == "elementwise":
                frontier += [self.producer[i] for i in node.input if i in self.producer]
        return None

    def logical(self, name: str, op_type: str) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]] | None:
        node = self.resolve(name, op_type)
        if node is None or any(i and i not in self.shapes for i in [*node.input, *node.output]):
            return None
        return [self.shapes[i] for i in node.input if i], [self.shapes[o] for o in node.output]


def ort_trace_ops(trace: list[dict[str, Any]], skip_runs: int = 0, model: Any = None) -> list[Op]:
    """Median per-node durations (us) from an onnxruntime profile trace, nodes in run order.

    Node events are assigned to the `model_run` event that contains them; the first `skip_runs` runs
    (warm-up) are ignored. Only the `*_kernel_time` events are node durations (fences are not). The trace's
    shapes are those of onnxruntime's own layout: NCHWc nodes pad channels to the SIMD block (8 channels
    show as 16 with AVX-512); with `model` (the ONNX model it ran) each node takes the logical shapes of the
    original node it stands for, where that node can be found.
    """
    graph = _OnnxGraph(model) if model is not None else None
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    runs = runs[skip_runs:]
    if not runs:
        raise ValueError("profile trace has no model_run events after the warm-up runs")
    durs: dict[str, list[float]] = defaultdict(list)
    order: list[str] = []
    first: dict[str, dict[str, Any]] = {}
    for e in sorted((e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")),
                    key=lambda e: e["ts"]):
        if not any(lo <= e["ts"] <= hi for lo, hi in runs):
            continue
        name = e["name"][: -len("_kernel_time")]
        if name not in first:
            first[name] = e
            order.append(name)
        durs[name].append(float(e["dur"]))
    ops = []
    for name in order:
        args = first[name].get("args", {})
        op_type = args.get("op_name", "")
        shapes_in = [tuple(next(iter(s.values()))) for s in args.get("input_type_shape", [])]
        shapes_out = [tuple(next(iter(s.values()))) for s in args.get("output_type_shape", [])]
        logical = graph.logical(name, op_type) if graph is not None else None
        if logical is not None:
            shapes_in, shapes_out = logical
        ops.append(ort_op(name, op_type, shapes_in, shapes_out, float(np.median(durs[name]))))
    return ops


def _profiling_session(path: Path, threads: int, prefix: Path) -> Any:
    """An onnxruntime session with the options of edgecompact.deploy.onnx.session, profiler on."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_profiling = True
    opts.profile_file_prefix = str(prefix)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_op_times(path: Path, x: np.ndarray, *, threads: int = 1, runs: int = 200, warmup: int = 20) -> list[Op]:
    """onnxruntime's profiler over `warmup` + `runs` runs of the model at `path`; median per-node durations
    of the measured runs."""
    return op_times(None, path, x, threads=threads, passes=1, ort_runs=runs, warmup=warmup)[1]


def op_times(ex: Any, path: Path, x: np.ndarray, *, threads: int = 1, passes: int = 15, number: int = 20,
             ort_runs: int = 200, warmup: int = 20, device: Any = None) -> tuple[list[Op], list[Op]]:
    """(TVM ops, onnxruntime ops) of the same model, measured interleaved: `passes` rounds of one timing of
    every TVM kernel call (`number` calls each) followed by `ort_runs / passes` profiled onnxruntime runs,
    so that load from other jobs on a shared machine falls on both runtimes alike. `ex` None: ORT only."""
    import onnx

    timer = _KernelTimer(ex, x, number, device) if ex is not None else None
    with tempfile.TemporaryDirectory() as tmp:
        sess = _profiling_session(path, threads, Path(tmp) / "ort")
        feed = {sess.get_inputs()[0].name: x}
        for _ in range(warmup):
            sess.run(None, feed)
        per_pass = [ort_runs // passes + (i < ort_runs % passes) for i in range(passes)]
        for n in per_pass:
            if timer is not None:
                timer.one_pass()
            for _ in range(n):
                sess.run(None, feed)
        trace = json.loads(Path(sess.end_profiling()).read_text())
    ort_ops = ort_trace_ops(trace, skip_runs=warmup, model=onnx.load(str(path)))
    return (timer.ops() if timer is not None else []), ort_ops
