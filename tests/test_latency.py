"""LatencyTable: interpolation, prediction, marginal latency, files, target checks; roofline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from edgecompact.cost.latency import (
    Entry,
    LatencyTable,
    LayerKey,
    default_table_path,
    group_grid,
    layer_grid,
)
from edgecompact.cost.model import table_for
from edgecompact.cost.roofline import roofline_ms, roofline_table
from edgecompact.errors import ConfigError
from edgecompact.structure import Layer, Structure, analyze
from edgecompact.targets import get_target

HOST = get_target("host")


def _structure() -> Structure:
    """stem conv (3 -> a), conv a -> b, BN b, depthwise b (stride 2), linear b -> 10."""
    layers = [
        Layer("stem", "conv2d", (3, 3), (1, 1), False, 1, False, (16, 16), (16, 16), [3], "a", 16),
        Layer("conv", "conv2d", (3, 3), (1, 1), False, 1, False, (16, 16), (16, 16), ["a"], "b", 32),
        Layer("bn", "batchnorm", (1, 1), (1, 1), False, 1, True, (16, 16), (16, 16), ["b"], "b", 32),
        Layer("dw", "conv2d", (3, 3), (2, 2), True, 32, False, (16, 16), (8, 8), ["b"], "b", 32),
        Layer("fc", "linear", (1, 1), (1, 1), False, 1, True, (1, 1), (1, 1), ["b"], None, 10),
    ]
    return Structure("toy", (3, 16, 16), {"a": 16, "b": 32}, layers)


def _bilinear(key: LayerKey, c_in: int, c_out: int) -> float:
    """A latency model that bilinear interpolation must reproduce exactly (distinct per key)."""
    h = key.in_hw[0] + 3 * key.stride[0] + (7 if key.depthwise else 0) + (11 if key.op == "linear" else 0)
    if key.depthwise:  # one axis: linear in the width
        c_in = 1
    return 0.01 * h + 0.002 * c_in + 0.003 * c_out + 1e-4 * h * c_in * c_out


def _table(structure: Structure, fn=_bilinear) -> LatencyTable:
    table = LatencyTable.new(HOST, "measured", space=structure.model_name, runtime=HOST.runtime)
    for key, (c_in, c_out) in layer_grid(structure, "fp32").items():
        entry = Entry.empty(c_in, c_out)
        for i, j, ci, co in entry.points():
            entry.ms[i][j] = fn(key, ci, co)
        table.entries[key] = entry
    return table


def test_grid_spans_one_eighth_to_full_width_per_kind():
    grid = layer_grid(_structure(), "fp32")
    assert [str(k) for k in grid] == [
        "conv2d k3x3 s1x1 dense 16x16->16x16 fp32",
        "conv2d k3x3 s2x2 dw 16x16->8x8 fp32",
        "linear fp32",
    ]
    conv = grid[next(iter(grid))]
    # the stem (c_in fixed at 3, c_out = a) and conv (a -> b) share one kind: their axes are united
    assert conv == ([2, 3, 4, 8, 12, 16], [2, 4, 8, 12, 16, 24, 32])
    assert grid[LayerKey.parse("conv2d k3x3 s2x2 dw 16x16->8x8 fp32")] == ([], [4, 8, 16, 24, 32])
    assert grid[LayerKey.parse("linear fp32")] == ([4, 8, 16, 24, 32], [10])
    for key in grid:
        assert LayerKey.parse(str(key)) == key
    assert layer_grid(_structure(), "fp32", multiple=8)[LayerKey.parse("linear fp32")] == (
        [8, 16, 24, 32],
        [10],
    )


def _grouped_net() -> nn.Sequential:
    """A ResNeXt-style grouped 3x3 conv (32 -> 64: 4 groups of 8 -> 16) between dense convs, BN, ReLU."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def test_grouped_conv_is_keyed_by_its_channels_per_group_and_gridded_in_whole_groups():
    s = analyze(_grouped_net(), (3, 16, 16))
    grouped = s.layers[2]
    assert grouped.groups == 4 and not grouped.depthwise
    key = LayerKey.of(grouped, "fp32", 32, 64)
    assert str(key) == "conv2d k3x3 s1x1 g8x16 16x16->16x16 fp32" and LayerKey.parse(str(key)) == key
    assert key.per_group == (8, 16) and key.one_axis
    assert LayerKey.of(grouped, "fp32", 16, 32) == key  # slimmed to 2 groups: the same kind
    assert str(LayerKey.of(s.layers[0], "fp32")) == "conv2d k3x3 s1x1 dense 16x16->16x16 fp32"
    with pytest.raises(ValueError, match="not whole groups"):
        key.conv_groups(24)
    for multiple, outs in [(1, [16, 32, 48, 64]), (8, [16, 32, 48, 64]), (32, [32, 64])]:
        grid = layer_grid(s, "fp32", multiple)
        assert grid[key] == ([], outs)  # one axis: c_in follows c_out, 8 per 16 output channels
        assert [key.in_channels(0, c) for c in outs] == [c // 2 for c in outs]
        assert [str(k).split()[3] for k in grid if k.op == "conv2d"] == ["dense", "g8x16", "dense"]
    # without a channel multiple, fractions of the groups (ResNeXt-50's 32 groups of 4 -> 4)
    assert group_grid(128, 4) == [16, 32, 64, 96, 128]
    assert group_grid(128, 4, multiple=8) == list(range(8, 129, 8))


def test_predict_prices_a_grouped_conv_from_its_own_entry():
    s = analyze(_grouped_net(), (3, 16, 16))
    grouped = s.layers[2]
    key = LayerKey.of(grouped, "fp32", 32, 64)
    dense_twin = LayerKey.parse("conv2d k3x3 s1x1 dense 16x16->16x16 fp32")  # the stem's kind, same shape
    table = _table(s, lambda k, ci, co: co / 16 if k == key else 100.0 + ci + co)
    entry = table.entries[key]
    assert entry.c_in == [] and entry.c_out == [16, 32, 48, 64] and entry.ms == [[1.0, 2.0, 3.0, 4.0]]
    assert dense_twin in table.entries and table.layer_ms(grouped, 16, 32) == 2.0  # its entry, not the twin's
    table.entries[key] = Entry([], [16, 64], [[1.0, 4.0]])  # between grid points: along its one axis
    assert table.layer_ms(grouped, 24, 48) == pytest.approx(3.0)
    table.entries[key] = entry
    two_groups = {**s.baseline_widths(), grouped.in_parts[0]: 2}
    assert [(ci, co) for layer, ci, co in s.channels(two_groups) if layer is grouped] == [(16, 32)]
    others = sum(
        table.layer_ms(layer, ci, co)
        for layer, ci, co in s.channels(two_groups)
        if layer.op != "batchnorm" and layer is not grouped
    )
    assert table.predict(s, two_groups) == pytest.approx(others + 2.0)
    del table.entries[key]
    with pytest.raises(ConfigError, match=r"layer '3' \(conv2d k3x3 s1x1 g8x16 16x16->16x16 fp32\)"):
        table.predict(s, s.baseline_widths())


def test_interpolation_is_exact_at_grid_points_and_for_bilinear_latency():
    s = _structure()
    rng = np.random.default_rng(0)
    table = _table(
        s, lambda k, ci, co: float(rng.uniform(0.1, 5.0))
    )  # arbitrary values: exact at grid points
    conv = s.layers[1]
    entry = table.entries[LayerKey.of(conv, "fp32")]
    for i, j, ci, co in entry.points():
        assert table.layer_ms(conv, ci, co) == pytest.approx(entry.ms[i][j], rel=1e-12)
    table = _table(s)  # a bilinear truth is reproduced everywhere inside the grid, off grid points too
    for c_in in range(2, 17):
        for c_out in range(2, 33, 3):
            key = LayerKey.of(conv, "fp32")
            assert table.layer_ms(conv, c_in, c_out) == pytest.approx(_bilinear(key, c_in, c_out), rel=1e-9)


def test_interpolation_is_monotone_between_grid_points():
    s = _structure()
    rng = np.random.default_rng(1)
    table = _table(s, lambda k, ci, co: float(rng.uniform(0.1, 5.0)))
    conv = s.layers[1]
    entry = table.entries[LayerKey.of(conv, "fp32")]
    for i, c_in in enumerate(entry.c_in):
        for j in range(len(entry.c_out) - 1):
            lo, hi = entry.c_out[j], entry.c_out[j + 1]
            values = [table.layer_ms(conv, c_in, c) for c in np.linspace(lo, hi, 9)]
            steps = np.diff(values)
            assert (steps >= -1e-12).all() or (steps <= 1e-12).all()
            assert min(values) >= min(entry.ms[i][j], entry.ms[i][j + 1]) - 1e-12
            assert max(values) <= max(entry.ms[i][j], entry.ms[i][j + 1]) + 1e-12


def test_extrapolation_is_linear_above_and_never_negative_below():
    s = _structure()
    table = _table(s)
    conv, key = s.layers[1], LayerKey.of(s.layers[1], "fp32")
    assert table.layer_ms(conv, 16, 40) == pytest.approx(
        _bilinear(key, 16, 40), rel=1e-9
    )  # bilinear: still exact
    assert table.layer_ms(conv, 1, 1) >= 0.0
    entry = table.entries[key]
    entry.ms = [
        [1.0 - 0.01 * j for j in range(len(entry.c_out))] for _ in entry.c_in
    ]  # decreasing with c_out
    assert table.layer_ms(conv, 16, 64) == pytest.approx(
        table.layer_ms(conv, 16, 32)
    )  # no negative slope outside


def test_predict_sums_conv_and_linear_layers_with_batchnorm_folded_and_applies_correction():
    s = _structure()
    table = _table(s)
    widths = {"a": 10, "b": 20}
    expected = sum(
        _bilinear(LayerKey.of(layer, "fp32"), c_in, c_out)
        for layer, c_in, c_out in s.channels(widths)
        if layer.op != "batchnorm"
    )
    assert table.predict(s, widths) == pytest.approx(expected, rel=1e-9)
    table.correction = {"scale": 1.5, "offset_ms": 0.25, "fitted_on": "test"}
    assert table.predict(s, widths) == pytest.approx(1.5 * expected + 0.25, rel=1e-9)
    assert table.predict(s, widths, corrected=False) == pytest.approx(expected, rel=1e-9)


def test_marginal_latency_is_the_per_channel_saving_of_the_group():
    s = _structure()
    table = _table(s)
    widths = {"a": 10, "b": 20}
    for group in ("a", "b"):
        fewer = {**widths, group: widths[group] - 1}
        truth = table.predict(s, widths) - table.predict(s, fewer)
        assert table.marginal_latency(s, widths, group) == pytest.approx(truth, rel=1e-9)
        assert truth > 0
    # c_in of "conv" is a: d/da of 0.002*a + 1e-4*h*a*b at b=20, plus the stem's d/dc_out (c_in fixed at 3)
    key_conv = LayerKey.of(s.layers[1], "fp32")
    h = key_conv.in_hw[0] + 3
    assert table.marginal_latency(s, widths, "a") == pytest.approx(
        (0.002 + 1e-4 * h * 20) + (0.003 + 1e-4 * h * 3), rel=1e-9
    )
    table.provenance["channel_multiple"] = 4  # one step is one channel multiple
    assert table.marginal_latency(s, {"a": 12, "b": 20}, "a") == pytest.approx(
        (table.predict(s, {"a": 12, "b": 20}) - table.predict(s, {"a": 8, "b": 20})) / 4, rel=1e-9
    )


def test_missing_or_incomplete_entry_is_a_config_error_naming_the_layer(tmp_path):
    s = _structure()
    table = _table(s)
    table.save(tmp_path / "t.json")
    del table.entries[LayerKey.parse("linear fp32")]
    with pytest.raises(ConfigError, match=r"t\.json: no entry for layer 'fc' \(linear fp32\)"):
        table.predict(s, s.baseline_widths())
    table = _table(s)
    table.entries[LayerKey.parse("linear fp32")].ms[0][0] = None
    with pytest.raises(ConfigError, match="incomplete"):
        table.predict(s, s.baseline_widths())


def test_save_load_round_trip_is_atomic_and_keeps_provenance(tmp_path):
    s = _structure()
    table = _table(s)
    table.correction = {"scale": 1.1, "offset_ms": 0.5, "fitted_on": "x"}
    path = tmp_path / "host.json"
    table.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["host.json"]  # no temp file left behind
    loaded = LatencyTable.load(path, HOST)
    assert loaded.provenance == table.provenance and loaded.correction == table.correction
    assert loaded.predict(s, {"a": 7, "b": 13}) == pytest.approx(table.predict(s, {"a": 7, "b": 13}))
    assert loaded.provenance["source"] == "measured" and loaded.label == "host (measured, onnxruntime)"


def test_per_layer_correction_adds_a_constant_per_conv_and_linear_layer():
    s = _structure()  # 4 timed layers (stem, conv, dw, fc); BatchNorm is folded and never counted
    table = _table(s)
    widths = {"a": 7, "b": 13}
    raw = table.predict(s, widths, corrected=False)
    table.correction = {"scale": 0.5, "per_layer_ms": -0.01, "offset_ms": 0.2, "fitted_on": "x"}
    assert table.predict(s, widths) == pytest.approx(0.5 * raw - 0.04 + 0.2, rel=1e-12)


def test_table_of_another_runtime_than_the_target_ships_is_refused_by_table_for(tmp_path):
    s = _structure()
    tvm_table = _table(s)
    tvm_table.provenance["runtime"] = "tvm"
    path = default_table_path(HOST, "toy", tmp_path)
    tvm_table.save(path)
    assert HOST.runtime == "onnxruntime" and LatencyTable.load(path, HOST).label == "host (measured, tvm)"
    with pytest.raises(ConfigError, match=r"toy-m\d+\.json: measured with tvm, but target 'host' ships onnxruntime"):
        table_for(HOST, s, directory=tmp_path)
    old = tvm_table.to_dict()
    old["provenance"]["runtime"] = "TVM Relax VM, local (x86_64)"  # tables written before the runtime key
    path.write_text(json.dumps(old))
    assert LatencyTable.load(path).runtime == "tvm"


def test_table_of_another_target_is_refused(tmp_path):
    path = tmp_path / "host.json"
    _table(_structure()).save(path)
    with pytest.raises(ConfigError, match=r"host\.json: table is for target 'host', not 'rpi4'"):
        LatencyTable.load(path, get_target("rpi4"))
    with pytest.raises(ConfigError, match="not 'mali-g52'"):
        LatencyTable.load(path).check_target(get_target("mali-g52"))


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        '{"format": "something-else"}',
        "[]",
        '{"format": "edgecompact-latency-table/1", "provenance": {"target": "host"}}',
    ],
)
def test_malformed_table_file_is_a_config_error_naming_the_file(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"bad\.json: malformed latency table"):
        LatencyTable.load(path)
    with pytest.raises(ConfigError, match=r"missing\.json: latency table not found"):
        LatencyTable.load(tmp_path / "missing.json")


