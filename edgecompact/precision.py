"""The search's fast proxy for accuracy at the deployment precision: fp32 as is, fp16 by running the model in half,
int8 by fake quantization. The figure reported is the runtime's own (`edgecompact.deploy.onnx.runtime_top1`).

The int8 scheme is onnxruntime's static QDQ quantization as the deploy stage calls it (`quantize_static`,
QuantFormat.QDQ, per_channel=True, weights QInt8, activations QUInt8, MinMax calibration, reduce_range as the
CPU needs: `edgecompact.cpu.Int8Scheme`): per-output-channel symmetric int8 weights (scale = max|w| / 127, or
max|w| / 64 with reduce_range), and one asymmetric uint8 scale and zero point per
activation tensor of the exported graph, from the min/max seen on calibration inputs by the float model. The graph
ORT quantizes has BatchNorm folded into the conv and a ReLU/Clip merged into the tensor it follows, so those
tensors are not quantized separately here either. The (folded) bias is rounded to int32 with scale
input_scale x weight_scale, as ORT does: small, but a visible share of an activation step.
This module only evaluates; it never changes the model it is given, and it does not export anything.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.data import TensorDataset

from edgecompact.cpu import Int8Scheme, int8_scheme
from edgecompact.errors import ConfigError
from edgecompact.targets import PRECISIONS
from edgecompact.train import evaluate

_RELU_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)  # exported as Relu / Clip, which ORT merges into their input
_RELU_FUNCTIONS = (F.relu, torch.relu, F.relu6, F.hardtanh, torch.clamp)
_RELU_METHODS = ("relu", "relu_", "clamp", "clamp_")


def calibration_inputs(dataset: TensorDataset, count: int = 256) -> torch.Tensor:
    """The inputs int8 ranges are calibrated on: the first `count` of `dataset`, as the deploy stage takes them."""
    return dataset.tensors[0][:count]


def evaluate_at_precision(model: nn.Module, dataset: TensorDataset, precision: str,
                          calib: torch.Tensor | None = None, scheme: Int8Scheme | None = None) -> float:
    """Top-1 % of `model` on `dataset` when deployed at `precision` ("fp32", "fp16" or "int8").

    `calib` (inputs, N x C x H x W) is required for int8: the activation ranges come from it. `scheme`: the int8
    settings (default: this CPU's, `int8_scheme()`).
    """
    return evaluate(at_precision(model, precision, calib, scheme), dataset)


def at_precision(model: nn.Module, precision: str, calib: torch.Tensor | None = None,
                 scheme: Int8Scheme | None = None) -> nn.Module:
    """A copy of `model` (eval mode) that computes at `precision`, taking and returning float32."""
    if precision == "fp32":
        return copy.deepcopy(model).eval()
    if precision == "fp16":
        return Half(copy.deepcopy(model).eval().half())
    if precision == "int8":
        if calib is None:
            raise ValueError("int8 evaluation needs calibration inputs")
        return quantize_int8(model, calib, scheme)
    raise ConfigError(f"--precision: unknown precision '{precision}' (choose {', '.join(PRECISIONS)})")


class Half(nn.Module):
    """Runs a half-precision model on float32 inputs: weights and every activation are fp16."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def quantize_int8(model: nn.Module, calib: torch.Tensor, scheme: Int8Scheme | None = None,
                  batch_size: int = 256) -> fx.GraphModule:
    """A fake-quantized copy of `model` (eval mode): int8 weights, uint8 activations calibrated on `calib`,
    under `scheme` (default: this CPU's)."""
    qmax = (scheme or int8_scheme()).weight_qmax
    try:
        gm = fx.symbolic_trace(copy.deepcopy(model).eval())
    except Exception as e:  # noqa: BLE001 - any tracing failure means the same thing to the user
        raise ConfigError(f"int8 evaluation: the model cannot be traced by torch.fx ({type(e).__name__}); "
                          "use precision fp32 or fp16") from None
    modules = dict(gm.named_modules())
    points = [n for n in gm.graph.nodes if _quantized_output(n, modules)]
    for i, node in enumerate(points):
        name = f"act_quant_{i}"
        gm.add_submodule(name, ActivationQuant())
        with gm.graph.inserting_after(node):
            q = gm.graph.call_module(name, (node,))
        node.replace_all_uses_with(q, delete_user_cb=lambda user, q=q: user is not q)
    gm.recompile()
    device = next(gm.parameters()).device
    with torch.no_grad():
        for i in range(0, len(calib), batch_size):
            gm(calib[i:i + batch_size].to(device))  # float model, observers record min/max
        for m in gm.modules():
            if isinstance(m, ActivationQuant):
                m.freeze()
        modules = dict(gm.named_modules())
        for node in gm.graph.nodes:
            if _is_module(node, modules, (nn.Conv2d, nn.Linear)):
                _quantize_layer(node, modules, qmax)
    return gm


