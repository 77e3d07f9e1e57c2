"""Build a target's LatencyTable by timing each layer kind of a search space, locally or over RPC.

A table measures the runtime the target ships (`Target.runtime`), so its predictions describe shipped code:
- "tvm": each grid point is one small Relax module (the layer with its fused bias + ReLU epilogue) compiled by
  `edgecompact.deploy.tvm.compile_relax`, the path deploy ships; locally or on boards over TVM RPC.
- "onnxruntime": each grid point is a one-node ONNX graph (Conv + bias [+ Relu], or Gemm) run by an
  onnxruntime CPU session configured as the deploy bench's (`edgecompact.deploy.onnx.session`); local only.
Both use one statistic (`timed_ms`). The table is rewritten atomically after every measurement; a re-run
resumes and never repeats a recorded point, and refuses a table measured with another runtime or setting.
This module measures; predicting from a table is edgecompact.cost.latency's job.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import queue
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import tvm
from onnx import TensorProto, helper
from tqdm import tqdm
from tvm import relax

from edgecompact import rpc as ec_rpc
from edgecompact.cost.latency import Entry, LatencyTable, LayerKey, layer_grid
from edgecompact.deploy import onnx as eonnx
from edgecompact.deploy.tvm import compile_relax, export_library, time_executable, tvm_target
from edgecompact.errors import ConfigError, DeployError
from edgecompact.structure import Structure
from edgecompact.targets import RUNTIMES, Target

DTYPES = {"fp32": "float32", "fp16": "float16"}
# The tables' statistic (`timed_ms`): single runs in REPEAT groups, each group spanning >= MIN_GROUP_MS (and
# >= MIN_GROUP_RUNS runs); the minimum over groups of each group's median. On a CPU shared with other jobs a
# mean drifts with their load (2-3x here); a group's median drops the runs they preempted, and the fastest
# group is the least contended stretch of time.
REPEAT = 20
MIN_GROUP_MS = 10.0
MIN_GROUP_RUNS = 5
STATISTIC = (
    f"min over {REPEAT} groups (each >= {MIN_GROUP_MS:g} ms, >= {MIN_GROUP_RUNS} runs) of the median run"
)
# Untuned (TVM's default CPU pipeline: naive conv loops). Tuning is per grid point (~150 s for 16 trials
# of one layer here), so a tuned ResNet-32 table (185 points) would take about 8 hours on 2 cores.
DEFAULT_TUNE_TRIALS = 0
RPC_TIMEOUT_S = 60.0  # longest wait for a free server before a job is given up
RPC_TRIES = 3  # attempts per grid point when servers die under it

Grid = dict[LayerKey, tuple[list[int], list[int]]]
OnMeasure = Callable[[LayerKey, int, int, float], None]
# runs(n) -> the ms of each of n back-to-back single runs
Runs = Callable[[int], list[float]]


def layer_module(key: LayerKey, c_in: int, c_out: int) -> tuple[tvm.IRModule, list[np.ndarray]]:
    """The Relax module of one layer at (c_in, c_out) and random inputs for it (activation, weight, bias).

    A conv is conv2d + bias + ReLU and a linear layer matmul + bias, as they appear after ONNX export with
    BatchNorm folded; the default pipeline fuses the epilogue into the conv, as it does in a whole model.
    """
    if key.precision not in DTYPES:
        raise ConfigError(f"precision '{key.precision}': profiling supports {', '.join(DTYPES)} only")
    dtype = DTYPES[key.precision]
    bb = relax.BlockBuilder()
    if key.op == "linear":
        shapes = [(1, c_in), (c_out, c_in), (c_out,)]
    else:
        c_in = c_out if key.depthwise else c_in
        shapes = [(1, c_in, *key.in_hw), (c_out, 1 if key.depthwise else c_in, *key.kernel), (c_out,)]
    x, w, b = (relax.Var(n, relax.TensorType(s, dtype)) for n, s in zip("xwb", shapes))
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            if key.op == "linear":
                y = bb.emit(relax.op.add(relax.op.matmul(x, relax.op.permute_dims(w)), b))
            else:
                conv = relax.op.nn.conv2d(
                    x, w, strides=key.stride, padding=_padding(key), groups=c_out if key.depthwise else 1
                )
                y = bb.emit(relax.op.nn.relu(relax.op.add(conv, relax.op.reshape(b, (1, c_out, 1, 1)))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    rng = np.random.default_rng(0)
    return bb.get(), [rng.standard_normal(s).astype(dtype) for s in shapes]


def _padding(key: LayerKey) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) padding mapping in_hw to out_hw: PyTorch's symmetric k // 2 when it fits."""
    pads = []
    for i, o, k, s in zip(key.in_hw, key.out_hw, key.kernel, key.stride):
        if (i + 2 * (k // 2) - k) // s + 1 == o:
            pads.append((k // 2, k // 2))
        else:
            total = max(0, (o - 1) * s + k - i)
            pads.append((total // 2, total - total // 2))
    return pads[0][0], pads[1][0], pads[0][1], pads[1][1]


def onnx_layer_model(key: LayerKey, c_in: int, c_out: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The one-layer ONNX graph of `key` at (c_in, c_out) and its input feed; weights are random initializers.

    A conv is Conv (with bias) + Relu and a linear layer Gemm (transB, with bias), as they appear after ONNX
    export with BatchNorm folded; onnxruntime's graph optimizer fuses the Relu into the conv, as in a model.
    """
    if key.precision != "fp32":
        raise ConfigError(f"precision '{key.precision}': onnxruntime profiling supports fp32 only")
    rng = np.random.default_rng(0)
    if key.op == "linear":
        x_shape, w_shape, out_shape = (1, c_in), (c_out, c_in), (1, c_out)
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
    else:
        c_in = c_out if key.depthwise else c_in
        x_shape = (1, c_in, *key.in_hw)
        w_shape, out_shape = (c_out, 1 if key.depthwise else c_in, *key.kernel), (1, c_out, *key.out_hw)
        conv = helper.make_node(
            "Conv",
            ["x", "w", "b"],
            ["conv"],
            kernel_shape=list(key.kernel),
            strides=list(key.stride),
            pads=list(_padding(key)),
            group=c_out if key.depthwise else 1,
        )
        nodes = [conv, helper.make_node("Relu", ["conv"], ["y"])]
    weights = [
        onnx.numpy_helper.from_array(rng.standard_normal(w_shape).astype(np.float32), "w"),
        onnx.numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "b"),
    ]
    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", eonnx.OPSET)], ir_version=8)
    onnx.checker.check_model(model)
    return model, {"x": rng.standard_normal(x_shape).astype(np.float32)}


def timed_ms(runs: Runs) -> float:
    """The tables' statistic (STATISTIC) of whatever `runs(n)` runs and times n times, one by one."""
    first = min(runs(3))
    size = max(MIN_GROUP_RUNS, min(1000, math.ceil(MIN_GROUP_MS / max(first, 1e-3))))
    runs(size)  # warm-up: caches, allocator arenas, CPU frequency
    return min(statistics.median(runs(size)) for _ in range(REPEAT))


def ort_runs(sess: onnxruntime.InferenceSession, feeds: dict[str, np.ndarray]) -> Runs:
    """`timed_ms`'s runner for an onnxruntime session."""

    def runs(n: int) -> list[float]:
        out = []
        for _ in range(n):
            start = time.perf_counter()
            sess.run(None, feeds)
            out.append((time.perf_counter() - start) * 1e3)
        return out

    return runs


def time_onnx(path: Path, feeds: dict[str, np.ndarray], threads: int = 1) -> float:
    """`timed_ms` of the ONNX file at `path` in a deploy-configured session with `threads` intra-op threads."""
    return timed_ms(ort_runs(eonnx.session(path, threads), feeds))


def tvm_runs(runtime_module: Any, args: list[np.ndarray], device: Any = None) -> Runs:
    """`timed_ms`'s runner for a compiled Relax module (TVM's time_evaluator, one run per value)."""
    return lambda n: time_executable(runtime_module, args, number=1, repeat=n, device=device)


def _ort_layer_ms(key: LayerKey, c_in: int, c_out: int, threads: int) -> float:
    model, feeds = onnx_layer_model(key, c_in, c_out)
    with tempfile.TemporaryDirectory(prefix="edgecompact-ort-") as tmp:
        path = Path(tmp) / "layer.onnx"
        onnx.save(model, str(path))
        return time_onnx(path, feeds, threads)


def _merge(table: LatencyTable, grid: Grid) -> None:
    """Give `table` an entry for every grid key, keeping each measured point whose widths are on the grid."""
    for key, (c_in, c_out) in grid.items():
        old = table.entries.get(key)
        if old is not None:
            c_in, c_out = sorted(set(c_in) | set(old.c_in)), sorted(set(c_out) | set(old.c_out))
            if c_in == old.c_in and c_out == old.c_out:
                continue
        new = Entry.empty(c_in, c_out)
        if old is not None:
            known = {(ci, co): old.ms[i][j] for i, j, ci, co in old.points()}
            for i, j, ci, co in new.points():
                new.ms[i][j] = known.get((ci, co))
        table.entries[key] = new


def profile(
    structure: Structure,
    target: Target,
    out_path: Path,
    *,
    grid: Grid | None = None,
    rpc: tuple[str, int, str] | None = None,
    runtime: str | None = None,
    threads: int = 1,
    tune_trials: int = DEFAULT_TUNE_TRIALS,
    db_dir: Path | None = None,
    on_measure: OnMeasure | None = None,
    progress: bool = True,
) -> LatencyTable:
    """Measure every layer kind of `structure`'s search space on `target` into the table at `out_path`.

    grid: {LayerKey: (c_in axis, c_out axis)}, default `layer_grid(structure, ...)` (each group from 1/8 to
    full width). runtime: "tvm" | "onnxruntime", default `target.runtime` (what ships there). rpc: (tracker
    host, port, key) to time TVM modules on remote servers (cross-compiled here), else local. threads:
    onnxruntime intra-op threads (TVM's pool follows TVM_NUM_THREADS). tune_trials: TVM only.
    An existing `out_path` is resumed: recorded points are kept and not measured again; one measured with
    another runtime or setting is refused. `on_measure` is called after each point has been saved.
    """
    out_path = Path(out_path)
    runtime = runtime or target.runtime
    if runtime not in RUNTIMES:
        raise ConfigError(f"--runtime: must be one of {', '.join(RUNTIMES)}, got '{runtime}'")
    if runtime == "onnxruntime" and rpc is not None:
        raise ConfigError("--rpc: RPC profiling times TVM modules only; profile onnxruntime tables locally")
    if rpc is None and not target.runnable_here:
        raise ConfigError(
            f"target '{target.name}' does not run on this machine; profile it with --rpc HOST:PORT"
        )
    if tune_trials < 0:
        raise ConfigError(f"--tune-trials must be >= 0, got {tune_trials}")
    if runtime == "onnxruntime" and tune_trials:
        raise ConfigError(f"--tune-trials {tune_trials}: tuning applies to TVM tables, not onnxruntime ones")
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    if out_path.exists():
        table = LatencyTable.load(out_path, target)
        _check_resumable(table, out_path, runtime, tune_trials, threads)
    else:
        table = _new_table(structure, target, runtime, rpc, tune_trials, threads)
    _merge(
        table, grid if grid is not None else layer_grid(structure, target.precision, target.channel_multiple)
    )
    todo = [
        (key, i, j, ci, co)
        for key, e in table.entries.items()
        for i, j, ci, co in e.points()
        if e.ms[i][j] is None
    ]
    total = sum(len(e.points()) for e in table.entries.values())
    table.save(out_path)
    bar = tqdm(
        total=total,
        initial=total - len(todo),
        desc=f"profile {target.name} ({runtime})",
        unit="layer",
        disable=not progress,
    )

    def record(job: tuple[LayerKey, int, int, int, int], ms: float) -> None:
        key, i, j, ci, co = job
        table.entries[key].ms[i][j] = ms
        table.provenance["updated"] = datetime.datetime.now().isoformat(timespec="seconds")
        table.save(out_path)
        bar.update(1)
        if on_measure is not None:
            on_measure(key, ci, co, ms)

    try:
        if rpc is not None:
            if todo:
                _profile_rpc(todo, target, rpc, tune_trials, db_dir, record)
        elif runtime == "onnxruntime":
            for job in todo:
                record(job, _ort_layer_ms(job[0], job[3], job[4], threads))
        else:
            for job in todo:
                mod, args = layer_module(job[0], job[3], job[4])
                ex = compile_relax(mod, target, tune_trials=tune_trials, db_dir=db_dir)
                record(job, timed_ms(tvm_runs(ex, args)))
    finally:
        bar.close()
    return table


def _new_table(
    structure: Structure,
    target: Target,
    runtime: str,
    rpc: tuple[str, int, str] | None,
    tune_trials: int,
    threads: int,
) -> LatencyTable:
    where = f"over RPC (key '{rpc[2]}')" if rpc else f"local ({platform.processor() or platform.machine()})"
    common = {
        "space": structure.model_name,
        "runtime": runtime,
        "where": where,
        "statistic": STATISTIC,
        "date": datetime.date.today().isoformat(),
    }
    if runtime == "onnxruntime":
        return LatencyTable.new(
            target,
            "measured",
            **common,
            onnxruntime_version=onnxruntime.__version__,
            session="CPUExecutionProvider, graph optimizations ORT_ENABLE_ALL (default), sequential, "
            "1 inter-op thread (edgecompact.deploy.onnx.session)",
            threads=threads,
            layer="Conv + bias + Relu (fused by onnxruntime) | Gemm (transB) + bias",
        )
    return LatencyTable.new(
        target,
        "measured",
        **common,
        tvm_version=tvm.__version__,
        tvm_target=str(tvm_target(target)),
        tuned=tune_trials > 0,
        tune_trials=tune_trials,
        threads=os.environ.get("TVM_NUM_THREADS", "TVM default (all cores)"),
        layer="conv2d + bias + ReLU (fused) | matmul + bias",
    )


def _check_resumable(table: LatencyTable, path: Path, runtime: str, tune_trials: int, threads: int) -> None:
    """A table is only resumed with the runtime and settings it was measured with (never mixed)."""
    if table.is_estimate:
        raise ConfigError(f"{path}: holds a roofline estimate, not measurements; choose another --out")
    if table.runtime != runtime:
        raise ConfigError(
            f"{path}: measured with {table.runtime}, not {runtime}; a table never mixes runtimes: "
            "use another --out"
        )
    if table.provenance.get("statistic") != STATISTIC:
        raise ConfigError(
            f"{path}: timed with another statistic ({table.provenance.get('statistic')}); use another --out"
        )
    if runtime == "onnxruntime" and table.provenance.get("threads") != threads:
        raise ConfigError(
            f"{path}: measured with {table.provenance.get('threads')} onnxruntime thread(s), not {threads}; "
            "use the same setting or another --out"
        )
    if runtime == "tvm" and table.provenance.get("tune_trials") != tune_trials:
        raise ConfigError(
            f"{path}: measured with tune_trials={table.provenance.get('tune_trials')}, "
            f"not {tune_trials}; use the same setting or another --out"
        )


def _profile_rpc(
    todo: list[tuple],
    target: Target,
    rpc: tuple[str, int, str],
    tune_trials: int,
    db_dir: Path | None,
    record: Callable[[tuple, float], None],
) -> None:
    """Spread jobs over every server under the key: one thread per server, one session per job (so a dead
    server only costs a retry), compiles serialized here, results recorded by the calling thread."""
    host, port, key = rpc
    n_servers = ec_rpc.servers_under_key((host, port), key)
    if n_servers == 0:
        raise ConfigError(f"--key: no RPC server is registered under key '{key}' at tracker {host}:{port}")
    jobs: queue.Queue = queue.Queue()
    for job in todo:
        jobs.put((job, 0))
    results: queue.Queue = queue.Queue()
    compile_lock = threading.Lock()
    stop = threading.Event()
    device_type = tvm_target(target).get_target_device_type()

    def worker() -> None:
        with tempfile.TemporaryDirectory(prefix="edgecompact-rpc-") as tmp:
            while not stop.is_set():
                try:
                    job, tries = jobs.get_nowait()
                except queue.Empty:
                    return
                try:
                    lib = Path(tmp) / f"layer{threading.get_ident()}.so"
                    with compile_lock:  # Relax's BlockBuilder stack is process-wide: one builder at a time
                        mod, args = layer_module(job[0], job[3], job[4])
                        ex = compile_relax(mod, target, tune_trials=tune_trials, db_dir=db_dir)
                        export_library(ex, lib, target)
                except Exception as e:  # noqa: BLE001 -- a compile failure ends the run, reported by the caller
                    results.put((job, e))
                    return
                try:
                    ms = _timed_remote((host, port), key, lib, args, device_type)
                except DeployError as e:
                    results.put((job, e))
                    return
                except Exception as e:  # noqa: BLE001 -- the server died or dropped the session: retry elsewhere
                    if tries + 1 >= RPC_TRIES:
                        results.put(
                            (
                                job,
                                DeployError(
                                    f"RPC: layer {job[0]} ({job[3]}, {job[4]}) failed "
                                    f"{RPC_TRIES} times; last: {type(e).__name__}: {e}"
                                ),
                            )
                        )
                        return
                    jobs.put((job, tries + 1))
                    continue
                results.put((job, ms))

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(n_servers)]
    for t in threads:
        t.start()
    try:
        for _ in range(len(todo)):
            job, value = results.get()
            if isinstance(value, Exception):
                raise value
            record(job, value)
    finally:
        stop.set()


def _timed_remote(
    tracker: tuple[str, int], key: str, lib: Path, args: list[np.ndarray], device_type: int
) -> float:
    """Upload `lib` to a free server under `key` and time it there. Every remote handle is local to this call,
    so the session ends (and the server returns to the tracker) when it returns."""
    session = ec_rpc.request_session(tracker, key, RPC_TIMEOUT_S)
    session.upload(str(lib))
    return timed_ms(tvm_runs(session.load_module(lib.name), args, session.device(device_type)))
