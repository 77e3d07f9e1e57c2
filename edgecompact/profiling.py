"""Build a target's LatencyTable by timing each layer kind of a search space with TVM, locally or over RPC.

Each grid point is one small Relax module (the layer with its fused bias + ReLU epilogue) compiled by
`edgecompact.deploy.tvm.compile_relax`, the path deploy ships, so the table describes shipped code. The table
is rewritten atomically after every measurement; a re-run resumes and never repeats a recorded point. This
module measures; predicting from a table is edgecompact.cost.latency's job.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import queue
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tqdm import tqdm
from tvm import relax

from edgecompact import rpc as ec_rpc
from edgecompact.cost.latency import Entry, LatencyTable, LayerKey, layer_grid
from edgecompact.deploy.tvm import compile_relax, export_library, time_executable, tvm_target
from edgecompact.errors import ConfigError, DeployError
from edgecompact.structure import Structure
from edgecompact.targets import Target

DTYPES = {"fp32": "float32", "fp16": "float16"}
# Each grid point keeps the fastest of REPEAT repeats (each averaging runs for >= MIN_REPEAT_MS): on a CPU
# shared with other jobs the median drifts with their load (2-3x here); the minimum is the uncontended time.
REPEAT = 10
MIN_REPEAT_MS = 10.0
# Untuned (TVM's default CPU pipeline: naive conv loops). Tuning is per grid point (~150 s for 16 trials
# of one layer here), so a tuned ResNet-32 table (185 points) would take about 8 hours on 2 cores.
DEFAULT_TUNE_TRIALS = 0
RPC_TIMEOUT_S = 60.0  # longest wait for a free server before a job is given up
RPC_TRIES = 3  # attempts per grid point when servers die under it

Grid = dict[LayerKey, tuple[list[int], list[int]]]
OnMeasure = Callable[[LayerKey, int, int, float], None]


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


def _timed_ms(runtime_module: Any, args: list[np.ndarray], device: Any = None) -> float:
    """Fastest of REPEAT repeats, each averaging enough runs (MIN_REPEAT_MS) to dwarf timer overhead."""
    first = time_executable(runtime_module, args, number=1, repeat=1, device=device)[0]
    number = max(1, min(1000, math.ceil(MIN_REPEAT_MS / max(first, 1e-3))))
    return min(time_executable(runtime_module, args, number=number, repeat=REPEAT, device=device))


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
    tune_trials: int = DEFAULT_TUNE_TRIALS,
    db_dir: Path | None = None,
    on_measure: OnMeasure | None = None,
    progress: bool = True,
) -> LatencyTable:
    """Measure every layer kind of `structure`'s search space on `target` into the table at `out_path`.

    grid: {LayerKey: (c_in axis, c_out axis)}, default `layer_grid(structure, ...)` (each group from 1/8 to
    full width). rpc: (tracker host, port, key) to time on remote servers (cross-compiled here), else local.
    An existing `out_path` is resumed: recorded points are kept and not measured again. `on_measure` is called
    after each point has been saved.
    """
    out_path = Path(out_path)
    if rpc is None and not target.runnable_here:
        raise ConfigError(
            f"target '{target.name}' does not run on this machine; profile it with --rpc HOST:PORT"
        )
    if tune_trials < 0:
        raise ConfigError(f"--tune-trials must be >= 0, got {tune_trials}")
    if out_path.exists():
        table = LatencyTable.load(out_path, target)
        if table.is_estimate:
            raise ConfigError(
                f"{out_path}: holds a roofline estimate, not measurements; choose another --out"
            )
        if table.provenance.get("tune_trials") != tune_trials:
            raise ConfigError(
                f"{out_path}: measured with tune_trials={table.provenance.get('tune_trials')}, "
                f"not {tune_trials}; use the same setting or another --out"
            )
    else:
        where = (
            f"over RPC (key '{rpc[2]}')" if rpc else f"local ({platform.processor() or platform.machine()})"
        )
        table = LatencyTable.new(
            target,
            "measured",
            space=structure.model_name,
            tvm_version=tvm.__version__,
            tvm_target=str(tvm_target(target)),
            tuned=tune_trials > 0,
            tune_trials=tune_trials,
            runtime=f"TVM Relax VM, {where}",
            threads=os.environ.get("TVM_NUM_THREADS", "TVM default (all cores)"),
            layer="conv2d + bias + ReLU (fused) | matmul + bias",
            statistic=f"min of {REPEAT} repeats of >= {MIN_REPEAT_MS:g} ms",
            date=datetime.date.today().isoformat(),
        )
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
        desc=f"profile {target.name}",
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
        if rpc is None:
            for job in todo:
                mod, args = layer_module(job[0], job[3], job[4])
                record(
                    job, _timed_ms(compile_relax(mod, target, tune_trials=tune_trials, db_dir=db_dir), args)
                )
        elif todo:
            _profile_rpc(todo, target, rpc, tune_trials, db_dir, record)
    finally:
        bar.close()
    return table


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
    return _timed_ms(session.load_module(lib.name), args, session.device(device_type))
