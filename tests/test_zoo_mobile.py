"""The zoo's small ShuffleNetV2, GhostNet, MobileNetV2-SE and DenseNet: searched end to end, the budget met, and
deployed through ONNX and TVM with the runtimes agreeing (tools/bench_zoo.py runs every method on each)."""

from __future__ import annotations

import pytest

from edgecompact.pipeline import SearchSpec, run_search

# each model with one method here (every method on every model: tools/bench_zoo.py)
CASES = [("shufflenet_v2_cifar", "group-lasso"), ("ghostnet_cifar", "morphnet"),
         ("mobilenet_v2_se_cifar", "variational-dropout"), ("densenet_cifar", "gensynth")]


@pytest.mark.slow
@pytest.mark.parametrize("model,method", CASES)
def test_mobile_zoo_model_is_searched_and_deployed(tmp_path, model, method):
    spec = SearchSpec(model=model, data="digits", method=method, budget="0.5x", input_size=16, epochs=1,
                      search_epochs=1, finetune_epochs=1, batch_size=64, target="host", final="inherit",
                      options={"cycles": 2, "samples": 2} if method == "gensynth" else {})
    doc = run_search(spec, tmp_path / "run", log=lambda *_: None)
    base, comp = doc["results"]
    assert abs(comp["budget"]["error_pct"]) <= 2.0
    assert comp["mflops"] < base["mflops"]
    for rec in (base, comp):
        assert {"host-ort", "host-tvm"} <= set(rec["latency_ms"])
        # the same network under both runtimes: ONNX (onnxruntime) and TVM's compiled module agree
        assert rec["deployed_top1"]["fp32-ort"] == pytest.approx(rec["deployed_top1"]["fp32-tvm"], abs=0.5)
    assert (tmp_path / "run" / "deploy" / "host" / "compact" / "model.so").is_file()
