"""Per-operator profiling: both runtimes' ops checked against torch's own conv layers, and the matching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from edgecompact.deploy import onnx as eonnx
from edgecompact.deploy import opprofile as op


class _Block(nn.Module):
    """Stem conv, then a residual block whose projection shortcut and first conv read the same tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.shortcut = nn.Sequential(nn.Conv2d(8, 16, 1, 2, 0, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.relu(self.conv2(self.conv1(x)) + self.shortcut(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def _torch_conv_keys(model: nn.Module, shape: tuple[int, ...]) -> list[tuple]:
    """The truth: (kind, input shape, output shape, kernel) of every nn.Conv2d, from forward hooks."""
    keys: list[tuple] = []
    hooks = [m.register_forward_hook(lambda m, i, o: keys.append(
        ("conv", tuple(i[0].shape), tuple(o.shape), tuple(m.kernel_size))))
        for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(shape))
    for h in hooks:
        h.remove()
    return keys


@pytest.fixture(scope="module")
def block_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = _Block().eval()
    path = tmp_path_factory.mktemp("opprofile") / "block.onnx"
    eonnx.export_onnx(model, (1, 3, 16, 16), path)
    return model, path


def test_both_runtimes_report_exactly_the_torch_conv_layers_and_all_pair_up(block_onnx):
    from tvm.relax.frontend.onnx import from_onnx

    from edgecompact.deploy import tvm as etvm
    from edgecompact.targets import get_target

    model, path = block_onnx
    truth = sorted(_torch_conv_keys(model, (1, 3, 16, 16)))
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)

    ex = etvm.compile_relax(from_onnx(eonnx.load_onnx(path), shape_dict={"x": [1, 3, 16, 16]}), get_target("host"))
    tvm_ops, ort_ops = op.op_times(ex, path, x, passes=2, number=1, ort_runs=3, warmup=1)

    assert sorted(o.key for o in ort_ops if o.kind == "conv") == truth
    assert sorted(o.key for o in tvm_ops if o.kind == "conv") == truth
    assert all(o.us > 0 for o in ort_ops + tvm_ops)
    assert [o.key for o in op.ort_op_times(path, x, runs=2, warmup=1)] == [o.key for o in ort_ops]
    rows = op.match_ops(tvm_ops, ort_ops)
    convs = [(t, o) for t, o in rows if (t or o).kind == "conv"]
    assert len(convs) == len(truth) and all(t is not None and o is not None and t.key == o.key for t, o in convs)
    assert any(t is not None and o is not None and t.kind == "dense" for t, o in rows)  # fc: matmul <-> Gemm
    s = op.summarize(rows)
    assert s["tvm_us"] == pytest.approx(sum(t.us for t in tvm_ops))
    assert s["ort_us"] == pytest.approx(sum(o.us for o in ort_ops))
    assert s["by_kind"]["conv"]["count"] == len(truth)
    # each TVM conv's FLOPs (from its weight) add up to torch's FlopCounterMode count of the model's convolutions
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, 16, 16))
    conv_flops = sum(v for k, v in counter.get_flop_counts()["Global"].items() if "convolution" in str(k))
    assert sum(o.flops for o in tvm_ops if o.kind == "conv") == conv_flops


def _conv(name: str, cin: int, cout: int, hw: int, k: int = 3, stride: int = 1, us: float = 1.0) -> op.Op:
    return op.Op(name, "conv", (1, cin, hw, hw), (1, cout, hw // stride, hw // stride), (k, k), us)


def test_match_pairs_by_shape_and_occurrence_not_by_position():
    a = [_conv("a_stem", 3, 16, 32), _conv("a_c1", 16, 32, 32, 3, 2), _conv("a_sc", 16, 32, 32, 1, 2),
         _conv("a_c2", 32, 32, 16), _conv("a_c3", 32, 32, 16), _conv("a_only", 32, 64, 16, 3, 2)]
    layout = op.Op("Reorder", "layout", (1, 32, 16, 16), (1, 32, 16, 16))
    # the other runtime runs the shortcut first and has a layout op the first one lacks
    b = [_conv("b_stem", 3, 16, 32), _conv("b_sc", 16, 32, 32, 1, 2), _conv("b_c1", 16, 32, 32, 3, 2),
         layout, _conv("b_c2", 32, 32, 16), _conv("b_c3", 32, 32, 16)]
    rows = op.match_ops(a, b)
    names = [(t.name if t else None, o.name if o else None) for t, o in rows]
    assert names == [("a_stem", "b_stem"), ("a_c1", "b_c1"), ("a_sc", "b_sc"), (None, "Reorder"),
                     ("a_c2", "b_c2"), ("a_c3", "b_c3"), ("a_only", None)]


def test_a_prepacked_conv_keeps_its_kernel_and_fan_in():
    """Shapes of a tuned, prepacked module (3->16 and 16->16 3x3 convs at 16x16): the weight's tiled layout holds
    the same O x I x 3 x 3 values, so the op matches onnxruntime's conv and counts the same FLOPs."""
    a = op.tvm_op("fused_conv2d_add_relu1_prepacked", [(1, 3, 16, 16), (2, 2, 3, 2, 3, 3, 2), (2, 2, 4),
                                                       (1, 16, 16, 16)])
    b = op.tvm_op("fused_conv2d1_add_relu1_prepacked", [(1, 16, 16, 16), (2, 8, 8, 2, 3, 3), (1, 16),
                                                        (1, 16, 16, 16)])
    dw = op.tvm_op("fused_conv2d2_prepacked", [(1, 16, 8, 8), (16, 1, 3, 3, 1), (1, 16, 8, 8)])
    assert (a.kernel, a.fan_in, b.kernel, b.fan_in, dw.kernel, dw.fan_in) == ((3, 3), 27, (3, 3), 144, (3, 3), 9)
    # a prepacked weight can be 4-D in another order (3->8 at 32x32: (3, 3, 3, 8), not O x I x kh x kw)
    four = op.tvm_op("fused_conv2d_add_relu1_prepacked", [(1, 3, 32, 32), (3, 3, 3, 8), (8,), (1, 8, 32, 32)])
    assert (four.kernel, four.fan_in) == ((3, 3), 27)
    assert a.key == _conv("x", 3, 16, 16).key and a.flops == 2 * 16 * 16 * 16 * 27


def test_kinds_and_descriptions():
    assert op.tvm_kind("fused_conv2d3_add2_add3_relu1") == "conv"
    assert op.tvm_kind("fused_matmul_add6") == "dense"
    assert op.tvm_kind("mean") == "pool"
    assert op.tvm_kind("reshape3") == "reshape"
    assert op.tvm_kind("fused_add_relu") == "elementwise"
    assert op.ort_kind("Conv") == "conv" and op.ort_kind("ReorderOutput") == "layout"
    assert _conv("c", 16, 32, 32, 3, 2).describe() == "conv 16->32 3x3/2 @32x32"
    assert op.tvm_op("fused_matmul_add", [(1, 64), (64, 10), (10,), (1, 10)]).describe() == "dense 64->10"
