"""Deploy: ONNX export checked by onnxruntime, TVM builds checked against torch, artifacts, runner, precision."""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from edgecompact.cpu import host_cpu, int8_scheme
from edgecompact.deploy import onnx as eonnx
from edgecompact.deploy import tvm as etvm
from edgecompact.deploy.artifact import compile_onnx, export_artifact
from edgecompact.errors import ConfigError, DeployError
from edgecompact.models import create_model, list_models, model_defaults
from edgecompact.run import sha256
from edgecompact.targets import get_target

torch.set_num_threads(1)
EM_AARCH64, ET_DYN = 183, 3


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()


def _tvm_run(ex, x: np.ndarray) -> np.ndarray:
    import tvm
    from tvm import relax

    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def _torch(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def host_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("host")
    export_artifact(_tiny_cnn(), (1, 3, 16, 16), get_target("host"), out, runs=50)
    return out


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if "inception" in n else n
                                  for n in list_models()])
def test_onnx_export_matches_torch_on_every_zoo_model(name, tmp_path):
    model, size = None, 0
    for size in (min(model_defaults(name).input_size, 64), 75, model_defaults(name).input_size):
        try:  # the smallest input the family accepts keeps this fast
            model = create_model(name, input_size=size).eval()
            break
        except ConfigError:
            continue
    diff = eonnx.export_onnx(model, (1, 3, size, size), tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)
    want = _torch(model, x)
    tolerance = 1e-4 * max(1.0, float(np.abs(want).max()))
    assert np.abs(eonnx.run_onnx(tmp_path / "m.onnx", x) - want).max() <= tolerance
    assert diff <= tolerance
    assert eonnx.input_spec(tmp_path / "m.onnx") == ("x", [1, 3, size, size], "float32")


@pytest.mark.slow
def test_tvm_host_build_matches_torch_on_resnet20_and_slimmed_resnet20(tmp_path):
    from edgecompact.budget import uniform_widths
    from edgecompact.structure import analyze, keep_from_scores, slim

    base = create_model("resnet20", input_size=16).eval()
    structure = analyze(base, (3, 16, 16), "resnet20")
    compact = slim(base, structure, keep_from_scores(structure, uniform_widths(structure, 0.5))).eval()
    x = np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)
    for tag, model in (("base", base), ("slim", compact)):
        eonnx.export_onnx(model, (1, 3, 16, 16), tmp_path / f"{tag}.onnx")
        got = _tvm_run(compile_onnx(tmp_path / f"{tag}.onnx", get_target("host")), x)
        assert np.abs(got - _torch(model, x)).max() <= 1e-4, tag


def test_host_target_resolves_native_cpu_and_attaches_host():
    tgt = etvm.tvm_target(get_target("host"))
    assert tgt.attrs["mcpu"] != "native"
    assert tgt.host is not None and str(tgt.host.attrs["mcpu"]) == str(tgt.attrs["mcpu"])


def test_manifest_records_checksum_of_the_library_and_the_faster_runtime(host_artifact):
    manifest = json.loads((host_artifact / "manifest.json").read_text())
    assert manifest["sha256"] == sha256(host_artifact / manifest["library"])
    assert manifest["input"] == {"name": "x", "shape": [1, 3, 16, 16], "dtype": "float32"}
    lat = manifest["latency_ms"]
    assert manifest["best_runtime"] == min(lat, key=lat.get)
    assert manifest["tvm_max_abs_diff_vs_ort"] <= 1e-4


def _runner(*args: str) -> subprocess.CompletedProcess:
    code = ("import sys; from edgecompact.run import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'runner imported torch'; sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False,
                          timeout=120)


def test_runner_runs_host_artifact_without_importing_torch(host_artifact, tmp_path):
    x = np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = _runner(str(host_artifact), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"))
    assert proc.returncode == 0, proc.stderr
    want = eonnx.run_onnx(host_artifact / "model.onnx", x)
    assert np.abs(np.load(tmp_path / "y.npy") - want).max() <= 1e-4


def test_runner_refuses_mismatched_input_shape_with_one_line(host_artifact, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 32, 32), np.float32))
    proc = _runner(str(host_artifact), "--input", str(tmp_path / "x.npy"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "[1, 3, 16, 16]" in lines[0] and "x.npy" in lines[0]


def test_runner_refuses_a_replaced_library(host_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(host_artifact, art)
    with open(art / "model.so", "ab") as f:
        f.write(b"\0")
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 16, 16), np.float32))
    proc = _runner(str(art), "--input", str(tmp_path / "x.npy"))
    assert proc.returncode == 2 and "sha256" in proc.stderr


