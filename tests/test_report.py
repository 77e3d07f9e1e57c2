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


def test_baseline_row_shows_the_runtime_its_compacts_are_timed_in():
    """The baseline is fastest on onnxruntime, its compact on TVM (timed beside a TVM baseline): the table's two ms
    must be one runtime's pair, the one the speedup is the ratio of."""
    base = {"name": "baseline", "mflops": 1.0, "top1": 50.0, "latency_ms": {"host-tvm": 0.0465, "host-ort": 0.044}}
    comp = {"name": "group-lasso", "mflops": 0.5, "top1": 49.0,
            "latency_ms": {"host-tvm": 0.0296, "host-tvm-baseline": 0.0465, "host-ort": 0.0569,
                           "host-ort-baseline": 0.044}, "measured_speedup": {"host-tvm": 1.571, "host-ort": 0.773}}
    rows = [line for line in markdown_table(bench_document("search", "c", "p", [base, comp])).splitlines()
            if line.startswith(("| baseline", "| group-lasso"))]
    assert "0.046 (host-tvm)" in rows[0] and "| 1.00x |" in rows[0]
    assert "0.030 (host-tvm)" in rows[1] and "1.57x" in rows[1]


def test_report_of_a_malformed_file_names_it(tmp_path):
    bad = tmp_path / "report.json"
    bad.write_text(json.dumps({"results": 3}))
    with pytest.raises(ConfigError, match="report.json"):
        load_records([bad])


def _seed(seed: int, top1: float, ms: float, base_ms: float) -> dict:
    return {"seed": seed, "top1": top1, "latency_ms": {"host-ort": ms, "host-ort-baseline": base_ms}}


def test_one_time_axis_puts_identical_shapes_timed_under_other_loads_at_one_ms():
    """Two compacts of one shape timed in pairs under different loads (the demo's uniform vs random): absolute ms
    differ, paired ratios do not; on the plot's axis both sit at ratio x the one reference baseline ms."""
    from edgecompact.report import one_axis_ms, reference_ms

    recs = [{"name": "uniform", "latency_ms": {"host-ort": 0.33, "host-ort-baseline": 1.0}},
            {"name": "random", "latency_ms": {"host-ort": 0.54, "host-ort-baseline": 1.636}},
            {"name": "baseline", "latency_ms": {"host-ort": 1.2}}]
    ref = reference_ms(recs)
    assert ref == pytest.approx((1.0 + 1.636) / 2)
    assert one_axis_ms(recs[0], ref) == pytest.approx(one_axis_ms(recs[1], ref), rel=1e-3)
    assert one_axis_ms(recs[0], ref) == pytest.approx(0.33 * ref)
    assert one_axis_ms(recs[2], ref) == ref


def test_seed_plot_has_error_bars_and_labels_that_do_not_overlap(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgecompact.report import place_labels, plot_seeds

    # crowded on purpose: five points within a few pixels of each other
    rows = [{"name": "baseline", "seeds": [0, 1], "top1": 90.0, "per_seed": [{"seed": 0, "top1": 90.0},
                                                                              {"seed": 1, "top1": 90.0}]}]
    for i, name in enumerate(["uniform-scratch", "gensynth", "group-lasso", "morphnet", "variational-dropout"]):
        per = [_seed(s, 88 + 0.01 * i + s * 0.1, 0.5 + 0.001 * i, 1.0 + 0.1 * s) for s in (0, 1)]
        rows.append({"name": name, "seeds": [0, 1], "top1": 88.05 + 0.01 * i, "per_seed": per})
    path = plot_seeds({"protocol": "test", "results": rows}, tmp_path / "p.png")
    assert path is not None and path.stat().st_size > 1000
    fig, ax = plt.subplots()
    ax.set_xlim(0.4, 1.2)
    ax.set_ylim(87, 91)
    pts = [(0.5 + 0.001 * i, 88.0 + 0.01 * i) for i in range(5)]
    texts = place_labels(ax, pts, [r["name"] for r in rows[1:]])
    boxes = [t.get_window_extent(fig.canvas.get_renderer()) for t in texts]
    assert len(boxes) == 5
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)
