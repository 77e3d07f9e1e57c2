"""ONNX side of deploy: export (static batch 1), simplify, verify against torch, fp16/int8 variants, and the
runtime's own top-1 of the model deploy ships.

Every exported model is checked against torch with onnxruntime before anything compiles it; an fp32 model
that differs by more than FP32_TOLERANCE is refused. Nothing here touches TVM.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.utils.data import TensorDataset

from edgecompact.cpu import Int8Scheme, int8_scheme
from edgecompact.errors import DeployError

OPSET = 17
FP32_TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAME = "x", "logits"


def load_onnx(path: Path) -> onnx.ModelProto:
    """Load and check an ONNX file; a missing, truncated or invalid file is a DeployError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DeployError(f"{path}: ONNX file not found")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001  (protobuf DecodeError, ValidationError, OSError, ...)
        raise DeployError(f"{path}: not a valid ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:120]})") \
            from None
    return model


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime CPU session with `threads` intra-op threads (and one inter-op thread)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  (onnxruntime raises its own Fail/InvalidGraph types)
        raise DeployError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:160]})") from None


def run_onnx(path: Path, x: np.ndarray, threads: int = 1) -> np.ndarray:
    return session(path, threads).run(None, {INPUT_NAME: x})[0]


def export_onnx(model: nn.Module, input_shape: Sequence[int], path: Path, *, opset: int = OPSET,
                tolerance: float = FP32_TOLERANCE) -> float:
    """Export `model` (eval mode, static batch 1) to `path`, simplify it, verify it with onnxruntime.

    Returns the max abs difference between onnxruntime and torch on a random input; above `tolerance` (times
    the largest |output| when that exceeds 1, e.g. an untrained deep net's exploding logits) it is a DeployError.
    """
    if opset < 17:
        raise DeployError(f"opset {opset}: deploy needs opset >= 17")
    shape = (1, *tuple(input_shape)[1:]) if len(input_shape) == 4 else (1, *input_shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    simplify_onnx(path)
    with torch.no_grad():
        want = model(x).numpy()
    diff = float(np.abs(run_onnx(path, x.numpy()) - want).max())
    allowed = tolerance * max(1.0, float(np.abs(want).max()))
    if not diff <= allowed:
        raise DeployError(f"{path}: onnxruntime output differs from torch by {diff:.3g} (> {allowed:.3g})")
    return diff


def simplify_onnx(path: Path) -> None:
    """onnx-simplifier in place (constant folding, BN/shape cleanup); refuses a model it cannot prove equal."""
    from onnxsim import simplify

    simplified, ok = simplify(load_onnx(path))
    if not ok:
        raise DeployError(f"{path}: onnx-simplifier could not validate the simplified model")
    onnx.save(simplified, str(path))


def input_spec(path: Path, model: onnx.ModelProto | None = None) -> tuple[str, list[int], str]:
    """(name, shape, numpy dtype) of the model's single input; `model`: the file already loaded."""
    model = load_onnx(path) if model is None else model
    if len(model.graph.input) != 1:
        raise DeployError(f"{path}: expected one input, found {len(model.graph.input)}")
    inp = model.graph.input[0]
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    if any(d <= 0 for d in dims):
        raise DeployError(f"{path}: input '{inp.name}' has a dynamic shape {dims}; deploy needs a static shape")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
    return inp.name, dims, str(np.dtype(dtype))


def to_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and activations, fp32 input/output (so the runner's interface does not change)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(load_onnx(src), keep_io_types=True)
    _sort_nodes(model.graph)  # the converter appends its input casts last; TVM's importer needs graph order
    onnx.save(model, str(dst))


def _sort_nodes(graph: onnx.GraphProto) -> None:
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        runnable = [n for n in pending if all(i in ready for i in n.input)]
        if not runnable:
            raise DeployError(f"graph '{graph.name}' has a cycle or an undefined input")
        for n in runnable:
            ordered.append(n)
            ready.update(n.output)
        pending = [n for n in pending if all(n is not r for r in runnable)]
    del graph.node[:]
    graph.node.extend(ordered)


def quantize_int8(src: Path, dst: Path, calib: np.ndarray, scheme: Int8Scheme | None = None) -> None:
    """Static int8 QDQ quantization (per-channel int8 weights, uint8 activations) calibrated on `calib` (N,C,H,W),
    with the CPU-dependent settings of `scheme` (default: this CPU's, `int8_scheme()`)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calib is None or len(calib) == 0:
        raise DeployError("precision int8 needs calibration inputs (--calib / the training data)")
    scheme = scheme or int8_scheme()

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib.astype(np.float32))

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.it, None)
            return None if x is None else {INPUT_NAME: x[None]}

    pre = Path(dst).with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(dst), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=scheme.reduce_range)
    pre.unlink()


def ship_onnx(model: nn.Module, input_shape: Sequence[int], precision: str, path: Path, *,
              calib: np.ndarray | None = None, scheme: Int8Scheme | None = None) -> tuple[Path, float]:
    """Write the ONNX model deploy ships at `precision` ("fp32", "fp16", "int8") to `path`.

    Returns (the verified fp32 file: `path` itself at fp32, else `path` with suffix .fp32.onnx beside it, and
    export_onnx's max difference to torch). int8 needs `calib`; `scheme` as in quantize_int8.
    """
    path = Path(path)
    fp32_path = path if precision == "fp32" else path.with_suffix(".fp32.onnx")
    max_diff = export_onnx(model, input_shape, fp32_path)
    if precision == "fp16":
        to_fp16(fp32_path, path)
    elif precision == "int8":
        quantize_int8(fp32_path, path, calib, scheme)
    elif precision != "fp32":
        raise DeployError(f"--precision {precision}: must be one of fp32, fp16, int8")
    return fp32_path, max_diff


def onnx_top1(path: Path, x: np.ndarray, y: np.ndarray, threads: int = 1) -> float:
    """Top-1 % of the ONNX model at `path` on inputs `x` (N,C,H,W) and labels `y`, one image at a time (the
    exported batch is 1), in an onnxruntime session as deploy benches it."""
    sess = session(path, threads)
    xs = np.ascontiguousarray(x, dtype=np.float32)
    hits = sum(int(np.argmax(sess.run(None, {INPUT_NAME: xs[i:i + 1]})[0])) == int(y[i]) for i in range(len(y)))
    return 100.0 * hits / len(y)


def runtime_top1(model: nn.Module, dataset: TensorDataset, precision: str, calib: torch.Tensor | None = None, *,
                 scheme: Int8Scheme | None = None, threads: int = 1) -> float:
    """Top-1 % of `model` on `dataset` as onnxruntime runs the model deploy ships at `precision`: exported,
    converted to fp16 or quantized to int8 (calibrated on `calib`, settings `scheme`) by the deploy stage's own
    functions, evaluated on this machine. The model is copied (to the CPU), never changed."""
    x, y = dataset.tensors[0], dataset.tensors[1]
    model = copy.deepcopy(model).cpu().eval()
    with tempfile.TemporaryDirectory(prefix="edgecompact-top1-") as tmp:
        path = Path(tmp) / "model.onnx"
        ship_onnx(model, (1, *x.shape[1:]), precision, path, scheme=scheme,
                  calib=None if calib is None else calib.detach().cpu().numpy())
        return onnx_top1(path, x.numpy(), y.numpy(), threads)


def u8s8_saturates(threads: int = 1) -> bool:
    """Whether onnxruntime's uint8 x int8 convolution saturates on this CPU: a QDQ 1x1 conv of 32 channels of
    255 x 127 (exact sum 1,036,320) comes out at half when pairs of products are summed in int16 (vpmaddubsw,
    x86 without VNNI). The fact that `Int8Scheme.reduce_range` exists for, measured rather than inferred."""
    from onnx import TensorProto, helper, numpy_helper

    c = 32

    def const(name: str, value: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(value, name)

    inits = [const("s", np.array(1.0, np.float32)), const("z", np.array(0, np.uint8)),
             const("w", np.full((1, c, 1, 1), 127, np.int8)), const("ws", np.ones(1, np.float32)),
             const("wz", np.zeros(1, np.int8)), const("so", np.array(8192.0, np.float32))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"]),
             helper.make_node("QuantizeLinear", ["y", "so", "z"], ["yq"]),  # a quantized output: QLinearConv
             helper.make_node("DequantizeLinear", ["yq", "so", "z"], ["out"])]
    graph = helper.make_graph(nodes, "u8s8_probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 1, 1])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, 1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    got = float(sess.run(None, {"x": np.full((1, c, 1, 1), 255, np.float32)})[0].item())
    return got < 0.75 * c * 255 * 127  # exact: 126.5 steps of 8192 -> 127; saturated: 16 x 32767 -> 64
