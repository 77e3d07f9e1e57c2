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
import sys
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
from edgecompact.cpu import host_cpu
from edgecompact.deploy import onnx as eonnx
from edgecompact.deploy.tvm import compile_relax, export_library, time_executable, tvm_target
from edgecompact.errors import ConfigError, DeployError, UserError
from edgecompact.storage import exclusive
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
RPC_TRIES = 3  # attempts per grid point when servers die under it
RPC_JOB_TIMEOUT_S = 120.0  # longest a board may take to accept a session and time one point

Grid = dict[LayerKey, tuple[list[int], list[int]]]
OnMeasure = Callable[[LayerKey, int, int, float], None]
# runs(n) -> the ms of each of n back-to-back single runs
Runs = Callable[[int], list[float]]


def layer_module(key: LayerKey, c_in: int, c_out: int) -> tuple[tvm.IRModule, list[np.ndarray], list[np.ndarray]]:
    """(the Relax module of one layer at (c_in, c_out), its input [activation], its random [weight, bias]).

    The weight and bias are bound as constants, as in a whole model imported from ONNX, so the compile path
    prepacks them exactly as it does there; `main` takes the activation alone.

    A conv is conv2d + bias + ReLU and a linear layer matmul + bias, as they appear after ONNX export with
    BatchNorm folded; the default pipeline fuses the epilogue into the conv, as it does in a whole model.
    A depthwise or grouped conv has the groups and c_in that follow `c_out` (LayerKey.conv_groups and
    in_channels).
    """
    if key.precision not in DTYPES:
        raise ConfigError(f"precision '{key.precision}': profiling supports {', '.join(DTYPES)} only")
    dtype = DTYPES[key.precision]
    bb = relax.BlockBuilder()
    if key.op == "linear":
        shapes = [(1, c_in), (c_out, c_in), (c_out,)]
    else:
        c_in, groups = key.in_channels(c_in, c_out), key.conv_groups(c_out)
        shapes = [(1, c_in, *key.in_hw), (c_out, c_in // groups, *key.kernel), (c_out,)]
    x, w, b = (relax.Var(n, relax.TensorType(s, dtype)) for n, s in zip("xwb", shapes))
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            if key.op == "linear":
                y = bb.emit(relax.op.add(relax.op.matmul(x, relax.op.permute_dims(w)), b))
            else:
                conv = relax.op.nn.conv2d(x, w, strides=key.stride, padding=_padding(key), groups=groups)
                y = bb.emit(relax.op.nn.relu(relax.op.add(conv, relax.op.reshape(b, (1, c_out, 1, 1)))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(dtype) for s in shapes]
    mod = relax.transform.BindParams("main", {"w": arrays[1], "b": arrays[2]})(bb.get())
    return mod, arrays[:1], arrays[1:]


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
    A depthwise or grouped conv has the groups and c_in that follow `c_out` (LayerKey.conv_groups and
    in_channels).
    """
    if key.precision != "fp32":
        raise ConfigError(f"precision '{key.precision}': onnxruntime profiling supports fp32 only")
    rng = np.random.default_rng(0)
    if key.op == "linear":
        x_shape, w_shape, out_shape = (1, c_in), (c_out, c_in), (1, c_out)
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
    else:
        c_in, groups = key.in_channels(c_in, c_out), key.conv_groups(c_out)
        x_shape = (1, c_in, *key.in_hw)
        w_shape, out_shape = (c_out, c_in // groups, *key.kernel), (1, c_out, *key.out_hw)
        conv = helper.make_node(
            "Conv",
            ["x", "w", "b"],
            ["conv"],
            kernel_shape=list(key.kernel),
            strides=list(key.stride),
            pads=list(_padding(key)),
            group=groups,
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
    rpc_timeout: float = RPC_JOB_TIMEOUT_S,
    log: Callable[[str], None] | None = None,
    wait: bool = False,
) -> LatencyTable:
    """Measure every layer kind of `structure`'s search space on `target` into the table at `out_path`.

    grid: {LayerKey: (c_in axis, c_out axis)}, default `layer_grid(structure, ...)` (each group from 1/8 to
    full width). runtime: "tvm" | "onnxruntime", default `target.runtime` (what ships there). rpc: (tracker
    host, port, key) to time TVM modules on remote servers (cross-compiled here), else local. threads:
    onnxruntime intra-op threads (TVM's pool follows TVM_NUM_THREADS). tune_trials: TVM only.
    An existing `out_path` is resumed: recorded points are kept and not measured again; one measured with
    another runtime or setting is refused. `on_measure` is called after each point has been saved.
    One process at a time fills a table (a lock file beside it; a second is refused in one line, or with `wait`
    waits for the first and resumes what it wrote). Over RPC, a
    board that takes longer than `rpc_timeout` s to answer and time a point, or answers garbage, loses the job
    to another board, with a message through `log` (default: stderr).
    """
    out_path = Path(out_path)
    log = log or _stderr
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
    with exclusive(out_path, str(out_path), log, wait=wait):  # one writer per table: no entry lost to a race
        if out_path.exists():
            table = LatencyTable.load(out_path, target)
            _check_resumable(table, out_path, runtime, tune_trials, threads)
        else:
            table = _new_table(structure, target, runtime, rpc, tune_trials, threads)
        _merge(
            table, grid if grid is not None else layer_grid(structure, target.precision, target.channel_multiple)
        )
        todo = [
            (key, i, j, key.in_channels(ci, co), co)
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
                    _profile_rpc(todo, target, rpc, tune_trials, db_dir, record, out_path, rpc_timeout, log)
            elif runtime == "onnxruntime":
                for job in todo:
                    record(job, _ort_layer_ms(job[0], job[3], job[4], threads))
            else:
                for job in todo:
                    mod, args, _ = layer_module(job[0], job[3], job[4])
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
    # a local table holds this CPU's numbers: name the CPU and its ISA (vector width decides the kernels)
    where = f"over RPC (key '{rpc[2]}')" if rpc else f"local ({platform.machine()} {host_cpu().describe()})"
    common = {
        "space": structure.model_name,
        "runtime": runtime,
        "where": where,
        "statistic": STATISTIC,
        "date": datetime.date.today().isoformat(),
    }
    if rpc is None:  # this CPU's numbers: refused on any other (LatencyTable.check_cpu)
        common.update(cpu=host_cpu().describe(), cpu_key=host_cpu().key)
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
    table_path: Path,
    job_timeout: float,
    log: Callable[[str], None],
) -> None:
    """Spread jobs over every server under the key: one thread per server, one session per job, compiles
    serialized here, results recorded (and saved) by the calling thread as they come.

    A job whose board fails (it died, answered garbage, or did not answer and time the point within
    `job_timeout` s) goes back to the queue and so to another board: the tracker hands a board out once per
    session, and a hung one never comes back. A thread stuck on a hung board is abandoned (TVM's handshake
    cannot be interrupted) and replaced. When the tracker goes away, the jobs on boards finish and are saved,
    then the run stops with the count of saved points."""
    host, port, key = rpc
    tracker = (host, port)
    n_servers = ec_rpc.servers_under_key(tracker, key)
    if n_servers == 0:
        raise ConfigError(f"--key: no RPC server is registered under key '{key}' at tracker {host}:{port}")
    jobs: queue.Queue = queue.Queue()  # (job, tries); None wakes a worker to stop
    for job in todo:
        jobs.put((job, 0))
    events: queue.Queue = queue.Queue()  # (worker, kind, job, tries, value)
    compile_lock = threading.Lock()
    stop = threading.Event()
    device_type = tvm_target(target).get_target_device_type()

    def worker(wid: int) -> None:
        with tempfile.TemporaryDirectory(prefix="edgecompact-rpc-") as tmp:
            # an abandoned worker whose board finally answered must not take a job nobody would wait for
            while not stop.is_set() and wid not in abandoned and (item := jobs.get()) is not None:
                job, tries = item
                try:
                    lib = Path(tmp) / f"layer{wid}.so"
                    with compile_lock:  # Relax's BlockBuilder stack is process-wide: one builder at a time
                        mod, args, _ = layer_module(job[0], job[3], job[4])
                        ex = compile_relax(mod, target, tune_trials=tune_trials, db_dir=db_dir)
                        export_library(ex, lib, target)
                    board = ec_rpc.request_board(tracker, key, ec_rpc.REQUEST_TIMEOUT_S)
                except Exception as e:  # noqa: BLE001 -- a compile failure, no free board, no tracker: the end
                    events.put((wid, "fatal", job, tries, e))
                    return
                events.put((wid, "start", job, tries, board))
                try:
                    ms = _timed_remote(board, lib, args, device_type)
                except Exception as e:  # noqa: BLE001 -- the board died, dropped the session or spoke garbage
                    events.put((wid, "failed", job, tries, e))
                    continue
                events.put((wid, "done", job, tries, ms))

    n_workers = 0
    abandoned: set[int] = set()

    def start_worker() -> None:
        nonlocal n_workers
        threading.Thread(target=worker, args=(n_workers,), daemon=True).start()
        n_workers += 1

    for _ in range(n_servers):
        start_worker()
    running: dict[int, tuple[tuple, int, tuple[str, int, str], float]] = {}  # worker -> (job, tries, board, t0)
    remaining, fatal = len(todo), None

    def retry(job: tuple, tries: int, board: tuple[str, int, str], why: str) -> Exception | None:
        """Send the job to another board, or the error that ends the run when it has failed RPC_TRIES times."""
        where = f"layer {job[0]} ({job[3]}, {job[4]})"
        if tries + 1 >= RPC_TRIES:
            return DeployError(f"RPC: {where} failed {RPC_TRIES} times; last: board {board[0]}:{board[1]} {why}")
        log(f"RPC: board {board[0]}:{board[1]} {why}; {where} goes to another board")
        jobs.put((job, tries + 1))
        return None

    try:
        while remaining and (fatal is None or running):  # after a fatal error, jobs on boards still finish
            try:
                wid, kind, job, tries, value = events.get(timeout=0.2)
            except queue.Empty:
                kind = None
            if kind == "start" and wid not in abandoned:
                running[wid] = (job, tries, value, time.monotonic())
            elif kind is not None and wid not in abandoned:
                board = running.pop(wid, (job, tries, ("?", 0, ""), 0.0))[2]
                if kind == "done":
                    record(job, value)
                    remaining -= 1
                elif fatal is None:
                    fatal = value if kind == "fatal" else retry(
                        job, tries, board, f"failed ({type(value).__name__}: {_first_line(value)})"
                    )
            for wid, (job, tries, board, t0) in list(running.items()):
                if time.monotonic() - t0 > job_timeout:
                    del running[wid]
                    abandoned.add(wid)  # stuck in TVM's handshake or a remote call: left behind, replaced
                    if fatal is None:
                        fatal = retry(job, tries, board, f"did not answer within {job_timeout:g} s")
                        start_worker()
            if fatal is not None:
                stop.set()
    finally:
        stop.set()
        for _ in range(n_workers):
            jobs.put(None)
    if fatal is None:
        return
    if not isinstance(fatal, UserError):
        raise fatal
    entries = LatencyTable.load(table_path).entries.values()
    saved = sum(v is not None for e in entries for row in e.ms for v in row)
    raise type(fatal)(
        f"{_first_line(fatal)}; the {saved} points measured so far are saved in {table_path}: "
        "re-run the same command to resume"
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _timed_remote(board: tuple[str, int, str], lib: Path, args: list[np.ndarray], device_type: int) -> float:
    """Upload `lib` to `board` and time it there. Every remote handle is local to this call, so the session
    ends (and the server returns to the tracker) when it returns."""
    session = ec_rpc.connect_board(board)
    session.upload(str(lib))
    return timed_ms(tvm_runs(session.load_module(lib.name), args, session.device(device_type)))


def _stderr(msg: str) -> None:
    tqdm.write(f"[edgecompact] {msg}", file=sys.stderr)
