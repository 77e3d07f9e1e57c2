"""`search` end to end on a tiny setting for every registered method: a valid run directory and report."""

from __future__ import annotations

import json

import pytest

from edgecompact.methods import list_methods
from edgecompact.pipeline import SearchSpec, load_compact, run_search
from edgecompact.report import markdown_table
from edgecompact.structure_check import torch_flops


def _spec(method: str, **kw) -> SearchSpec:
    base = {"model": "resnet20", "data": "digits", "method": method, "budget": "0.33x", "input_size": 16, "epochs": 1,
                "search_epochs": 1, "finetune_epochs": 1, "batch_size": 64, "target": "host"}
    base.update(kw)
    return SearchSpec(**base)


@pytest.mark.slow
@pytest.mark.parametrize("method", list_methods())
def test_search_every_method_writes_a_valid_run_dir(tmp_path, method):
    spec = _spec(method, options={"cycles": 2, "samples": 2} if method == "gensynth" else {},
                 drop_blocks=method == "uniform-depth-scratch")  # the compound control removes residual blocks
    doc = run_search(spec, tmp_path / method, deploy=False, log=lambda *_: None)
    names = [r["name"] for r in doc["results"]]
    assert names == ["baseline", method]
    rec = doc["results"][1]
    assert abs(rec["budget"]["error_pct"]) <= 2.0
    # a prediction is there, from the host's table; fewer FLOPs need not mean fewer predicted ms on onnxruntime
    assert rec["latency_ms"]["predicted"] > 0 and doc["results"][0]["latency_ms"]["predicted"] > 0
    for f in ("config.json", "structure.json", "arch.json", "compact.pt", "history.json", "report.json", "report.md"):
        assert (tmp_path / method / f).is_file(), f
    arch = json.loads((tmp_path / method / "arch.json").read_text())
    assert {k: len(v) for k, v in arch["keep"].items()} == arch["widths"] == rec["widths"]
    # the reported MFLOPs are torch's own count of the saved model, and the Markdown is the JSON's table
    compact, _, structure = load_compact(tmp_path / method)
    assert rec["mflops"] == pytest.approx(torch_flops(compact, structure.input_shape) / 1e6, abs=1e-3)
    assert (tmp_path / method / "report.md").read_text() == markdown_table(doc)
    # every method's final training is the protocol's default, chosen on validation (controls fix theirs)
    fixed = {"uniform": "inherit", "random": "inherit", "uniform-scratch": "scratch", "uniform-depth-scratch": "scratch"}
    assert rec["final"] == fixed.get(method, rec["final"]) and rec["final"] in rec["final_val_top1"]


@pytest.mark.slow
def test_search_with_deploy_measures_baseline_and_compact_on_the_host(tmp_path):
    doc = run_search(_spec("uniform", budget="0.5x"), tmp_path / "run", log=lambda *_: None)
    base, comp = doc["results"]
    for rec in (base, comp):
        assert {"host-ort", "host-tvm", "host-torch"} <= set(rec["latency_ms"])
        assert rec["deployed_top1"]["fp32-ort"] == pytest.approx(rec["deployed_top1"]["fp32-tvm"], abs=0.5)
    assert (tmp_path / "run" / "deploy" / "host" / "compact" / "model.so").is_file()
    assert (tmp_path / "run" / "deploy" / "host" / "bench.json").is_file()


@pytest.mark.slow
def test_distill_reaches_every_fine_tune_with_the_baseline_as_teacher(tmp_path, monkeypatch):
    import edgecompact.train as train_mod
    from edgecompact.methods import base

    calls: list[tuple[float, object]] = []
    real = train_mod.train

    def spy(model, data, cfg, *a, teacher=None, **kw):
        calls.append((cfg.distill_alpha, teacher))
        return real(model, data, cfg, *a, teacher=teacher, **kw)

    monkeypatch.setattr(base, "train", spy)  # run_method's fine-tune
    doc = run_search(_spec("uniform", distill=0.5), tmp_path / "run", deploy=False, log=lambda *_: None)
    assert calls and all(alpha == 0.5 and teacher is not None for alpha, teacher in calls)
    assert "distillation 0.5" in json.dumps(doc)