def test_corrupt_onnx_file_is_a_deploy_error_naming_the_file(tmp_path):
    bad = tmp_path / "broken.onnx"
    eonnx.export_onnx(_tiny_cnn(), (1, 3, 8, 8), bad)
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    with pytest.raises(DeployError, match="broken.onnx"):
        compile_onnx(bad, get_target("host"))


def _elf_header(path) -> tuple[bytes, int, int, int]:
    head = path.read_bytes()[:20]
    e_type, e_machine = struct.unpack("<HH", head[16:20])
    return head[:4], head[4], e_type, e_machine


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="needs gcc-aarch64-linux-gnu")
@pytest.mark.parametrize("target_name", ["rpi4", "mali-g52"])
def test_cross_compiled_artifact_is_an_aarch64_shared_object(target_name, tmp_path, capsys):
    manifest = json.loads(export_artifact(_tiny_cnn(), (1, 3, 16, 16), get_target(target_name), tmp_path).read_text())
    magic, elf_class, e_type, e_machine = _elf_header(tmp_path / manifest["library"])
    assert (magic, elf_class, e_type, e_machine) == (b"\x7fELF", 2, ET_DYN, EM_AARCH64)
    assert "latency_ms" not in manifest and "not run here" in manifest["runs_here"]
    assert manifest["runs_here"] in capsys.readouterr().out
    if target_name == "mali-g52":
        assert manifest["device"] == "opencl" and "opencl" in manifest["runs_here"]


@pytest.mark.slow
def test_int8_and_fp16_accuracy_stay_near_fp32(trained_resnet20, digits16, tmp_path):
    xs, ys = digits16.test.tensors if digits16.test is not None else digits16.val.tensors
    eval_data = (xs[:100].numpy(), ys[:100].numpy())
    calib = digits16.train.tensors[0][:64].numpy()
    shape = (1, *xs.shape[1:])
    for precision in ("int8", "fp16"):
        m = json.loads(export_artifact(copy.deepcopy(trained_resnet20), shape, get_target("host"), tmp_path / precision,
                                       precision=precision, calib=calib, eval_data=eval_data, runs=5).read_text())
        acc = m["accuracy_top1"]
        assert acc["fp32-ort"] > 50, acc  # the fixture model is trained
        assert acc[f"{precision}-ort"] >= acc["fp32-ort"] - 3.0, acc
        assert acc[f"{precision}-tvm"] >= acc["fp32-ort"] - 3.0, acc
        # the recorded accuracy is onnxruntime's own evaluation of the file shipped, on this machine
        assert acc[f"{precision}-ort"] == round(eonnx.onnx_top1(tmp_path / precision / m["onnx"], *eval_data), 2)
    cpu = host_cpu()
    assert m["cpu"] == cpu.to_dict() and cpu.describe() in m["machine"]
    int8 = json.loads((tmp_path / "int8" / "manifest.json").read_text())["int8"]
    assert int8["reduce_range"] == int8_scheme().reduce_range == (cpu.x86 and not cpu.vnni)
    assert int8["ort_u8s8_saturates_here"] == int8["reduce_range"]


def test_int8_without_calibration_data_is_refused(tmp_path):
    with pytest.raises(DeployError, match="calibration"):
        export_artifact(_tiny_cnn(), (1, 3, 8, 8), get_target("host"), tmp_path, precision="int8")


@pytest.mark.slow
def test_tuning_speeds_up_and_reuses_records_for_shared_shapes(tmp_path):
    from tvm.relax.frontend.onnx import from_onnx

    model = _tiny_cnn()
    eonnx.export_onnx(model, (1, 3, 16, 16), tmp_path / "m.onnx")
    mod = from_onnx(eonnx.load_onnx(tmp_path / "m.onnx"), shape_dict={"x": [1, 3, 16, 16]})
    first = etvm.tune(mod, get_target("host"), 4, tmp_path / "db")
    assert first["tuned_tasks"] == first["tasks"] > 0 and first["trials"] > 0
    stamp = json.loads((tmp_path / "db" / etvm.DB_STAMP).read_text())
    assert stamp["cpu"] == host_cpu().key  # the database names the CPU it was measured on
    again = etvm.tune(mod, get_target("host"), 4, tmp_path / "db")
    assert again["tuned_tasks"] == 0 and again["reused_tasks"] == first["tasks"]
    # every task's best time by records given, read back from MetaSchedule's own database API
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    times: dict[str, list[float]] = {}
    for rec in ms.database.JSONDatabase(work_dir=str(tmp_path / "db")).get_all_tuning_records():
        secs = [float(t) for t in rec.run_secs or []]
        times.setdefault(str(tvm_ffi.structural_hash(rec.workload.mod)), []).append(
            sum(secs) / len(secs) if secs else float("inf"))
    assert len(again["convergence"]) == again["tasks"]
    for task in again["convergence"]:
        assert task["records"] == len(times[task["key"]]) > 0
        curve = list(task["best_us"].values())
        assert curve == sorted(curve, reverse=True)  # the best so far never gets worse
        assert curve[-1] == pytest.approx(min(times[task["key"]]) * 1e6, abs=0.05)
    ex = etvm.compile_relax(mod, get_target("host"), db_dir=tmp_path / "db")
    x = np.random.default_rng(4).standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert np.abs(_tvm_run(ex, x) - _torch(model, x)).max() <= 1e-4  # main takes the input alone, as before
    # the tuned convs read weights prepacked at compile time into their loops' layout
    from edgecompact.deploy.opprofile import tvm_calls

    assert any(name.endswith("_prepacked") for name, _ in tvm_calls(ex, x))


