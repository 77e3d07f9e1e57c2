"""Reports: Pareto front, Markdown table, and the plots made from report JSON."""

from __future__ import annotations

import json

import pytest

from edgecompact.errors import ConfigError
from edgecompact.report import bench_document, load_records, markdown_table, pareto, plot, write_bench


def test_pareto_keeps_only_non_dominated_points():
    pts = [(10, 90), (5, 85), (6, 80), (12, 89), (5, 85.5)]
    assert sorted(pareto(pts)) == [0, 4]  # (5, 85) and (6, 80) are dominated by (5, 85.5); (12, 89) by (10, 90)


def _records():
    widths = {"stem": 16, "layer2.0.conv1": 32}
    return [
        {"name": "baseline", "model": "resnet20", "dataset": "digits", "mflops": 20.3, "params": 272186,
         "top1": 98.3, "latency_ms": {"predicted": 0.4, "host-ort": 0.33}, "widths": widths},
        {"name": "uniform", "model": "resnet20", "dataset": "digits", "mflops": 6.6, "params": 90693, "top1": 98.0,
         "budget": {"metric": "flops", "target": 6.69, "achieved": 6.6, "error_pct": -1.3},
         "latency_ms": {"predicted": 0.13, "host-ort": 0.22}, "measured_speedup": {"host-ort": 1.4},
         "widths": {"stem": 9, "layer2.0.conv1": 18}},
    ]


def test_report_table_and_plots_from_run_reports(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_bench(run / "report.json", bench_document("search", "edgecompact search ...", "test", _records()))
    # the Markdown beside the JSON is the JSON's table: one document, written twice
    assert (run / "report.md").read_text() == markdown_table(json.loads((run / "report.json").read_text()))
    records = load_records([run])
    md = markdown_table(bench_document("report", "edgecompact report run", "test", records))
    assert "| uniform | resnet20 | digits | 6.6 | 90693 | 98.0 | -1.3 | 0.13 | 0.220 (host-ort) | 1.40x |" in md  # paired, same-process ratio
    written = plot(records, tmp_path)
    assert {p.name for p in written} == {"accuracy_vs_mflops.png", "accuracy_vs_ms.png", "widths.png"}
    assert all(p.stat().st_size > 1000 for p in written)


def test_table_says_whose_top1_a_reduced_precision_row_holds():
    runtime = {"name": "uniform", "model": "resnet20", "dataset": "digits", "top1": 97.2, "precision": "int8",
               "top1_runtime": "onnxruntime", "top1_proxy": 97.5, "top1_fp32": 98.0}
    older = {"name": "random", "model": "resnet20", "dataset": "digits", "top1": 96.9, "precision": "int8",
             "top1_fp32": 97.1}  # written before reports held the runtime's own top-1
    md = markdown_table(bench_document("search", "cmd", "test", [runtime, older]))
    assert "| uniform | resnet20 | digits | 97.2 | int8 (onnxruntime) | 97.5 | 98.0 |" in md
    assert "| random | resnet20 | digits | 96.9 | int8 (fake-quant proxy) |  | 97.1 |" in md


def test_report_of_a_malformed_file_names_it(tmp_path):
    bad = tmp_path / "report.json"
    bad.write_text(json.dumps({"results": 3}))
    with pytest.raises(ConfigError, match="report.json"):
        load_records([bad])
