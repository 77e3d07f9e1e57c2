"""Profiling: TVM and onnxruntime layer graphs compute the layer (vs torch), tables fill and resume (even after
SIGKILL), never mix runtimes or settings; loopback RPC."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from edgecompact import rpc as ec_rpc
from edgecompact.cost.flops import layer_flops
from edgecompact.cost.latency import LatencyTable, LayerKey, layer_grid
from edgecompact.errors import ConfigError
from edgecompact.profiling import STATISTIC, layer_module, onnx_layer_model, profile
from edgecompact.structure import Layer, Structure, analyze, slim
from edgecompact.structure_check import check_net, random_keep, randomize_bn, torch_flops
from edgecompact.targets import get_target

HOST = get_target("host")
CONV = LayerKey.parse("conv2d k3x3 s1x1 dense 8x8->8x8 fp32")


def _tiny() -> Structure:
    """One 3x3 conv on 8x8 maps whose width (a group of 8 channels) is searched."""
    layer = Layer("conv", "conv2d", (3, 3), (1, 1), False, 1, False, (8, 8), (8, 8), ["g"], "g", 8)
    return Structure("tiny", (8, 8, 8), {"g": 8}, [layer])


def _grid(c_in: list[int], c_out: list[int]) -> dict:
    return {CONV: (c_in, c_out)}


LAYERS = [
    ("conv2d k3x3 s1x1 dense 8x8->8x8 fp32", 3, 5),
    ("conv2d k3x3 s2x2 dense 9x9->5x5 fp32", 4, 6),
    ("conv2d k1x1 s2x2 dense 8x8->4x4 fp32", 4, 6),
    ("conv2d k3x3 s2x2 dw 8x8->4x4 fp32", 6, 6),
    ("conv2d k3x3 s2x2 g4x8 9x9->5x5 fp32", 12, 24),  # grouped: 3 groups of 4 -> 8
    ("linear fp32", 7, 3),
]


def _torch_layer(key: LayerKey, x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The layer computed by torch: the independent truth for both runtimes' layer graphs."""
    x, w, b = (torch.from_numpy(np.array(a)) for a in (x, w, b))
    if key.op == "linear":
        return torch.nn.functional.linear(x, w, b).numpy()
    pad = key.kernel[0] // 2
    groups = x.shape[1] // w.shape[1]  # from the tensors: depthwise and grouped convs alike
    return torch.relu(
        torch.nn.functional.conv2d(x, w, b, stride=key.stride, padding=pad, groups=groups)
    ).numpy()


@pytest.mark.parametrize(("key", "c_in", "c_out"), LAYERS)
def test_onnx_layer_model_computes_the_layer_as_torch_does(key, c_in, c_out):
    import onnxruntime as ort
    from onnx import numpy_helper

    key = LayerKey.parse(key)
    model, feeds = onnx_layer_model(key, c_in, c_out)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )[0]
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    want = _torch_layer(key, feeds["x"], weights["w"], weights["b"])
    assert got.shape == want.shape and tuple(want.shape[2:]) == (key.out_hw if key.op != "linear" else ())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("key", "c_in", "c_out"), LAYERS)