def _quantize_layer(node: fx.Node, modules: dict[str, nn.Module], qmax: int) -> None:
    """Fake-quantize a conv/linear's weight per channel and its bias (folded with a following BN) to int32."""
    layer = modules[str(node.target)]
    users = list(node.users)
    bn = modules[str(users[0].target)] if len(users) == 1 and _is_module(users[0], modules, nn.BatchNorm2d) else None
    w = layer.weight.detach().double()
    bias = torch.zeros(w.shape[0], dtype=torch.float64) if layer.bias is None else layer.bias.detach().double()
    if bn is not None:  # the export folds BN: w' = k w, b' = k (b - mean) + beta
        k = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        w = w * k.view(-1, *([1] * (w.dim() - 1)))
        bias = k * (bias - bn.running_mean.double()) + bn.bias.detach().double()
    source = node.args[0]
    quant = modules.get(str(source.target)) if isinstance(source, fx.Node) and source.op == "call_module" else None
    if isinstance(quant, ActivationQuant) and quant.scale is not None and (bn is not None or layer.bias is not None):
        w_scale = _weight_scale(w.float(), qmax).double()
        b_scale = torch.tensor(quant.scale, dtype=torch.float64) * w_scale
        shift = torch.round(bias / b_scale) * b_scale - bias  # int32 rounding error of the folded bias
        target = bn.bias if bn is not None else layer.bias
        target.add_(shift.to(target.dtype))
    layer.weight.copy_(fake_quant_weight(layer.weight, qmax))


def _quantized_output(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ORT's QDQ graph has a quantized tensor where `node`'s output is."""
    if node.op == "placeholder":
        return True
    if node.op not in ("call_module", "call_function", "call_method"):
        return False
    users = list(node.users)
    if len(users) == 1:
        user = users[0]
        if _is_module(node, modules, nn.Conv2d) and _is_module(user, modules, nn.BatchNorm2d):
            return False  # folded into the conv at export
        if _is_relu(user, modules):
            return False  # ORT drops the ReLU and quantizes its output in place of this one
    return True


def _is_module(node: fx.Node, modules: dict[str, nn.Module], kind: type | tuple[type, ...]) -> bool:
    return node.op == "call_module" and isinstance(modules.get(str(node.target)), kind)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in _RELU_METHODS
    return _is_module(node, modules, _RELU_MODULES)


class ActivationQuant(nn.Module):
    """Observes min/max while calibrating, then fake-quantizes to uint8 with ORT's scale and zero point."""

    def __init__(self) -> None:
        super().__init__()
        self.lo = float("inf")
        self.hi = float("-inf")
        self.scale: float | None = None
        self.zero_point = 0

    def forward(self, x):
        if not torch.is_tensor(x) or not x.is_floating_point():
            return x
        if self.scale is None:
            self.lo = min(self.lo, float(x.min()))
            self.hi = max(self.hi, float(x.max()))
            return x
        q = torch.clamp(torch.round(x / self.scale) + self.zero_point, 0, 255)
        return (q - self.zero_point) * self.scale

    def freeze(self) -> None:
        self.scale, self.zero_point = uint8_scale_zero_point(self.lo, self.hi)


def uint8_scale_zero_point(lo: float, hi: float) -> tuple[float, int]:
    """ORT's `compute_scale_zp` for asymmetric uint8: the range is widened to include 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0  # float64, as ORT computes it before storing float32
    if scale < torch.finfo(torch.float32).tiny:
        return 1.0, 0
    zero_point = round(0 - lo / scale)  # Python's round is half-to-even, as numpy.round
    return float(torch.tensor(scale, dtype=torch.float32)), zero_point


def _weight_scale(w: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """Per-output-channel symmetric int8 scale, max|w| / qmax (1 for an all-zero channel, as ORT)."""
    absmax = w.detach().abs().reshape(w.shape[0], -1).amax(1).double()
    scale = (2 * absmax / (2 * qmax)).float()  # ORT: (rmax - rmin) / (qmax - qmin) in float64, stored float32
    return torch.where(scale < torch.finfo(torch.float32).tiny, torch.ones_like(scale), scale)


def fake_quant_weight(w: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """Per-output-channel symmetric int8 in [-qmax, qmax] (127, or 64 with reduce_range); the scale commutes with
    BN folding's per-channel factor."""
    scale = _weight_scale(w, qmax).view(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale
