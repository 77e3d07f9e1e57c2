"""Accuracy at the deployment precision: the runtime's own top-1, and int8 fake quantization (the search's proxy)
against onnxruntime's static QDQ model under the int8 settings of the CPU the tests run on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgecompact.cpu import Int8Scheme, host_cpu, int8_scheme
from edgecompact.errors import ConfigError
from edgecompact.precision import (
    at_precision,
    calibration_inputs,
    evaluate_at_precision,
    fake_quant_weight,
    quantize_int8,
    uint8_scale_zero_point,
)
from edgecompact.train import evaluate


def _shipped_int8_logits(tmp_path, model, calib, x, scheme):
    """The int8 model as the deploy stage ships it (export, simplify, quantize_static QDQ), run by onnxruntime."""
    from edgecompact.deploy.onnx import INPUT_NAME, export_onnx, session
    from edgecompact.deploy.onnx import quantize_int8 as ort_quantize_int8

    export_onnx(model, (1, *x.shape[1:]), tmp_path / "fp32.onnx")
    ort_quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", calib.numpy(), scheme)
    sess = session(tmp_path / "int8.onnx")
    return np.concatenate([sess.run(None, {INPUT_NAME: x[i:i + 1].numpy()})[0] for i in range(len(x))])


@pytest.mark.parametrize("settings", ["this-cpu", "reduce-range"])
def test_int8_fake_quantization_matches_onnxruntime_static_qdq_model(tmp_path, digits16, trained_resnet20, settings):
    """The independent check, with this CPU's int8 settings and with 7-bit weights (which no CPU saturates).

    Measured (digits16 ResNet-20, 359 test images): top-1 equal and every prediction agreeing, mean logit distance
    0.065-0.083x the int8 shift, on a Xeon with VNNI (both settings) and under qemu's AVX2 Haswell (reduce_range);
    full-range weights under AVX2 instead differ by 2.2 points (benchmarks/precision.md)."""
    model = trained_resnet20
    scheme = int8_scheme() if settings == "this-cpu" else Int8Scheme(reduce_range=True)
    calib = calibration_inputs(digits16.train)
    x, y = digits16.test.tensors
    ort_logits = _shipped_int8_logits(tmp_path, model, calib, x, scheme)
    with torch.no_grad():
        ours = quantize_int8(model, calib, scheme)(x).numpy()
        fp32 = model(x).numpy()
    ort_top1 = 100 * float((ort_logits.argmax(1) == y.numpy()).mean())
    assert evaluate_at_precision(model, digits16.test, "int8", calib, scheme) == pytest.approx(ort_top1, abs=0.3)
    assert (ours.argmax(1) == ort_logits.argmax(1)).mean() >= 0.99
    # int8 moves the logits; our fake quantization moves them where onnxruntime does
    quant_shift = np.abs(fp32 - ort_logits).mean()
    assert quant_shift > 0.01
    assert np.abs(ours - ort_logits).mean() < 0.3 * quant_shift


def test_reported_int8_top1_is_onnxruntimes_own_on_the_shipped_model(tmp_path, digits16, trained_resnet20):
    """runtime_top1 (what measure() reports) is onnxruntime's evaluation of the deploy stage's int8 file, exactly."""
    from edgecompact.deploy.onnx import runtime_top1

    calib = calibration_inputs(digits16.train)
    x, y = digits16.test.tensors
    ort_logits = _shipped_int8_logits(tmp_path, trained_resnet20, calib, x, int8_scheme())
    assert runtime_top1(trained_resnet20, digits16.test, "int8", calib) == 100 * float(
        (ort_logits.argmax(1) == y.numpy()).mean())


def test_measure_reports_the_runtimes_top1_and_the_proxy_beside_it(make_context):
    from edgecompact.deploy.onnx import runtime_top1
    from edgecompact.methods.base import measure

    ctx = make_context(precision="int8")
    widths = ctx.structure.baseline_widths()
    calib = calibration_inputs(ctx.data.train)
    test = ctx.data.test if ctx.data.test is not None else ctx.data.val
    out = measure(ctx, widths, ctx.baseline)
    assert out["top1"] == round(runtime_top1(ctx.baseline, test, "int8", calib), 2)
    assert out["top1_proxy"] == round(evaluate_at_precision(ctx.baseline, test, "int8", calib), 2)
    assert out["top1_runtime"] == "onnxruntime" and out["top1_fp32"] == round(evaluate(ctx.baseline, test), 2)
    assert out["int8"]["reduce_range"] == int8_scheme().reduce_range


def test_onnxruntime_int8_kernels_saturate_exactly_where_the_cpu_has_no_vnni():
    """The fact behind reduce_range, on the CPU the tests run on: x86 without VNNI sums uint8 x int8 products in
    int16 pairs (vpmaddubsw) and saturates; VNNI (and Arm) accumulate in int32."""
    from edgecompact.deploy.onnx import u8s8_saturates

    cpu = host_cpu()
    assert u8s8_saturates() == (cpu.x86 and not cpu.vnni)
    assert int8_scheme().reduce_range == u8s8_saturates()


@pytest.mark.parametrize("reduce_range", [False, True])
def test_weights_are_quantized_like_onnxruntimes_quantize_data(reduce_range):
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    w[2] *= 1e-3  # a small channel keeps its own scale
    qmax = Int8Scheme(reduce_range).weight_qmax
    ours = fake_quant_weight(w, qmax)
    for c in range(w.shape[0]):
        zp, scale, q = quantize_data(w[c].flatten().numpy(), TensorProto.INT8, True, reduce_range=reduce_range)
        assert int(zp) == 0 and int(np.abs(q).max()) == qmax
        assert np.array_equal(ours[c].flatten().numpy(), (q.astype(np.float32) * np.float32(scale)))


def test_uint8_scale_and_zero_point_equal_onnxruntimes():
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    for lo, hi in [(-1.3, 4.1), (0.0, 6.0), (0.2, 3.0), (-2.0, -0.5), (-0.004, 0.013)]:
        zp, scale = compute_scale_zp(np.float32(lo), np.float32(hi), np.uint8(0), np.uint8(255))
        ours = uint8_scale_zero_point(float(np.float32(lo)), float(np.float32(hi)))
        assert ours == (pytest.approx(float(scale), rel=1e-7), int(zp))


def test_weights_are_quantized_per_output_channel_symmetric():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.01, -0.02, 0.004]])
    q = fake_quant_weight(w)
    for row, qrow in zip(w, q):
        step = row.abs().max() / 127
        assert torch.allclose(qrow / step, torch.round(qrow / step), atol=1e-4)  # on the int8 grid of its row
        assert (qrow - row).abs().max() <= step / 2 + 1e-7
    assert q[0, 0] == w[0, 0] and q[1, 1] == w[1, 1]  # each row's extreme is exactly +-127 steps
    assert (q[1] != 0).all()  # a per-tensor scale would have flushed the small row to zero


def test_fp32_is_the_model_itself_and_fp16_runs_in_half(digits16, trained_resnet20):
    assert evaluate_at_precision(trained_resnet20, digits16.test, "fp32") == evaluate(trained_resnet20, digits16.test)
    half = at_precision(trained_resnet20, "fp16")
    assert all(p.dtype == torch.float16 for p in half.parameters())
    x = digits16.test.tensors[0][:64]
    with torch.no_grad():
        a, b = trained_resnet20(x), half(x)
    assert b.dtype == torch.float32
    assert 0 < (a - b).abs().max() < 0.05 * a.abs().max()


def test_int8_calibrated_on_wrong_ranges_loses_accuracy(digits16, trained_resnet20):
    calib = calibration_inputs(digits16.train)
    good = evaluate_at_precision(trained_resnet20, digits16.test, "int8", calib)
    bad = evaluate_at_precision(trained_resnet20, digits16.test, "int8", calib * 200)  # ranges 200x too wide
    assert good > evaluate(trained_resnet20, digits16.test) - 2
    assert bad < good - 20


def test_precision_errors_name_the_problem(trained_resnet20):
    with pytest.raises(ConfigError, match="precision"):
        evaluate_at_precision(trained_resnet20, None, "int4")

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)  # data-dependent: torch.fx cannot trace it

    with pytest.raises(ConfigError, match="torch.fx"):
        quantize_int8(Branchy(), torch.randn(8, 4))