def test_layer_module_computes_the_layer_as_torch_does(key, c_in, c_out):
    import tvm
    from tvm import relax

    from edgecompact.deploy.tvm import compile_relax

    key = LayerKey.parse(key)
    mod, inputs, weights = layer_module(key, c_in, c_out)
    vm = relax.VirtualMachine(compile_relax(mod, HOST), tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(a) for a in inputs]).numpy()  # the weights are the module's constants
    want = _torch_layer(key, *inputs, *weights)
    assert got.shape == want.shape and tuple(want.shape[2:]) == (key.out_hw if key.op != "linear" else ())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _grouped_net() -> torch.nn.Sequential:
    """A ResNeXt-style grouped 3x3 conv (32 -> 64: 4 groups of 8 -> 16) between dense convs, BN, ReLU."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def test_grouped_conv_slims_in_whole_groups_as_masking_does():
    checks = check_net(_grouped_net(), (3, 16, 16), seed=3, onnx=False)
    assert checks["slim_equals_mask"] and checks["flops_equal_torch"] and checks["params_equal"]


def test_layer_graphs_of_a_grouped_conv_are_the_slimmed_torch_conv():
    import onnxruntime as ort
    from onnx import numpy_helper

    model = randomize_bn(_grouped_net())
    s = analyze(model, (3, 16, 16))
    layer, keep = s.layers[2], random_keep(s, seed=5)
    conv = slim(model, s, keep)[3]  # the grouped conv as slimming leaves it: 2 of its 4 groups
    c_in, c_out = conv.in_channels, conv.out_channels
    assert (c_in, c_out, conv.groups) == (16, 32, 2)
    key = LayerKey.of(layer, "fp32", c_in, c_out)
    onnx_model, feeds = onnx_layer_model(key, 0, c_out)  # c_in follows c_out
    weights = {t.name: numpy_helper.to_array(t) for t in onnx_model.graph.initializer}
    assert weights["w"].shape == tuple(conv.weight.shape) == (32, 8, 3, 3)
    assert feeds["x"].shape == (1, c_in, 16, 16)
    assert [a.i for a in onnx_model.graph.node[0].attribute if a.name == "group"] == [conv.groups]
    flops = 2 * weights["w"].size * 16 * 16
    assert flops == torch_flops(conv, (c_in, 16, 16)) == layer_flops(layer, c_in, c_out)
    _, inputs, bound = layer_module(key, 0, c_out)
    assert inputs[0].shape == feeds["x"].shape and bound[0].shape == weights["w"].shape
    # the one-layer graph with the slimmed conv's own weights computes that conv (+ ReLU)
    onnx_model.graph.initializer[0].CopyFrom(numpy_helper.from_array(conv.weight.detach().numpy(), "w"))
    onnx_model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.zeros(c_out, np.float32), "b"))
    got = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )[0]
    with torch.no_grad():
        want = torch.relu(conv(torch.from_numpy(feeds["x"]))).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_onnxruntime_profile_of_a_grouped_conv_measures_whole_groups_and_predicts_from_them(tmp_path):
    s = analyze(_grouped_net(), (3, 16, 16))
    grouped = s.layers[2]
    key = LayerKey.of(grouped, "fp32", 32, 64)
    seen = []
    grid = {key: layer_grid(s, "fp32", HOST.channel_multiple)[key]}  # the grouped kind alone: 4 points
    table = profile(s, HOST, tmp_path / "g.json", grid=grid, runtime="onnxruntime", progress=False,
                    on_measure=lambda k, ci, co, ms: seen.append((str(k), ci, co)))
    assert seen == [(str(key), 8 * n, 16 * n) for n in (1, 2, 3, 4)]  # c_in follows c_out, whole groups
    entry = LatencyTable.load(tmp_path / "g.json", HOST).entries[key]
    assert entry.c_in == [] and entry.c_out == [16, 32, 48, 64] and all(v > 0 for v in entry.ms[0])
    for j, c_out in enumerate(entry.c_out):
        assert table.layer_ms(grouped, c_out // 2, c_out) == pytest.approx(entry.ms[0][j])


@pytest.mark.parametrize("runtime", ["tvm", "onnxruntime"])
def test_profile_fills_the_grid_and_a_rerun_measures_nothing(tmp_path, runtime):
    out = tmp_path / "t.json"

    def run(record: list) -> None:
        profile(_tiny(), HOST, out, grid=_grid([2, 8], [2, 8]), runtime=runtime, progress=False,
                on_measure=lambda *a: record.append(a[:3]))

    seen = []
    run(seen)
    assert sorted((c, o) for _, c, o in seen) == [(2, 2), (2, 8), (8, 2), (8, 8)]
    loaded = LatencyTable.load(out, HOST)
    assert loaded.provenance["source"] == "measured" and loaded.runtime == runtime
    assert loaded.provenance["statistic"] == STATISTIC and loaded.provenance["threads"]
    if runtime == "tvm":
        assert loaded.provenance["tuned"] is False and loaded.provenance["tune_trials"] == 0
        assert loaded.provenance["tvm_version"]
    else:
        assert loaded.provenance["onnxruntime_version"] and loaded.provenance["threads"] == 1
    ms = loaded.entries[CONV].ms
    assert all(v > 0 for row in ms for v in row)  # no ordering check: tiny layers' times are noise on a loaded CPU
    assert loaded.predict(_tiny(), {"g": 8}) == pytest.approx(ms[1][1])
    again = []
    run(again)
    assert again == []
    profile(
        _tiny(),
        HOST,
        out,
        grid=_grid([2, 4, 8], [2, 8]),
        runtime=runtime,
        progress=False,
        on_measure=lambda *a: again.append(a[1:3]),
    )  # a wider grid measures only the new points
    assert sorted(again) == [(4, 2), (4, 8)]
    assert LatencyTable.load(out).entries[CONV].ms[0] == ms[0]


def test_profile_refuses_bad_setups(tmp_path):
    out = tmp_path / "t.json"
    with pytest.raises(ConfigError, match="does not run on this machine; profile it with --rpc"):
        profile(_tiny(), get_target("rpi4"), out, progress=False)
    profile(_tiny(), HOST, out, grid=_grid([8], [8]), runtime="tvm", progress=False)
    with pytest.raises(ConfigError, match="measured with tune_trials=0, not 4"):
        profile(_tiny(), HOST, out, grid=_grid([8], [8]), runtime="tvm", tune_trials=4, progress=False)
    with pytest.raises(
        ConfigError, match=r"t\.json: measured with tvm, not onnxruntime; a table never mixes"
    ):
        profile(_tiny(), HOST, out, grid=_grid([8], [8]), progress=False)  # host ships onnxruntime
    data = json.loads(out.read_text())
    data["provenance"]["target"] = "rpi4"
    out.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="table is for target 'rpi4', not 'host'"):
        profile(_tiny(), HOST, out, progress=False)


def test_onnxruntime_table_refuses_tvm_other_threads_rpc_and_tuning(tmp_path):
    out = tmp_path / "ort.json"
    assert HOST.runtime == "onnxruntime"
    profile(_tiny(), HOST, out, grid=_grid([8], [8]), progress=False)  # the target's runtime by default
    assert LatencyTable.load(out).runtime == "onnxruntime"
    with pytest.raises(ConfigError, match=r"ort\.json: measured with onnxruntime, not tvm"):
        profile(_tiny(), HOST, out, grid=_grid([8], [8]), runtime="tvm", progress=False)
    with pytest.raises(ConfigError, match=r"ort\.json: measured with 1 onnxruntime thread\(s\), not 2"):
        profile(_tiny(), HOST, out, grid=_grid([8], [8]), threads=2, progress=False)
    data = json.loads(out.read_text())
    data["provenance"]["statistic"] = "mean of 50 runs"
    out.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"ort\.json: timed with another statistic \(mean of 50 runs\)"):
        profile(_tiny(), HOST, out, grid=_grid([8], [8]), progress=False)
    with pytest.raises(ConfigError, match="--rpc: RPC profiling times TVM modules only"):
        profile(_tiny(), HOST, tmp_path / "b.json", rpc=("127.0.0.1", 9190, "k"), progress=False)
    with pytest.raises(ConfigError, match="--tune-trials 4: tuning applies to TVM tables"):
        profile(_tiny(), HOST, tmp_path / "c.json", tune_trials=4, progress=False)
    with pytest.raises(ConfigError, match="--runtime: must be one of tvm, onnxruntime, got 'tflite'"):
        profile(_tiny(), HOST, tmp_path / "d.json", runtime="tflite", progress=False)
    with pytest.raises(ConfigError, match="onnxruntime profiling supports fp32 only"):
        onnx_layer_model(LayerKey.parse("conv2d k3x3 s1x1 dense 8x8->8x8 fp16"), 2, 2)
    assert not any((tmp_path / n).exists() for n in ("b.json", "c.json", "d.json"))


CHILD = """
import sys
from pathlib import Path
from edgecompact.cost.latency import LayerKey
from edgecompact.profiling import profile
from edgecompact.structure import Layer, Structure
from edgecompact.targets import get_target
layer = Layer("conv", "conv2d", (3, 3), (1, 1), False, 1, False, (8, 8), (8, 8), ["g"], "g", 8)
STRUCTURE = Structure("tiny", (8, 8, 8), {"g": 8}, [layer])
out, log = Path(sys.argv[1]), Path(sys.argv[2])
def logged(key, c_in, c_out, ms):
    with log.open("a") as f:
        f.write(f"{c_in} {c_out}\\n")
key = LayerKey.parse("conv2d k3x3 s1x1 dense 8x8->8x8 fp32")
profile(STRUCTURE, get_target("host"), out, grid={key: ([2, 4, 6, 8], [2, 4, 6, 8])}, runtime="tvm",
        progress=False, on_measure=logged)
"""


@pytest.mark.slow
def test_resume_after_sigkill_repeats_and_loses_no_measurement(tmp_path):
    out, log = tmp_path / "t.json", tmp_path / "log.txt"
    env = {**os.environ, "TVM_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(out), str(log)], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL, "the child finished before it could be killed"
    before = LatencyTable.load(out, HOST).entries[CONV]
    recorded = {(ci, co) for i, j, ci, co in before.points() if before.ms[i][j] is not None}
    logged = {tuple(int(v) for v in line.split()) for line in log.read_text().splitlines()}
    assert logged <= recorded and len(recorded) < 16  # every reported point is on disk; the run was cut short
    again: list[tuple[int, int]] = []
    table = profile(
        _tiny(),
        HOST,
        out,
        grid=_grid([2, 4, 6, 8], [2, 4, 6, 8]),
        runtime="tvm",
        progress=False,
        on_measure=lambda k, ci, co, ms: again.append((ci, co)),
    )
    assert len(again) == len(set(again)) == 16 - len(recorded)  # exactly the missing points, once each
    assert not set(again) & recorded  # nothing recorded before the kill is measured again
    entry = table.entries[CONV]
    assert all(v is not None for row in entry.ms for v in row)
    assert all(entry.ms[i][j] == before.ms[i][j] for i, j, ci, co in entry.points() if (ci, co) in recorded)


@pytest.fixture(scope="module")
def tracker():
    t = ec_rpc.start_tracker(port=19190, port_end=19390)
    yield ("127.0.0.1", t.port)
    t.terminate()


def _wait_servers(tracker, key, n, timeout=30.0):
    deadline = time.monotonic() + timeout
    while ec_rpc.servers_under_key(tracker, key) < n:
        assert time.monotonic() < deadline, f"{n} servers never registered under {key}"
        time.sleep(0.2)


@pytest.mark.slow
def test_profile_over_loopback_rpc_matches_the_grid(tracker, tmp_path):
    server = ec_rpc.start_server(tracker, "ec-test", port=19400, port_end=19600)
    try:
        _wait_servers(tracker, "ec-test", 1)
        out = tmp_path / "rpc.json"
        table = profile(
            _tiny(),
            HOST,
            out,
            grid=_grid([8], [2, 8]),
            rpc=(*tracker, "ec-test"),
            runtime="tvm",
            progress=False,
        )
    finally:
        server.terminate()
    entry = table.entries[CONV]
    assert all(v is not None and v > 0 for v in entry.ms[0])
    loaded = LatencyTable.load(out)
    assert loaded.runtime == "tvm" and loaded.provenance["where"] == "over RPC (key 'ec-test')"


@pytest.mark.slow
def test_rpc_jobs_survive_a_killed_server(tracker, tmp_path):
    servers = [ec_rpc.start_server(tracker, "ec-kill", port=19600, port_end=19800) for _ in range(2)]
    try:
        _wait_servers(tracker, "ec-kill", 2)
        done = []

        def kill_first(*args):
            done.append(args)
            if len(done) == 1:
                servers[0].terminate()

        table = profile(
            _tiny(),
            HOST,
            tmp_path / "t.json",
            grid=_grid([2, 4, 8], [2, 8]),
            rpc=(*tracker, "ec-kill"),
            runtime="tvm",
            progress=False,
            on_measure=kill_first,
        )
    finally:
        for s in servers:
            s.terminate()
    assert len(done) == 6
    assert all(v is not None for row in table.entries[CONV].ms for v in row)


def test_unreachable_tracker_and_unknown_key_fail_fast_in_one_line(tracker, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ConfigError, match=rf"cannot reach the RPC tracker at 127\.0\.0\.1:{port}"):
        profile(
            _tiny(),
            HOST,
            tmp_path / "a.json",
            grid=_grid([8], [8]),
            rpc=("127.0.0.1", port, "k"),
            runtime="tvm",
            progress=False,
        )
    with pytest.raises(ConfigError, match="no RPC server is registered under key 'nobody'"):
        profile(
            _tiny(),
            HOST,
            tmp_path / "b.json",
            grid=_grid([8], [8]),
            rpc=(*tracker, "nobody"),
            runtime="tvm",
            progress=False,
        )
    assert time.monotonic() - start < 15
    with pytest.raises(ConfigError, match="--rpc: expected HOST:PORT, got 'localhost'"):
        ec_rpc.parse_address("localhost")
    assert ec_rpc.parse_address("10.0.0.2:9190") == ("10.0.0.2", 9190)


def test_layer_key_text_round_trips():
    layer = Layer("x", "conv2d", (5, 3), (2, 1), True, 4, False, (9, 7), (5, 7), ["g"], "g", 4)
    key = LayerKey.of(layer, "fp16")
    assert str(key) == "conv2d k5x3 s2x1 dw 9x7->5x7 fp16" and LayerKey.parse(str(key)) == key