def test_malformed_grid_is_a_config_error(tmp_path):
    d = _table(_structure()).to_dict()
    first = next(iter(d["entries"]))
    d["entries"][first]["ms"] = d["entries"][first]["ms"][:-1]
    (tmp_path / "t.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="ms grid does not match its axes"):
        LatencyTable.load(tmp_path / "t.json")


def test_roofline_flops_match_torch_flop_counter():
    from edgecompact.structure_check import torch_flops

    # compute-bound figures: 1 GFLOP/s and a huge bandwidth, so the estimate is FLOPs / 1e9 s
    for conv, hw in [
        (nn.Conv2d(12, 24, 3, stride=2, padding=1, bias=False), 16),
        (nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False), 8),
        (nn.Conv2d(32, 64, 3, padding=1, groups=4, bias=False), 8),  # grouped: 4x fewer FLOPs than dense
    ]:
        y = conv(torch.randn(1, conv.in_channels, hw, hw))
        per_group = None
        if 1 < conv.groups < conv.in_channels:
            per_group = (conv.in_channels // conv.groups, conv.out_channels // conv.groups)
        depthwise = conv.groups == conv.in_channels > 1
        shape = (hw, hw), tuple(y.shape[2:])
        key = LayerKey("conv2d", conv.kernel_size, conv.stride, depthwise, *shape, "fp32", per_group)
        ms = roofline_ms(key, conv.in_channels, conv.out_channels, peak_gflops=1.0, peak_gbps=1e9)
        assert ms == pytest.approx(torch_flops(conv, (conv.in_channels, hw, hw)) / 1e9 * 1e3, rel=1e-9)
    # memory-bound: 1x1 conv on a big map at 1 GB/s: (input + weight + output) * 4 bytes
    key = LayerKey("conv2d", (1, 1), (1, 1), False, (64, 64), (64, 64), "fp32")
    assert roofline_ms(key, 4, 4, peak_gflops=1e9, peak_gbps=1.0) == pytest.approx(
        (4 * 64 * 64 + 16 + 4 * 64 * 64) * 4 / 1e9 * 1e3
    )


def test_roofline_table_is_labelled_an_estimate_and_used_only_without_a_measured_table(tmp_path):
    s = _structure()
    est = roofline_table(s, HOST)
    assert est.provenance["source"] == "roofline-estimate" and est.is_estimate
    assert est.label == "host (roofline estimate)"
    widths = {"a": 9, "b": 17}
    assert est.predict(s, widths) > 0 and est.predict(s, widths) < est.predict(s, s.baseline_widths())
    assert table_for(HOST, s, directory=tmp_path).is_estimate
    measured = _table(s)
    measured.save(default_table_path(HOST, "toy", tmp_path))
    got = table_for(HOST, s, directory=tmp_path)
    assert not got.is_estimate and got.predict(s, widths) == pytest.approx(measured.predict(s, widths))
