"""ONNX side of deploy: export (static batch 1), simplify, verify against torch, and fp16/int8 variants.

Every exported model is checked against torch with onnxruntime before anything compiles it; an fp32 model
that differs by more than FP32_TOLERANCE is refused. Nothing here touches TVM.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

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


def input_spec(path: Path) -> tuple[str, list[int], str]:
    """(name, shape, numpy dtype) of the model's single input."""
    model = load_onnx(path)
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


def quantize_int8(src: Path, dst: Path, calib: np.ndarray) -> None:
    """Static int8 QDQ quantization (per-channel weights, uint8/int8 activations) calibrated on `calib` (N,C,H,W)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calib is None or len(calib) == 0:
        raise DeployError("precision int8 needs calibration inputs (--calib / the training data)")

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib.astype(np.float32))

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.it, None)
            return None if x is None else {INPUT_NAME: x[None]}

    pre = Path(dst).with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(dst), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    pre.unlink()
