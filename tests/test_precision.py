"""Accuracy at the deployment precision: int8 fake quantization against onnxruntime's static QDQ model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

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


def test_int8_fake_quantization_matches_onnxruntime_static_qdq_model(tmp_path, digits16, trained_resnet20):
    """The independent check: the model the deploy stage ships (export, simplify, quantize_static QDQ)."""
    from edgecompact.deploy.onnx import INPUT_NAME, export_onnx, session
    from edgecompact.deploy.onnx import quantize_int8 as ort_quantize_int8

    model = trained_resnet20
    calib = calibration_inputs(digits16.train)
    x, y = digits16.test.tensors
    export_onnx(model, (1, *x.shape[1:]), tmp_path / "fp32.onnx")
    ort_quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", calib.numpy())
    sess = session(tmp_path / "int8.onnx")
    ort_logits = np.concatenate([sess.run(None, {INPUT_NAME: x[i:i + 1].numpy()})[0] for i in range(len(x))])
    with torch.no_grad():
        ours = quantize_int8(model, calib)(x).numpy()
        fp32 = model(x).numpy()
    ort_top1 = 100 * float((ort_logits.argmax(1) == y.numpy()).mean())
    assert evaluate_at_precision(model, digits16.test, "int8", calib) == pytest.approx(ort_top1, abs=0.3)
    assert (ours.argmax(1) == ort_logits.argmax(1)).mean() >= 0.99
    # int8 moves the logits; our fake quantization moves them where onnxruntime does
    quant_shift = np.abs(fp32 - ort_logits).mean()
    assert quant_shift > 0.01
    assert np.abs(ours - ort_logits).mean() < 0.3 * quant_shift


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
