"""Measured latency of deploy artifacts: torch eager, onnxruntime and TVM, batch 1, in one process.

Median of >= 50 runs after warm-up, thread counts set explicitly for every runtime (torch and onnxruntime
intra-op threads, TVM's pool). A remote board is reached through a TVM RPC tracker. Writes nothing but
the bench.json it is asked for.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tvm
from torch import nn
from tvm import relax, rpc

from edgecompact import run
from edgecompact.deploy import onnx as eonnx
from edgecompact.deploy import tvm as etvm
from edgecompact.errors import DeployError
from edgecompact.storage import write_text_atomic
from edgecompact.targets import Target

MIN_RUNS = 50


def median_ms(fn: Any, runs: int, warmup: int = 10) -> float:
    """Median wall time in ms of `fn()` over `runs` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def paired_median_ms(fn_a: Any, fn_b: Any, runs: int, warmup: int = 10) -> tuple[float, float]:
    """Median ms of `fn_a()` and of `fn_b()`, their calls interleaved so that both see the same machine load:
    on a shared machine the ratio of the two medians is then far steadier than two separate timings."""
    a, b = interleaved_median_ms([fn_a, fn_b], runs, warmup)
    return a, b


def interleaved_median_ms(fns: list[Any], runs: int, warmup: int = 10) -> list[float]:
    """Median ms of each of `fns`, called in turn `runs` times (after `warmup` rounds): every one sees the same
    machine load, so their ratios hold where separate timings would drift."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return [float(np.median(ts)) for ts in times]


def time_ort_pair(path_a: Path, path_b: Path, x: np.ndarray, runs: int = MIN_RUNS,
                  threads: int = 1) -> tuple[float, float]:
    """onnxruntime median ms of two models (e.g. baseline and compact) on the same input, interleaved."""
    sa, sb = eonnx.session(path_a, threads), eonnx.session(path_b, threads)
    na, nb = sa.get_inputs()[0].name, sb.get_inputs()[0].name
    return paired_median_ms(lambda: sa.run(None, {na: x}), lambda: sb.run(None, {nb: x}), runs)


def time_torch(model: nn.Module, x: np.ndarray, runs: int = MIN_RUNS) -> float:
    """Median ms of torch eager inference (no_grad, eval) at the current torch thread count."""
    model = model.eval()
    xt = torch.from_numpy(x)
    with torch.no_grad():
        return median_ms(lambda: model(xt), runs)


def time_ort(path: Path, x: np.ndarray, runs: int = MIN_RUNS, threads: int = 1) -> float:
    sess = eonnx.session(path, threads)
    name = sess.get_inputs()[0].name
    return median_ms(lambda: sess.run(None, {name: x}), runs)


def time_tvm(lib: Path, x: np.ndarray, runs: int = MIN_RUNS, device: str = "cpu") -> float:
    """Median ms of the library run locally (TVM's time_evaluator: one warm-up, then `runs` single runs)."""
    ex = tvm.runtime.load_module(str(lib))
    dev = tvm.device(device, 0)
    return float(np.median(etvm.time_executable(ex, [x], number=1, repeat=runs, device=dev)))


def time_tvm_rpc(lib: Path, x: np.ndarray, tracker: str, key: str, runs: int = MIN_RUNS,
                 device: str = "cpu") -> float:
    """Median ms of the library on a board reached through the RPC tracker `host:port` under `key`."""
    host, _, port = tracker.rpartition(":")
    if not host or not port.isdigit():
        raise DeployError(f"--rpc {tracker}: expected host:port of a TVM RPC tracker")
    try:
        remote = rpc.connect_tracker(host, int(port)).request(key, priority=1, session_timeout=600)
    except (tvm.TVMError, OSError, RuntimeError) as e:
        raise DeployError(f"--rpc {tracker} --key {key}: no board ({str(e).splitlines()[0][:120]})") from None
    remote.upload(str(lib))
    dev = remote.device(device, 0)
    vm = relax.VirtualMachine(remote.load_module(Path(lib).name), dev)
    inp = tvm.runtime.tensor(x, dev)
    vm["main"](inp)
    result = vm.time_evaluator("main", dev, number=1, repeat=runs)(inp)
    return float(np.median(result.results)) * 1e3


def bench_artifacts(paths: list[Path], *, runs: int = MIN_RUNS, threads: int = 1, rpc_tracker: str | None = None,
                    rpc_key: str | None = None, models: dict[str, nn.Module] | None = None,
                    write: bool = True) -> dict[str, Any]:
    """Time every artifact in `paths` in this process; returns {"results": [...]}, one record per artifact.

    Latency keys name target and runtime (`host-tvm`, `host-ort`, `host-torch`, `rpi4-tvm`, ...). Two artifacts
    that both run here with the same input (a baseline and its compact) are timed as a pair: each runtime's calls
    interleaved (`paired_median_ms`), so each model is timed once per runtime and their ratio does not depend on
    the machine's load; the second record then holds `<key>-baseline` and `measured_speedup`. Several artifacts
    otherwise are timed each on its own, and their records say `"paired": false`. An artifact whose target does not
    run here is timed over RPC when `rpc_tracker` is given (key: `rpc_key` or the target's rpc_key), else it gets a
    `skipped` line. `models` maps an artifact path to its torch module for the torch eager figure. With `write`,
    each artifact directory gets a bench.json.
    """
    if runs < MIN_RUNS:
        raise DeployError(f"--runs {runs}: the protocol needs at least {MIN_RUNS} runs")
    torch.set_num_threads(threads)
    etvm.set_num_threads(threads)
    arts = [_loaded(Path(p), threads, runs) for p in paths]
    models = models or {}
    local = [a for a in arts if a["not_here"] is None]
    inputs = {(a["x"].shape, a["x"].dtype) for a in arts}
    if len(arts) == 2 and len(local) == 2 and len(inputs) == 1:
        _time_pair(arts, models, runs, threads)
    else:
        for a in arts:
            _time_one(a, models, runs, threads, rpc_tracker, rpc_key)
            if len(arts) > 1:
                a["rec"]["paired"] = False
    results = []
    for a in arts:
        rec = a["rec"]
        rec["latency_ms"] = {k: round(v, 4) for k, v in rec["latency_ms"].items()}
        if write:
            write_text_atomic(a["dir"] / "bench.json", json.dumps(rec, indent=1))
        results.append(rec)
    return {"results": results}


def _loaded(art: Path, threads: int, runs: int) -> dict[str, Any]:
    """An artifact checked against its manifest, with its input and an empty record."""
    manifest = run.load_manifest(art)
    try:
        target = Target(**{k: v for k, v in manifest["target"].items()})
    except TypeError as e:  # a hand-edited target: unknown or missing key
        raise DeployError(f"{art / 'manifest.json'}: malformed manifest: target: {e}") from None
    inp = manifest["input"]
    lib = art / manifest["library"]
    if run.sha256(lib) != manifest["sha256"]:
        raise DeployError(f"{lib}: sha256 does not match manifest.json")
    rec: dict[str, Any] = {"artifact": str(art), "target": target.name, "precision": manifest["precision"],
                           "threads": threads, "runs": runs, "latency_ms": {}}
    x = np.random.default_rng(0).standard_normal(inp["shape"]).astype(inp["dtype"])
    return {"dir": art, "target": target, "lib": lib, "onnx": art / manifest["onnx"],
            "device": manifest.get("device", "cpu"), "x": x,
            "not_here": etvm.runnable_here(target), "rec": rec}


def _time_one(a: dict[str, Any], models: dict[str, nn.Module], runs: int, threads: int, rpc_tracker: str | None,
              rpc_key: str | None) -> None:
    name, lat, x = a["target"].name, a["rec"]["latency_ms"], a["x"]
    if a["not_here"] is None:
        lat[f"{name}-tvm"] = time_tvm(a["lib"], x, runs, a["device"])
        lat[f"{name}-ort"] = time_ort(a["onnx"], x, runs, threads)
        if str(a["dir"]) in models:
            lat[f"{name}-torch"] = time_torch(models[str(a["dir"])], x, runs)
    elif rpc_tracker:
        key = rpc_key or a["target"].rpc_key or name
        lat[f"{name}-tvm"] = time_tvm_rpc(a["lib"], x, rpc_tracker, key, runs, a["device"])
    else:
        a["rec"]["skipped"] = a["not_here"]


def _time_pair(arts: list[dict[str, Any]], models: dict[str, nn.Module], runs: int, threads: int) -> None:
    """Baseline (first) and compact (second) timed interleaved, runtime by runtime, on the same input."""
    (a, b), x = arts, arts[0]["x"]
    pairs = {"tvm": lambda: time_tvm_pair(a["lib"], b["lib"], x, runs, a["device"]),
             "ort": lambda: time_ort_pair(a["onnx"], b["onnx"], x, runs, threads)}
    if str(a["dir"]) in models and str(b["dir"]) in models:
        pairs["torch"] = lambda: time_torch_pair(models[str(a["dir"])], models[str(b["dir"])], x, runs)
    speedup = {}
    for runtime, timed in pairs.items():
        ms_a, ms_b = (round(v, 4) for v in timed())  # as stored: the speedup is the ratio of the record's ms
        key_a, key_b = f"{a['target'].name}-{runtime}", f"{b['target'].name}-{runtime}"
        a["rec"]["latency_ms"][key_a] = ms_a
        b["rec"]["latency_ms"][key_b] = ms_b
        b["rec"]["latency_ms"][f"{key_b}-baseline"] = ms_a
        speedup[key_b] = round(ms_a / ms_b, 3)
    b["rec"]["measured_speedup"] = speedup
    for art in arts:
        art["rec"]["paired"] = True


def time_tvm_pair(lib_a: Path, lib_b: Path, x: np.ndarray, runs: int = MIN_RUNS,
                  device: str = "cpu") -> tuple[float, float]:
    """Local TVM median ms of two libraries (e.g. baseline and compact) on the same input, interleaved."""
    dev = tvm.device(device, 0)
    vms = [relax.VirtualMachine(tvm.runtime.load_module(str(lib)), dev) for lib in (lib_a, lib_b)]
    inp = tvm.runtime.tensor(x, dev)

    def call(vm: Any) -> Any:
        return lambda: vm["main"](inp)

    return paired_median_ms(call(vms[0]), call(vms[1]), runs)


def time_tvm_rpc_pair(lib_a: Path, lib_b: Path, x: np.ndarray, board: tuple[str, int, str], runs: int = MIN_RUNS,
                      device_type: int = 1) -> tuple[float, float]:
    """Median ms of two libraries on one board (from `rpc.request_board`), interleaved in one session: each of
    `runs` rounds times one call of each on the board's own timer (time_evaluator), the board's load shared."""
    from edgecompact import rpc as ec_rpc

    session = ec_rpc.connect_board(board)
    dev = session.device(device_type, 0)
    timers = []
    for lib in (lib_a, lib_b):
        session.upload(str(lib))
        vm = relax.VirtualMachine(session.load_module(Path(lib).name), dev)
        inp = tvm.runtime.tensor(x, dev)
        vm["main"](inp)  # warm-up: first-call allocation and caches
        timers.append((vm.time_evaluator("main", dev, number=1, repeat=1), inp))
    a, b = [], []
    for _ in range(runs):
        for out, (timer, inp) in zip((a, b), timers, strict=True):
            out.append(float(timer(inp).results[0]) * 1e3)
    return float(np.median(a)), float(np.median(b))


def time_torch_pair(model_a: nn.Module, model_b: nn.Module, x: np.ndarray,
                    runs: int = MIN_RUNS) -> tuple[float, float]:
    """torch eager median ms of two models on the same input, interleaved (no_grad, eval)."""
    xt = torch.from_numpy(x)
    a, b = model_a.eval(), model_b.eval()
    with torch.no_grad():
        return paired_median_ms(lambda: a(xt), lambda: b(xt), runs)