@pytest.mark.parametrize("stamp", [{"cpu": "x86_64-amd-epyc-7b13-0123abcd", "cpu_describe": "AMD EPYC 7B13 (avx2)"},
                                   None])
def test_a_tuning_database_of_another_cpu_or_without_a_stamp_is_refused(tmp_path, stamp):
    from tvm.relax.frontend.onnx import from_onnx

    eonnx.export_onnx(_tiny_cnn(), (1, 3, 16, 16), tmp_path / "m.onnx")
    mod = from_onnx(eonnx.load_onnx(tmp_path / "m.onnx"), shape_dict={"x": [1, 3, 16, 16]})
    db = tmp_path / "db"
    db.mkdir()
    (db / "database_workload.json").write_text("")
    if stamp is not None:
        (db / etvm.DB_STAMP).write_text(json.dumps(stamp))
    with pytest.raises(DeployError, match=str(db)) as err:
        etvm.compile_relax(mod, get_target("host"), db_dir=db)
    assert "\n" not in str(err.value)
    assert ("another CPU" if stamp else "no record of the CPU") in str(err.value)
    with pytest.raises(DeployError, match=str(db)):  # nor tuned further
        etvm.tune(mod, get_target("host"), 1, db)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs Linux CPU affinity")
def test_set_num_threads_does_not_pin_the_process_to_one_core():
    # TVM's config_threadpool binds the calling thread to core 0 unless TVM_BIND_THREADS=0; every process started
    # afterwards (the tuning subprocess and its workers) would inherit that mask. Subprocess: pinning is sticky.
    code = ("import os; before = os.sched_getaffinity(0); from edgecompact.deploy import tvm as etvm; "
            "etvm.set_num_threads(1); assert os.sched_getaffinity(0) == before, os.sched_getaffinity(0)")
    env = {k: v for k, v in os.environ.items() if k != "TVM_BIND_THREADS"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_two_local_artifacts_are_timed_once_each_per_runtime_as_a_pair(host_artifact, tmp_path, monkeypatch):
    """Deploy times each model once per runtime: baseline and compact interleaved (one paired timing per
    runtime, no separate one), the compact's record holding the baseline of its pair and the ratio of the two."""
    from edgecompact.deploy import bench

    torch.manual_seed(1)
    wide = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5)).eval()
    export_artifact(wide, (1, 3, 16, 16), get_target("host"), tmp_path / "wide", runs=50)
    calls = {"paired": 0, "single": 0}
    paired, single = bench.paired_median_ms, bench.median_ms

    def count(kind, fn):
        def wrapped(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(bench, "paired_median_ms", count("paired", paired))
    monkeypatch.setattr(bench, "median_ms", count("single", single))
    models = {str(tmp_path / "wide"): wide, str(host_artifact): _tiny_cnn()}
    doc = bench.bench_artifacts([tmp_path / "wide", host_artifact], runs=50, models=models, write=False)
    assert calls == {"paired": 3, "single": 0}  # onnxruntime, TVM and torch: one interleaved timing each
    base, comp = doc["results"]
    assert base["paired"] and comp["paired"]
    for key in ("host-ort", "host-tvm", "host-torch"):
        assert comp["latency_ms"][f"{key}-baseline"] == base["latency_ms"][key]
        assert comp["measured_speedup"][key] == round(base["latency_ms"][key] / comp["latency_ms"][key], 3)
    # three artifacts: each on its own, labelled so
    calls.update(paired=0, single=0)
    doc = bench.bench_artifacts([host_artifact] * 3, runs=50, write=False)
    assert calls["paired"] == 0 and all(r["paired"] is False for r in doc["results"])
